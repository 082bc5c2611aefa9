"""The models: the plain U-Net (unet.py), torchvision encoders with a U-Net decoder (encoders.py, one
`STAGES` entry per encoder) and timm's CNN backbones with the same decoder (timm_encoder.py,
`model.encoder=timm:NAME`), with the loss (losses.py), the optimizer and LR schedule (optim.py) and the
weights folders they are saved in (weights.py). Imports only the leaves."""

from __future__ import annotations

from torch import nn

from distseg.errors import UserError
from distseg.models.encoders import STAGES, Encoder, EncoderUNet
from distseg.models.timm_encoder import PREFIX, TimmEncoder, check_timm_name, import_timm
from distseg.models.unet import UNet


def encoder_names() -> list[str]:
    """Every named value model.encoder takes: the plain U-Net, then each torchvision encoder
    (encoders.STAGES); besides these, `timm:NAME` takes any timm CNN."""
    return ["unet", *STAGES]


def check_encoder(name: str) -> None:
    """One error line for a model.encoder that does not exist (a timm name is looked up in timm)."""
    if name.startswith(PREFIX):
        return check_timm_name(name[len(PREFIX):])
    if name not in encoder_names():
        raise UserError(f"config: model.encoder must be one of {', '.join(encoder_names())} or timm:NAME (a "
                        f"timm CNN, e.g. timm:resnet50d), got {name!r}")


def build_model(cfg, num_classes: int, pretrained: bool = True) -> nn.Module:
    """The model the config describes (model.encoder), with `num_classes` output channels. `pretrained=False`
    leaves model.pretrained unread, for a caller that loads every tensor itself (a trained run's weights, a
    resume): evaluating a run on a machine without the ImageNet cache or the original weights file works."""
    m = cfg.model
    source = m.pretrained if pretrained else "none"
    check_encoder(m.encoder)
    if m.encoder == "unet":
        if m.pretrained not in ("", "none"):
            raise UserError("model.pretrained needs an encoder (model.encoder=resnet50, timm:resnet50d, "
                            "...); the plain U-Net trains from scratch")
        return UNet(3, num_classes, m.base, m.depth, m.norm)
    if m.encoder.startswith(PREFIX):
        encoder = TimmEncoder(m.encoder[len(PREFIX):], source)
    else:
        encoder = Encoder(m.encoder, source)
    return EncoderUNet(encoder, num_classes, norm=m.norm, width=m.base)


def sync_batchnorm(model: nn.Module) -> nn.Module:
    """The model with SyncBatchNorm layers (multi-GPU model.norm=sync_batch). A timm encoder goes through
    timm's converter: torch's turns timm's fused BN + activation (BatchNormAct2d: EfficientNet, RegNet) into
    a plain SyncBatchNorm, which silently drops the activation."""
    timm_encoders = [m for m in model.modules() if isinstance(m, TimmEncoder)]
    if timm_encoders:
        return import_timm(timm_encoders[0].name).layers.convert_sync_batchnorm(model)
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


def out_channels(cfg, num_classes: int) -> int:
    """BCE-only training on a binary scheme uses one logit (foreground); everything else one per class."""
    if num_classes == 2 and cfg.loss.bce > 0 and cfg.loss.ce == 0 and cfg.loss.dice == 0:
        return 1
    return num_classes
