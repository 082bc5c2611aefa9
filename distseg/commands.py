"""CLI commands that need torch (train, evaluate, predict, bench); torch is imported inside each."""

from __future__ import annotations

import sys

import click

from distseg.cli import cli
from distseg.errors import UserError


@cli.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.option("--config", "-c", default=None, help="YAML config")
@click.argument("overrides", nargs=-1)
def train(config, overrides) -> None:
    """Train in this process (for several processes: accelerate launch distseg/train.py ...)."""
    from distseg.train import main as train_main

    code = train_main((["--config", config] if config else []) + list(overrides))
    if code:
        sys.exit(code)


@cli.command()
@click.option("--run", required=True, help="run folder (runs/<name>)")
@click.option("--checkpoint", default="best", show_default=True, help="best, latest or a checkpoint path")
@click.option("--split", default=None, help="split to evaluate [default: the run's val split]")
@click.option("--shards", default=None, help="shard folder [default: the run's]")
@click.option("--json", "json_out", default=None, help="also write scores and confusion matrix here")
@click.argument("overrides", nargs=-1)
def evaluate(run, checkpoint, split, shards, json_out, overrides) -> None:
    """Per-class IoU, mIoU and pixel accuracy of a run's weights."""
    from distseg.evaluate import evaluate as run_eval

    run_eval(run, checkpoint, split, shards, tuple(overrides), json_out)


@cli.command()
@click.option("--run", required=True, help="run folder (runs/<name>)")
@click.option("--checkpoint", default="best", show_default=True)
@click.option("--out", required=True, help="results folder")
@click.option("--alpha", default=0.5, show_default=True, help="overlay opacity")
@click.argument("inputs", nargs=-1, required=True)
def predict(run, checkpoint, out, alpha, inputs) -> None:
    """Segment images (files or folders): labelId PNGs (official results format) + overlays."""
    from distseg.predict import predict as run_predict

    n = run_predict(run, tuple(inputs), out, checkpoint, alpha)
    click.echo(f"wrote {n} predictions to {out} (overlays in {out}/overlay)")
