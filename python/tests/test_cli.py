"""The `prelu` command that `pip install ./python` installs: the Rust
binary's command line inside the extension, with the same output."""

import json
import os
import subprocess

import pytest

from test_torch_report import installed_command


def command():
    path = installed_command()
    if path is None:
        pytest.skip("the package's `prelu` command is not installed beside this Python")
    return path


def run(exe, *args):
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=300)


def test_the_installed_command_trains_diagnoses_and_reports(tmp_path):
    exe = command()
    out = run(exe, "--threads", "1", "train", "--hidden", "16", "--epochs", "1", "--train-limit", "300",
              "--test-limit", "100", "--log-every", "0", "--out", str(tmp_path / "run"), "--json")
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert summary["epochs"] == 1 and 0 <= summary["test_acc"] <= 1
    d = run(exe, "--threads", "1", "diagnose", str(tmp_path / "run"), "--json")
    assert d.returncode == 0, d.stderr
    layers = json.loads(d.stdout)["layers"]
    assert [l["layer"] for l in layers] and all(0 <= l["negative_share"] <= 1 for l in layers)
    r = run(exe, "report", str(tmp_path / "run"), "-o", str(tmp_path / "r.html"))
    assert r.returncode == 0, r.stderr
    assert "<svg" in (tmp_path / "r.html").read_text(encoding="utf-8")
    # The binary built by cargo, when given, prints the same numbers.
    binary = os.environ.get("PRELU_BIN")
    if binary:
        same = run(binary, "--threads", "1", "diagnose", str(tmp_path / "run"), "--json")
        assert json.loads(same.stdout) == json.loads(d.stdout)


def test_usage_errors_help_and_json_errors_as_the_binary():
    exe = command()
    v = run(exe, "--version")
    assert v.returncode == 0 and v.stdout.startswith("prelu ")
    h = run(exe, "diagnose", "--help")
    assert h.returncode == 0 and "Usage: prelu diagnose" in h.stdout
    bad = run(exe, "no-such-command")
    assert bad.returncode == 2 and "no-such-command" in bad.stderr
    missing = run(exe, "diagnose", "/no/such/model", "--json")
    assert missing.returncode == 1
    assert "cannot read /no/such/model" in json.loads(missing.stdout)["error"]["message"]


def test_a_closed_pipe_ends_the_command_quietly():
    exe = command()
    p = subprocess.run(f"'{exe}' --help | head -1", shell=True, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and "Traceback" not in p.stderr and "panicked" not in p.stderr
    assert p.stdout.strip()
