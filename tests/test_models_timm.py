"""timm encoders (`model.encoder=timm:NAME`): the tiny CNN families give logits at the input size; what does
not fit the U-Net decoder (ViT, Swin), an unknown name and a missing timm are one line each; pretrained
weights really arrive from both kinds of local file, and from the Hugging Face cache with no network (an
empty cache is one line saying how to fill it); a timm run trains, evaluates and converts to SyncBatchNorm."""

import json
import re
import sys

import pytest
import torch
from PIL import Image

from conftest import base_overrides, run_train
from distseg.config import load_config
from distseg.errors import UserError
from distseg.flows.evaluate import score_checkpoint
from distseg.flows.predict import predict
from distseg.models import build_model, check_encoder, sync_batchnorm
from distseg.models.weights import save_weights, write_safetensors

timm = pytest.importorskip("timm")

TINY = ["resnet10t", "convnext_atto", "regnetx_002", "efficientnet_b0"]


def tiny_cfg(encoder: str, *extra: str):
    return load_config(None, [f"model.encoder={encoder}", "model.base=8", *extra])


def build(name: str, pretrained: str = "none", classes: int = 5):
    return build_model(tiny_cfg(f"timm:{name}", f"model.pretrained={pretrained}"), classes)


def one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg


def randomized(model: torch.nn.Module) -> dict:
    """The model's state dict with values far from any init: equality cannot happen by chance."""
    g = torch.Generator().manual_seed(0)
    return {k: torch.rand(v.shape, generator=g) + 0.5 if v.is_floating_point() else v
            for k, v in model.state_dict().items()}


def full_key(k: str) -> str:
    """A features model's key as the full model names it (FeatureListNet flattens `stages.0`: `stages_0`)."""
    return re.sub(r"^([a-z]+)_(\d+)\.", r"\1.\2.", k)


def assert_body_holds(model, sd: dict):
    body = model.encoder.body.state_dict()
    for k, v in body.items():
        assert torch.equal(v, sd[k if k in sd else full_key(k)]), k
    assert "state_dict" not in model.encoder.body.pretrained_cfg  # timm's copy of the weights is dropped


@pytest.mark.parametrize("name", TINY)
def test_every_tiny_cnn_family_gives_logits_at_the_input_size(name):
    torch.manual_seed(0)
    model = build(name).eval()
    info = timm.create_model(name, features_only=True).feature_info
    assert model.encoder.channels == info.channels() and model.encoder.stride == info.reduction()[-1] == 32
    for n, h, w in ((1, 64, 96), (2, 37, 53), (1, 33, 71)):  # odd sizes: padded to the stride, cropped back
        with torch.no_grad():
            y = model(torch.randn(n, 3, h, w))
        assert y.shape == (n, 5, h, w) and torch.isfinite(y).all()
    model.train()(torch.randn(2, 3, 37, 53)).square().mean().backward()
    assert all(p.grad is not None for p in model.encoder.parameters() if p.requires_grad)


def test_what_does_not_fit_the_decoder_is_one_line(monkeypatch):
    with pytest.raises(UserError) as e:
        build("vit_tiny_patch16_224")
    assert "reductions [16, 16, 16] do not strictly grow" in one_line(e) and "timm:resnet50d" in str(e.value)
    with pytest.raises(UserError) as e:
        build("swin_tiny_patch4_window7_224")
    assert "does not fit the U-Net decoder (it fails on a 64x96 input" in one_line(e)
    assert "needs a CNN family" in str(e.value)
    real = timm.create_model

    class NHWC(torch.nn.Module):
        def __init__(self, body):
            super().__init__()
            self.body, self.feature_info, self.pretrained_cfg = body, body.feature_info, body.pretrained_cfg

        def forward(self, x):
            return [f.permute(0, 2, 3, 1) for f in self.body(x)]

    monkeypatch.setattr(timm, "create_model", lambda *a, **k: NHWC(real(*a, **k)))
    with pytest.raises(UserError) as e:
        build("resnet10t")
    assert "its features on a 64x96 input are [(1, 32, 48, 64), " in one_line(e)

    def fails(*a, **k):
        raise RuntimeError("features_only not implemented for Foo models\nmore")

    monkeypatch.setattr(timm, "create_model", fails)
    with pytest.raises(UserError) as e:
        build("resnet10t")
    assert "timm cannot build its features_only model: features_only not implemented" in one_line(e)


def test_unknown_names_and_a_missing_timm_are_one_line(monkeypatch):
    check_encoder("timm:resnet10t")  # what bench train --encoders checks up front
    with pytest.raises(UserError) as e:
        check_encoder("timm:resnet10tt")
    assert one_line(e).startswith("unknown model.encoder timm:resnet10tt: timm has no such model (close: ")
    assert "timm:resnet10t" in str(e.value)
    with pytest.raises(UserError) as e:
        check_encoder("resnet99")
    assert "or timm:NAME" in one_line(e)
    monkeypatch.setitem(sys.modules, "timm", None)  # `import timm` now fails as where it is not installed
    for call in (lambda: build("resnet10t"), lambda: check_encoder("timm:resnet10t")):
        with pytest.raises(UserError) as e:
            call()
        assert one_line(e) == 'model.encoder=timm:resnet10t needs timm: pip install "distseg[timm]"'
    build_model(tiny_cfg("resnet18"), 5)  # the torchvision encoders do not need it


