"""Models users choose (issue 16): torchvision encoders with a U-Net decoder, pretrained weights from a local
file, class-weighted and OHEM cross-entropy against direct reference computations, EMA weights chosen by
evaluate/predict/export/fine-tuning, the ready configs, and ONNX / torch.export files equal to torch."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT, SGD, assert_user_error, base_overrides, run_cli, run_train
from distseg.config import dump_config, load_config
from distseg.errors import UserError
from distseg.labels import get_scheme
from distseg.models import build_model
from distseg.models.encoders import STAGES, EncoderUNet
from distseg.models.losses import SegLoss, class_weights
from distseg.models.weights import load_weights, save_weights
from distseg.runs.checkpoint import latest_checkpoint
from distseg.runs.run_dir import load_run

ENCODERS = ["unet", *STAGES]


def tiny_cfg(encoder: str, *extra: str):
    return load_config(None, [f"model.encoder={encoder}", "model.base=8", "model.depth=2", *extra])


@pytest.mark.parametrize("encoder", ENCODERS)
def test_every_encoder_gives_logits_at_the_input_size(encoder):
    torch.manual_seed(0)
    model = build_model(tiny_cfg(encoder), 5).eval()
    for n, h, w in ((1, 64, 96), (2, 37, 53), (1, 33, 71)):  # odd sizes: padded to the stride, cropped back
        with torch.no_grad():
            y = model(torch.randn(n, 3, h, w))
        assert y.shape == (n, 5, h, w) and torch.isfinite(y).all()


def test_a_local_torchvision_weights_file_is_really_loaded(tmp_path):
    import torchvision

    torch.manual_seed(1)
    net = torchvision.models.resnet18(weights=None)
    for v in net.state_dict().values():  # not torchvision's init: equality cannot happen by chance
        if v.is_floating_point():
            v.uniform_(0.5, 1.5)
    torch.save(net.state_dict(), tmp_path / "resnet18.pth")
    model = build_model(tiny_cfg("resnet18", f"model.pretrained={tmp_path / 'resnet18.pth'}"), 19)
    body = model.encoder.body.state_dict()
    for k, v in net.state_dict().items():
        if k.startswith("fc."):
            continue  # the classifier is not part of the encoder
        assert torch.equal(body[k], v), k
    # a distseg checkpoint of the same encoder (keys encoder.body.*) gives its encoder
    save_weights(model.state_dict(), tmp_path / "run_best", {})
    again = build_model(tiny_cfg("resnet18", f"model.pretrained={tmp_path / 'run_best'}"), 7)
    for k, v in again.encoder.body.state_dict().items():
        assert torch.equal(body[k], v), k


def test_wrong_weights_files_are_one_clear_error(shards, tmp_path):
    import torchvision

    torch.save(torchvision.models.resnet34(weights=None).state_dict(), tmp_path / "resnet34.pth")
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), tmp_path / "resnet50.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match=r"does not fit encoder resnet18: tensors \d+ unknown to it"):
        build_model(tiny_cfg("resnet18", f"model.pretrained={tmp_path / 'resnet34.pth'}"), 19)
    with pytest.raises(UserError, match=r"does not fit encoder resnet18: tensors \d+ with other shapes"):
        build_model(tiny_cfg("resnet18", f"model.pretrained={tmp_path / 'resnet50.pth'}"), 19)
    with pytest.raises(UserError, match="cannot read weights"):
        build_model(tiny_cfg("resnet18", f"model.pretrained={tmp_path / 'junk.pth'}"), 19)
    with pytest.raises(UserError, match="needs a torchvision encoder"):
        build_model(tiny_cfg("unet", f"model.pretrained={tmp_path / 'resnet34.pth'}"), 19)
    p = run_train(base_overrides(shards, tmp_path, "bad", **{
        "model.encoder": "resnet18", "model.pretrained": tmp_path / "resnet50.pth"}), check=False)
    assert_user_error(p, "does not fit encoder resnet18")
    p = run_train(base_overrides(shards, tmp_path, "bad2", **{
        "model.encoder": "resnet18", "model.pretrained": tmp_path / "nowhere.pth"}), check=False)
    assert_user_error(p, "weights file not found")
    assert not (tmp_path / "bad" / "checkpoints").exists()


# --- losses against direct reference computations -----------------------------------------------------


def batch(seed=0, n=2, c=5, h=12, w=16):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, c, h, w, generator=g) * 2
    target = torch.randint(0, c, (n, h, w), generator=g)
    target[torch.rand(n, h, w, generator=g) < 0.2] = 255
    return logits, target


def test_class_weights_from_the_manifest_histogram():
    scheme = get_scheme("trainid")
    counts = {name: (i + 1) * 1000 for i, name in enumerate(scheme.class_names)}
    counts["train"] = 0  # a class never seen
    man = {"class_pixels": counts, "scheme": {"name": "trainid"}}
    total = sum(counts.values())
    inv_log = class_weights(man, scheme, "inv_log")
    for i, name in enumerate(scheme.class_names):
        assert inv_log[i].item() == pytest.approx(1 / math.log(1.02 + counts[name] / total), rel=1e-6)
    med = class_weights(man, scheme, "median_freq")
    present = sorted(v / total for v in counts.values() if v)
    median = (present[len(present) // 2] + present[(len(present) - 1) // 2]) / 2
    for i, name in enumerate(scheme.class_names):
        if counts[name]:
            assert med[i].item() == pytest.approx(median / (counts[name] / total), rel=1e-6)
    assert med[scheme.class_names.index("train")] == med.max()
    assert class_weights(man, scheme, "none") is None
    # labelid shards trained as trainid: the label-id counts are summed through the remapping
    lid = get_scheme("labelid")
    lman = {"class_pixels": {n: 10 * (i + 1) for i, n in enumerate(lid.class_names)},
            "scheme": {"name": "labelid"}}
    w = class_weights(lman, scheme, "inv_log")
    car = 10 * (lid.class_names.index("car") + 1)
    kept = sum(10 * (i + 1) for i in range(lid.num_classes) if scheme.lut[i] != 255)
    want = 1 / math.log(1.02 + car / kept)
    assert w[scheme.class_names.index("car")].item() == pytest.approx(want, rel=1e-6)


def test_weighted_ce_equals_pytorch_weighted_mean():
    logits, target = batch()
    w = torch.tensor([0.5, 1.0, 2.0, 3.0, 0.25])
    ours = SegLoss(weight=w)(logits, target)
    ref = F.cross_entropy(logits, target, weight=w, ignore_index=255)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-6)


def ohem_reference(logits, target, thresh, min_kept):
    """mmsegmentation's OHEM written out in float64 numpy: per-pixel softmax, sorted valid probabilities."""
    x = logits.double().numpy()
    t = target.numpy()
    p = np.exp(x - x.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    valid = t != 255
    n, h, w = t.shape
    true_p = np.zeros((n, h, w))
    for b in range(n):
        for i in range(h):
            for j in range(w):
                if valid[b, i, j]:
                    true_p[b, i, j] = p[b, t[b, i, j], i, j]
    images = int(valid.reshape(n, -1).any(1).sum())
    vals = np.sort(true_p[valid])
    kth = vals[min(min_kept * images, len(vals) - 1)]
    keep = valid & (true_p < max(kth, thresh))
    return -np.log(true_p[keep]).mean(), int(keep.sum())


@pytest.mark.parametrize("thresh,min_kept", [(0.7, 10), (0.05, 150), (0.3, 0), (0.99, 10**6)])
def test_ohem_equals_the_reference(thresh, min_kept):
    logits, target = batch(seed=2)
    ours = SegLoss(ohem=(thresh, min_kept))
    total, count = ours.pixel_sum(logits, target)
    ref, kept = ohem_reference(logits, target, thresh, min_kept)
    assert int(count) == kept and 0 < kept <= int((target != 255).sum())
    assert (total / count).item() == pytest.approx(ref, rel=1e-5)


def test_ohem_counts_only_images_with_labels():
    """A padded (all-ignored) image in a micro-batch does not raise the minimum kept."""
    logits, target = batch(seed=3, n=2)
    target[1] = 255
    a = SegLoss(ohem=(0.01, 40)).pixel_sum(logits, target)
    b = SegLoss(ohem=(0.01, 40)).pixel_sum(logits[:1], target[:1])
    assert a[1] == b[1] == 40
    assert a[0].item() == pytest.approx(b[0].item(), rel=1e-6)


def test_ohem_with_class_weights_normalises_by_their_sum():
    logits, target = batch(seed=4)
    w = torch.tensor([0.5, 1.0, 2.0, 3.0, 0.25])
    total, norm = SegLoss(weight=w, ohem=(0.3, 5)).pixel_sum(logits, target)
    from distseg.models.losses import ohem_mask

    keep = ohem_mask(logits, target, 0.3, 5)
    masked = torch.where(keep, target, torch.full_like(target, 255))
    ref = F.cross_entropy(logits, masked, weight=w, ignore_index=255)
    assert (total / norm).item() == pytest.approx(ref.item(), rel=1e-6)


def test_ohem_normalises_over_ranks_and_accumulation(shards, tmp_path):
    """Hard pixels are chosen per micro-batch: 2 processes x batch 2 see the micro-batches that 1 process x
    batch 2 x 2 accumulation steps sees, so with the loss normalised by the kept pixels of the whole global
    batch both give the same weights (SGD)."""
    ov = {**SGD, "data.batch_size": 2, "loss.ohem": "true", "loss.ohem_thresh": 0.06,
          "loss.ohem_min_kept": 2000, "train.epochs": 1}
    run_train(base_overrides(shards, tmp_path, "two", **ov), procs=2)
    run_train(base_overrides(shards, tmp_path, "acc", **ov, **{"train.grad_accum": 2}))
    w2 = load_weights(latest_checkpoint(tmp_path / "two" / "checkpoints"))
    wa = load_weights(latest_checkpoint(tmp_path / "acc" / "checkpoints"))
    for k in w2:
        torch.testing.assert_close(w2[k], wa[k], rtol=1e-4, atol=1e-5, msg=k)
    s = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert s["steps"] == json.loads((tmp_path / "acc" / "summary.json").read_text())["steps"] == 4


# --- EMA weights chosen by every consumer -----------------------------------------------------------------


def make_run(tmp_path: Path, encoder="unet", ema=True, name="run") -> Path:
    """A run folder as training leaves it: config.yaml and best/ (model + EMA weights, which differ)."""
    run = tmp_path / name
    run.mkdir()
    cfg = tiny_cfg(encoder, "model.norm=batch")
    (run / "config.yaml").write_text(dump_config(cfg))
    torch.manual_seed(0)
    model = build_model(cfg, 19)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for m in bns:  # real BN statistics (of random images), not the initial 0 / 1
        m.momentum = None
    with torch.no_grad():
        model(torch.randn(4, 3, 64, 96))
    for m in bns:
        m.momentum = 0.1
    params = {k for k, _ in model.named_parameters()}
    avg = {k: v * 0.99 if k in params else v for k, v in model.state_dict().items()}
    save_weights(model.state_dict(), run / "best", {"step": 1}, avg if ema else None)
    return run


def test_evaluate_predict_export_and_finetune_take_the_ema_weights(tmp_path):
    run = make_run(tmp_path)
    raw, avg = load_weights(run / "best", "raw"), load_weights(run / "best", "ema")
    assert not torch.equal(raw["head.weight"], avg["head.weight"])
    for which, want in (("auto", avg), ("ema", avg), ("raw", raw)):
        got = load_run(run, weights=which).model.state_dict()
        assert torch.equal(got["head.weight"], want["head.weight"]), which
    assert torch.equal(load_weights(run / "best")["head.weight"], avg["head.weight"])  # fine-tuning's init
    plain = make_run(tmp_path, ema=False, name="plain")
    assert torch.equal(load_run(plain).model.state_dict()["head.weight"],
                       load_weights(plain / "best", "raw")["head.weight"])
    p = run_cli("evaluate", "--run", plain, "--weights", "ema", check=False)
    assert_user_error(p, "has no EMA weights")
    p = run_cli("export", "--run", plain, "--weights", "ema", "--format", "pt2", "--out", tmp_path / "x.pt2",
                check=False)
    assert_user_error(p, "has no EMA weights")
    assert not (tmp_path / "x.pt2").exists()


def test_validation_scores_the_ema_weights(shards, tmp_path):
    """Validation scores the EMA weights, exactly what evaluate scores by default (resuming with an EMA is
    bit-identical: the kill + resume test in test_train_e2e keeps one)."""
    run_train(base_overrides(shards, tmp_path, "ema", **{"train.ema_decay": 0.8, "train.epochs": 1}))
    run = tmp_path / "ema"
    assert json.loads((run / "best" / "meta.json").read_text())["ema"] is True
    raw, avg = load_weights(run / "best", "raw"), load_weights(run / "best", "ema")
    assert any(not torch.equal(raw[k], avg[k]) for k in raw)
    summary = json.loads((run / "summary.json").read_text())
    run_cli("evaluate", "--run", run, "--checkpoint", "latest", "--json", tmp_path / "s.json")
    miou = json.loads((tmp_path / "s.json").read_text())["miou"]
    assert miou == pytest.approx(summary["final_miou"], abs=1e-9)


# --- the ready configs -------------------------------------------------------------------------------------


@pytest.mark.parametrize("config,encoder", [("resnet", None), ("resnet", "resnet18"), ("resnet", "resnet34"),
                                            ("convnext", None), ("efficientnet", None)])
def test_each_config_trains_two_steps(shards, tmp_path, config, encoder):
    path = ROOT / "configs" / f"{config}.yaml"
    cfg = load_config(path)
    assert cfg.model.pretrained == "imagenet" and cfg.sched.warmup_steps > 0 and cfg.sched.power > 0
    ov = {"model.pretrained": "none", "data.batch_size": 2, "data.crop": "[64,96]", "train.max_steps": 2,
          "train.mixed_precision": "no", "data.val_batch_size": 2}
    if encoder:
        ov["model.encoder"] = encoder
    args = base_overrides(shards, tmp_path, "cfg", **ov)
    args = [a for a in args if not a.startswith(("model.base", "model.depth", "model.norm", "optim.lr",
                                                 "sched."))]
    run_train(["--config", path, *args])
    w = load_weights(latest_checkpoint(tmp_path / "cfg" / "checkpoints"), "raw")
    assert any(k.startswith("encoder.body.") for k in w) and all(torch.isfinite(v).all() for v in w.values())
    summary = json.loads((tmp_path / "cfg" / "summary.json").read_text())
    assert summary["steps"] == 2 and math.isfinite(summary["final_miou"])
    saved = load_config(tmp_path / "cfg" / "config.yaml")
    assert saved.model.encoder == (encoder or cfg.model.encoder) and saved.optim.name == cfg.optim.name


# --- export --------------------------------------------------------------------------------------------


def reference(loaded, images: torch.Tensor, uint8=True) -> torch.Tensor:
    cfg = loaded.cfg
    x = images.float() / (255.0 if uint8 else 1.0)
    x = (x - torch.tensor(cfg.data.mean).view(1, 3, 1, 1)) / torch.tensor(cfg.data.std).view(1, 3, 1, 1)
    with torch.no_grad():
        return loaded.model(x)


def run_exported(path: Path, images: torch.Tensor) -> np.ndarray:
    if path.suffix == ".onnx":
        import onnxruntime as ort

        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return sess.run(None, {sess.get_inputs()[0].name: images.numpy()})[0]
    with torch.no_grad():
        return torch.export.load(str(path)).module()(images).numpy()


@pytest.mark.parametrize("encoder", ["unet", "resnet18"])
@pytest.mark.parametrize("fmt", ["onnx", "pt2"])
def test_exported_files_equal_torch(tmp_path, encoder, fmt):
    from distseg.flows.export import export_run

    run = make_run(tmp_path, encoder)
    loaded = load_run(run)  # the EMA weights
    g = torch.Generator().manual_seed(0)
    fixed = export_run(loaded, fmt, str(tmp_path / f"fixed.{fmt}"), 64, 96)
    x = torch.randint(0, 256, (1, 3, 64, 96), dtype=torch.uint8, generator=g)
    np.testing.assert_allclose(run_exported(fixed, x), reference(loaded, x).numpy(), atol=1e-4, rtol=0)
    dyn = export_run(loaded, fmt, str(tmp_path / f"dyn.{fmt}"), 64, 96, dynamic=True)
    for n, h, w in ((1, 64, 96), (3, 37, 53), (2, 70, 101)):
        x = torch.randint(0, 256, (n, 3, h, w), dtype=torch.uint8, generator=g)
        out = run_exported(dyn, x)
        assert out.shape == (n, 19, h, w)
        np.testing.assert_allclose(out, reference(loaded, x).numpy(), atol=1e-4, rtol=0)


def test_export_cli_argmax_float_input_and_metadata(tmp_path):
    import onnx

    run = make_run(tmp_path)
    out = tmp_path / "out" / "model.onnx"
    p = run_cli("export", "--run", run, "--format", "onnx", "--out", out, "--dynamic", "--argmax", "--input",
                "float", "--height", 64, "--width", 96)
    assert "exported" in p.stdout and "torch.onnx" not in p.stdout
    meta = {e.key: e.value for e in onnx.load(str(out)).metadata_props}
    assert meta["output"].startswith("int64 class map") and meta["input"].startswith("float32 RGB")
    assert json.loads(meta["classes"])[0] == "road" and meta["weights"].endswith("ema.safetensors")
    loaded = load_run(run)
    x = torch.rand(2, 3, 45, 67, generator=torch.Generator().manual_seed(1))
    classes = run_exported(out, x)
    ref = reference(loaded, x, uint8=False)
    assert classes.shape == (2, 45, 67) and classes.dtype == np.int64
    # equal wherever the top two logits are not a float-rounding tie
    top2 = ref.topk(2, dim=1).values
    clear = (top2[:, 0] - top2[:, 1] > 1e-4).numpy()
    assert clear.mean() > 0.99 and (classes == ref.argmax(1).numpy())[clear].all()
    pt2 = tmp_path / "model.pt2"
    run_cli("export", "--checkpoint", run / "best", "--format", "pt2", "--out", pt2,
            "--height", 32, "--width", 48)
    import zipfile

    with zipfile.ZipFile(pt2) as z:
        name = next(n for n in z.namelist() if n.endswith("distseg.json"))
        assert json.loads(z.read(name))["shape"] == "fixed 32x48 (H x W)"
    x = torch.randint(0, 256, (1, 3, 32, 48), dtype=torch.uint8)
    np.testing.assert_allclose(run_exported(pt2, x), reference(loaded, x).numpy(), atol=1e-4, rtol=0)
    p = run_cli("export", "--run", run, "--format", "onnx", "--out", tmp_path / "y.onnx", "--height", 4,
                check=False)
    assert_user_error(p, "at least 8")
    p = run_cli("export", "--checkpoint", tmp_path, "--format", "pt2", "--out", tmp_path / "z.pt2",
                check=False)
    assert_user_error(p, "not inside a training run")


def test_encoder_unet_decoder_uses_every_stage():
    model = EncoderUNet("resnet18", 3, width=8)
    assert len(model.dec) == len(STAGES["resnet18"]) - 1
