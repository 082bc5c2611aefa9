import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time

import numpy as np
import pytest
from PIL import Image

from conftest import assert_user_error, run_cli, split_keys
from distseg.labels import get_scheme
from distseg.shards.cityscapes import find_pairs
from distseg.shards.codec import member_names
from distseg.shards.shard import ShardOptions, run_shard
from distseg.shards.shard_reader import decode_mask, decode_rgb


def read_tar(path):
    with tarfile.open(path) as t:
        return {m.name: t.extractfile(m).read() for m in t.getmembers()}


def all_samples(out, split="train"):
    man = json.loads((out / f"{split}.json").read_text())
    samples = {}
    for sh in man["shards"]:
        files = read_tar(out / sh["name"])
        keys = sorted({n.split(".", 1)[0] for n in files})
        assert "keys" not in sh and len(keys) == sh["count"]
        for k in keys:
            samples[k] = {n.split(".", 1)[1]: d for n, d in files.items() if n.split(".", 1)[0] == k}
    return man, samples


@pytest.mark.parametrize("lossless", ["png", "zstd"])
def test_lossless_round_trip_is_bit_exact(synth_root, tmp_path, lossless):
    out = tmp_path / "s"
    run_shard(synth_root, out, ShardOptions(split="train", image_format="png", maxcount=5, lossless=lossless),
              progress=False, log=lambda *a: None)
    man, samples = all_samples(out)
    pairs = {p.key: p for p in find_pairs(synth_root, "train")}
    assert set(samples) == set(pairs) and man["total"] == len(pairs)
    assert (man["image_ext"], man["mask_ext"]) == member_names("png", lossless)
    scheme = get_scheme("trainid")
    hist = np.zeros(256, np.int64)
    for k, files in samples.items():
        if lossless == "zstd":  # the loader's own decoders
            img = decode_rgb(files["rgb.zst"]).permute(1, 2, 0).numpy()
            mask = decode_mask(files["mask.zst"], None).numpy()
        else:
            img = np.asarray(Image.open(io.BytesIO(files["png"])))
            mask = np.asarray(Image.open(io.BytesIO(files["mask.png"])))
            assert Image.open(io.BytesIO(files["mask.png"])).mode == "L"
        np.testing.assert_array_equal(img, np.asarray(Image.open(pairs[k].image).convert("RGB")))
        np.testing.assert_array_equal(mask, scheme.remap(np.asarray(Image.open(pairs[k].label))))
        assert json.loads(files["json"])["key"] == k
        hist += np.bincount(mask.ravel(), minlength=256)
    assert man["class_pixels"] == {n: int(hist[i]) for i, n in enumerate(scheme.class_names)}
    assert man["ignore_pixels"] == int(hist[255])


def test_val_is_lossless_by_default_and_jpeg_val_states_the_drift(synth_root, tmp_path):
    for split, ext in (("val", "png"), ("train", "jpg")):
        p = run_cli("shard", "--split", split, "--root", synth_root, "--out", tmp_path / "d")
        assert json.loads((tmp_path / "d" / f"{split}.json").read_text())["image_ext"] == ext
        assert "note:" not in p.stdout
    p = run_cli("shard", "--split", "val", "--root", synth_root, "--out", tmp_path / "j", "--image-format",
                "jpg")
    assert "note: val images as JPEG q95" in p.stdout and "differ slightly" in p.stdout


def test_jpeg_masks_exact_images_close_and_resize(synth_root, tmp_path):
    out = tmp_path / "s"
    run_cli("shard", "--split", "val", "--root", synth_root, "--out", out, "--resize", "128x64", "--scheme",
            "category",
            "--image-format", "jpg")
    man, samples = all_samples(out, "val")
    pairs = {p.key: p for p in find_pairs(synth_root, "val")}
    scheme = get_scheme("category")
    for k, files in samples.items():
        img = np.asarray(Image.open(io.BytesIO(files["jpg"])), np.float64)
        assert img.shape == (64, 128, 3)
        ref = Image.open(pairs[k].image).convert("RGB").resize((128, 64), Image.Resampling.BILINEAR)
        ref = np.asarray(ref, np.float64)
        psnr = 10 * np.log10(255 ** 2 / np.mean((img - ref) ** 2))
        assert psnr > 30, psnr
        lab = Image.open(pairs[k].label).resize((128, 64), Image.Resampling.NEAREST)
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(files["mask.png"]))),
                                      scheme.remap(np.asarray(lab)))


