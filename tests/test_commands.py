"""The command line: every user mistake is one `error:` line, exit status 2, no traceback; help lists every
command and says how to run several processes; messages point further. One mistake runs `distseg` as a
user would (a subprocess); the others call the same entry in this process (`cli.main`), which is faster."""

import importlib
import json
import signal

import click
import pytest

from conftest import assert_user_error, run_cli
from distseg.cli import COMMANDS, main
from distseg.config import PRECISIONS, RUN_PRECISION


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
    (["evaluate", "--run", "{tmp}/norun"], "{tmp}/norun does not exist"),
    (["evaluate", "--run", "{tmp}"], "{tmp} is not a training run (no config.yaml)"),
    (["predict", "--run", "{tmp}/norun", "--out", "{tmp}/p", "{tmp}"], "does not exist"),
    (["inspect", "{tmp}/s/train-000003.tar"], "is one shard; inspect its folder: distseg inspect {tmp}/s "
                                              "--split train"),
    (["train", "train.epochs=-1"], "train.epochs"),
    (["train", "data.crop=64,128"], "data.crop must be a list, written data.crop=[64,128]"),
    (["train", "train.epoch=3"], "unknown key train.epoch (did you mean train.epochs?)"),
    (["train", "--train.epochs=2"], "without dashes: e.g. train.epochs=2"),
    (["config", "--set", "data.streams=[{{shards: a}}, {{shards: b, weight: -1}}]"],
     "config: data.streams[1].weight must be > 0, got -1"),
    (["train", "data.streams=[{{shards: a, split: train}}, {{shards: a}}]"],
     "config: data.streams[1] repeats data.streams[0] (shards a, split train)"),
])
def test_cli_errors_are_one_line(cli, args, needle, synth_root, tmp_path):
    args = [a.format(tmp=tmp_path, root=synth_root) for a in args]
    assert_user_error(cli(*args), needle.format(tmp=tmp_path))


def test_help_lists_every_command_and_each_command_has_its_help(cli):
    assert "distseg, version" in cli("--version").stdout
    out = cli("--help").stdout
    assert "python -m distseg.launch" in out
    listed = [line.split()[0] for line in out.split("Commands:")[1].splitlines() if line.strip()]
    assert listed == list(COMMANDS)
    for name in COMMANDS:
        p = cli(name, "--help")
        assert p.returncode == 0 and p.stdout.startswith(f"Usage: distseg {name} "), (name, p.stdout[:200])


def every_command() -> dict[str, click.Command]:
    """Every command and subcommand by its name as typed (`bench eval`), imported as `distseg` would."""
    out = {}
    for name, (target, _) in COMMANDS.items():
        module, attr = target.split(":")
        command = getattr(importlib.import_module(module), attr)
        subs = command.commands if isinstance(command, click.Group) else {}
        out |= {f"{name} {sub}": c for sub, c in subs.items()} if subs else {name: command}
    return out


def test_every_command_that_runs_a_model_takes_one_precision_option():
    """One rule: the run's own train.mixed_precision by default (`run`), or the precision given; export
    writes a float32 program and takes none."""
    commands = every_command()
    options = {name: p for name, c in commands.items() for p in c.params if p.name == "precision"}
    assert set(options) == {"evaluate", "predict", "report", "bench eval"}
    for name, p in options.items():
        assert list(p.type.choices) == [RUN_PRECISION, *PRECISIONS] and p.default == RUN_PRECISION, name
        assert f"{RUN_PRECISION}: " in p.help and "train.mixed_precision" in p.help, name
    assert "float32 whatever the run's train.mixed_precision" in " ".join(commands["export"].help.split())


def test_help_texts(cli):
    assert "best, latest or a checkpoint path" in cli("predict", "--help").stdout
    sh = cli("bench", "shard", "--help").stdout
    assert "Cityscapes root" in sh and "append the table to this file" in sh
    for cmd in (["train"], ["evaluate"], ["predict"], ["experiment"], ["bench", "train"], ["bench", "eval"]):
        text = " ".join(cli(*cmd, "--help").stdout.split())
        assert "--set SECTION.KEY=VALUE" in text and "`distseg config` lists every setting" in text, cmd
        assert "accelerate launch distseg" not in text and "accelerate launch -m" not in text, cmd
    assert "python -m distseg.launch --multi_gpu" in " ".join(cli("train", "--help").stdout.split())


def test_config_lists_every_setting_with_its_value_and_meaning(cli, tmp_path):
    import dataclasses

    from distseg.config import Config, StreamCfg

    want = []
    for section in dataclasses.fields(Config):
        value = getattr(Config(), section.name)
        fields = dataclasses.fields(value) if dataclasses.is_dataclass(value) else []
        want += [f"{section.name}.{f.name}" for f in fields] or [section.name]
    # a list of mappings is followed by its entries' fields (no value: they are set with the list)
    entries = [f"data.streams[].{f.name}" for f in dataclasses.fields(StreamCfg)]
    want[want.index("data.streams") + 1:0] = entries
    out = cli("config").stdout.splitlines()
    assert [line.split("=")[0].split()[0] for line in out] == want
    assert all(out[want.index(e)].split("  # ")[0].strip() == e for e in entries)
    crop = out[want.index("data.crop")]
    assert crop.startswith("data.crop=[512,1024] ") and crop.endswith("# H, W of training crops; [] = no "
                                                                      "crop")
    # a config's values, with both ways of giving a setting
    (tmp_path / "c.yaml").write_text("train:\n  epochs: 7\n")
    out = cli("config", "-c", tmp_path / "c.yaml", "model.base=16", "--set", "data.batch_size=3").stdout
    values = {line.split()[0] for line in out.splitlines()}
    assert {"train.epochs=7", "model.base=16", "data.batch_size=3", "data.num_workers=2"} <= values


def test_predict_tells_settings_from_input_paths(tmp_path):
    from distseg.commands.options import inputs_and_settings

    odd = tmp_path / "a.b=c"
    odd.mkdir()
    args = ("img.png", "eval.mode=slide", str(odd), "data.val_batch_size=1")
    assert inputs_and_settings(args) == (("img.png", str(odd)), ("eval.mode=slide", "data.val_batch_size=1"))


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
    # a typo in a run's name: the runs that are there
    assert_user_error(cli("evaluate", "--run", one_proc_run.parent / "oen"),
                      f"{one_proc_run.parent / 'oen'} does not exist; runs in {one_proc_run.parent}: one")


def test_inspect_table_fits_the_longest_class_name(cli, synth_root, tmp_path):
    cli("shard", "--split", "val", "--root", synth_root, "--out", tmp_path, "--scheme", "labelid")
    out = cli("inspect", tmp_path, "--split", "val").stdout.splitlines()
    table = out[out.index(next(r for r in out if r.startswith("class"))):][:36]
    assert any(r.startswith("rectification border ") for r in table)
    assert len({len(r) for r in table}) == 1, "\n".join(table)  # every row as wide as the header
