"""A preloaded Python that forks one child per distseg command a test runs (`conftest.run_cli`,
`conftest.run_train`, the README's `distseg ...` lines), so each command skips the ~3 s of CPU a fresh
interpreter spends importing torch, torchvision (whose ops import torch._dynamo: 1.4 s of it) and accelerate:
about a quarter of the suite's CPU time went to those imports.

A child is a plain main process running `python -m distseg ARGS` (or a script: distseg/train.py, the
console script) with the request's argv, working directory, environment and standard streams, the
checkout's distseg, the warnings filters and numpy's global generator as a fresh process has them, and
what the imports printed on stderr. It ends as the interpreter ends (`finish`): non-daemon threads joined,
atexit handlers run, the command's objects collected, a traceback and status 1 for an uncaught exception,
death by SIGINT after an uncaught KeyboardInterrupt; but without the teardown of every module.
Hand-written rather than multiprocessing's forkserver, whose children are multiprocessing children
(named Process-N, atexit handlers skipped, their own signal set-up): a command must run as the user's
process does. The zygote only imports, never runs a torch operator or starts a thread (forking a process
with an OpenMP pool or threads is unsafe); the client (`Zygote`) runs a command as a subprocess instead
where the environment differs from the zygote's in what is read at import time.

Protocol: one JSON request per line on stdin, {"id", "kind": module | path, "target", "args", "cwd", "env",
"stdout", "stderr"}; the zygote answers {"pid", "id"} once forked and {"rc", "id"} once the child ended.

Left as it is: a child starts with the zygote's modules imported (a fresh command imports fewer), so a
missing import can pass here; `DISTSEG_TEST_ZYGOTE=0` runs the suite with fresh interpreters."""

from __future__ import annotations

import gc
import itertools
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import threading

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PRELOAD = ["torch", "torchvision", "accelerate", "numpy", "PIL.Image", "distseg.cli",
           "distseg.training.entry"]
# environment read when those modules are imported, or cached by them: a request that differs here runs as
# a subprocess
IMPORT_TIME_ENV = ("PYTHON", "OMP_", "MKL_", "KMP_", "GOMP_", "OPENBLAS_", "CUDA", "NVIDIA", "TORCH",
                   "PYTORCH", "LD_", "HF_", "HUGGINGFACE", "XDG_", "HOME", "TMP", "TEMP", "MPL", "NCCL_")


def import_time_env(env: dict) -> dict:
    return {k: v for k, v in env.items() if k.startswith(IMPORT_TIME_ENV)}


def preload() -> tuple[list, str]:
    """Import the heavy modules, the checkout's distseg first on the path (as `python -m distseg` from the
    repository and distseg/train.py find it, not an install elsewhere). Returns the warnings filters as they
    were before (a fresh command starts with those) and what the imports printed on stderr (a fresh command
    prints it itself)."""
    import importlib
    import warnings

    sys.path.insert(0, REPO)
    filters = list(warnings.filters)
    said = tempfile.TemporaryFile()
    saved = os.dup(2)
    os.dup2(said.fileno(), 2)
    try:
        from distseg.cli import COMMANDS

        for name in PRELOAD + sorted({target.split(":")[0] for target, _ in COMMANDS.values()}):
            importlib.import_module(name)
        sys.stderr.flush()
    finally:
        os.dup2(saved, 2)
        os.close(saved)
    sys.path.remove(REPO)
    if threading.active_count() != 1:
        raise SystemExit("zygote: a preloaded module started a thread; forking would not be safe")
    gc.freeze()  # the preloaded objects out of every collection: a child's collects only what it made
    said.seek(0)
    return filters, said.read().decode(errors="replace")


def run_request(req: dict) -> None:
    """The command, as `python -m MODULE` or `python SCRIPT` (the console script is one) would run it."""
    import runpy

    target = req["target"]
    if req["kind"] == "module":
        sys.argv, sys.path[0] = [target, *req["args"]], req["cwd"]  # runpy puts the module's file in argv[0]
        runpy.run_module(target, run_name="__main__", alter_sys=True)
    else:
        sys.argv, sys.path[0] = [target, *req["args"]], os.path.dirname(os.path.realpath(target))
        runpy.run_path(target, run_name="__main__")


def child(req: dict, filters: list, said: str) -> None:
    """In the forked child: the command's streams, folder, environment and fresh state, the command, then
    `finish`. Never returns."""
    import warnings

    import numpy as np

    code = 1
    try:
        for fd, path, flags in ((0, os.devnull, os.O_RDONLY), (1, req["stdout"], os.O_WRONLY | os.O_TRUNC),
                                (2, req["stderr"], os.O_WRONLY | os.O_TRUNC)):
            f = os.open(path, flags)
            os.dup2(f, fd)
            os.close(f)
        os.chdir(req["cwd"])
        os.environ.clear()
        os.environ.update(req["env"])
        warnings.filters[:] = filters
        warnings._filters_mutated()
        np.random.seed()  # Python's random reseeds itself after a fork; numpy's global generator does not
        sys.stderr.write(said)
        try:
            run_request(req)
            code = 0
        except SystemExit as e:
            code = exit_code(e.code)
        except KeyboardInterrupt:
            sys.excepthook(*sys.exc_info())
            code = -signal.SIGINT
        except BaseException:
            sys.excepthook(*sys.exc_info())
        finish()
    finally:
        if code == -signal.SIGINT:
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGINT)
        os._exit(code)