def test_workers_1_and_2_write_identical_shards(synth_root, tmp_path):
    mans = []
    for w in (1, 2):
        run_cli("shard", "--split", "train", "--root", synth_root, "--out", tmp_path / f"w{w}", "--maxcount",
                "3",
                "--workers", w)
        mans.append(json.loads((tmp_path / f"w{w}" / "train.json").read_text())["shards"])
    assert mans[0] == mans[1]
    assert len(mans[0]) == 5  # 14 samples, 3 per shard
    keys = split_keys(tmp_path / "w1")
    assert sorted(keys) == sorted(p.key for p in find_pairs(synth_root, "train"))
    assert keys != sorted(keys), "samples must be shuffled across shards"


def test_maxsize_bounds_shards(synth_root, tmp_path):
    run_cli("shard", "--split", "train", "--root", synth_root, "--out", tmp_path, "--maxsize", "60K")
    man = json.loads((tmp_path / "train.json").read_text())
    assert len(man["shards"]) > 1 and man["total"] == 14
    for sh in man["shards"]:
        assert sh["bytes"] <= 60 * 1024 + 10240 or sh["count"] == 1  # + tar end-of-archive record


def test_readable_by_webdataset_and_dali(synth_root, tmp_path):
    run_cli("shard", "--split", "train", "--root", synth_root, "--out", tmp_path, "--maxcount", "4")
    man = json.loads((tmp_path / "train.json").read_text())
    tars = [str(tmp_path / sh["name"]) for sh in man["shards"]]
    wds = pytest.importorskip("webdataset")
    got = [s["__key__"] for s in wds.WebDataset(tars, shardshuffle=False, empty_check=False)]
    assert sorted(got) == sorted(split_keys(tmp_path))
    # DALI's reader with our .idx files (CPU-only pipeline)
    from nvidia.dali import fn, pipeline_def

    @pipeline_def(batch_size=1, num_threads=1, device_id=None)
    def pipe():
        jpg, mask = fn.readers.webdataset(paths=tars, index_paths=[t[:-4] + ".idx" for t in tars],
                                          ext=["jpg", "mask.png"], name="r")
        return fn.decoders.image(jpg, device="cpu"), fn.decoders.image(mask, device="cpu", output_type=0)

    p = pipe()
    p.build()
    n = p.reader_meta("r")["epoch_size"]
    assert n == man["total"]
    for _ in range(n):
        img, mask = p.run()
        assert np.asarray(img[0]).shape == (128, 256, 3)


