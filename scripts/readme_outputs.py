#!/usr/bin/env python3
"""Re-runs every command whose output README.md and docs/*.md show, and
rewrites (or, with --check, compares) the shown output. Standard library
only; scripts/readme_outputs.sh is the entry point (it builds the binary).

    python3 scripts/readme_outputs.py [--check] [--all] [FILE.md ...]

A shown output is a fenced code block right after a marker line

    <!-- output: OPTIONS -->

whose lines starting with `$ ` are commands (a line ending in `\\` goes on
to the next) and whose other lines are the output of the command above
them. A line `...` in an output stands for lines left out: the lines before
the first `...` are the first lines of the fresh output, those after the
last `...` its last lines, and a run of lines between two `...` is found in
the fresh output by its first line. OPTIONS, separated by spaces:

    id=NAME       other blocks can depend on this one (after=NAME)
    after=A,B     run blocks A and B first (the files they leave are used)
    all           run only with --all: needs the full data sets in
                  ../shared/data, or runs for more than about a minute
    python=M,N    run only if $PYTHON (default python3) imports M and N
                  (onnxruntime, torch); otherwise skipped and reported
    mask=time     compare timings (`12.3 s`, `456 samples/s`, the `s/run`
                  column, JSON `seconds`/`samples_per_s`) as `#`
    mask=numbers  compare every number as `#` (benchmark output, and the
                  unseeded own_model example): the shown numbers are one
                  run's, the check keeps the text and layout honest

Masked blocks are rewritten only when they differ beyond the masked
numbers, so a re-run does not churn timings. Progress lines (`...: 5/10
examples (50%), 12 s, eta 12 s`, printed every 10 s when stderr is not a
terminal) depend on the machine's speed and are always left out.

Commands run with bash in a scratch copy of the repository (its top-level
entries linked, `runs/` fresh, `../shared` linked when it exists); `/tmp/`
in a command means a scratch folder, written back as `/tmp/` in the
output. `prelu` is $PRELU, `cargo run --release -- ARGS` is `prelu ARGS`,
`cargo run --release --example NAME` is $EXAMPLES/NAME, and
`python`/`python3` is $PYTHON. stdout and stderr are shown together.
"""

import difflib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

MARKER = re.compile(r"^<!-- output(?::\s*(.*?))?\s*-->$")
FENCE = re.compile(r"^```")
SEP = "\x1e"
PROGRESS = re.compile(r"^.+: \d+/\d+ .*\(\d+%\), \d+ s(, eta \d+ s)?$")
OPTIONS = {"id", "after", "all", "python", "mask"}
MASKS = {"time", "numbers"}
TIME_PATTERNS = [
    (re.compile(r"\d+(?:\.\d+)?(?= s\b)"), "#"),
    (re.compile(r"\d+(?:\.\d+)?(?= samples/s)"), "#"),
    (re.compile(r'("\w*(?:seconds|per_s|_ms)\w*":)\s*-?[0-9.eE+-]+'), r"\1#"),
]
NUMBER = re.compile(r"\d+(?:\.\d+)?(?:e[+-]?\d+)?")
BLOCK_TIMEOUT_S = 3600

PRELUDE = r"""
exec 2>&1
cargo() {
    if [ "$1 $2 $3" = "run --release --" ]; then shift 3; prelu "$@"
    elif [ "$1 $2 $3" = "run --release --example" ]; then "$EXAMPLES/$4" "${@:5}"
    else command cargo "$@"; fi
}
python() { "$PYTHON" "$@"; }
python3() { "$PYTHON" "$@"; }
"""


class Block:
    """One marked output block: where it is, its options and its commands."""

    def __init__(self, path, start, end, options, lines):
        self.path, self.start, self.end = path, start, end
        self.options = options
        self.commands = parse_commands(lines, f"{path}:{start + 1}")
        self.name = options.get("id") or f"{path}:{start}"

    def where(self):
        return f"{self.path}:{self.start}"

    def shown(self):
        return [line for cmd, out in self.commands for line in cmd + out]


def parse_options(text, where):
    """The marker's options as a dict (flags map to True)."""
    options = {}
    for word in (text or "").split():
        key, eq, value = word.partition("=")
        if key not in OPTIONS:
            raise SystemExit(f"{where}: unknown marker option `{word}`")
        options[key] = value if eq else True
    if options.get("mask", "time") not in MASKS:
        raise SystemExit(f"{where}: mask must be one of {sorted(MASKS)}")
    return options


