"""`distseg train`: training in this process; `accelerate launch distseg/train.py` runs the same command once
per rank (python -m distseg.launch for distseg's exit status and messages)."""

from __future__ import annotations

import sys

import click

from distseg.training.entry import main as train_main


@click.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.option("--config", "-c", default=None, help="YAML config (configs/*.yaml)")
@click.argument("overrides", nargs=-1)
def train(config, overrides) -> None:
    """Train in this process. OVERRIDES are section.key=value settings, e.g. train.epochs=5.

    For several processes or GPUs: accelerate launch distseg/train.py --config ... [OVERRIDES]
    """
    code = train_main(config, list(overrides))
    if code:
        sys.exit(code)
