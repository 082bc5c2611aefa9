"""`distseg report`: one self-contained HTML page comparing runs."""

from __future__ import annotations

import click

from distseg.commands.options import precision_option, weights_option
from distseg.reporting.report import write_report


@click.command()
@click.argument("runs", nargs=-1, required=True)
@click.option("--out", default="report.html", show_default=True, help="the HTML file to write")
@click.option("--images", default=8, show_default=True, help="val images in each run's gallery")
@click.option("--checkpoints", default=5, show_default=True, help="checkpoints the gallery shows, best first")
@precision_option("each run's")
@weights_option
def report(runs, out, images, checkpoints, precision, weights) -> None:
    """Curves, per-class IoU, confusion matrix and a val gallery with a checkpoint chooser for RUNS (run
    folders), in one HTML file that needs no network to view. A page already built from the same runs and
    options is left as it is."""
    path, built = write_report(list(runs), out, images, checkpoints, precision, weights, click.echo)
    if built:
        click.echo(f"report written to {path} ({path.stat().st_size / 1e6:.1f} MB)")
    else:
        click.echo(f"report {path} is up to date: its runs and options have not changed since it was built")