def parse_commands(lines, where):
    """[(command lines, output lines)] of a block's transcript."""
    commands, i = [], 0
    while i < len(lines):
        if not lines[i].startswith("$ "):
            raise SystemExit(f"{where}: output before the first `$ ` command: {lines[i]!r}")
        cmd = [lines[i]]
        while cmd[-1].endswith("\\") and i + 1 < len(lines):
            i += 1
            cmd.append(lines[i])
        i += 1
        out = []
        while i < len(lines) and not lines[i].startswith("$ "):
            out.append(lines[i])
            i += 1
        commands.append((cmd, out))
    if not commands:
        raise SystemExit(f"{where}: a marked block without commands")
    return commands


def parse_file(path):
    """The file's lines, its marked blocks, and unmarked blocks showing `$ ` commands."""
    lines = path.read_text().split("\n")
    blocks, unmarked, i, pending = [], [], 0, None
    while i < len(lines):
        m = MARKER.match(lines[i])
        if m:
            pending = (i, parse_options(m.group(1), f"{path}:{i + 1}"))
            i += 1
            continue
        if FENCE.match(lines[i]):
            j = i + 1
            while j < len(lines) and not FENCE.match(lines[j]):
                j += 1
            body = lines[i + 1 : j]
            if pending and pending[0] == i - 1:
                blocks.append(Block(str(path), i + 1, j, pending[1], body))
            elif any(line.startswith("$ ") for line in body):
                unmarked.append(f"{path}:{i + 1}")
            i = j + 1
        elif pending and pending[0] == i - 1:
            raise SystemExit(f"{path}:{i}: a marker not followed by a code block")
        else:
            i += 1
    return lines, blocks, unmarked


def mask_time(lines):
    """Timings replaced by `#` (see the module doc), whitespace collapsed."""
    out, in_table = [], False
    for line in lines:
        for pattern, repl in TIME_PATTERNS:
            line = pattern.sub(repl, line)
        if in_table and line.strip():
            line = re.sub(r"\d+(?:\.\d+)?$", "#", line.rstrip())
        else:
            in_table = False
        if line.rstrip().endswith("s/run"):
            in_table = True
        out.append(" ".join(line.split()))
    return out


def masked(lines, mask):
    if mask == "numbers":
        return [" ".join(NUMBER.sub("#", line).split()) for line in lines]
    if mask == "time":
        return mask_time(lines)
    return lines


def fit(shown, fresh, mask):
    """The fresh output cut as the shown one is (`...`), or None with why not."""
    if "..." not in shown:
        return fresh, None
    parts, cur = [], []
    for line in shown:
        if line == "...":
            parts.append(cur)
            cur = []
        else:
            cur.append(line)
    parts.append(cur)
    head, middles, tail = parts[0], parts[1:-1], parts[-1]
    out, pos = fresh[: len(head)], len(head)
    fresh_m = masked(fresh, mask)
    for mid in middles:
        out.append("...")
        if not mid:
            continue
        anchor = masked([mid[0]], mask)[0]
        found = next((k for k in range(pos, len(fresh)) if fresh_m[k] == anchor), None)
        if found is None:
            return fresh, f"the line {mid[0]!r} after a `...` is no longer in the output"
        out.extend(fresh[found : found + len(mid)])
        pos = found + len(mid)
    out.append("...")
    if tail:
        out.extend(fresh[max(pos, len(fresh) - len(tail)) :])
    return out, None


