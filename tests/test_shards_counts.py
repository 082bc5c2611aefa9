"""Per-sample class counts (issue 36): `distseg shard` records each sample's pixels per class in a
memory-mapped .npy beside the manifest, equal to its decoded mask's, in the sample index's order across
shards, the same after a resumed run; labelid shards give a run's scheme its own classes; remote splits fetch
the file with the manifest, never the tars; shards made before give one line, and `distseg shard` adds the
counts to them; inspect shows images per class; `distseg synth --rare` puts a bus, a rider and a motorcycle
each in 1 image of 20 and changes nothing else."""

import dataclasses
import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from servers import http_files

from distseg.commands.data import synth
from distseg.commands.inspect import manifest_text
from distseg.config import load_config
from distseg.errors import UserError
from distseg.labels import get_scheme
from distseg.shards import shard as shard_module
from distseg.shards.manifest import load_manifest
from distseg.shards.shard import ShardOptions, run_shard
from distseg.shards.shard_reader import ShardFiles, ShardSamples, decode_mask
from distseg.shards.split import open_split
from distseg.shards.synth import RARE, L, rare_kinds, rare_rng, render_scene, sample_rng

DATA = load_config(None, []).data
TRAINID = get_scheme("trainid")
QUIET = {"progress": False, "log": lambda *a: None}


def decoded(folder, split: str, lut=None, classes: int | None = None) -> np.ndarray:
    """Each sample's class pixel counts from its decoded mask (through `lut`), in the sample index's order."""
    man = load_manifest(folder, split)
    samples = ShardSamples(man, ShardFiles(man), log=lambda *a: None)
    classes = classes or man["scheme"]["num_classes"]
    masks = (decode_mask(samples.read(i, "mask"), lut).numpy() for i in range(len(samples)))
    return np.array([np.bincount(m.ravel(), minlength=256)[:classes] for m in masks])


def test_the_counts_are_each_decoded_masks_in_the_index_order(shards):
    for split in ("train", "val"):  # JPEG train in 4 shards, PNG val in 3
        opened = open_split(shards, split, TRAINID)
        counts = opened.class_counts(DATA)
        assert isinstance(counts, np.memmap) and not counts.flags.writeable  # the mapped file, no copy
        assert counts.dtype == np.uint32 and counts.shape == (opened.manifest["total"], 19)
        assert len(opened.manifest["shards"]) >= 3
        np.testing.assert_array_equal(counts, decoded(shards, split))
        man = opened.manifest
        assert list(man["class_images"].values()) == (counts > 0).sum(0).tolist()
        assert opened.images_per_class(DATA).tolist() == (counts > 0).sum(0).tolist()
        assert np.array_equal(counts.sum(0), opened.class_pixels())
        record = man["class_counts"]
        assert (record["name"], record["dtype"], record["shape"]) == (f"{split}.counts.npy", "<u4",
                                                                      [man["total"], 19])
    assert not list(shards.glob("*-*.counts.npy"))  # the per-shard files are gone once the split's is written


def test_labelid_shards_give_the_counts_of_the_runs_scheme(synth_root, shards, tmp_path):
    run_shard(synth_root, tmp_path, ShardOptions(split="val", scheme="labelid", maxcount=2), **QUIET)
    stored = open_split(tmp_path, "val", get_scheme("labelid")).class_counts(DATA)
    assert stored.shape == (5, 34)
    np.testing.assert_array_equal(stored, decoded(tmp_path, "val"))
    as_trainid = open_split(tmp_path, "val", TRAINID)
    counts = as_trainid.class_counts(DATA)
    np.testing.assert_array_equal(counts, decoded(tmp_path, "val", as_trainid.lut, 19))
    np.testing.assert_array_equal(counts, open_split(shards, "val", TRAINID).class_counts(DATA))
    category = get_scheme("category")
    by_category = open_split(tmp_path, "val", category)
    np.testing.assert_array_equal(by_category.class_counts(DATA), decoded(tmp_path, "val", category.lut, 7))
    assert by_category.images_per_class(DATA).tolist() == \
        (decoded(tmp_path, "val", category.lut, 7) > 0).sum(0).tolist()


