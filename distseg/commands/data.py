"""`distseg synth`, `distseg shard`: data commands (no torch import)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from distseg.errors import UserError
from distseg.shards.shard import ShardOptions, run_shard
from distseg.shards.synth import write_synth
from distseg.units import parse_bytes, parse_wxh


@click.command()
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="folder for the Cityscapes-format tree")
@click.option("--train", "n_train", default=48, show_default=True, help="train images")
@click.option("--val", "n_val", default=12, show_default=True, help="val images")
@click.option("--test", "n_test", default=0, show_default=True, help="test images")
@click.option("--extra", "n_extra", default=0, show_default=True,
              help="train_extra images with coarse labels only; also writes gtCoarse for train and val (as "
                   "the real dataset: labels well inside the objects, boundaries, some objects unlabelled)")
@click.option("--rare", is_flag=True,
              help="add real Cityscapes rare classes the plain scenes lack: a small bus, rider (on a "
                   "bicycle) or motorcycle, each in 1 image of 20 (without it, not a byte changes)")
@click.option("--size", default="512x256", show_default=True, help="WIDTHxHEIGHT of every image")
@click.option("--seed", default=0, show_default=True, help="scenes are a function of (seed, split, index)")
@click.option("--workers", default=1, show_default=True, help="rendering processes (the files are the same)")
def synth(out: str, n_train: int, n_val: int, n_test: int, n_extra: int, rare: bool, size: str, seed: int,
          workers: int) -> None:
    """Write synthetic street scenes in the Cityscapes layout (deterministic by seed)."""
    w, h = parse_wxh(size)
    if min(n_train, n_val, n_test, n_extra) < 0:
        raise UserError("image counts must not be negative")
    asked = (("train", n_train), ("val", n_val), ("test", n_test), ("train_extra", n_extra))
    counts = {k: v for k, v in asked if v}
    if workers < 1:
        raise UserError("--workers must be at least 1")
    n = write_synth(Path(out), counts, w, h, seed, progress=sys.stderr.isatty(), workers=workers, rare=rare)
    extras = [" with gtCoarse for train, val and train_extra"] if n_extra else []
    extras += [" with rare classes (bus, rider on a bicycle, motorcycle: 1 image in 20 each)"] if rare else []
    click.echo(f"wrote {n} synthetic images to {out} ({', '.join(f'{k} {v}' for k, v in counts.items())})"
               + ",".join(extras))


@click.command()
@click.option("--split", required=True, help="train, val, test, or train_extra (coarse labels only)")
@click.option("--labels", default="fine", show_default=True, type=click.Choice(["fine", "coarse"]),
              help="the ground truth: fine (gtFine) or coarse (gtCoarse: train, val, train_extra); "
                   "coarse and fine shard sets live in separate --out folders")
@click.option("--root", default=None, help="Cityscapes root [default: $CITYSCAPES_DATASET]")
@click.option("--out", default="shards", show_default=True, type=click.Path(file_okay=False),
              help="shard folder")
@click.option("--scheme", default="trainid", show_default=True,
              help="trainid, category, automobile, person, labelid, or a scheme .yaml")
@click.option("--image-format", default=None, type=click.Choice(["jpg", "png"]),
              help="[default: png for val (lossless: validation sees the source pixels), jpg otherwise]")
@click.option("--lossless", default="png", show_default=True, type=click.Choice(["png", "zstd"]),
              help="masks and lossless images: png (every WebDataset, wids, DALI, HF reader decodes it) or "
                   "zstd (masks decode ~20x faster on a CPU; distseg's torch loader only)")
@click.option("--quality", default=95, show_default=True, help="JPEG quality")
@click.option("--resize", default=None, help="WIDTHxHEIGHT (image bilinear, mask nearest)")
@click.option("--maxcount", default=100, show_default=True, help="samples per shard at most")
@click.option("--maxsize", default="1G", show_default=True, help="bytes per shard at most (K/M/G)")
@click.option("--workers", default=1, show_default=True, help="encoding processes")
@click.option("--seed", default=0, show_default=True, help="shuffle seed")
@click.option("--overwrite", is_flag=True, help="replace shards made with other settings")
def shard(split, labels, root, out, scheme, image_format, lossless, quality, resize, maxcount, maxsize,
          workers, seed, overwrite) -> None:
    """Pack one split into WebDataset tars + <split>.json manifest + DALI .idx files."""
    opts = ShardOptions(split=split, scheme=scheme, image_format=image_format or "", quality=quality,
                        resize=parse_wxh(resize), maxcount=maxcount, seed=seed,
                        maxsize=parse_bytes(maxsize, "--maxsize"), lossless=lossless, labels=labels)
    run_shard(root, out, opts, workers=workers, overwrite=overwrite, progress=sys.stderr.isatty(),
              log=click.echo)
