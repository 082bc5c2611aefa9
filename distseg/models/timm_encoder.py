"""timm backbones as U-Net encoders (`model.encoder=timm:NAME`): timm's `features_only` model of NAME gives
the stages' feature maps, whose widths and strides come from its `feature_info`, to the same U-Net decoder
as the torchvision encoders (encoders.EncoderUNet). Only models whose features are NCHW maps at strictly
growing strides fit that decoder (the CNN families: ResNet, ConvNeXt, EfficientNet, RegNet, ...); the rest
(ViT: one stride; Swin: a fixed input size, NHWC) are refused in one line when the model is built.

timm is an optional extra (`pip install "distseg[timm]"`), imported only when a timm encoder is asked for.
Pretrained weights (`model.pretrained`): `imagenet` is timm's default pretrained tag, from the Hugging Face
cache (downloaded once, so it needs a network the first time, or a copied cache); a PATH is a local file,
either timm's state dict of the full classification model or a distseg checkpoint of the same encoder.
"""

from __future__ import annotations

import difflib
from pathlib import Path

import torch
from torch import nn

from distseg.errors import UserError, missing_extra
from distseg.models.encoders import check_fit
from distseg.models.weights import load_weights

PREFIX = "timm:"
EXAMPLES = "timm:resnet50d, timm:convnext_tiny, timm:efficientnet_b3, timm:regnety_016"
PROBE_STRIDES = (2, 3)  # the probe input is this many of the encoder's strides high and wide


def import_timm(name: str):
    """The timm module, or one line naming the extra that installs it (timm is optional)."""
    try:
        import timm
    except ImportError as e:
        raise UserError(f"model.encoder={PREFIX}{name} {missing_extra(e) or e}") from None
    return timm


def check_timm_name(name: str) -> None:
    """One error line for a timm model that does not exist, with the closest names timm has."""
    timm = import_timm(name)
    if timm.is_model(name):
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=4, cutoff=0.6)
    hint = f"close: {', '.join(PREFIX + c for c in close)}" if close else "timm.list_models() lists them"
    raise UserError(f"unknown model.encoder {PREFIX}{name}: timm has no such model ({hint})")


def first_line(e: Exception) -> str:
    """An exception's message for a one-line error: its first line, bounded."""
    lines = str(e).strip().splitlines()
    return (lines[0] if lines else type(e).__name__)[:200]


def refuse(name: str, why: str) -> UserError:
    """The one line for a timm model whose features do not fit the U-Net decoder."""
    return UserError(f"model.encoder={PREFIX}{name} does not fit the U-Net decoder ({why}): it needs a CNN "
                     f"family whose features are NCHW maps at growing strides, e.g. {EXAMPLES}")


def create_features(timm, name: str, **kwargs) -> nn.Module:
    """timm's features_only model of `name` (random weights unless `kwargs` say otherwise)."""
    try:
        return timm.create_model(name, features_only=True, **kwargs)
    except Exception as e:  # a family without features_only support, or one that needs other arguments
        raise refuse(name, f"timm cannot build its features_only model: {first_line(e)}") from None


def check_features(body: nn.Module, name: str) -> None:
    """Refuse what the decoder cannot take: reductions that do not strictly grow, or features on a probe
    input (eval mode, so BN statistics stay) that are not NCHW maps of `channels[i]` x H/r x W/r."""
    channels, reductions = body.feature_info.channels(), body.feature_info.reduction()
    if any(b <= a for a, b in zip(reductions, reductions[1:])):
        raise refuse(name, f"its feature reductions {reductions} do not strictly grow")
    h, w = (s * reductions[-1] for s in PROBE_STRIDES)
    body.eval()
    try:
        with torch.no_grad():
            feats = body(torch.zeros(1, 3, h, w))
    except Exception as e:  # e.g. a fixed input size (Swin, ViT)
        raise refuse(name, f"it fails on a {h}x{w} input: {first_line(e)}") from None
    finally:
        body.train()
    want = [(1, c, h // r, w // r) for c, r in zip(channels, reductions)]
    got = [tuple(f.shape) if isinstance(f, torch.Tensor) else type(f).__name__ for f in feats] \
        if isinstance(feats, (list, tuple)) else type(feats).__name__
    if got != want:
        raise refuse(name, f"its features on a {h}x{w} input are {got}, not {want}")


class TimmEncoder(nn.Module):
    """A timm backbone returning its stages' feature maps, shallow to deep: `channels` per stage, the inputs'
    sides a multiple of `stride` (the deepest stage's reduction). `body` is timm's features_only model, so a
    distseg checkpoint's `encoder.body.*` keys are that model's own keys."""

    def __init__(self, name: str, pretrained: str = "none"):
        super().__init__()
        timm = import_timm(name)
        check_timm_name(name)
        body = create_features(timm, name, pretrained=False)
        check_features(body, name)
        if pretrained and pretrained != "none":
            body = load_timm_weights(timm, body, name, pretrained)
        self.name, self.body = name, body
        self.channels = list(body.feature_info.channels())
        self.stride = body.feature_info.reduction()[-1]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Images -> feature maps, shallow to deep."""
        return list(self.body(x))


def load_timm_weights(timm, body: nn.Module, name: str, source: str) -> nn.Module:
    """The features model with the weights `source` names: `imagenet` (timm's pretrained tag, through the
    Hugging Face cache) or a local file (`load_timm_file`)."""
    if source != "imagenet":
        return load_timm_file(timm, body, name, source)
    cfg = body.pretrained_cfg
    if not any(cfg.get(k) for k in ("hf_hub_id", "url", "file")):
        raise UserError(f"timm has no pretrained weights for {name}: use model.pretrained=none or PATH")
    try:  # the features model itself builds (checked first): what fails now is getting the weights
        return timm.create_model(name, features_only=True, pretrained=True)
    except Exception as e:  # offline with nothing cached, a proxy, the disk
        fetch = f"python -c \"import timm; timm.create_model('{name}', pretrained=True)\""
        raise UserError(f"cannot get timm's ImageNet weights for {name} ({first_line(e)}): on a machine with "
                        f"a network run `{fetch}` and copy its Hugging Face cache (HF_HOME, default "
                        "~/.cache/huggingface) here, or pass model.pretrained=PATH") from None


def load_timm_file(timm, body: nn.Module, name: str, source: str) -> nn.Module:
    """A local weights file into the features model, after one clear error if it is of another network. A
    distseg checkpoint (`encoder.body.*`) holds the features model's own keys; timm's file of the full
    classification model holds the full model's keys (convnext: `stem.0.weight`, not `stem_0.weight`), so it
    is checked against the headless full model and loaded through timm, which maps them."""
    if not Path(source).exists():
        raise UserError(f"model.pretrained: weights file not found: {source}")
    sd = load_weights(source)
    prefix = "encoder.body."
    if any(k.startswith(prefix) for k in sd):
        sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
        need = body.state_dict()
        check_fit(sd, need, need, source, PREFIX + name)
        body.load_state_dict(sd)
        return body
    full = timm.create_model(name, num_classes=0)
    heads = full.pretrained_cfg.get("classifier") or ()
    heads = tuple(f"{h}." for h in ((heads,) if isinstance(heads, str) else heads))
    sd = {k: v for k, v in sd.items() if not k.startswith(heads)}
    need = full.state_dict()
    check_fit(sd, need, need, source, PREFIX + name)
    loaded = create_features(timm, name, pretrained=True, pretrained_cfg_overlay=dict(state_dict=sd))
    loaded.pretrained_cfg.pop("state_dict", None)  # timm keeps the overlay's copy of every tensor there
    return loaded