def test_a_resumed_run_writes_the_same_counts(synth_root, shards, tmp_path, monkeypatch):
    encode, calls = shard_module.encode_pair, []

    def dies_at_the_tenth(*args):
        calls.append(1)
        if len(calls) == 10:
            raise RuntimeError("killed")
        return encode(*args)
    monkeypatch.setattr(shard_module, "encode_pair", dies_at_the_tenth)
    with pytest.raises(RuntimeError):
        run_shard(synth_root, tmp_path / "a", ShardOptions(split="train", maxcount=4), **QUIET)
    monkeypatch.setattr(shard_module, "encode_pair", encode)
    a = tmp_path / "a"
    assert sorted(p.name for p in a.glob("*.counts.npy")) == ["train-000000.counts.npy",
                                                              "train-000001.counts.npy"]
    # a run of an earlier version left its state: no counts files, none in the state (masks decoded)
    b = shutil.copytree(a, tmp_path / "b")
    state = json.loads((b / "train.state.json").read_text())
    for sh in state["shards"]:
        del sh["counts_sha256"]
    (b / "train.state.json").write_text(json.dumps(state))
    for p in b.glob("*.counts.npy"):
        p.unlink()
    for out in (a, b):
        said = []
        run_shard(synth_root, out, ShardOptions(split="train", maxcount=4), progress=False, log=said.append)
        assert said[0] == "resuming: 2 finished shards (8 samples) kept"
        assert (out / "train.counts.npy").read_bytes() == (shards / "train.counts.npy").read_bytes()
        assert json.loads((out / "train.json").read_text())["class_counts"] == \
            json.loads((shards / "train.json").read_text())["class_counts"]
        assert not list(out.glob("train-*.counts.npy"))


def test_remote_counts_come_with_the_manifest_never_from_the_tars(shards, tmp_path):
    data = dataclasses.replace(DATA, cache_dir=str(tmp_path / "cache"))
    with http_files(shards) as (base, faults):
        opened = open_split(base, "train", TRAINID)
        counts = opened.class_counts(data)
        np.testing.assert_array_equal(counts, open_split(shards, "train", TRAINID).class_counts(DATA))
        assert isinstance(counts, np.memmap)
        opened.class_counts(data)  # the second time from the node cache
        assert faults.requests == {"/train.json": 1, "/train.counts.npy": 1}
        faults.flip.add("/val.counts.npy")
        with pytest.raises(UserError, match=r"val.counts.npy fails its sha256 check") as e:
            open_split(base, "val", TRAINID).class_counts(data)
        assert "\n" not in str(e.value)
        assert not any(path.endswith((".tar", ".idx")) for path in faults.requests)


def test_shards_made_before_the_counts_say_so_in_one_line_and_reshard_adds_them(synth_root, shards,
                                                                              tmp_path):
    old = tmp_path / "old"
    shutil.copytree(shards, old, ignore=shutil.ignore_patterns("*.counts.npy"))
    for split in ("train", "val"):
        man = json.loads((old / f"{split}.json").read_text())
        del man["class_counts"], man["class_images"]
        (old / f"{split}.json").write_text(json.dumps(man))
    opened = open_split(old, "train", TRAINID)
    with pytest.raises(UserError) as e:
        opened.class_counts(DATA)
    assert str(e.value) == (f"{old / 'train.json'} has no per-sample class counts (shards made before they "
                            "were recorded): re-shard (`distseg shard` with the same settings adds them), or "
                            "use data.sampling=uniform")
    assert len(opened.samples(DATA, log=lambda *a: None)) == 14  # read as before when nobody asks
    text = manifest_text(load_manifest(old, "train"), False)
    assert "images per class: not recorded" in text and "images" not in text.splitlines()[3]
    said = []
    run_shard(synth_root, old, ShardOptions(split="train", maxcount=4), progress=False, log=said.append)
    assert said[0] == f"{old / 'train.json'}: adding the per-sample class counts (decoding the masks of 4 " \
        "shards)"
    assert said[1].endswith("is up to date (14 samples in 4 shards); nothing to do")
    assert (old / "train.counts.npy").read_bytes() == (shards / "train.counts.npy").read_bytes()
    (old / "train.counts.npy").unlink()  # a counts file gone: one line, and the same rerun writes it again
    with pytest.raises(UserError, match=r"train.counts.npy, listed in .*, are missing: rerun `distseg shard"):
        open_split(old, "train", TRAINID).class_counts(DATA)
    run_shard(synth_root, old, ShardOptions(split="train", maxcount=4), **QUIET)
    assert (old / "train.counts.npy").read_bytes() == (shards / "train.counts.npy").read_bytes()
    data = bytearray((old / "train.counts.npy").read_bytes())
    data[-1] ^= 1  # a changed count: refused by inspect --verify and by a reader, one line each
    (old / "train.counts.npy").write_bytes(bytes(data))
    with pytest.raises(UserError, match=r"train.counts.npy fail their sha256 check: delete them and rerun"):
        load_manifest(old, "train", verify=True)
    with pytest.raises(UserError, match=r"train.counts.npy fail their sha256 check \(changed since"):
        open_split(old, "train", TRAINID).class_counts(dataclasses.replace(DATA, cache_dir=str(tmp_path)))
    man = json.loads((old / "train.json").read_text())
    man["class_counts"]["name"] = "../../etc/passwd"
    (old / "train.json").write_text(json.dumps(man))
    with pytest.raises(UserError, match="invalid class counts '../../etc/passwd' .expected train.counts.npy"):
        load_manifest(old, "train")


