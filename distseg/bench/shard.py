"""`distseg bench shard`: shard encoding speed per core and bytes against the raw PNGs, JPEG vs PNG."""

from __future__ import annotations

from distseg.bench.common import measure, table
from distseg.labels import get_scheme
from distseg.shards.cityscapes import find_pairs, resolve_root
from distseg.shards.shard import ShardOptions, encode_pair


def bench_shard(root, split: str, workers: int, limit: int) -> str:
    """JPEG q95 vs PNG: images encoded per second on one core, and bytes relative to the source PNGs."""
    pairs = find_pairs(resolve_root(root), split)[:limit]
    scheme = get_scheme("trainid")
    rows = []
    src = sum(p.image.stat().st_size + p.label.stat().st_size for p in pairs)
    for fmt in ("png", "jpg"):
        opts = ShardOptions(split=split, image_format=fmt)
        with measure() as m:
            size = sum(sum(len(d) for _, d in encode_pair(p, opts, scheme).files) for p in pairs)
        rows.append([f"{fmt}{' q95' if fmt == 'jpg' else ''}", len(pairs) / m["wall"], size / src])
    return (f"shard encoding (decode PNG, remap, encode), one core, {len(pairs)} {split} images\n\n"
            + table(["image format", "img/s per core", "bytes vs raw PNG"],
                    [[r[0], r[1], f"{r[2]:.2f}x"] for r in rows]))
