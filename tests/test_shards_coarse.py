"""Coarse labels: `distseg synth --extra` (train_extra and gtCoarse in the real layout) and coarse shards."""

import hashlib
from pathlib import Path

from click.testing import CliRunner

from distseg.commands.data import synth

# sha256 over (relative path, sha256 of the bytes) of every file `synth --out D --train 3 --val 2 --test 1
# --size 128x64 --seed 5` writes, recorded on the code before `--extra` existed (commit 8b15294): the demo's
# expected mIoU, the tests and the benchmarks depend on these bytes.
SYNTH_TREE_SHA = "a196dac723fd0610499ec649d1647e8f9b974b75b223b6137f831fa66baba9a8"


def tree_sha(root: Path) -> tuple[int, str]:
    """(number of files, sha256 over each file's relative path and content hash, in path order)."""
    h = hashlib.sha256()
    files = sorted(p for p in root.rglob("*") if p.is_file())
    for p in files:
        h.update(p.relative_to(root).as_posix().encode() + b"\0" + hashlib.sha256(p.read_bytes()).digest())
    return len(files), h.hexdigest()


def test_synth_without_extra_writes_the_same_bytes_as_before(tmp_path):
    r = CliRunner().invoke(synth, ["--out", str(tmp_path), "--train", "3", "--val", "2", "--test", "1",
                                   "--size", "128x64", "--seed", "5"])
    assert r.exit_code == 0, r.output
    assert tree_sha(tmp_path) == (6 * 4, SYNTH_TREE_SHA)
