"""torchvision backbones (ResNet, ConvNeXt, EfficientNet) as U-Net encoders: the stages' feature maps
(taken with torchvision's feature extractor) feed a U-Net decoder through skip connections; the output is
raw logits at the input's resolution.

Pretrained encoders (`model.pretrained`): `imagenet` asks torchvision's weights API (downloaded once into
its cache, so it needs a network the first time), a PATH loads a local file — torchvision's own state
dict (its classifier is left out) or a distseg checkpoint — so air-gapped clusters work.

timm's backbones (`model.encoder=timm:NAME`) are built in timm_encoder.py and feed the same `EncoderUNet`.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor

from distseg.errors import UserError
from distseg.models.unet import DoubleConv, crop_padding, pad_to_multiple
from distseg.models.weights import load_weights

# encoder -> the nodes whose outputs are its stages, shallow to deep (strides 2 or 4, ..., 32)
STAGES = {
    "resnet18": ["relu", "layer1", "layer2", "layer3", "layer4"],
    "resnet34": ["relu", "layer1", "layer2", "layer3", "layer4"],
    "resnet50": ["relu", "layer1", "layer2", "layer3", "layer4"],
    "convnext_tiny": ["features.1", "features.3", "features.5", "features.7"],
    "efficientnet_b0": ["features.1", "features.2", "features.3", "features.5", "features.7"],
}
CLASSIFIER = ("fc.", "classifier.")  # torchvision's heads, not part of an encoder
STRIDE = 32


def load_backbone_weights(net: nn.Module, body: nn.Module, name: str, source: str) -> None:
    """`imagenet` (torchvision's weights API) or a local state dict file into the encoder's `body` (which
    shares its tensors with torchvision's `net`). One clear error when the file is of another network: a key
    the encoder needs is missing, has another shape, or the file has keys `net` does not know."""
    if source == "imagenet":
        try:
            weights = torchvision.models.get_model_weights(name).DEFAULT
            sd = weights.get_state_dict(progress=False)
        except Exception as e:  # offline, proxy, disk
            why = str(e).splitlines()[0]
            raise UserError(f"cannot get torchvision's ImageNet weights for {name} ({why}): download them "
                            "where a network exists and pass model.pretrained=PATH") from None
    else:
        if not Path(source).exists():
            raise UserError(f"model.pretrained: weights file not found: {source}")
        sd = load_weights(source)
        prefix = "encoder.body."  # a distseg checkpoint of the same encoder: take its encoder
        if any(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    sd = {k: v for k, v in sd.items() if not k.startswith(CLASSIFIER)}
    need = body.state_dict()
    check_fit(sd, need, net.state_dict(), source, name)
    body.load_state_dict({k: sd[k] for k in need})


def check_fit(sd: dict, need: dict, known: dict, source: str, name: str) -> None:
    """One error line when the state dict `sd` read from `source` is of another network than encoder `name`:
    a tensor of `need` is missing or has another shape, or `sd` has keys the network (`known`) lacks."""
    problems = [(f"{len(v)} {what}", v[0]) for what, v in (
        ("missing", [k for k in need if k not in sd]),
        ("with other shapes", [k for k in need if k in sd and sd[k].shape != need[k].shape]),
        ("unknown to it", [k for k in sd if k not in known])) if v]
    if problems:
        what = ", ".join(f"{n} (e.g. {k})" for n, k in problems)
        raise UserError(f"model.pretrained {source} does not fit encoder {name}: tensors {what}")


class Encoder(nn.Module):
    """A torchvision backbone returning its stages' feature maps, shallow to deep: `channels` per stage, the
    inputs' sides a multiple of `stride` (the deepest stage's reduction)."""

    stride = STRIDE

    def __init__(self, name: str, pretrained: str = "none"):
        super().__init__()
        if name not in STAGES:
            raise UserError(f"unknown model.encoder {name!r}: use unet, {', '.join(STAGES)}")
        net = torchvision.models.get_model(name, weights=None)
        self.nodes = STAGES[name]
        self.body = create_feature_extractor(net, {n: n for n in self.nodes})
        if pretrained and pretrained != "none":
            load_backbone_weights(net, self.body, name, pretrained)
        self.body.eval()  # the probe for the stages' widths must not move the BN statistics
        with torch.no_grad():
            feats = self.body(torch.zeros(1, 3, 64, 64))
        self.body.train()
        self.channels = [feats[n].shape[1] for n in self.nodes]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Images -> feature maps, shallow to deep."""
        out = self.body(x)
        return [out[n] for n in self.nodes]


class EncoderUNet(nn.Module):
    """Encoder stages -> U-Net decoder (upsample, concatenate the skip, DoubleConv) -> upsample to the input's
    size -> 1x1 head. Inputs of any size are padded to a multiple of the encoder's stride (32 for the
    torchvision ones) and the logits cropped back.

    `encoder`: a torchvision name (`STAGES`), or a built encoder module (`channels`, `stride`, and a forward
    giving NCHW maps shallow to deep), e.g. a `timm_encoder.TimmEncoder`."""

    def __init__(self, encoder: str | nn.Module, num_classes: int, pretrained: str = "none",
                 norm: str = "batch", width: int = 32):
        super().__init__()
        self.encoder = Encoder(encoder, pretrained) if isinstance(encoder, str) else encoder
        ch = self.encoder.channels
        dec = [width * 2 ** i for i in range(len(ch) - 1)]  # decoder widths, shallow to deep
        ins = [(ch[i + 1] if i == len(ch) - 2 else dec[i + 1]) + ch[i] for i in range(len(ch) - 1)]
        self.dec = nn.ModuleList(DoubleConv(ins[i], dec[i], norm) for i in reversed(range(len(ch) - 1)))
        self.final = DoubleConv(dec[0], width, norm)
        self.head = nn.Conv2d(width, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images N x 3 x H x W -> logits N x C x H x W."""
        x, ph, pw = pad_to_multiple(x, self.encoder.stride)
        return crop_padding(self.body(x), ph, pw)

    def body(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of an input whose sides are multiples of the stride."""
        feats = self.encoder(x)
        y = feats[-1]
        for dec, skip in zip(self.dec, reversed(feats[:-1])):
            y = F.interpolate(y, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            y = dec(torch.cat([skip, y], dim=1))
        y = F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return self.head(self.final(y))
