"""Options shared by several commands: sizes in bytes, WIDTHxHEIGHT, and which weights of a run to use."""

from __future__ import annotations

import click

from distseg.config import parse_bytes  # noqa: F401  (re-exported for the commands)
from distseg.errors import UserError

# evaluate, predict, export, report: which weights of a run to load (see checkpoint.weights_file)
weights_option = click.option(
    "--weights", default="auto", show_default=True, type=click.Choice(["auto", "ema", "raw"]),
    help="ema (the weight average), raw (the trained weights), or auto: the average if the run kept one")


def parse_wxh(text: str | None) -> tuple[int, int] | None:
    """'1024x512' -> (1024, 512); None or '' -> None."""
    if not text:
        return None
    try:
        w, h = (int(v) for v in text.lower().split("x"))
        if w > 0 and h > 0:
            return w, h
    except ValueError:
        pass
    raise UserError(f"bad size {text!r}: use WIDTHxHEIGHT, e.g. 1024x512")
