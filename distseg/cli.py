"""The `distseg` command line. User mistakes end as one line on stderr with exit status 2."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import click

from distseg.errors import UserError, describe_os_error


def _size(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    t = text.strip().lower().rstrip("b")
    try:
        return int(float(t[:-1]) * units[t[-1]]) if t and t[-1] in units else int(t)
    except (ValueError, IndexError):
        raise UserError(f"bad size {text!r}: use bytes or a number with K, M or G") from None


def _wxh(text: str | None) -> tuple[int, int] | None:
    if not text:
        return None
    try:
        w, h = (int(v) for v in text.lower().split("x"))
        if w > 0 and h > 0:
            return w, h
    except ValueError:
        pass
    raise UserError(f"bad size {text!r}: use WIDTHxHEIGHT, e.g. 1024x512")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="distseg")
def cli() -> None:
    """U-Net semantic segmentation on Cityscapes: synth, shard, train, evaluate, predict, bench."""


@cli.command()
@click.option("--out", required=True, type=click.Path(file_okay=False), help="folder for the Cityscapes-format tree")
@click.option("--train", "n_train", default=48, show_default=True, help="train images")
@click.option("--val", "n_val", default=12, show_default=True, help="val images")
@click.option("--test", "n_test", default=0, show_default=True, help="test images")
@click.option("--size", default="512x256", show_default=True, help="WIDTHxHEIGHT of every image")
@click.option("--seed", default=0, show_default=True)
def synth(out: str, n_train: int, n_val: int, n_test: int, size: str, seed: int) -> None:
    """Write synthetic street scenes in the Cityscapes layout (deterministic by seed)."""
    from distseg.data.synth import write_synth

    w, h = _wxh(size)
    if min(n_train, n_val, n_test) < 0:
        raise UserError("image counts must not be negative")
    counts = {k: v for k, v in (("train", n_train), ("val", n_val), ("test", n_test)) if v}
    n = write_synth(Path(out), counts, w, h, seed, progress=sys.stderr.isatty())
    click.echo(f"wrote {n} synthetic images to {out} ({', '.join(f'{k} {v}' for k, v in counts.items())})")


@cli.command()
@click.option("--split", required=True, help="train, val or test")
@click.option("--root", default=None, help="Cityscapes root [default: $CITYSCAPES_DATASET]")
@click.option("--out", default="shards", show_default=True, type=click.Path(file_okay=False))
@click.option("--scheme", default="trainid", show_default=True,
              help="trainid, category, automobile, person, labelid, or a scheme .yaml")
@click.option("--image-format", default="jpg", show_default=True, type=click.Choice(["jpg", "png"]))
@click.option("--quality", default=95, show_default=True, help="JPEG quality")
@click.option("--resize", default=None, help="WIDTHxHEIGHT (image bilinear, mask nearest)")
@click.option("--maxcount", default=100, show_default=True, help="samples per shard at most")
@click.option("--maxsize", default="1G", show_default=True, help="bytes per shard at most (K/M/G)")
@click.option("--workers", default=1, show_default=True, help="encoding processes")
@click.option("--seed", default=0, show_default=True, help="shuffle seed")
@click.option("--overwrite", is_flag=True, help="replace shards made with other settings")
def shard(split, root, out, scheme, image_format, quality, resize, maxcount, maxsize, workers, seed, overwrite) -> None:
    """Pack one split into WebDataset tars + <split>.json manifest + DALI .idx files."""
    from distseg.data.shard import ShardOptions, run_shard

    opts = ShardOptions(split=split, scheme=scheme, image_format=image_format, quality=quality,
                        resize=_wxh(resize), maxcount=maxcount, maxsize=_size(maxsize), seed=seed)
    run_shard(root, out, opts, workers=workers, overwrite=overwrite, progress=sys.stderr.isatty(), log=click.echo)


@cli.command()
@click.argument("manifest", type=click.Path())
@click.option("--split", default="train", show_default=True, help="when MANIFEST is a folder")
@click.option("--verify", is_flag=True, help="check every shard's sha256")
def inspect(manifest: str, split: str, verify: bool) -> None:
    """Print what a shard manifest holds."""
    from distseg.data.manifest import load_manifest

    man = load_manifest(manifest, split, verify=verify)
    p = man["params"]
    click.echo(f"{man['_path']}: split {man['split']}, {man['total']} samples in {len(man['shards'])} shards, "
               f"{man['bytes'] / 1e6:.1f} MB ({man['bytes'] / max(man['source_bytes'], 1):.2f}x source)")
    click.echo(f"scheme {man['scheme']['name']} ({man['scheme']['num_classes']} classes), image {man['image_ext']}"
               f"{' q' + str(p['quality']) if man['image_ext'] == 'jpg' else ''}, "
               f"resize {'x'.join(map(str, p['resize'])) if p['resize'] else 'none'}, seed {p['seed']}, {man['tool']}")
    total = sum(man["class_pixels"].values()) + man["ignore_pixels"]
    click.echo(f"{'class':<16}{'pixels':>14}{'share':>9}")
    for name, n in list(man["class_pixels"].items()) + [("(ignore)", man["ignore_pixels"])]:
        click.echo(f"{name:<16}{n:>14}{100 * n / max(total, 1):>8.2f}%")
    click.echo(f"{'shard':<22}{'samples':>8}{'MB':>9}  sha256")
    for sh in man["shards"]:
        click.echo(f"{sh['name']:<22}{sh['count']:>8}{sh['bytes'] / 1e6:>9.2f}  {sh['sha256'][:16]}")
    if verify:
        click.echo("all shards match their sha256")


def _register_late_commands() -> None:
    """Commands living in heavier modules are added here so `distseg shard` does not import torch."""
    from distseg import commands  # noqa: F401  (registers on `cli`)


def main(argv: list[str] | None = None) -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run cleanup (temp files) on TERM too
    try:
        _register_late_commands()
        cli.main(args=argv, prog_name="distseg", standalone_mode=False)
    except UserError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.UsageError as e:
        where = f" (see distseg {e.ctx.info_name if e.ctx and e.ctx.parent else ''} --help)".replace("  ", " ")
        click.echo(f"error: {e.format_message()}{where}", err=True)
        sys.exit(2)
    except click.ClickException as e:
        click.echo(f"error: {e.format_message()}", err=True)
        sys.exit(e.exit_code)
    except OSError as e:  # unwritable output, full disk, ...: say which file, no traceback
        click.echo(f"error: {describe_os_error(e)}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":  # `python -m distseg.cli`: use the importable module, where commands register
    from distseg.cli import main as _main

    _main()
