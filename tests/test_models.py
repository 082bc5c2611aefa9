"""The models room: the plain U-Net and torchvision encoders with a U-Net decoder, pretrained weights from a
local file (one clear error for a wrong one), and the losses (plain, class-weighted and OHEM cross-entropy,
BCE, Dice) against direct reference computations."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from distseg.config import load_config
from distseg.errors import UserError
from distseg.labels import get_scheme
from distseg.models import build_model
from distseg.models.encoders import STAGES, EncoderUNet
from distseg.models.losses import SegLoss, class_weights, dice_loss
from distseg.models.unet import UNet
from distseg.models.weights import save_weights

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


def test_wrong_weights_files_are_one_clear_error(tmp_path):
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
    with pytest.raises(UserError, match="needs an encoder"):
        build_model(tiny_cfg("unet", f"model.pretrained={tmp_path / 'resnet34.pth'}"), 19)


# --- losses against direct reference computations -----------------------------------------------------


def batch(seed=0, n=2, c=5, h=12, w=16):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, c, h, w, generator=g) * 2
    target = torch.randint(0, c, (n, h, w), generator=g)
    target[torch.rand(n, h, w, generator=g) < 0.2] = 255
    return logits, target


def test_class_weights_from_the_split_histogram():
    scheme = get_scheme("trainid")
    counts = {name: (i + 1) * 1000 for i, name in enumerate(scheme.class_names)}
    counts["train"] = 0  # a class never seen
    pixels = np.array(list(counts.values()), np.float64)
    total = sum(counts.values())
    inv_log = class_weights(pixels, "inv_log")
    for i, name in enumerate(scheme.class_names):
        assert inv_log[i].item() == pytest.approx(1 / math.log(1.02 + counts[name] / total), rel=1e-6)
    med = class_weights(pixels, "median_freq")
    present = sorted(v / total for v in counts.values() if v)
    median = (present[len(present) // 2] + present[(len(present) - 1) // 2]) / 2
    for i, name in enumerate(scheme.class_names):
        if counts[name]:
            assert med[i].item() == pytest.approx(median / (counts[name] / total), rel=1e-6)
    assert med[scheme.class_names.index("train")] == med.max()
    assert class_weights(pixels, "none") is None


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


# --- EMA weights chosen by every consumer -----------------------------------------------------------------


# --- the ready configs -------------------------------------------------------------------------------------


# --- export --------------------------------------------------------------------------------------------


def test_encoder_unet_decoder_uses_every_stage():
    model = EncoderUNet("resnet18", 3, width=8)
    assert len(model.dec) == len(STAGES["resnet18"]) - 1


def test_losses():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 8, 8)
    target = torch.randint(0, 4, (2, 8, 8))
    target[0, :2] = 255
    loss = SegLoss(ce=1.0)
    assert loss(logits,
                target).item() == pytest.approx(F.cross_entropy(logits, target, ignore_index=255).item(),
                                                rel=1e-5)
    perfect = F.one_hot(target.clamp(max=3), 4).permute(0, 3, 1, 2).float() * 50
    assert dice_loss(perfect, target).item() < 1e-3
    assert dice_loss(-perfect, target).item() > 0.9
    b = SegLoss(ce=0, bce=1.0)
    bt = (target % 2) * (target != 255) + 255 * (target == 255)
    one = logits[:, :1]
    ref = F.binary_cross_entropy_with_logits(one[:, 0][bt != 255], bt[bt != 255].float())
    assert b(one, bt).item() == pytest.approx(ref.item(), rel=1e-5)


def test_unet_shapes_and_odd_sizes():
    m = UNet(3, 5, base=8, depth=3, norm="group")
    assert m(torch.randn(2, 3, 64, 96)).shape == (2, 5, 64, 96)
    assert m(torch.randn(1, 3, 37, 51)).shape == (1, 5, 37, 51)
    plain = UNet(3, 19, base=64, depth=4)
    assert 30e6 < sum(p.numel() for p in plain.parameters()) < 32e6  # the plain U-Net at base 64: 31M


@pytest.mark.parametrize("encoder", ["unet", "resnet18"])
def test_an_input_that_fits_is_not_copied_and_gives_what_padding_by_zero_gives(encoder):
    """No F.pad copy for an input whose sides are multiples of the stride: outputs and gradients equal those
    of the padded path (the path a traced graph with symbolic sizes takes)."""
    torch.manual_seed(0)
    model = build_model(tiny_cfg(encoder), 5)
    x = torch.randn(2, 3, 64, 96)
    a = model(x)
    a.square().sum().backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()
    b = model.body(torch.nn.functional.pad(x, (0, 0, 0, 0)))
    b.square().sum().backward()
    assert torch.equal(a, b)
    for k, p in model.named_parameters():
        assert torch.equal(grads[k], p.grad), k
    from distseg.models.unet import pad_to_multiple
    assert pad_to_multiple(x, 32)[0] is x and pad_to_multiple(x[..., :95], 32)[0].shape[-1] == 96
