"""Scores equal to the official Cityscapes evaluation, run inside the test on the same files: `distseg
predict` output of a short-trained model (whole image, and slide windows with flip), and a folder of
perturbed ground truth; plus training validation == evaluate, 2-process predict == 1-process predict, and
the results-folder mistakes the official script meets with IndexErrors, each as one error line."""

import json
import math
import os
import shutil
import subprocess
import sys
import zipfile

import numpy as np
import pytest
from PIL import Image

from conftest import free_port, run_cli
from distseg.errors import UserError
from distseg.flows.evaluate import score_results
from distseg.flows.predict import predict

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def official():
    """cityscapesscripts' evaluator, `np.in1d` (removed in numpy 2.4) restored in this test process only."""
    if not hasattr(np, "in1d"):
        np.in1d = lambda a, b, invert=False: np.isin(a, b, invert=invert).ravel()
    ev = pytest.importorskip("cityscapesscripts.evaluation.evalPixelLevelSemanticLabeling")
    ev.args.evalInstLevelScore = True
    ev.args.JSONOutput = False
    ev.args.quiet = True

    def run(preds, gts):
        return ev.evaluateImgLists([str(p) for p in preds], [str(g) for g in gts], ev.args)
    return run


def gts_of(root, split="val"):
    return sorted((root / "gtFine" / split).glob("*/*_gtFine_labelIds.png"))


def key(gt):
    return gt.name.replace("_gtFine_labelIds.png", "")


def assert_equal_to_official(ours: dict, off: dict, tol=1e-6):
    def same(a, b, what):
        if b is None or (isinstance(b, float) and math.isnan(b)):
            assert a is None, what
        else:
            assert a == pytest.approx(b, abs=tol), what

    for name, v in off["classScores"].items():
        if name in ours["iou"]:
            same(ours["iou"][name], v, f"IoU {name}")
            same(ours["iiou"][name], off["classInstScores"][name], f"iIoU {name}")
    assert len(ours["iou"]) == 19
    for cat, v in off["categoryScores"].items():
        same(ours["category_iou"][cat], v, f"category IoU {cat}")
        same(ours["category_iiou"][cat], off["categoryInstScores"][cat], f"category iIoU {cat}")
    same(ours["miou"], off["averageScoreClasses"], "class mIoU")
    same(ours["miiou"], off["averageScoreInstClasses"], "class iIoU")
    same(ours["category_miou"], off["averageScoreCategories"], "category mIoU")
    same(ours["category_miiou"], off["averageScoreInstCategories"], "category iIoU")
    # a comparison that means something: several classes and instance classes actually scored
    assert sum(v is not None and v > 0 for v in ours["iou"].values()) >= 2
    assert sum(v is not None for v in ours["iiou"].values()) >= 1


@pytest.mark.parametrize("mode", [[], ["eval.mode=slide", "eval.crop=[64,96]", "eval.stride=[40,60]",
                                       "eval.flip=true"]],
                         ids=["whole", "slide+flip"])
def test_predict_scored_officially_equals_evaluate(synth_root, one_proc_run, official, tmp_path, mode):
    res, ovl = tmp_path / "results", tmp_path / "overlays"
    sets = [a for m in mode for a in ("--set", m)]
    run_cli("predict", "--run", one_proc_run, "--out", res, "--root", synth_root, "--split", "val",
            "--overlays", ovl, *sets)
    gts = gts_of(synth_root)
    # the results folder holds exactly one official-format file per image and nothing else
    assert sorted(p.name for p in res.rglob("*")) == sorted(f"{key(g)}_pred_labelIds.png" for g in gts)
    assert len(list(ovl.glob("*_overlay.png"))) == len(gts) == len(list(ovl.glob("*_color.png")))
    off = official([res / f"{key(g)}_pred_labelIds.png" for g in gts], gts)
    p = run_cli("evaluate", "--run", one_proc_run, "--json", tmp_path / "run.json", *mode)
    assert ("slide 96x64/60x40 + flip" in p.stdout) == bool(mode)  # W x H, as on command lines
    assert f"source images in {synth_root} (the run's source data)" in p.stdout
    assert "Score Average" in p.stdout and "iIoU" in p.stdout
    run_scores = json.loads((tmp_path / "run.json").read_text())  # printed in percent, as training prints
    assert f"Score Average   {100 * run_scores['miou']:7.2f}  {100 * run_scores['miiou']:7.2f}" in p.stdout
    assert "nan" not in p.stdout and "n/a" in p.stdout  # classes absent from the synthetic images
    assert_equal_to_official(json.loads((tmp_path / "run.json").read_text()), off)
    run_cli("evaluate", "--results", res, "--root", synth_root, "--json", tmp_path / "res.json")
    assert_equal_to_official(json.loads((tmp_path / "res.json").read_text()), off)


