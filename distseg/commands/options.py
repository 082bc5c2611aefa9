"""Options shared by several commands: which weights of a run to use, the precision a model runs in, and
config settings (the same two ways everywhere: bare `section.key=value` arguments and `--set
section.key=value`)."""

from __future__ import annotations

import re
from pathlib import Path

import click

from distseg.config import PRECISIONS, RUN_PRECISION

# evaluate, predict, export, report: which weights of a run to load (see checkpoint.weights_file)
weights_option = click.option(
    "--weights", default="auto", show_default=True, type=click.Choice(["auto", "ema", "raw"]),
    help="ema (the weight average), raw (the trained weights), or auto: the average if the run kept one")


def precision_option(whose: str = "the run's"):
    """evaluate, predict, report, bench eval: one rule for the precision a model runs in. By default the
    one it trained in, so a checkpoint scores what training's validation printed for it; a value given
    overrides it."""
    return click.option(
        "--precision", default=RUN_PRECISION, show_default=True,
        type=click.Choice([RUN_PRECISION, *PRECISIONS]),
        help=f"{RUN_PRECISION}: {whose} train.mixed_precision, the one validation during training runs in; "
             "or no (fp32), bf16, fp16")


SETTINGS_HELP = ("Settings: section.key=value arguments or --set section.key=value, e.g. train.epochs=5; "
                 "`distseg config` lists every setting with its default.")

# train, evaluate, predict, experiment, bench: settings given as options (after the bare ones)
set_option = click.option("--set", "set_values", multiple=True, metavar="SECTION.KEY=VALUE",
                          help="a config setting (repeatable); bare section.key=value arguments work too")

SETTING = re.compile(r"[A-Za-z_]\w*(\.\w+)*=")


def settings(bare: tuple[str, ...] | list[str], set_values: tuple[str, ...]) -> tuple[str, ...]:
    """The settings of a command line: its bare ones, then its --set ones (a key given twice: --set wins)."""
    return tuple(bare) + tuple(set_values)


def inputs_and_settings(args: tuple[str, ...]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Split positional arguments into input paths and settings: `eval.mode=slide` is a setting unless a file
    or folder of that name exists (a path may hold '=')."""
    is_setting = [bool(SETTING.match(a)) and not Path(a).exists() for a in args]
    return (tuple(a for a, s in zip(args, is_setting) if not s),
            tuple(a for a, s in zip(args, is_setting) if s))