class Runner:
    """Runs blocks in one scratch copy of the repository, each at most once."""

    def __init__(self, root, blocks, run_all):
        self.root, self.run_all = root, run_all
        self.by_name = {b.name: b for b in blocks}
        self.results = {}
        self.python = os.environ.get("PYTHON", "python3")
        self.prelu = os.path.abspath(os.environ.get("PRELU", root / "target/release/prelu"))
        examples = os.environ.get("EXAMPLES", Path(self.prelu).parent / "examples")
        self.scratch = Path(tempfile.mkdtemp(prefix="readme-outputs-"))
        self.work = self.scratch / "work"
        self.env = self.make_env(os.path.abspath(examples))

    def make_env(self, examples):
        (self.scratch / "tmp").mkdir()
        (self.scratch / "bin").mkdir()
        (self.scratch / "bin/prelu").symlink_to(self.prelu)
        self.work.mkdir()
        for entry in self.root.iterdir():
            if entry.name not in {"runs", "target", ".git"}:
                (self.work / entry.name).symlink_to(entry)
        shared = self.root.parent / "shared"
        if shared.exists():
            (self.scratch / "shared").symlink_to(shared)
        env = {k: v for k, v in os.environ.items() if not k.startswith("PRELU") and k != "RUST_BACKTRACE"}
        env.update(PATH=f"{self.scratch / 'bin'}:{env.get('PATH', '')}", EXAMPLES=examples,
                   PYTHON=self.python)
        return env

    def close(self):
        shutil.rmtree(self.scratch, ignore_errors=True)

    def skip_reason(self, block):
        if block.options.get("all") and not self.run_all:
            return "needs --all"
        for mod in filter(None, str(block.options.get("python", "")).split(",")):
            if subprocess.run([self.python, "-c", f"import {mod}"], capture_output=True).returncode:
                return f"{self.python} has no `{mod}`"
        return None

    def run(self, block):
        """Fresh outputs, one list of lines per command, or a reason it was skipped."""
        if block.name in self.results:
            return self.results[block.name]
        self.results[block.name] = "depends on itself"
        result = self.skip_reason(block)
        for dep in filter(None, str(block.options.get("after", "")).split(",")):
            if dep not in self.by_name:
                raise SystemExit(f"{block.where()}: after={dep}: no block has id={dep}")
            dep_result = self.run(self.by_name[dep])
            if result is None and isinstance(dep_result, str):
                result = f"after={dep}: {dep_result}"
        if result is None:
            result = self.execute(block)
        self.results[block.name] = result
        return result

    def execute(self, block):
        tmp = f"{self.scratch}/tmp/"
        script = [PRELUDE]
        for k, (cmd, _) in enumerate(block.commands):
            text = "\n".join(cmd)[2:].replace("/tmp/", tmp)
            script.append(f"__rc=$?; printf '{SEP}{k}{SEP}\\n'; (exit $__rc)\n{text}\n")
        print(f"running {block.where()}: {block.commands[0][0][0]}", file=sys.stderr, flush=True)
        proc = subprocess.run(["bash", "-c", "".join(script)], cwd=self.work, env=self.env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              timeout=BLOCK_TIMEOUT_S)
        text = proc.stdout.decode(errors="replace").replace(tmp, "/tmp/")
        text = text.replace(f"{self.scratch}/", "/tmp/")
        outs = [[] for _ in block.commands]
        k = None
        for line in text.split("\n"):
            m = re.fullmatch(f"{SEP}(\\d+){SEP}", line)
            if m:
                k = int(m.group(1))
            elif k is not None and not PROGRESS.match(line):
                outs[k].append(line.rstrip())
        for out in outs:
            while out and not out[-1]:
                out.pop()
        return outs


def refresh(block, fresh):
    """The block's new lines and a note on why the output could not be cut."""
    mask = block.options.get("mask")
    new, notes = [], []
    for (cmd, shown), out in zip(block.commands, fresh):
        cut, note = fit(shown, out, mask)
        if note:
            notes.append(note)
        new.extend(cmd + (shown if masked(cut, mask) == masked(shown, mask) else cut))
    return new, notes


def main():
    args = sys.argv[1:]
    check, run_all = "--check" in args, "--all" in args
    files = [a for a in args if not a.startswith("--")]
    root = Path(__file__).resolve().parent.parent
    os.chdir(root)
    every = [Path("README.md")] + sorted(Path("docs").glob("*.md"))
    chosen = [Path(f) for f in files] or every
    parsed = {p: parse_file(p) for p in dict.fromkeys(every + chosen)}
    runner = Runner(root, [b for _, blocks, _ in parsed.values() for b in blocks], run_all)
    failures, skipped, done = [], [], 0
    try:
        for path in chosen:
            lines, blocks, unmarked = parsed[path]
            failures += [f"{w}: a code block shows `$ ` commands but has no output marker" for w in unmarked]
            results = [(block, runner.run(block)) for block in blocks]
            for block, fresh in reversed(results):
                if isinstance(fresh, str):
                    skipped.append(f"{block.where()}: skipped ({fresh})")
                    continue
                done += 1
                new, notes = refresh(block, fresh)
                failures += [f"{block.where()}: {n}" for n in notes]
                if new != block.shown():
                    if check:
                        print("\n".join(difflib.unified_diff(
                            block.shown(), new, f"{block.where()} (shown)", f"{block.where()} (fresh)",
                            lineterm="")))
                        failures.append(f"{block.where()}: the shown output differs")
                    lines[block.start : block.end] = new
            if not check:
                path.write_text("\n".join(lines))
    finally:
        runner.close()
    for line in skipped + failures:
        print(line, file=sys.stderr)
    print(f"{done} blocks run, {len(skipped)} skipped, {len(failures)} problems", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
