"""A preloaded Python that forks one child per distseg command a test runs (`conftest.run_cli`,
`conftest.run_train`, the README's `distseg ...` lines), so each command skips the ~3 s of CPU a fresh
interpreter spends importing torch, torchvision (whose ops import torch._dynamo: 1.4 s of it) and accelerate:
about a quarter of the suite's CPU time went to those imports.

A child is a plain main process running `python -m distseg ARGS` (or the script, or the console entry) with
the request's argv, working directory, environment and standard streams; it ends as the interpreter would
(non-daemon threads joined, atexit handlers run, a traceback and status 1 for an uncaught exception, death
by SIGINT after an uncaught KeyboardInterrupt). Hand-written rather than multiprocessing's forkserver,
whose children are multiprocessing children (named Process-N, atexit handlers skipped, their own signal
set-up): a command must run as the user's process does. The zygote only imports, never runs a torch
operator or starts a thread (forking a process with an OpenMP pool or threads is unsafe); the client
(`Zygote`) runs a command as a subprocess instead where the environment differs from the zygote's in what
is read at import time.

Protocol: one JSON request per line on stdin, {"kind": module | path | entry, "target", "args", "cwd",
"env", "stdout", "stderr"}; the zygote answers {"pid"} once forked and {"rc"} once the child ended."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import threading

PRELOAD = ["torch", "torchvision", "accelerate", "numpy", "PIL.Image", "distseg.cli",
           "distseg.training.entry"]
# environment read when those modules are imported, or cached by them: a request that differs here runs as
# a subprocess
IMPORT_TIME_ENV = ("PYTHON", "OMP_", "MKL_", "KMP_", "GOMP_", "OPENBLAS_", "CUDA", "NVIDIA", "TORCH",
                   "PYTORCH", "LD_", "HF_", "HUGGINGFACE", "XDG_", "HOME", "TMP", "TEMP", "MPL", "NCCL_")


def import_time_env(env: dict) -> dict:
    return {k: v for k, v in env.items() if k.startswith(IMPORT_TIME_ENV)}


def preload() -> None:
    import importlib

    from distseg.cli import COMMANDS

    for name in PRELOAD + sorted({target.split(":")[0] for target, _ in COMMANDS.values()}):
        importlib.import_module(name)
    if threading.active_count() != 1:
        raise SystemExit("zygote: a preloaded module started a thread; forking would not be safe")


def run_request(req: dict) -> None:
    """The command, as `python -m`, `python SCRIPT` or the console script would run it."""
    import runpy

    kind, target = req["kind"], req["target"]
    if kind == "module":
        sys.argv, sys.path[0] = [target, *req["args"]], req["cwd"]  # runpy puts the module's file in argv[0]
        runpy.run_module(target, run_name="__main__", alter_sys=True)
    elif kind == "path":
        sys.argv, sys.path[0] = [target, *req["args"]], os.path.dirname(os.path.abspath(target))
        runpy.run_path(target, run_name="__main__")
    else:
        from distseg.cli import main

        sys.argv, sys.path[0] = [target, *req["args"]], os.path.dirname(target)
        sys.exit(main())


def child(req: dict) -> None:
    """Runs in the forked child; never returns."""
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
        threading._shutdown()  # as the interpreter does at exit: join non-daemon threads, then atexit
        import atexit

        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        if code == -signal.SIGINT:
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGINT)
        os._exit(code if isinstance(code, int) and code >= 0 else 1)


def exit_code(code) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    print(code, file=sys.stderr)
    return 1


def serve() -> None:
    preload()
    out = sys.stdout
    for line in sys.stdin:
        req = json.loads(line)
        out.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            child(req)
        out.write(json.dumps({"pid": pid}) + "\n")
        out.flush()
        _, status = os.waitpid(pid, 0)
        out.write(json.dumps({"rc": os.waitstatus_to_exitcode(status)}) + "\n")
        out.flush()


class Zygote:
    """The test process's end: starts the zygote on first use (with this process's environment), runs
    commands through it, and answers None where a request must run as a subprocess."""

    def __init__(self):
        self.proc, self.env = None, None

    def start(self) -> None:
        self.env, self.pending, self.tmp = dict(os.environ), b"", tempfile.mkdtemp(prefix="distseg-zygote-")
        self.proc = subprocess.Popen([sys.executable, __file__], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, bufsize=0, env=self.env,
                                     cwd=os.path.dirname(__file__))

    def run_argv(self, argv: list, env: dict, cwd, timeout: float):
        """`python -m MODULE ARGS` or `python SCRIPT.py ARGS` (argv[0] this interpreter) through `run`; None
        for any other command line."""
        argv = [str(a) for a in argv]
        if argv[0] != sys.executable or len(argv) < 2:
            return None
        if argv[1] == "-m" and len(argv) > 2:
            return self.run("module", argv[2], argv[3:], env, cwd, timeout)
        if argv[1].endswith(".py"):
            return self.run("path", argv[1], argv[2:], env, cwd, timeout)
        return None

    def run(self, kind: str, target: str, args: list[str], env: dict, cwd, timeout: float):
        """CompletedProcess(args, rc, stdout, stderr), as subprocess.run(capture_output=True, text=True)
        gives it, or None: the environment differs from the zygote's in what is read at import time."""
        if os.environ.get("DISTSEG_TEST_ZYGOTE") == "0":  # every command as a fresh interpreter, to compare
            return None
        if self.proc is None or self.proc.poll() is not None:
            self.start()
        if import_time_env(env) != import_time_env(self.env):
            return None
        out, err = os.path.join(self.tmp, "stdout"), os.path.join(self.tmp, "stderr")
        for path in (out, err):
            open(path, "w").close()
        req = {"kind": kind, "target": target, "args": [str(a) for a in args],
               "cwd": os.path.abspath(cwd or os.getcwd()), "env": env, "stdout": out, "stderr": err}
        self.proc.stdin.write((json.dumps(req) + "\n").encode())
        pid = self.answer(None)["pid"]
        try:
            rc = self.answer(timeout)["rc"]
        except TimeoutError:
            os.kill(pid, signal.SIGKILL)
            self.answer(None)
            raise subprocess.TimeoutExpired([target, *args], timeout, output=read(out), stderr=read(err))
        return subprocess.CompletedProcess([target, *args], rc, read(out), read(err))

    def answer(self, timeout: float | None) -> dict:
        """The zygote's next line, waiting at most `timeout` seconds for it (TimeoutError)."""
        while b"\n" not in self.pending:
            if not select.select([self.proc.stdout], [], [], timeout)[0]:
                raise TimeoutError
            chunk = os.read(self.proc.stdout.fileno(), 65536)
            if not chunk:
                raise RuntimeError("the test zygote ended (see the test's stderr)")
            self.pending += chunk
        line, self.pending = self.pending.split(b"\n", 1)
        return json.loads(line)


def read(path: str) -> str:
    with open(path, errors="replace") as f:
        return f.read()


if __name__ == "__main__":
    serve()
