"""Options shared by several commands: which weights of a run to use."""

from __future__ import annotations

import click

# evaluate, predict, export, report: which weights of a run to load (see checkpoint.weights_file)
weights_option = click.option(
    "--weights", default="auto", show_default=True, type=click.Choice(["auto", "ema", "raw"]),
    help="ema (the weight average), raw (the trained weights), or auto: the average if the run kept one")
