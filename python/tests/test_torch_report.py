"""A run folder written by prelu.torch.Sentinel renders with `prelu report`.

The command is the one this package installs (beside the Python running
the tests), else $PRELU_BIN (e.g. target/release/prelu from `cargo build
--release`), else `prelu` on PATH."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from torch import nn

import prelu.torch as pt


def installed_command():
    """The `prelu` command pip installed beside this Python, if it is there."""
    path = os.path.join(os.path.dirname(sys.executable), "prelu")
    return path if os.access(path, os.X_OK) else None


def prelu_bin():
    """The prelu command, or skip."""
    path = installed_command() or os.environ.get("PRELU_BIN") or shutil.which("prelu")
    if not path:
        pytest.skip("no prelu command: pip install ./python, set PRELU_BIN or put `prelu` on PATH")
    if not os.access(path, os.X_OK):
        pytest.fail(f"PRELU_BIN={path} is not an executable file")
    return path


def report(run_dir):
    """Runs `prelu report RUN --json`; returns its summary and the page."""
    out = subprocess.run(
        [prelu_bin(), "report", str(run_dir), "--json"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    with open(summary["out"], encoding="utf-8") as f:
        return summary, f.read()


def net():
    """A small PReLU CNN for 1x12x12 inputs, He-initialised for its slopes."""
    torch.manual_seed(0)
    m = nn.Sequential(
        nn.Conv2d(1, 8, 3),
        nn.BatchNorm2d(8),
        nn.PReLU(8),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(8 * 5 * 5, 32),
        nn.PReLU(),
        nn.Linear(32, 32),
        nn.ReLU(),
        nn.Linear(32, 10),
    )
    return pt.init_he_prelu_(m)


def test_twenty_training_steps_render(tmp_path):
    m = net()
    opt = torch.optim.AdamW(pt.param_groups(m, 1e-4), lr=1e-2)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(160, 1, 12, 12, generator=g), torch.randint(0, 10, (160,), generator=g)
    xt, yt = torch.randn(64, 1, 12, 12, generator=g), torch.randint(0, 10, (64,), generator=g)
    s = pt.Sentinel(m, tmp_path, optimizer=opt, config={"epochs": 2, "batch_size": 16})
    for epoch in (1, 2):
        m.train()
        loss_sum, correct = 0.0, 0
        for i in range(10):
            xb, yb = x[i * 16 : (i + 1) * 16], y[i * 16 : (i + 1) * 16]
            out = m(xb)
            loss = nn.functional.cross_entropy(out, yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            pt.clamp_slopes_(m, 0.0)
            loss_sum += loss.item()
            correct += (out.argmax(1) == yb).sum().item()
        m.eval()
        with torch.no_grad():
            out = m(xt)
            test_loss = nn.functional.cross_entropy(out, yt).item()
            test_acc = (out.argmax(1) == yt).float().mean().item()
        s.epoch_end(epoch, train_loss=loss_sum / 10, train_acc=correct / 160, test_loss=test_loss, test_acc=test_acc)
    s.close()
    summary, page = report(tmp_path)
    assert summary["epochs"] == 2 and summary["runs"] == 1
    assert summary["final_test_acc"] == pytest.approx(test_acc)
    for layer in ("2 (prelu)", "6 (prelu-shared)", "8 (relu)"):
        assert f"{layer}: negative share per channel" in page
    assert "pytorch:Sequential" in page
    with open(tmp_path / "metrics.jsonl", encoding="utf-8") as f:
        kinds = [json.loads(line)["kind"] for line in f]
    assert kinds.count("epoch") == 2 and kinds.count("sentinel") == 2


def test_alarms_and_an_epoch_without_metrics_render(tmp_path):
    m = nn.Sequential(nn.Linear(4, 4), nn.PReLU(4))
    with torch.no_grad():
        m[0].bias.fill_(-100.0)
        m[1].weight.copy_(torch.tensor([0.25, -0.5, 0.0, 0.001]))
    s = pt.Sentinel(m, tmp_path)
    m(torch.randn(8, 4)).sum().backward()
    s.epoch_end(1)
    s.close()
    summary, page = report(tmp_path)
    assert summary["alarms"] == 2
    assert "dead-units" in page and "non-positive-slope" in page


def test_prelus_config_reader_accepts_the_config_and_resume_leaves_the_run_alone(tmp_path):
    m = net()
    opt = torch.optim.SGD(pt.param_groups(m, 1e-4), lr=0.1, momentum=0.9)
    s = pt.Sentinel(m, tmp_path, optimizer=opt, config={"epochs": 1, "batch_size": 16, "seed": 3})
    m(torch.randn(16, 1, 12, 12))
    s.epoch_end(1)
    s.close()
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    out = subprocess.run(
        [prelu_bin(), "train", "--out", str(tmp_path), "--resume", "--epochs", "2"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    # config.toml parsed (an unknown key would be "invalid run config"); the
    # model name stops the resume before the folder is touched.
    assert out.returncode != 0
    assert "unknown model `pytorch:Sequential`" in out.stderr, out.stderr
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
