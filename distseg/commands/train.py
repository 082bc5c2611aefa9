"""`distseg train`: training in this process; `python -m distseg.launch ... distseg/train.py` runs the same
command once per rank."""

from __future__ import annotations

import sys

import click

from distseg.commands.options import SETTINGS_HELP, set_option, settings
from distseg.training.entry import main as train_main

LAUNCH = ("Several processes or GPUs: python -m distseg.launch --multi_gpu --num_processes N "
          "distseg/train.py -c CONFIG [SETTINGS] (accelerate launch's options; distseg's exit status and "
          "one-line errors).")


@click.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
               epilog=f"{SETTINGS_HELP}\n\n{LAUNCH}")
@click.option("--config", "-c", default=None, help="YAML config (configs/*.yaml)")
@set_option
@click.argument("overrides", nargs=-1)
def train(config, set_values, overrides) -> None:
    """Train in this process. OVERRIDES are section.key=value settings, e.g. train.epochs=5."""
    code = train_main(config, list(settings(overrides, set_values)))
    if code:
        sys.exit(code)
