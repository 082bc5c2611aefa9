"""The command line: every user mistake is one `error:` line, exit status 2, no traceback; help lists every
command and says how to run several processes; messages point further. One mistake runs `distseg` as a
user would (a subprocess); the others call the same entry in this process (`cli.main`), which is faster."""

import json
import signal

import pytest

from conftest import assert_user_error, run_cli
from distseg.cli import COMMANDS, main


class Result:
    """What `distseg ARGS` printed and returned, as subprocess.CompletedProcess has it."""

    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


@pytest.fixture
def cli(capsys):
    """Run `distseg ARGS` in this process through the script's own entry (errors mapped to exit codes)."""
    def run(*args):
        term = signal.getsignal(signal.SIGTERM)
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as e:
            code = e.code or 0
        finally:
            signal.signal(signal.SIGTERM, term)
        out = capsys.readouterr()
        return Result(code, out.out, out.err)
    return run


def test_a_mistake_in_a_real_process_is_one_line():
    assert_user_error(run_cli("frobnicate", check=False), "No such command 'frobnicate'")


@pytest.mark.parametrize("args,needle", [
    (["shard", "--root", "x"], "Missing option '--split'"),
    (["synth", "--out", "{tmp}/s", "--size", "0x3"], "bad size"),
    (["shard", "--split", "train", "--root", "{root}", "--out", "/proc/distseg-nope"], "/proc/distseg-nope"),
    (["shard", "--split", "train", "--root", "{root}", "--out", "{tmp}/o", "--maxsize", "12Q"],
     "bad size '12Q'"),
    (["shard", "--split", "train", "--root", "{root}", "--out", "{tmp}/o", "--quality", "0"], "--quality"),
    (["inspect", "{tmp}/none.json"], "no manifest"),
    (["evaluate", "--run", "{tmp}/norun"], "not a training run"),
    (["predict", "--run", "{tmp}/norun", "--out", "{tmp}/p", "{tmp}"], "not a training run"),
    (["train", "train.epochs=-1"], "train.epochs"),
    (["train", "data.crop=64,128"], "data.crop must be a list, written data.crop=[64,128]"),
    (["train", "train.epoch=3"], "unknown key train.epoch (did you mean train.epochs?)"),
    (["train", "--train.epochs=2"], "without dashes: e.g. train.epochs=2"),
])
def test_cli_errors_are_one_line(cli, args, needle, synth_root, tmp_path):
    args = [a.format(tmp=tmp_path, root=synth_root) for a in args]
    assert_user_error(cli(*args), needle)


def test_help_lists_every_command_and_each_command_has_its_help(cli):
    assert "distseg, version" in cli("--version").stdout
    out = cli("--help").stdout
    assert "python -m distseg.launch" in out
    listed = [line.split()[0] for line in out.split("Commands:")[1].splitlines() if line.strip()]
    assert listed == list(COMMANDS)
    for name in COMMANDS:
        p = cli(name, "--help")
        assert p.returncode == 0 and p.stdout.startswith(f"Usage: distseg {name} "), (name, p.stdout[:200])


def test_help_texts(cli):
    assert "best, latest or a checkpoint path" in cli("predict", "--help").stdout
    assert "OVERRIDES are section.key=value settings" in cli("evaluate", "--help").stdout
    sh = cli("bench", "shard", "--help").stdout
    assert "Cityscapes root" in sh and "append the table to this file" in sh
    assert "OVERRIDES are section.key=value settings" in cli("train", "--help").stdout


def test_sharper_hints(cli, synth_root, one_proc_run, tmp_path):
    cli("shard", "--split", "train", "--root", synth_root, "--out", tmp_path / "s", "--maxcount", "20")
    assert_user_error(cli("shard", "--split", "train", "--root", synth_root, "--out", tmp_path / "s",
                          "--maxcount", "20", "--quality", "90"), "(--quality 95 -> 90)")
    assert_user_error(cli("evaluate", "--run", one_proc_run, "--checkpoint", "last"),
                      "checkpoint 'last' not found: use best|latest|PATH")
    p = cli("shard", "--split", "val", "--root", synth_root, "--out", tmp_path / "t", "--scheme", "trainIds")
    assert json.loads((tmp_path / "t" / "val.json").read_text())["scheme"]["name"] == "trainid"
    assert "in 1 shard," in p.stdout  # 5 val images, 100 per shard: no "1 shards"
    assert "in 1 shard," in cli("inspect", tmp_path / "t" / "val.json").stdout
    p = cli("inspect", one_proc_run / "missing.json")
    assert_user_error(p, "is a training run folder, not a shard folder")
    assert "distseg shard" not in p.stderr
