"""Every user mistake at the command line: one `error:` line, exit status 2, no traceback."""

import pytest

from conftest import assert_user_error, run_cli


@pytest.mark.parametrize("args,needle", [
    (["shard", "--root", "x"], "Missing option '--split'"),
    (["frobnicate"], "No such command 'frobnicate'"),
    (["synth", "--out", "{tmp}/s", "--size", "0x3"], "bad size"),
    (["shard", "--split", "train", "--root", "{root}", "--out", "/proc/distseg-nope"], "/proc/distseg-nope"),
    (["shard", "--split", "train", "--root", "{root}", "--out", "{tmp}/o", "--maxsize", "12Q"],
     "bad size '12Q'"),
    (["shard", "--split", "train", "--root", "{root}", "--out", "{tmp}/o", "--quality", "0"], "--quality"),
    (["inspect", "{tmp}/none.json"], "no manifest"),
    (["evaluate", "--run", "{tmp}/norun"], "not a training run"),
    (["predict", "--run", "{tmp}/norun", "--out", "{tmp}/p", "{tmp}"], "not a training run"),
    (["train", "train.epochs=-1"], "train.epochs"),
])
def test_cli_errors_are_one_line(args, needle, synth_root, tmp_path):
    args = [a.format(tmp=tmp_path, root=synth_root) for a in args]
    assert_user_error(run_cli(*args, check=False), needle)


def test_version_and_help():
    assert "distseg, version" in run_cli("--version").stdout
    out = run_cli("--help").stdout
    for cmd in ("synth", "shard", "inspect", "train", "evaluate", "predict", "bench"):
        assert cmd in out