def perturbed(gt: np.ndarray, rng) -> np.ndarray:
    pred = gt.copy()
    noise = rng.random(gt.shape)
    pred[noise < 0.1] = rng.choice([7, 8, 11, 23, 26, 24, 0, 4, 29],
                                   size=(noise < 0.1).sum())  # incl. ignored ids
    pred[:, : gt.shape[1] // 8] = 26  # a block of false 'car'
    pred[gt.shape[0] // 2:, -gt.shape[1] // 6:] = 24  # and of false 'person'
    return pred


def test_perturbed_ground_truth_scores_as_officially(synth_root, official, tmp_path):
    rng = np.random.default_rng(0)
    res = tmp_path / "res" / "frankfurt"  # nested: results are found anywhere under the folder, as officially
    res.mkdir(parents=True)
    gts = gts_of(synth_root)
    preds = []
    for g in gts:
        preds.append(res / f"{key(g)}_anything.png")
        Image.fromarray(perturbed(np.asarray(Image.open(g)), rng)).save(preds[-1])
    off = official(preds, gts)
    run_cli("evaluate", "--results", tmp_path / "res", "--root", synth_root, "--json", tmp_path / "s.json")
    ours = json.loads((tmp_path / "s.json").read_text())
    assert_equal_to_official(ours, off)
    assert ours["iiou"]["car"] is not None and ours["category_iiou"]["vehicle"] is not None
    json.loads((tmp_path / "s.json").read_text(), parse_constant=lambda c: pytest.fail(f"invalid JSON {c}"))


def test_training_validation_equals_evaluate_on_the_source_images(one_proc_run, tmp_path):
    """Lossless val shards: validation saw exactly the pixels evaluate reads from the source PNGs."""
    summary = json.loads((one_proc_run / "summary.json").read_text())
    run_cli("evaluate", "--run", one_proc_run, "--checkpoint", "latest", "--json", tmp_path / "s.json")
    ours = json.loads((tmp_path / "s.json").read_text())
    assert ours["miou"] == pytest.approx(summary["final_miou"], abs=1e-9)
    for name, v in summary["final_iou"].items():
        assert ours["iou"][name] == (None if v is None else pytest.approx(v, abs=1e-9)), name
    # the best validation's category IoU, as the official evaluation of the best weights computes it
    run_cli("evaluate", "--run", one_proc_run, "--json", tmp_path / "best.json")
    best = json.loads((tmp_path / "best.json").read_text())
    assert best["miou"] == pytest.approx(summary["best"]["miou"], abs=1e-9)
    cats = summary["best"]["category_iou"]
    assert set(best["category_iou"]) - set(cats) == {"void"} and best["category_iou"]["void"] is None
    assert sum(v is not None for v in cats.values()) >= 3
    for name, v in best["category_iou"].items() - {("void", None)}:
        assert cats[name] == (None if v is None else pytest.approx(v, abs=1e-9)), name


def test_two_process_predict_writes_identical_files(synth_root, one_proc_run, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    # the split's images found as evaluate finds them (the run's source data), and said
    p = run_cli("predict", "--run", one_proc_run, "--out", one, "--split", "val", "--precision", "no",
                "--batch-size", "2", "eval.flip=false")
    assert f"predicting the val split of {synth_root} (the run's source data)" in p.stdout
    cmd = [sys.executable, "-m", "distseg.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--main_process_port", str(free_port()), "--mixed_precision", "no",
           "--dynamo_backend", "no", "-m", "distseg", "predict", "--run", str(one_proc_run), "--out",
           str(two), "--root", str(synth_root), "--split", "val", "--precision", "no", "--batch-size", "2"]
    p = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"),
                       timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.count("wrote 5 results") == 1  # once, by rank 0
    names = sorted(f.name for f in one.iterdir())
    assert len(names) == 5 and names == sorted(f.name for f in two.iterdir())
    for n in names:
        assert (one / n).read_bytes() == (two / n).read_bytes(), n


def test_predict_inputs_names_and_zip(synth_root, one_proc_run, tmp_path):
    src = sorted((synth_root / "leftImg8bit" / "val").glob("*/*.png"))
    plain = tmp_path / "plain"
    plain.mkdir()
    shutil.copy(src[0], plain / "street.png")
    Image.open(src[1]).convert("RGB").save(plain / "other.jpg")
    assert "//" not in run_cli("predict", "--run", one_proc_run, "--out", f"{tmp_path}/o/", plain).stdout
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["other_pred_labelIds.png",
                                                                  "street_pred_labelIds.png"]
    # a Cityscapes folder: only the camera images, even with results and ground truth inside it
    mixed = tmp_path / "mixed"
    shutil.copytree(synth_root / "leftImg8bit" / "val", mixed)
    shutil.copy(next((synth_root / "gtFine" / "val").glob("*/*_labelIds.png")), mixed)
    run_cli("predict", "--run", one_proc_run, "--out", tmp_path / "m", mixed)
    assert len(list((tmp_path / "m").iterdir())) == 5
    # the test split as the benchmark server's archive
    z = tmp_path / "submit.zip"
    run_cli("predict", "--run", one_proc_run, "--out", tmp_path / "t", "--root", synth_root, "--split",
            "test",
            "--zip", z)
    with zipfile.ZipFile(z) as f:
        names = sorted(f.namelist())
    assert len(names) == 2
    assert all(n.startswith("berlin_") and n.endswith("_pred_labelIds.png") for n in names)
    label = next((synth_root / "gtFine" / "val").glob("*/*_labelIds.png"))
    for inputs, overlays, needle in (((synth_root / "gtFine" / "val",), None, "not camera images"),
                                     ((label,), None, "is a label or result image"),
                                     ((plain,), tmp_path / "x", "--overlays must be another folder")):
        with pytest.raises(UserError, match=needle):
            predict(str(one_proc_run), tuple(map(str, inputs)), str(tmp_path / "x"),
                    overlays=overlays and str(overlays))
    assert not (tmp_path / "x").exists()


def test_results_folder_mistakes_are_one_line(synth_root, tmp_path):
    from distseg.labels import get_scheme

    gts = gts_of(synth_root)

    def folder(name, edit=None):
        d = tmp_path / name
        d.mkdir()
        for g in gts:
            arr = np.asarray(Image.open(g))
            Image.fromarray(edit(arr) if edit else arr).save(d / f"{key(g)}_pred.png")
        return d

    def check(d, needle):  # what `distseg evaluate --results d --root ROOT` raises as its one line
        with pytest.raises(UserError) as e:
            score_results(str(d), str(synth_root))
        assert needle in str(e.value)

    d = folder("missing")
    (d / f"{key(gts[2])}_pred.png").unlink()
    check(d, f"no prediction for ground truth {gts[2]}")
    d = folder("twice")
    shutil.copy(d / f"{key(gts[1])}_pred.png", d / f"{key(gts[1])}_overlay.png")
    check(d, "several predictions for ground truth")
    check(folder("size", lambda a: np.asarray(Image.fromarray(a).resize((100, 50)))),
          "but its ground truth is 256x128")
    check(folder("rgb", lambda a: np.stack([a] * 3, -1)), "has 3 channels")
    train = get_scheme("trainid")
    check(folder("trainids", lambda a: train.remap(a)), "not a Cityscapes label id (0-33) (trainIds")
    check(folder("trainids0", lambda a: np.where(train.remap(a) == 255, 0, train.remap(a)).astype(np.uint8)),
          "looks like trainIds")
    check(tmp_path / "none", "results folder not found")


def test_binary_run_reports_foreground_iou(synth_root, person_shards, tmp_path):
    """A person run: predict writes class indexes, evaluate reports the foreground IoU of those same maps."""
    import torch

    from conftest import base_overrides, run_train
    from distseg.inference.metrics import ConfusionMatrix
    from distseg.labels import get_scheme

    run_train(base_overrides(person_shards, tmp_path, "p", **{"data.scheme": "person", "train.epochs": 1}))
    p = run_cli("evaluate", "--run", tmp_path / "p", "--json", tmp_path / "p.json")
    ours = json.loads((tmp_path / "p.json").read_text())
    assert f"foreground IoU  {100 * ours['foreground_iou']:8.2f}" in p.stdout
    run_cli("predict", "--run", tmp_path / "p", "--out", tmp_path / "pred", "--root", synth_root, "--split",
            "val")
    scheme, cm = get_scheme("person"), ConfusionMatrix(2)
    for g in gts_of(synth_root):
        pred = np.asarray(Image.open(tmp_path / "pred" / f"{key(g)}_pred_classes.png"))
        assert pred.max() <= 1
        cm.update(torch.from_numpy(pred.astype(np.int64)),
                  torch.from_numpy(scheme.remap(np.asarray(Image.open(g)))))
    fg = cm.scores()["iou"][1]
    assert ours["foreground_iou"] == pytest.approx(fg, abs=1e-12)
    run_cli("evaluate", "--results", tmp_path / "pred", "--root", synth_root, "--scheme", "person",
            "--json", tmp_path / "r.json")
    assert json.loads((tmp_path / "r.json").read_text())["foreground_iou"] == pytest.approx(fg, abs=1e-12)
