"""The suite's preloaded interpreter (tests/zygote.py) runs a command as a fresh `python` would: its argv,
working directory, environment, streams and exit status; atexit handlers run; a time-out kills it."""

import os
import signal
import subprocess
import sys

import pytest

from conftest import ZYGOTE
from zygote import Zygote

SCRIPT = """
import atexit, os, sys
atexit.register(lambda: print("atexit ran", flush=True))
print("argv", sys.argv[1:], "cwd", os.getcwd(), "env", os.environ.get("ZYGOTE_PROBE"), "main", __name__)
print("preloaded", "accelerate" in sys.modules, file=sys.stderr)
how = sys.argv[1]
if how == "exit":
    sys.exit(int(sys.argv[2]))
if how == "raise":
    raise ValueError("boom")
if how == "interrupt":
    raise KeyboardInterrupt
if how == "sleep":
    import time; time.sleep(60)
if how == "state":  # which distseg, numpy's global draw, an object whose __del__ fails at shutdown
    import distseg, numpy
    print("distseg", distseg.__file__, "draw", numpy.random.randint(2**31))
    class Late:
        def __del__(self):
            raise RuntimeError("failed in __del__ at shutdown")
    late = Late()
"""


@pytest.fixture(scope="module")
def zygote():
    """The one run_cli uses; under DISTSEG_TEST_ZYGOTE=0, which turns that off, one of this module's own."""
    z = ZYGOTE if ZYGOTE.enabled else Zygote(enabled=True)
    yield z
    if z is not ZYGOTE and z.proc is not None:
        z.stop(None)


@pytest.mark.parametrize("args, rc", [(["ok"], 0), (["exit", "3"], 3), (["raise"], 1),
                                      (["interrupt"], -signal.SIGINT)])
def test_a_command_runs_as_a_fresh_interpreter_would(zygote, tmp_path, args, rc):
    script = tmp_path / "probe.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, ZYGOTE_PROBE="seen")
    p = zygote.run_argv([sys.executable, script, *args], env, tmp_path, 60)
    fresh = subprocess.run([sys.executable, str(script), *args], env=env, cwd=tmp_path, capture_output=True,
                           text=True, timeout=60)
    assert p.returncode == fresh.returncode == rc
    assert p.stdout == fresh.stdout and f"cwd {tmp_path} env seen main __main__" in p.stdout
    assert p.stdout.rstrip().endswith("atexit ran")
    assert "preloaded True" in p.stderr  # it skipped the imports
    assert ("Traceback" in p.stderr) == ("Traceback" in fresh.stderr) == (rc in (1, -signal.SIGINT))
    assert p.stderr.splitlines()[-1] == fresh.stderr.splitlines()[-1] or rc in (0, 3)  # the same error


def test_a_command_over_its_time_is_killed_and_the_next_runs(zygote, tmp_path):
    script = tmp_path / "probe.py"
    script.write_text(SCRIPT)
    with pytest.raises(subprocess.TimeoutExpired):
        zygote.run_argv([sys.executable, script, "sleep"], dict(os.environ), tmp_path, 1)
    assert zygote.run_argv([sys.executable, script, "ok"], dict(os.environ), tmp_path, 60).returncode == 0


def test_an_environment_read_at_import_time_runs_as_a_subprocess(zygote, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="7")
    assert zygote.run_argv([sys.executable, tmp_path / "probe.py"], env, tmp_path, 60) is None
    assert zygote.run_argv(["bash", "-c", "true"], dict(os.environ), tmp_path, 60) is None
    assert zygote.run_argv([sys.executable, "-c", "pass"], dict(os.environ), tmp_path, 60) is None
    p = zygote.run(["bash", "-c", "echo as written"], dict(os.environ), tmp_path, 60)  # run as a subprocess
    assert (p.returncode, p.stdout) == (0, "as written\n")


def test_a_child_has_the_checkouts_code_fresh_state_and_the_interpreters_shutdown(zygote, tmp_path):
    import distseg

    script = tmp_path / "probe.py"
    script.write_text(SCRIPT)
    runs = [zygote.run_argv([sys.executable, script, "state"], dict(os.environ), tmp_path, 60) for _ in "ab"]
    fresh = subprocess.run([sys.executable, str(script), "state"], cwd=tmp_path, capture_output=True,
                           text=True, timeout=60)
    assert f"distseg {distseg.__file__} " in runs[0].stdout and f"distseg {distseg.__file__} " in fresh.stdout
    assert runs[0].stdout.split("draw")[1] != runs[1].stdout.split("draw")[1]  # numpy reseeded per child
    for p in (*runs, fresh):
        assert "failed in __del__ at shutdown" in p.stderr and p.returncode == 0


def test_a_command_broken_off_ends_its_zygote_and_the_next_gets_a_new_one(zygote, tmp_path):
    script = tmp_path / "probe.py"
    script.write_text(SCRIPT)

    def interrupt(*_):
        raise InterruptedError("broken off")

    old = signal.signal(signal.SIGALRM, interrupt)
    signal.alarm(2)
    try:
        with pytest.raises(InterruptedError):
            zygote.run_argv([sys.executable, script, "sleep"], dict(os.environ), tmp_path, 60)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    p = zygote.run_argv([sys.executable, script, "exit", "4"], dict(os.environ), tmp_path, 60)
    assert p.returncode == 4 and "argv ['exit', '4']" in p.stdout