def test_kill_mid_run_leaves_no_partial_tar_and_rerun_resumes(synth_root, tmp_path):
    ref = tmp_path / "ref"
    run_cli("shard", "--split", "train", "--root", synth_root, "--out", ref, "--maxcount", "2")
    out = tmp_path / "out"
    env = dict(os.environ, DISTSEG_SHARD_THROTTLE="0.15")
    proc = subprocess.Popen([sys.executable, "-m", "distseg", "shard", "--split", "train", "--root",
                             str(synth_root),
                             "--out", str(out), "--maxcount", "2"], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while time.time() < deadline and len(list(out.glob("train-*.tar"))) < 2:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    tars = sorted(out.glob("train-*.tar"))
    assert 2 <= len(tars) < 7, "the kill must land mid-run"
    assert not (out / "train.json").exists()
    state = json.loads((out / "train.state.json").read_text())
    ref_man = json.loads((ref / "train.json").read_text())
    for t in tars:  # every .tar on disk is complete: identical to the uninterrupted run's shard
        assert read_tar(t).keys() == read_tar(ref / t.name).keys()
        assert t.read_bytes() == (ref / t.name).read_bytes()
    assert len(state["shards"]) >= len(tars) - 1
    p = run_cli("shard", "--split", "train", "--root", synth_root, "--out", out, "--maxcount", "2")
    assert "resuming" in p.stdout
    man = json.loads((out / "train.json").read_text())
    assert [(s["name"], s["sha256"], s["keys_sha"]) for s in man["shards"]] == \
        [(s["name"], s["sha256"], s["keys_sha"]) for s in ref_man["shards"]]
    assert not list(out.glob("*.tmp")) and not (out / "train.state.json").exists()
    assert (out / "train.counts.npy").read_bytes() == (ref / "train.counts.npy").read_bytes()


def _copy_tree(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_bad_inputs_give_one_line_and_no_partial_shard(synth_root, tmp_path):
    assert_user_error(run_cli("shard", "--split", "train", "--root", tmp_path / "nope", "--out",
                              tmp_path / "o",
                              check=False), "dataset root not found")
    assert_user_error(run_cli("shard", "--split", "tain", "--root", synth_root, "--out", tmp_path / "o",
                              check=False),
                      "split 'tain' not found")
    assert_user_error(run_cli("shard", "--split", "train", "--root", synth_root, "--scheme", "foo",
                              check=False),
                      "unknown scheme")
    assert_user_error(run_cli("shard", "--split", "train", "--root", synth_root, "--resize", "12by4",
                              check=False),
                      "bad size")
    # missing label
    root = _copy_tree(synth_root, tmp_path / "r1")
    victim = sorted((root / "gtFine" / "train").glob("*/*_labelIds.png"))[3]
    victim.unlink()
    assert_user_error(run_cli("shard", "--split", "train", "--root", root, "--out", tmp_path / "o1",
                              check=False),
                      "missing label file")
    # size mismatch
    root = _copy_tree(synth_root, tmp_path / "r2")
    lab = sorted((root / "gtFine" / "train").glob("*/*_labelIds.png"))[5]
    Image.open(lab).resize((100, 50)).save(lab)
    p = run_cli("shard", "--split", "train", "--root", root, "--out", tmp_path / "o2", "--maxcount", "2",
                check=False)
    assert_user_error(p, "size mismatch")
    # corrupt PNG, found after some shards were written: those stay valid, no partial one is left
    root = _copy_tree(synth_root, tmp_path / "r3")
    out = tmp_path / "o3"
    imgs = sorted((root / "leftImg8bit" / "train").glob("*/*.png"))
    ref = tmp_path / "ref"
    run_cli("shard", "--split", "train", "--root", synth_root, "--out", ref, "--maxcount", "2")
    keys = split_keys(ref)
    bad = next(i for i in imgs if i.name.startswith(keys[9]))
    bad.write_bytes(bad.read_bytes()[:200])
    p = run_cli("shard", "--split", "train", "--root", root, "--out", out, "--maxcount", "2", check=False)
    assert_user_error(p, "corrupt or unreadable image")
    assert not list(out.glob("*.tmp")) and not (out / "train.json").exists()
    tars = sorted(out.glob("train-*.tar"))
    assert [t.name for t in tars] == [f"train-{i:06d}.tar" for i in range(4)]
    for t in tars:
        assert t.read_bytes() == (ref / t.name).read_bytes()
    # fixing the file and rerunning resumes and completes
    shutil.copy(synth_root / bad.relative_to(root), bad)
    p = run_cli("shard", "--split", "train", "--root", root, "--out", out, "--maxcount", "2")
    assert "resuming: 4 finished shards" in p.stdout
    run_cli("inspect", out / "train.json", "--verify")


def test_rerun_with_other_settings_refuses_without_overwrite(synth_root, tmp_path):
    run_cli("shard", "--split", "val", "--root", synth_root, "--out", tmp_path)
    before = (tmp_path / "val.json").read_text()
    assert_user_error(run_cli("shard", "--split", "val", "--root", synth_root, "--out", tmp_path,
                              "--quality", "80",
                              check=False), "--overwrite")
    assert (tmp_path / "val.json").read_text() == before
    run_cli("shard", "--split", "val", "--root", synth_root, "--out", tmp_path, "--quality", "80",
            "--overwrite")
    assert json.loads((tmp_path / "val.json").read_text())["params"]["quality"] == 80
    assert_user_error(run_cli("inspect", tmp_path / "train.json", check=False), "no manifest")


def test_sigterm_mid_run_cleans_up_and_rerun_resumes(synth_root, tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, DISTSEG_SHARD_THROTTLE="0.15")
    proc = subprocess.Popen([sys.executable, "-m", "distseg", "shard", "--split", "train", "--root",
                             str(synth_root),
                             "--out", str(out), "--maxcount", "2", "--workers", "2"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while time.time() < deadline and len(list(out.glob("train-*.tar"))) < 1:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143 and "Traceback" not in err, err
    assert not list(out.glob("*.tmp")), "the shard being written is removed on TERM"
    state = json.loads((out / "train.state.json").read_text())
    tars = sorted(t.name for t in out.glob("train-*.tar"))
    listed = [s["name"] for s in state["shards"]]
    # a TERM between a shard's rename and the state update leaves one complete shard not yet listed
    assert listed == tars[: len(listed)] and len(tars) - len(listed) <= 1
    for t in tars:
        assert len(read_tar(out / t)) == 6  # complete: 2 samples x (jpg, mask.png, json)
    p = run_cli("shard", "--split", "train", "--root", synth_root, "--out", out, "--maxcount", "2")
    assert "resuming" in p.stdout and json.loads((out / "train.json").read_text())["total"] == 14


def test_synth_writes_the_same_files_with_any_number_of_workers(tmp_path):
    from distseg.shards.synth import write_synth

    for w in (1, 2):
        write_synth(tmp_path / f"w{w}", {"train": 5, "val": 2}, 128, 64, seed=4, progress=False, workers=w)
    files = sorted(p.relative_to(tmp_path / "w1") for p in (tmp_path / "w1").rglob("*.png"))
    assert len(files) == 7 * 4
    for f in files:
        assert (tmp_path / "w1" / f).read_bytes() == (tmp_path / "w2" / f).read_bytes(), f
