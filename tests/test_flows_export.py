"""What the flows take from a run: evaluate, predict, export and fine-tuning choose the EMA weights (or the
raw ones when asked), and ONNX / torch.export files equal torch (the plain U-Net, a torchvision and two timm
encoders), at fixed and dynamic sizes."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import assert_user_error, run_cli
from distseg.config import dump_config, load_config
from distseg.errors import UserError
from distseg.models import build_model
from distseg.models.weights import load_weights, save_weights
from distseg.runs.run_dir import find_run, load_run


def tiny_cfg(encoder: str, *extra: str):
    return load_config(None, [f"model.encoder={encoder}", "model.base=8", "model.depth=2", *extra])


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


# both formats for the plain U-Net and two timm encoders; a torchvision encoder in ONNX (its pt2 is the same
# torch.export program the others test, and the README exports resnet18 as both)
@pytest.mark.parametrize("fmt,encoder", [("onnx", "unet"), ("pt2", "unet"), ("onnx", "resnet18"),
                                         ("onnx", "timm:convnext_atto"), ("pt2", "timm:convnext_atto"),
                                         ("onnx", "timm:resnet10t"), ("pt2", "timm:resnet10t")])
def test_exported_files_equal_torch(tmp_path, encoder, fmt):
    from distseg.flows.export import export_run

    run = make_run(tmp_path, encoder)
    loaded = load_run(run)  # the EMA weights
    g = torch.Generator().manual_seed(0)
    if encoder == "unet":  # fixed vs dynamic is the decoder's padding, the same for any encoder
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
    assert "torch.onnx" not in p.stdout
    assert p.stdout.strip().endswith("input images batch x 3 x height x width (any), float32 0-1 RGB")
    graph = onnx.load(str(out)).graph
    assert [d.dim_param or d.dim_value for d in graph.input[0].type.tensor_type.shape.dim] == \
        ["batch", 3, "height", "width"]
    assert [d.dim_param for d in graph.output[0].type.tensor_type.shape.dim] == ["batch", "height", "width"]
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
    from distseg.flows.export import export_run

    with pytest.raises(UserError, match="at least 8"):  # the messages of bad input, in this process
        export_run(loaded, "onnx", str(tmp_path / "y.onnx"), 4, 96)
    with pytest.raises(UserError, match="not inside a training run"):
        find_run(str(tmp_path))


def test_export_takes_the_runs_image_size(one_proc_run, tmp_path):
    import zipfile

    p = run_cli("export", "--run", one_proc_run, "--format", "pt2", "--out", tmp_path / "m.pt2")
    assert "input images 1 x 3 x 128 x 256, uint8 0-255 RGB (the run's images)" in p.stdout  # synth: 256x128
    with zipfile.ZipFile(tmp_path / "m.pt2") as z:
        name = next(n for n in z.namelist() if n.endswith("distseg.json"))
        assert json.loads(z.read(name))["shape"] == "fixed 128x256 (H x W)"


def test_a_run_loads_without_its_pretrained_source(tmp_path):
    """The run's weights hold every tensor: a run trained from a weights file (or ImageNet) evaluates,
    predicts and exports where that file or the cache is gone."""
    run = make_run(tmp_path, "resnet18", ema=False)
    cfg = load_config(run / "config.yaml", ["model.pretrained=/gone/resnet18.pth"])
    (run / "config.yaml").write_text(dump_config(cfg))
    loaded = load_run(run, "best")
    saved = load_weights(run / "best")
    assert all(torch.equal(v, saved[k]) for k, v in loaded.model.state_dict().items())
