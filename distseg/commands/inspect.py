"""`distseg inspect PATH`: what a shard folder (its manifest) or a training run folder holds."""

from __future__ import annotations

import re
from pathlib import Path

import click

from distseg.errors import UserError
from distseg.run_files import looks_like_run
from distseg.runs.listing import describe_run
from distseg.shards.manifest import load_manifest


def manifest_text(man: dict, verify: bool) -> str:
    """The listing of a manifest: totals, scheme, labels (fine or coarse) and formats, pixels per class,
    shards."""
    p, n_sh = man["params"], len(man["shards"])
    lines = [f"{man['_path']}: split {man['split']}, {man['total']} samples in {n_sh} "
             f"shard{'s' * (n_sh != 1)}, {man['bytes'] / 1e6:.1f} MB "
             f"({man['bytes'] / max(man['source_bytes'], 1):.2f}x source)",
             f"scheme {man['scheme']['name']} ({man['scheme']['num_classes']} classes), labels "
             f"{man['labels']}, image "
             f"{man['image_ext']}{' q' + str(p['quality']) if man['image_ext'] == 'jpg' else ''}, mask "
             f"{man['mask_ext']}, resize {'x'.join(map(str, p['resize'])) if p['resize'] else 'none'}, "
             f"seed {p['seed']}, {man['tool']}"]
    if man.get("image_sizes"):
        lines.append("image sizes " + ", ".join(f"{wxh} ({n})" for wxh, n in man["image_sizes"].items()))
    lines += class_rows(man)
    lines.append(f"{'shard':<22}{'samples':>8}{'MB':>9}  sha256")
    lines += [f"{sh['name']:<22}{sh['count']:>8}{sh['bytes'] / 1e6:>9.2f}  {sh['sha256'][:16]}"
              for sh in man["shards"]]
    if verify:
        counts = ", and so do the class counts" if "class_counts" in man else ""
        lines.append(f"all shards match their sha256{counts}")
    return "\n".join(lines)


def class_rows(man: dict) -> list[str]:
    """Per class: its labelled pixels, their share, and how many samples hold it (recorded with the
    per-sample class counts; shards made before them say so)."""
    rows = list(man["class_pixels"].items()) + [("(ignore)", man["ignore_pixels"])]
    total, width = sum(n for _, n in rows), max(16, max(len(name) for name, _ in rows) + 2)
    images = man.get("class_images") if "class_counts" in man else None
    lines = [f"{'class':<{width}}{'pixels':>14}{'share':>9}{'images' if images else '':>9}"]
    for name, n in rows:
        held = images.get(name, 0) if images and name in man["class_pixels"] else ""
        lines.append(f"{name:<{width}}{n:>14}{100 * n / max(total, 1):>8.2f}%{held:>9}")
    if images is None:
        lines.append("images per class: not recorded (shards made before per-sample class counts: rerun "
                     "`distseg shard` with the same settings to add them)")
    return lines


def one_shard_hint(path: str) -> str:
    """A shard file was given: the command for its folder (its split read from the name)."""
    p = Path(path)
    m = re.fullmatch(r"(.+)-\d{6}\.(tar|idx)", p.name)
    split = f" --split {m.group(1)}" if m else ""
    return f"{path} is one shard; inspect its folder: distseg inspect {p.parent}{split}"


@click.command()
@click.argument("path", type=click.Path())
@click.option("--split", default="train", show_default=True, help="when PATH is a shard folder")
@click.option("--verify", is_flag=True, help="check every shard's sha256")
def inspect(path: str, split: str, verify: bool) -> None:
    """Print what a shard folder (its SPLIT.json manifest) or a training run folder holds: for a run, its
    checkpoints with their epochs, where best/ came from, and the summary's segments."""
    if path.endswith((".tar", ".idx")):
        raise UserError(one_shard_hint(path))
    local = Path(path)
    if "://" not in path and local.is_dir() and looks_like_run(local):
        click.echo(describe_run(local))
        return
    click.echo(manifest_text(load_manifest(path, split, verify=verify), verify))
