"""``python -c SCRIPT ARGS`` and ``python -m MODULE ARGS`` for the CLI tests, without importing torch each time.

A test of the command line runs a fresh interpreter, most of whose time goes on importing
torch and shardwise before a line of the command runs. Here one server process imports them
once; each command then runs in a child forked from it, which starts as a new interpreter
would have after those imports: its own process, working directory, environment, argv,
stdin (empty), stdout and stderr, ``__main__`` (run as ``-c`` or ``-m`` run it), exit status
(SystemExit and uncaught exceptions as Python reports them, or minus the signal that killed
it). Nothing a command does reaches the server or the next command. ``run`` takes the same
command lines as ``subprocess.run`` and returns the same ``CompletedProcess``; any other
command, or options it does not handle, go to ``subprocess.run`` itself.

Commands that start ranks still do: launch spawns them as fresh interpreters, from the
child as from any ``python -m shardwise.cli``.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

# What the server imports before it forks: whatever a command would import first anyway.
PRELOAD = ("torch", "torch.distributed", "shardwise", "shardwise.cli", "shardwise.cli.args", "shardwise.cli.bench",
           "shardwise.cli.checkpoints", "shardwise.cli.generate", "shardwise.cli.parser", "shardwise.cli.plan",
           "shardwise.cli.train", "shardwise.train.run", "shardwise.model.text", "tokenizers", "jinja2", "tqdm")

SERVER = f"""
import sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
import forked_python
del sys.path[0]  # a command's sys.path is what python -c/-m gives it
forked_python.serve()
"""
# The environment the test session started with: the server's imports see it, whatever a test has patched by the
# time the first command runs (each command gets the environment of its own call).
BASE_ENV = dict(os.environ)


# The server side: runs in the server process and its children.


def serve() -> None:
    """Read one request per line from stdin; for each, fork a child that runs it, and write back its pid, then its
    exit status. Stops at the end of stdin (the test process exited or closed it)."""
    import importlib

    for name in PRELOAD:
        with contextlib.suppress(ImportError):
            importlib.import_module(name)
    control_in, control_out = os.fdopen(os.dup(0), "r"), os.fdopen(os.dup(1), "w")
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)  # the children's stdio is theirs alone; the control pipes stay with the server
    os.close(devnull)
    control_out.write("ready\n")
    control_out.flush()
    for line in control_in:
        request = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            control_in.close()
            control_out.close()
            _child(request)  # never returns
        control_out.write(json.dumps({"pid": pid}) + "\n")
        control_out.flush()
        _, status = os.waitpid(pid, 0)
        control_out.write(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}) + "\n")
        control_out.flush()


def _child(request: dict[str, Any]) -> None:
    """Become the interpreter ``python ARGV`` would have started, run it, and exit as it would have."""
    import builtins
    import io
    import runpy

    code = 1
    try:
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        for fd, path, flags in ((0, os.devnull, os.O_RDONLY), (1, request["stdout"], os.O_WRONLY | os.O_TRUNC),
                                (2, request["stderr"], os.O_WRONLY | os.O_TRUNC)):
            opened = os.open(path, flags)
            os.dup2(opened, fd)
            os.close(opened)
        sys.stdin = sys.__stdin__ = io.TextIOWrapper(io.FileIO(0, "r", closefd=False))
        sys.stdout = sys.__stdout__ = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), encoding="utf-8")
        sys.stderr = sys.__stderr__ = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), encoding="utf-8",
                                                       errors="backslashreplace", line_buffering=True)
        main = sys.modules["__main__"]
        main.__dict__.clear()
        main.__dict__.update(__name__="__main__", __doc__=None, __package__=None, __spec__=None,
                             __loader__=builtins.__loader__, __builtins__=builtins)
        mode, target, *args = request["argv"][1:]
        try:
            if mode == "-c":
                sys.argv = ["-c", *args]
                sys.path[0] = ""
                exec(compile(target, "<string>", "exec"), main.__dict__)
            else:
                sys.argv = [target, *args]  # runpy puts the module's file in argv[0], as -m does
                sys.path[0] = os.getcwd()
                runpy._run_module_as_main(target, alter_argv=True)
            code = 0
        except SystemExit as e:
            code = _exit_code(e)
        except BaseException:  # noqa: BLE001 - reported as the interpreter reports it: from the command's frames
            kind, error, tb = sys.exc_info()
            sys.excepthook(kind, error, tb.tb_next if mode == "-c" else tb)
            code = 1
        try:
            atexit._run_exitfuncs()
        except SystemExit as e:
            code = _exit_code(e)
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):  # a closed stream has nothing left to write
                stream.flush()
    finally:
        os._exit(code)


def _exit_code(e: SystemExit) -> int:
    if e.code is None:
        return 0
    if isinstance(e.code, int):
        return e.code
    print(e.code, file=sys.stderr)
    return 1


# The test side.


class _Server:
    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     env=BASE_ENV)
        self.lock = threading.Lock()
        self.buffer = b""
        if self._line(None) != b"ready":
            raise RuntimeError("the forking server did not start")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def close(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def _line(self, timeout: float | None) -> bytes | None:
        """The server's next line, or None if none came within ``timeout`` seconds (read unbuffered, so that
        select sees every byte not yet taken)."""
        fd = self.proc.stdout.fileno()
        deadline = None if timeout is None else time.monotonic() + timeout
        while b"\n" not in self.buffer:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not select.select([fd], [], [], left)[0]:
                return None
            chunk = os.read(fd, 65536)
            if not chunk:
                raise RuntimeError("the forking server died")
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return line

    def _reply(self, timeout: float | None) -> dict[str, Any] | None:
        line = self._line(timeout)
        return None if line is None else json.loads(line)

    def run(self, argv: list[str], env: dict[str, str], cwd: str, timeout: float | None) -> tuple[int, str, str]:
        with self.lock, tempfile.TemporaryDirectory(prefix="forked-python-") as tmp:
            out, err = Path(tmp, "stdout"), Path(tmp, "stderr")
            out.touch()
            err.touch()
            request = dict(argv=argv, env=env, cwd=cwd, stdout=str(out), stderr=str(err))
            self.proc.stdin.write(json.dumps(request).encode() + b"\n")
            self.proc.stdin.flush()
            pid = self._reply(None)["pid"]
            reply = self._reply(timeout)
            if reply is None:
                _kill(pid)
                self._reply(None)
                raise subprocess.TimeoutExpired(argv, timeout, out.read_bytes(), err.read_bytes())
            return reply["returncode"], out.read_text(errors="replace"), err.read_text(errors="replace")


def _kill(pid: int) -> None:
    """SIGKILL a timed-out command; its ranks die with it (they ask the kernel to)."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


_server: _Server | None = None


def _get_server() -> _Server:
    global _server
    if _server is None or not _server.alive():
        _server = _Server()
        atexit.register(_server.close)
    return _server


def run(cmd: list[str], *, capture_output: bool = False, text: bool = False, timeout: float | None = None,
        env: dict[str, str] | None = None, check: bool = False, **kwargs: Any) -> subprocess.CompletedProcess:
    """``subprocess.run(cmd, capture_output=True, text=True, ...)`` for ``python -c``/``-m`` commands, forked from a
    server that has imported torch and shardwise already; anything else goes to ``subprocess.run``."""
    cmd = [str(c) for c in cmd]
    forkable = (capture_output and text and not kwargs and len(cmd) >= 3 and cmd[0] == sys.executable
                and cmd[1] in ("-c", "-m"))
    if not forkable:
        return subprocess.run(cmd, capture_output=capture_output, text=text, timeout=timeout, env=env, check=check,
                              **kwargs)
    returncode, stdout, stderr = _get_server().run(cmd, dict(os.environ if env is None else env), os.getcwd(),
                                                   timeout)
    done = subprocess.CompletedProcess(cmd, returncode, stdout, stderr)
    if check:
        done.check_returncode()
    return done