def test_zstd_shards_made_before_get_their_counts_too(synth_root, tmp_path):
    run_shard(synth_root, tmp_path, ShardOptions(split="val", lossless="zstd", maxcount=2), **QUIET)
    want = (tmp_path / "val.counts.npy").read_bytes()
    man = json.loads((tmp_path / "val.json").read_text())
    del man["class_counts"]
    (tmp_path / "val.json").write_text(json.dumps(man))
    (tmp_path / "val.counts.npy").unlink()
    run_shard(synth_root, tmp_path, ShardOptions(split="val", lossless="zstd", maxcount=2), **QUIET)
    assert (tmp_path / "val.counts.npy").read_bytes() == want
    np.testing.assert_array_equal(open_split(tmp_path, "val", TRAINID).class_counts(DATA),
                                  decoded(tmp_path, "val"))


def test_inspect_shows_images_per_class(shards):
    man = load_manifest(shards, "train")
    rows = manifest_text(man, False).splitlines()
    assert rows[3].split() == ["class", "pixels", "share", "images"]
    table = {r.split()[0]: r.split() for r in rows[4:4 + 20]}
    counts = open_split(shards, "train", TRAINID).class_counts(DATA)
    assert table["road"][-1] == str(int((counts[:, 0] > 0).sum())) == "14"
    assert table["rider"][-1] == "0" and table["(ignore)"][-1].endswith("%")
    assert int(table["person"][-1]) == man["class_images"]["person"] > 0


def test_rare_classes_are_each_in_a_few_percent_of_the_images():
    for seed in (0, 1, 7):
        held = {kind: [i for i in range(64) if kind in rare_kinds(seed, "train", i)] for kind in RARE}
        for kind, images in held.items():
            assert 2 <= len(images) <= 5, (seed, kind, images)  # 3-8% of 64
        assert all(len(rare_kinds(seed, "train", i)) <= 1 for i in range(64))
        assert all(any(kind in rare_kinds(seed, "val", i) for i in range(12)) for kind in RARE)  # val: 12


@pytest.mark.parametrize("size", [(128, 64), (256, 128)])
def test_rare_objects_are_seen_and_change_no_other_pixel(size):
    w, h = size
    seen = set()
    for i in range(24):
        plain = render_scene(sample_rng(0, "train", i), w, h)
        kinds = rare_kinds(0, "train", i)
        rare = render_scene(sample_rng(0, "train", i), w, h, kinds, rare_rng(0, "train", i))
        lab = rare[1]
        ids = [L[k] for k in kinds] + ([L["bicycle"]] if "rider" in kinds else [])
        for lid in ids:
            assert 0 < (lab == lid).sum() < 0.02 * w * h, (i, lid)  # there, and small
            seen.add(lid)
        outside = ~np.isin(lab, ids)
        for a, b in zip(plain, rare):
            np.testing.assert_array_equal(a[outside], b[outside])
    assert seen == {L["bus"], L["rider"], L["bicycle"], L["motorcycle"]}


def test_synth_rare_is_counted_by_the_shards_and_changes_only_its_images(tmp_path):
    args = ["--train", "20", "--val", "12", "--size", "128x64", "--seed", "2"]
    for name, extra in (("plain", []), ("rare", ["--rare"])):
        r = CliRunner().invoke(synth, ["--out", str(tmp_path / name), *args, *extra])
        assert r.exit_code == 0, r.output
    assert "with rare classes (bus, rider on a bicycle, motorcycle: 1 image in 20 each)" in r.output
    with_rare = {f"{split}/{i:06d}" for split, n in (("train", 20), ("val", 12)) for i in range(n)
                 if rare_kinds(2, split, i)}
    assert len(with_rare) == 6
    for p in sorted((tmp_path / "rare").rglob("*.png")):
        q = tmp_path / "plain" / p.relative_to(tmp_path / "rare")
        split, _city, name = p.relative_to(tmp_path / "rare").parts[1:]
        i = int(name.split("_")[1]) * (2 if split == "train" else 1) + (p.parent.name == "bochum")
        assert (p.read_bytes() == q.read_bytes()) == (f"{split}/{i:06d}" not in with_rare), p
    for split in ("train", "val"):
        man = run_shard(tmp_path / "rare", tmp_path / "s", ShardOptions(split=split), **QUIET)
        for kind in (*RARE, "bicycle"):
            assert man["class_images"][kind] >= 1, (split, kind)
        assert man["class_images"]["car"] == man["total"]
