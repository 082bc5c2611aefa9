"""The compact sample index: the same samples as the shards' .idx files say, built once per node and shared
(a second process maps the file the first one wrote), rebuilt when the shards change, in memory where no
node-local folder can be written; manifests of version 1 still load; the benchmark at 10^5 samples."""

import json
import shutil

import numpy as np
import pytest

from distseg.bench.index import bench_index
from distseg.errors import UserError
from distseg.shards.manifest import load_manifest
from distseg.shards.sample_index import identity, read_index_file, sample_index
from distseg.shards.shard_reader import ShardFiles, ShardSamples


def test_the_index_holds_what_the_idx_files_say(shards, tmp_path):
    man = load_manifest(shards, "train")
    samples = ShardSamples(man, ShardFiles(man, str(tmp_path)))
    i = 0
    for k, sh in enumerate(man["shards"]):
        for key, comps in read_index_file((shards / sh["index"]).read_text()):
            assert samples.key(i) == key and samples.shard(i) == k
            for member, ext in (("image", "jpg"), ("mask", "mask.png"), ("json", "json")):
                assert samples.index.member(i, member) == comps[ext]
            i += 1
    assert i == len(samples) == man["total"]
    with open(shards / man["shards"][1]["name"], "rb") as f:  # a read by offset gives the member's bytes
        off, size = samples.index.member(samples.index.shard.tolist().index(1), "json")
        f.seek(off)
        assert json.loads(f.read(size))["key"] == samples.key(samples.index.shard.tolist().index(1))


def test_built_once_per_node_shared_and_rebuilt_when_the_shards_change(shards, tmp_path):
    man = load_manifest(shards, "train")
    first = ShardSamples(man, ShardFiles(man, str(tmp_path))).index
    files = list(tmp_path.glob("train-*.dsidx"))
    assert files == [first.path] and first.path.name == f"train-{identity(man)}.dsidx"
    mtime = first.path.stat().st_mtime_ns

    def no_build():
        raise AssertionError("a second process must map the node's file, not build its own")
    again = sample_index(man, no_build, tmp_path)  # as another process of the node would
    assert again.path == first.path and first.path.stat().st_mtime_ns == mtime
    assert again.all_keys() == first.all_keys()
    other = tmp_path / "other"
    shutil.copytree(shards, other)
    changed = json.loads((other / "train.json").read_text())
    changed["shards"][0]["sha256"] = "0" * 64  # the shards changed: another identity, another file
    (other / "train.json").write_text(json.dumps(changed))
    ShardSamples(load_manifest(other, "train"), ShardFiles(load_manifest(other, "train"), str(tmp_path)))
    assert len(list(tmp_path.glob("train-*.dsidx"))) == 2


def test_without_a_writable_node_folder_each_process_builds_its_own(shards):
    man = load_manifest(shards, "train")
    said = []
    samples = ShardSamples(man, ShardFiles(man, "/proc/distseg-no-such-folder"), log=said.append)
    assert samples.index.path is None and len(samples) == man["total"]
    assert said and said[0].startswith("note: no writable node-local folder for the sample index")
    assert samples.index.__getstate__()["shard"] is samples.index.shard  # pickled whole, not by path


def test_manifests_of_version_1_still_load_and_newer_ones_say_so(shards, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(shards, old)
    man = json.loads((old / "train.json").read_text())
    man["version"] = 1
    for sh in man["shards"]:  # version 1 listed every key
        sh["keys"] = [k for k, _ in read_index_file((old / sh["index"]).read_text())]
    (old / "train.json").write_text(json.dumps(man))
    loaded = load_manifest(old, "train")
    assert ShardSamples(loaded, ShardFiles(loaded, str(tmp_path))).index.all_keys() == \
        [k for sh in man["shards"] for k in sh["keys"]]
    man["version"] = 3
    (old / "train.json").write_text(json.dumps(man))
    with pytest.raises(UserError, match="is a version-3 manifest, newer than this distseg reads"):
        load_manifest(old, "train")


def test_bench_index_at_ten_to_the_fifth():
    out = bench_index(100_000, workers=2, dali=False)
    rows = {line.split("|")[1].strip(): line.split("|")[2].strip() for line in out.splitlines()
            if line.startswith("| ") and not line.startswith("| measure")}
    per_sample = float(rows["index file on disk"].split()[0])
    assert per_sample <= 40 + 20  # the budget: 40 bytes + the 20-character key
    cold = float(rows["open + 10^4 random lookups, cold (built from the .idx files)"].split()[0])
    warm = float(rows["open + 10^4 random lookups, from the node-local file"].split()[0])
    assert warm < cold
    growth = rows["private memory growth per worker over an epoch (2 workers)"]
    assert np.isfinite(float(growth.split()[1]))
    assert "skipped" in rows["DALI webdataset reader over the same .idx files: its own memory"]
    assert rows["class counts file on disk (labelid: 34 classes of uint32)"].startswith("136.0 B/sample")
    assert float(rows["class counts: map + images per class; summed into trainid"].split()[0]) > 0
    for what in ("one split", "two streams 3:1 (data.streams)"):  # measured in a child process each
        cell = rows[f"planning an epoch's global order, {what}"].split()  # 0.017 s, peak 22.8 MiB (...)
        assert float(cell[0]) >= 0 and float(cell[3]) >= 0 and cell[4] == "MiB"