def test_local_weights_files_of_both_kinds_really_arrive(tmp_path):
    """timm's file of the full classification model (keys `stages.0...`, classifier included) and a distseg
    checkpoint (keys `encoder.body.stages_0...`, the features model's own)."""
    sd = randomized(timm.create_model("convnext_atto"))
    assert "head.fc.weight" in sd and "stages.0.blocks.0.gamma" in sd
    torch.save(sd, tmp_path / "convnext_atto.pth")  # as timm's train.py / torch.save leave it
    model = build("convnext_atto", tmp_path / "convnext_atto.pth")
    assert_body_holds(model, sd)
    save_weights(model.state_dict(), tmp_path / "run_best", {})
    again = build("convnext_atto", tmp_path / "run_best", classes=7)
    assert_body_holds(again, model.encoder.body.state_dict())


def test_wrong_weights_files_are_one_clear_error(tmp_path):
    torch.save(timm.create_model("resnet10t").state_dict(), tmp_path / "resnet10t.pth")
    torch.save(timm.create_model("resnet14t").state_dict(), tmp_path / "resnet14t.pth")
    save_weights(build("resnet10t").state_dict(), tmp_path / "run_best", {})
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    unknown = r"\d+ unknown to it \(e\.g\. \S+\)"
    for file, name, want in (("resnet10t.pth", "convnext_atto", r"\d+ missing \(e\.g\. stem\.0\.weight\)"),
                             ("resnet14t.pth", "resnet10t", r"\d+ with other shapes \(e\.g\. \S+\)"),
                             ("run_best", "regnetx_002", r"\d+ missing \(e\.g\. stem\.conv\.weight\)")):
        with pytest.raises(UserError) as e:
            build(name, tmp_path / file)
        want = rf"model\.pretrained \S+/{file} does not fit encoder timm:{name}: tensors {want}, {unknown}"
        assert re.fullmatch(want, one_line(e)), str(e.value)
    with pytest.raises(UserError, match="cannot read weights"):
        build("resnet10t", tmp_path / "junk.pth")
    with pytest.raises(UserError, match="weights file not found"):
        build("resnet10t", tmp_path / "nothing.pth")


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """No network and an empty Hugging Face cache under tmp (huggingface_hub reads both settings when it is
    imported: the environment for child processes, its constants for this one)."""
    from huggingface_hub import constants

    home = tmp_path / "hf"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    return home / "hub"


def test_imagenet_weights_offline_come_from_the_cache_or_say_how_to_fill_it(offline_hub):
    with pytest.raises(UserError) as e:
        build("resnet10t", "imagenet")
    assert one_line(e).startswith("cannot get timm's ImageNet weights for resnet10t (")
    assert "run `python -c \"import timm; timm.create_model('resnet10t', pretrained=True)\"` and copy its " \
           "Hugging Face cache (HF_HOME" in str(e.value) and str(e.value).endswith("model.pretrained=PATH")
    # a cache entry as huggingface_hub leaves it, for the repository and file timm reads (model.safetensors)
    cfg = timm.create_model("resnet10t", pretrained=False).pretrained_cfg
    assert cfg["hf_hub_id"] == "timm/resnet10t.c3_in1k" and not cfg.get("hf_hub_filename")
    repo, rev = offline_hub / ("models--" + cfg["hf_hub_id"].replace("/", "--")), "a" * 40
    (repo / "snapshots" / rev).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(rev)
    sd = randomized(timm.create_model("resnet10t"))
    write_safetensors(sd, repo / "snapshots" / rev / "model.safetensors")
    assert_body_holds(build("resnet10t", "imagenet"), sd)


def test_sync_batchnorm_keeps_timms_fused_activations():
    model = build("efficientnet_b0")
    fused = [type(m.act) for m in model.modules() if isinstance(m, timm.layers.BatchNormAct2d)]
    synced = sync_batchnorm(model)
    acts = [type(m.act) for m in synced.modules() if isinstance(m, timm.layers.SyncBatchNormAct)]
    assert acts == fused and fused.count(torch.nn.SiLU) > 10
    assert not any(type(m) is torch.nn.BatchNorm2d for m in synced.modules())  # the decoder's too


def test_a_timm_run_trains_evaluates_and_predicts(shards, synth_root, tmp_path):
    """Two steps, then what `distseg evaluate` and `distseg predict` run (in this process: timm is imported
    already): the run's timm model rebuilt from its config scores exactly what the run's last validation
    scored, and predicts the test split in the official format."""
    ov = {"model.encoder": "timm:resnet10t", "data.crop": "[64,128]", "train.max_steps": 2,
          "data.batch_size": 2, "train.mixed_precision": "no", "model.norm": "batch"}
    run_train(base_overrides(shards, tmp_path, "timm", **ov))
    run = tmp_path / "timm"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 2
    scores = score_checkpoint(str(run), "latest", workers=0)
    assert scores["miou"] == pytest.approx(summary["final_miou"], abs=1e-9)
    images = sorted((synth_root / "leftImg8bit" / "test").glob("*/*.png"))
    assert predict(str(run), (), str(tmp_path / "results"), root=str(synth_root), split="test", workers=0) \
        == len(images) == 2
    for image in images:
        result = tmp_path / "results" / image.name.replace("_leftImg8bit.png", "_pred_labelIds.png")
        assert Image.open(result).size == Image.open(image).size
