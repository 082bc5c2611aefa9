"""Coarse labels: `distseg synth --extra` (train_extra and gtCoarse in the real layout) and coarse shards."""

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from conftest import assert_user_error, run_cli
from distseg.commands.data import synth
from distseg.commands.inspect import manifest_text
from distseg.errors import UserError
from distseg.labels import BUILTIN_SCHEMES, ID2LABEL, get_scheme
from distseg.shards.cityscapes import find_pairs
from distseg.shards.manifest import load_manifest
from distseg.shards.shard import ShardOptions, run_shard
from distseg.shards.shard_reader import ShardFiles, ShardSamples, decode_mask, decode_rgb
from distseg.shards.synth import coarse_margin, render_scene, sample_rng, stem_of, write_synth

# sha256 over (relative path, sha256 of the bytes) of every file `synth --out D --train 3 --val 2 --test 1
# --size 128x64 --seed 5` writes, recorded on the code before `--extra` existed (commit 8b15294), and the
# same without `--rare` (tests/test_shards_counts.py): the demo's expected mIoU, the tests and the benchmarks
# depend on these bytes.
SYNTH_TREE_SHA = "a196dac723fd0610499ec649d1647e8f9b974b75b223b6137f831fa66baba9a8"
COUNTS = {"train": 3, "val": 2, "test": 1}
EXTRA = 5
EXTRA_CITIES = {"augsburg", "bad-honnef", "bamberg", "bayreuth", "dortmund"}
W, H, SEED = 128, 64, 5
QUIET = {"progress": False, "log": lambda *a: None}


def tree_sha(root: Path, skip=lambda rel: False) -> tuple[int, str]:
    """(number of files, sha256 over each file's relative path and content hash, in path order)."""
    h = hashlib.sha256()
    files = sorted(p for p in root.rglob("*") if p.is_file() and not skip(p.relative_to(root)))
    for p in files:
        h.update(p.relative_to(root).as_posix().encode() + b"\0" + hashlib.sha256(p.read_bytes()).digest())
    return len(files), h.hexdigest()


def is_coarse_file(rel: Path) -> bool:
    return rel.parts[0] == "gtCoarse" or "train_extra" in rel.parts