def finish() -> None:
    """The interpreter's end without its teardown of every module (1.4 s with torch imported, which a fresh
    `distseg --help` never imports; 15x that command's own time): non-daemon threads joined, atexit handlers
    run, the command's objects collected (its `__main__` went with runpy's temporary module, so their
    `__del__` runs, and what fails there is said as at shutdown), the streams flushed."""
    import atexit

    sys.last_type = sys.last_value = sys.last_traceback = None  # the traceback holds the command's frames
    threading._shutdown()
    atexit._run_exitfuncs()
    gc.collect()
    sys.stdout.flush()
    sys.stderr.flush()


def exit_code(code) -> int:
    """SystemExit's argument as the interpreter turns it into an exit status."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    print(code, file=sys.stderr)
    return 1


def serve() -> None:
    filters, said = preload()
    out = sys.stdout
    for line in sys.stdin:
        req = json.loads(line)
        out.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            child(req, filters, said)
        out.write(json.dumps({"pid": pid, "id": req["id"]}) + "\n")
        out.flush()
        _, status = os.waitpid(pid, 0)
        out.write(json.dumps({"rc": os.waitstatus_to_exitcode(status), "id": req["id"]}) + "\n")
        out.flush()


class Zygote:
    """The test process's end: starts the zygote on first use (with this process's environment), runs
    commands through it one at a time, and answers None where a request must run as a subprocess. Anything
    that interrupts a command (a time-out, a signal's exception) ends the child and the zygote with it, so
    no later command can read an earlier one's answer; the next starts a new zygote."""

    def __init__(self, enabled: bool | None = None):
        self.proc, self.env, self.lock, self.ids = None, None, threading.Lock(), itertools.count()
        # DISTSEG_TEST_ZYGOTE=0: every command as a fresh interpreter, to compare
        self.enabled = os.environ.get("DISTSEG_TEST_ZYGOTE") != "0" if enabled is None else enabled

    def start(self) -> None:
        self.env, self.pending, self.tmp = dict(os.environ), b"", tempfile.mkdtemp(prefix="distseg-zygote-")
        self.proc = subprocess.Popen([sys.executable, __file__], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, bufsize=0, env=self.env, cwd=REPO)

    def run(self, argv: list, env: dict, cwd, timeout: float, as_written: list | None = None):
        """`argv` through the zygote where it can run it (`run_argv`), else as a subprocess (`as_written`: the
        words to run then, where they are not argv), as subprocess.run(capture_output=True, text=True) gives
        it."""
        return self.run_argv(argv, env, cwd, timeout) or subprocess.run(
            as_written or [str(a) for a in argv], capture_output=True, text=True, env=env, cwd=cwd,
            timeout=timeout)

    def run_argv(self, argv: list, env: dict, cwd, timeout: float):
        """`python -m MODULE ARGS` or `python SCRIPT ARGS` (argv[0] this interpreter) through the zygote:
        CompletedProcess; None for any other command line, or where the environment differs from the
        zygote's in what is read at import time."""
        argv = [str(a) for a in argv]
        if argv[0] != sys.executable or len(argv) < 2:
            return None
        if argv[1] == "-m" and len(argv) > 2:
            return self.fork("module", argv[2], argv[3:], env, cwd, timeout)
        if not argv[1].startswith("-"):
            return self.fork("path", argv[1], argv[2:], env, cwd, timeout)
        return None

    def fork(self, kind: str, target: str, args: list[str], env: dict, cwd, timeout: float):
        """One request (`run_argv`)."""
        if not self.enabled:
            return None
        with self.lock:
            if self.proc is None or self.proc.poll() is not None:
                self.start()
            if import_time_env(env) != import_time_env(self.env):
                return None
            n = next(self.ids)
            out, err = os.path.join(self.tmp, f"{n}.out"), os.path.join(self.tmp, f"{n}.err")
            for path in (out, err):
                open(path, "w").close()
            req = {"id": n, "kind": kind, "target": target, "args": [str(a) for a in args],
                   "cwd": os.path.abspath(cwd or os.getcwd()), "env": env, "stdout": out, "stderr": err}
            pid = None
            try:
                self.proc.stdin.write((json.dumps(req) + "\n").encode())
                pid = self.answer(None, n)["pid"]
                rc = self.answer(timeout, n)["rc"]
            except BaseException as e:
                self.stop(pid)
                if isinstance(e, TimeoutError):
                    raise subprocess.TimeoutExpired([target, *args], timeout, output=read(out),
                                                    stderr=read(err)) from None
                raise
            result = subprocess.CompletedProcess([target, *args], rc, read(out), read(err))
            for path in (out, err):
                os.unlink(path)
            return result

    def stop(self, pid: int | None) -> None:
        """End the command in flight (if it started) and the zygote."""
        for p in (pid, self.proc.pid):
            if p is not None:
                try:
                    os.kill(p, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        self.proc.wait()
        self.proc = None

    def answer(self, timeout: float | None, n: int) -> dict:
        """The zygote's next line about request `n`, waiting at most `timeout` seconds (TimeoutError)."""
        while b"\n" not in self.pending:
            if not select.select([self.proc.stdout], [], [], timeout)[0]:
                raise TimeoutError
            chunk = os.read(self.proc.stdout.fileno(), 65536)
            if not chunk:
                raise RuntimeError("the test zygote ended (see the test's stderr)")
            self.pending += chunk
        line, self.pending = self.pending.split(b"\n", 1)
        reply = json.loads(line)
        assert reply["id"] == n, (reply, n)
        return reply


def read(path: str) -> str:
    with open(path, errors="replace") as f:
        return f.read()


if __name__ == "__main__":
    serve()
