"""The README's Python example and its marked shell sessions run as written, printing what the README shows; launch
says in one line what to change where it cannot run."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from shardwise.launch import START_METHOD_ENV

README = Path(__file__).parent.parent / "README.md"
MARK = "<!-- run by tests/test_readme.py -->"
DEMO_MODEL = "~/.cache/shardwise/smollm2-135m-instruct"  # where `make demo` imports SmolLM2
# What changes from run to run: times, rates, memory, log timestamps. The rest of a sample line must be printed.
VOLATILE = [(re.compile(r"\d+(\.\d+)?(?=( ?(s|ms|MiB|tok/s)\b|s,))"), "#"), (re.compile(r"\d\d:\d\d"), "#:#"),
            (re.compile(r"tokens/s \d+"), "tokens/s #")]
TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ ")  # a log line: present or not with the machine


def run(code: str, tmp_path: Path, how: str = "file", start: str = "spawn") -> subprocess.CompletedProcess:
    """Run ``code`` as a user would (a file, ``-c`` or stdin), its launches starting ranks as ``start`` says."""
    if how == "file":
        (tmp_path / "example.py").write_text(code)
        cmd, stdin = [sys.executable, str(tmp_path / "example.py")], None
    elif how == "-c":
        cmd, stdin = [sys.executable, "-c", code], None
    else:
        cmd, stdin = [sys.executable, "-"], code
    return subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env={**os.environ, START_METHOD_ENV: start})


def test_the_readme_python_example_runs_as_written(checkpoints, tmp_path):
    code = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
    code = code.replace('"path/to/checkpoint"', repr(str(checkpoints["llama-untied"])))
    code += "    print(tuple(logits.shape), tuple(out.shape), tuple(batch.shape))\n"
    out = run(code, tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[-2] == "(1, 3, 131) (1, 19) (2, 22)"


JOB = "import shardwise\n\ndef job():\n    return 1\n\nprint(shardwise.launch(job, 2, timeout=120))\n"


def test_launch_from_python_c_or_stdin_says_what_to_change(tmp_path):
    for how in ("-c", "stdin"):
        out = run(JOB, tmp_path, how)
        assert out.returncode != 0
        assert "'job' is defined interactively" in out.stderr and "define it in a .py file" in out.stderr, out.stderr


@pytest.mark.parametrize("start", ["spawn", "forkserver"])
def test_launch_without_a_main_guard_says_what_to_change(tmp_path, start):
    out = run(JOB, tmp_path, start=start)
    assert out.returncode != 0
    assert 'call it under `if __name__ == "__main__":`' in out.stderr, out.stderr
    guarded = JOB.replace("print(", 'if __name__ == "__main__":\n    print(')
    out = run(guarded, tmp_path, start=start)
    assert out.returncode == 0 and out.stdout.strip() == "1", out.stderr


def test_launch_of_an_imported_function_works_from_stdin(tmp_path):
    out = run("import torch, shardwise\nprint(shardwise.launch(torch.arange, 2, 3, timeout=120).tolist())\n", tmp_path,
              "stdin")
    assert out.returncode == 0 and out.stdout.strip() == "[0, 1, 2]", out.stderr


def test_a_directory_named_shardwise_does_not_shadow_the_package(tmp_path):
    (tmp_path / "shardwise").mkdir()  # e.g. the clone itself, run from its parent
    (tmp_path / "shardwise" / "README.md").write_text("a clone")
    out = run("import shardwise\nprint(callable(shardwise.launch), shardwise.__file__)\n", tmp_path, "-c")
    assert out.returncode == 0 and out.stdout.startswith("True "), out.stderr
    assert "src/shardwise/__init__.py" in out.stdout


def sessions(text: str) -> list[list[tuple[str, list[str]]]]:
    """Each marked block: its commands (``$ `` lines, continued after a trailing backslash) with the lines each
    printed."""
    out = []
    for block in re.findall(re.escape(MARK) + r"\n```text\n(.*?)```", text, re.S):
        steps: list[tuple[str, list[str]]] = []
        lines = iter(block.splitlines())
        for line in lines:
            if line.startswith("$ "):
                command = line[2:]
                while command.endswith("\\"):
                    command = command[:-1] + next(lines).strip()
                steps.append((command, []))
            else:
                steps[-1][1].append(line)
        out.append(steps)
    return out


def stable(line: str) -> str | None:
    """A printed line with its times, rates and sizes masked; None for a log line (timestamped: whether one is
    printed depends on the machine, e.g. more ranks than cores)."""
    if TIMESTAMP.match(line):
        return None
    for pattern, mask in VOLATILE:
        line = pattern.sub(mask, line)
    return line.rstrip()


def test_the_readme_marks_its_quick_sessions():
    steps = [command.split()[1] for block in sessions(README.read_text()) for command, _ in block]
    assert {"generate", "plan", "reshard", "export"} <= set(steps), steps


def mismatch(shown: list[str], out: str, err: str) -> str | None:
    """What differs between a command's sample output and what it printed, times and the like masked: the same
    lines as often (stdout and stderr interleave in the sample), stdout's in its order. Log lines are left out on
    both sides."""
    printed, errors = [stable(line) for line in out.splitlines()], [stable(line) for line in err.splitlines()]
    expected = [line for line in map(stable, shown) if line is not None]
    got = [line for line in printed + errors if line is not None]
    if Counter(expected) != Counter(got):
        return f"not printed: {list((Counter(expected) - Counter(got)).elements())}, " \
               f"not shown: {list((Counter(got) - Counter(expected)).elements())}"
    if [line for line in expected if line in printed] != [line for line in printed if line is not None]:
        return "stdout printed in another order"
    return None


def replay(block: list[tuple[str, list[str]]], cwd: Path, model: Path) -> str | None:
    """Run one session's commands in ``cwd``, in order, as the README shows them; the first mismatch, if any."""
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    cwd.mkdir()
    for command, shown in block:
        typed = command.replace(DEMO_MODEL, str(model)).replace("examples/", f"{README.parent}/examples/")
        out = subprocess.run(["bash", "-c", typed], capture_output=True, text=True, timeout=600, cwd=cwd, env=env)
        if out.returncode != 0:
            return f"$ {command}\nexit code {out.returncode}:\n{out.stderr}"
        if wrong := mismatch(shown, out.stdout, out.stderr):
            return f"$ {command}\n{wrong}\nprinted:\n{out.stdout}{out.stderr}"
    return None


def test_the_readme_shell_sessions_print_what_it_shows(smollm2_demo, tmp_path):
    """Every marked session runs in a new directory on SmolLM2 as `make demo` imports it (the README's examples/
    being the clone's); each command must succeed and print every line the README shows after it (times, rates and
    sizes aside). The sessions are independent, so they run side by side: most of a command's time is starting
    Python and torch, not computing."""
    blocks = sessions(README.read_text())
    with ThreadPoolExecutor(len(blocks)) as pool:
        failures = [f for f in pool.map(replay, blocks, [tmp_path / f"session{i}" for i in range(len(blocks))],
                                        [smollm2_demo] * len(blocks)) if f]
    assert not failures, "\n\n".join(failures)