def read(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.array(im)


@pytest.fixture(scope="module")
def coarse_root(tmp_path_factory) -> Path:
    """The fixed invocation of the hash, with --extra 5."""
    root = tmp_path_factory.mktemp("coarse")
    write_synth(root, {**COUNTS, "train_extra": EXTRA}, W, H, seed=SEED, progress=False)
    return root


def test_synth_without_extra_writes_the_same_bytes_as_before(tmp_path):
    r = CliRunner().invoke(synth, ["--out", str(tmp_path), "--train", "3", "--val", "2", "--test", "1",
                                   "--size", "128x64", "--seed", "5"])
    assert r.exit_code == 0, r.output
    assert tree_sha(tmp_path) == (6 * 4, SYNTH_TREE_SHA)


def test_synth_extra_writes_the_real_coarse_layout(coarse_root, tmp_path):
    # the fine part of the tree is unchanged by --extra: the same bytes as without it
    assert tree_sha(coarse_root, is_coarse_file) == (6 * 4, SYNTH_TREE_SHA)
    extra = sorted((coarse_root / "leftImg8bit" / "train_extra").glob("*/*_leftImg8bit.png"))
    assert len(extra) == EXTRA and {p.parent.name for p in extra} == EXTRA_CITIES
    assert (coarse_root / "leftImg8bit/train_extra/bad-honnef" / "bad-honnef_000000_000000_leftImg8bit.png"
            ).is_file()
    assert not (coarse_root / "gtFine" / "train_extra").exists()  # as the real dataset: coarse labels only
    assert sorted(p.name for p in (coarse_root / "gtCoarse").iterdir()) == ["train", "train_extra", "val"]
    for split, n in (("train", 3), ("val", 2), ("train_extra", EXTRA)):
        images = sorted((coarse_root / "leftImg8bit" / split).glob("*/*_leftImg8bit.png"))
        assert len(images) == n
        for kind in ("labelIds", "color", "instanceIds"):
            files = sorted((coarse_root / "gtCoarse" / split).glob(f"*/*_gtCoarse_{kind}.png"))
            assert len(files) == n, (split, kind)
            assert all(re.fullmatch(rf"[a-z-]+_\d{{6}}_\d{{6}}_gtCoarse_{kind}\.png", f.name) for f in files)
            # one beside each image: same city folder, same <city>_<seq>_<frame>
            assert [(f.parent.name, f.name.split("_gtCoarse_")[0]) for f in files] == \
                [(i.parent.name, i.name[:-len("_leftImg8bit.png")]) for i in images]
    # deterministic by seed, in any number of processes
    write_synth(tmp_path, {**COUNTS, "train_extra": EXTRA}, W, H, seed=SEED, progress=False, workers=2)
    assert tree_sha(tmp_path) == tree_sha(coarse_root)


def boundary(a: np.ndarray) -> np.ndarray:
    """True at pixels with a 4-neighbour of another value."""
    b = np.zeros(a.shape, bool)
    b[1:] |= a[1:] != a[:-1]
    b[:-1] |= a[:-1] != a[1:]
    b[:, 1:] |= a[:, 1:] != a[:, :-1]
    b[:, :-1] |= a[:, :-1] != a[:, 1:]
    return b


def eroded(region: np.ndarray, m: int) -> np.ndarray:
    """Pixels whose whole (2m+1)^2 window (the edge repeated) is in `region`."""
    win = np.lib.stride_tricks.sliding_window_view(np.pad(region, m, mode="edge"), (2 * m + 1, 2 * m + 1))
    return win.all(axis=(2, 3))


def fine_of(root: Path, split: str, i: int) -> tuple[np.ndarray, np.ndarray]:
    """The fine (labelIds, instanceIds) of image i: the gtFine files, or for train_extra (which has none)
    the scene rendered again."""
    city, stem = stem_of(split, i)
    if split == "train_extra":
        _, lab, inst = render_scene(sample_rng(SEED, split, i), W, H)
        return lab, inst
    gt = root / "gtFine" / split / city
    return read(gt / f"{stem}_gtFine_labelIds.png"), read(gt / f"{stem}_gtFine_instanceIds.png").astype(int)


def test_coarse_masks_are_coarse(coarse_root):
    m = coarse_margin(W, H)
    palette = {lid: lab.color for lid, lab in ID2LABEL.items() if lid >= 0}
    dropped_objects = 0
    for split, n in (("train", 3), ("val", 2), ("train_extra", EXTRA)):
        for i in range(n):
            lab, inst = fine_of(coarse_root, split, i)
            city, stem = stem_of(split, i)
            gt = coarse_root / "gtCoarse" / split / city
            coarse = read(gt / f"{stem}_gtCoarse_labelIds.png")
            c_inst = read(gt / f"{stem}_gtCoarse_instanceIds.png").astype(int)
            color = read(gt / f"{stem}_gtCoarse_color.png")
            labelled = coarse != 0
            assert 0 < labelled.sum() < (lab != 0).sum() and (lab != 0).all()
            np.testing.assert_array_equal(coarse[labelled], lab[labelled])  # never a wrong label
            edges = boundary(lab) | boundary(inst)
            assert edges.any() and not labelled[edges].any()  # boundaries left unlabelled
            np.testing.assert_array_equal(c_inst, np.where(labelled, inst, 0))
            for lid in np.unique(coarse):
                assert (color[coarse == lid][:, :3] == palette[lid]).all()
            # objects whose inside would survive the margin but carry no coarse label at all
            dropped_objects += sum(1 for r in np.unique(inst) if r >= 1000 and eroded(inst == r, m).any()
                                   and not labelled[inst == r].any())
    assert dropped_objects >= 1


@pytest.mark.parametrize("scheme", BUILTIN_SCHEMES)
def test_coarse_shards_of_train_extra_hold_the_gtcoarse_masks(coarse_root, tmp_path, scheme):
    man = run_shard(coarse_root, tmp_path, ShardOptions(split="train_extra", scheme=scheme, labels="coarse",
                                                        maxcount=2), **QUIET)
    assert man["labels"] == "coarse" and man["params"]["labels"] == "coarse" and man["total"] == EXTRA
    sch = get_scheme(scheme)
    samples = ShardSamples(man, ShardFiles(man), log=lambda *a: None)
    gt = {p.key: p for p in find_pairs(coarse_root, "train_extra", "coarse")}
    assert sorted(samples.key(i) for i in range(len(samples))) == sorted(gt)
    assert "bad-honnef_000000_000000" in gt
    for i in range(len(samples)):
        key, pair = samples.key(i), gt[samples.key(i)]
        assert pair.label == coarse_root / "gtCoarse/train_extra" / pair.city / f"{key}_gtCoarse_labelIds.png"
        np.testing.assert_array_equal(decode_mask(samples.read(i, "mask"), None).numpy(),
                                      sch.lut[read(pair.label)])
        assert tuple(decode_rgb(samples.read(i, "image")).shape) == (3, H, W)
        meta = json.loads(samples.read(i, "json"))
        assert meta["key"] == key and key.startswith(meta["city"] + "_") and meta["city"] in EXTRA_CITIES
    assert "labels coarse" in manifest_text(load_manifest(tmp_path, "train_extra"), False)


def test_coarse_train_shards_read_gtcoarse_not_gtfine(coarse_root, tmp_path):
    from distseg.shards.split import open_split

    run_shard(coarse_root, tmp_path, ShardOptions(split="train", scheme="labelid", labels="coarse"), **QUIET)
    opened = open_split(tmp_path, "train", get_scheme("trainid"))  # labelid shards, read as trainid
    samples = ShardSamples(opened.manifest, ShardFiles(opened.manifest), log=lambda *a: None)
    trainid = get_scheme("trainid").lut
    differs = 0
    for i in range(len(samples)):
        key = samples.key(i)
        city = key.split("_")[0]
        coarse = read(coarse_root / "gtCoarse/train" / city / f"{key}_gtCoarse_labelIds.png")
        fine = read(coarse_root / "gtFine/train" / city / f"{key}_gtFine_labelIds.png")
        mask = decode_mask(samples.read(i, "mask"), opened.lut).numpy()
        np.testing.assert_array_equal(mask, trainid[coarse])
        differs += not np.array_equal(mask, trainid[fine])
    assert len(samples) == 3 and differs == 3


def test_keys_of_hyphenated_cities_parse_where_results_are_matched(coarse_root, tmp_path):
    from distseg.flows.evaluate import match_results
    from distseg.shards.image_files import ImageItem, key_of

    pair = next(p for p in find_pairs(coarse_root, "train_extra", "coarse") if p.city == "bad-honnef")
    assert pair.key == key_of(pair.image) == "bad-honnef_000000_000000"
    pred = tmp_path / "bad-honnef" / "bad-honnef_000000_000000_pred_labelIds.png"
    pred.parent.mkdir()
    Image.fromarray(np.zeros((H, W), np.uint8)).save(pred)
    assert match_results(tmp_path, [ImageItem(pair.image, pair.key, pair.label)]) == [pred]


def test_labels_are_a_recorded_setting_and_older_manifests_read_as_fine(coarse_root, tmp_path):
    coarse, fine = tmp_path / "coarse", tmp_path / "fine"
    run_shard(coarse_root, coarse, ShardOptions(split="train", labels="coarse"), **QUIET)
    before = (coarse / "train.json").read_text()
    with pytest.raises(UserError) as e:
        run_shard(coarse_root, coarse, ShardOptions(split="train"), **QUIET)
    msg = str(e.value)
    assert "\n" not in msg and "--labels coarse -> fine" in msg and "--overwrite" in msg, msg
    assert "separate folders" in msg
    assert (coarse / "train.json").read_text() == before  # refused before touching anything
    # fine shards record no labels in their params (as before the option), so older sets stay up to date
    run_shard(coarse_root, fine, ShardOptions(split="train"), **QUIET)
    man = json.loads((fine / "train.json").read_text())
    assert man["labels"] == "fine" and "labels" not in man["params"]
    del man["labels"]  # a manifest written before coarse shards existed
    (fine / "train.json").write_text(json.dumps(man))
    assert load_manifest(fine, "train")["labels"] == "fine"
    assert "labels fine" in manifest_text(load_manifest(fine, "train"), False)
    logged = []
    run_shard(coarse_root, fine, ShardOptions(split="train"), progress=False, log=logged.append)
    assert "up to date" in logged[-1]
    with pytest.raises(UserError, match="--labels fine -> coarse"):
        run_shard(coarse_root, fine, ShardOptions(split="train", labels="coarse"), **QUIET)


def test_train_extra_with_fine_labels_is_one_line(coarse_root, tmp_path):
    p = run_cli("shard", "--split", "train_extra", "--root", coarse_root, "--out", tmp_path / "s",
                check=False)
    assert_user_error(p, "has coarse labels only")
    assert "--labels coarse" in p.stderr and not (tmp_path / "s").exists()


def test_coarse_labels_missing_from_a_tree_say_where_they_come_from(tmp_path):
    write_synth(tmp_path, {"train": 1}, W, H, progress=False)  # no --extra: fine labels only
    with pytest.raises(UserError, match=r"no coarse labels: .*gtCoarse.* `distseg synth --extra N`"):
        find_pairs(tmp_path, "train", "coarse")
    with pytest.raises(UserError, match="--labels must be one of fine, coarse"):
        run_shard(tmp_path, tmp_path / "s", ShardOptions(split="train", labels="rough"), **QUIET)
    with pytest.raises(UserError, match="split 'test' has no coarse labels"):
        run_shard(tmp_path, tmp_path / "s", ShardOptions(split="test", labels="coarse"), **QUIET)
    only_coarse = tmp_path / "c"
    (only_coarse / "leftImg8bit" / "val").mkdir(parents=True)
    (only_coarse / "gtCoarse" / "val").mkdir(parents=True)
    with pytest.raises(UserError, match=r"has no gtFine/val under .*, only gtCoarse/val \(`distseg shard "
                                        r"--labels coarse` reads it\)"):
        find_pairs(only_coarse, "val")
