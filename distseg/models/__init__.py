"""The models: the plain U-Net (unet.py) and torchvision encoders with a U-Net decoder (encoders.py, one
`STAGES` entry per encoder), with the loss (losses.py), the optimizer and LR schedule (optim.py) and the
weights folders they are saved in (weights.py). Imports only the leaves."""

from __future__ import annotations

from torch import nn

from distseg.errors import UserError
from distseg.models.encoders import STAGES, EncoderUNet
from distseg.models.unet import UNet


def encoder_names() -> list[str]:
    """Every value model.encoder takes: the plain U-Net, then each torchvision encoder (encoders.STAGES)."""
    return ["unet", *STAGES]


def check_encoder(name: str) -> None:
    """One error line for a model.encoder that does not exist."""
    if name not in encoder_names():
        raise UserError(f"config: model.encoder must be one of {', '.join(encoder_names())}, got {name!r}")


def build_model(cfg, num_classes: int) -> nn.Module:
    """The model the config describes (model.encoder), with `num_classes` output channels."""
    m = cfg.model
    check_encoder(m.encoder)
    if m.encoder == "unet":
        if m.pretrained not in ("", "none"):
            raise UserError("model.pretrained needs a torchvision encoder (model.encoder=resnet50, ...); the "
                            "plain U-Net trains from scratch")
        return UNet(3, num_classes, m.base, m.depth, m.norm)
    return EncoderUNet(m.encoder, num_classes, m.pretrained, m.norm, m.base)


def out_channels(cfg, num_classes: int) -> int:
    """BCE-only training on a binary scheme uses one logit (foreground); everything else one per class."""
    if num_classes == 2 and cfg.loss.bce > 0 and cfg.loss.ce == 0 and cfg.loss.dice == 0:
        return 1
    return num_classes
