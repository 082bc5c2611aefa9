"""The one inference path: slide windows, flip and multi-scale TTA, checked against direct computations."""

import math

import pytest
import torch
import torch.nn.functional as F

from distseg.inference.metrics import ConfusionMatrix
from distseg.inference.segmenter import InferenceSpec, Segmenter, segment_images, window_starts
from distseg.models.unet import UNet

MEAN, STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]


def seg(model, **spec):
    return Segmenter(model.eval(), InferenceSpec(**spec), MEAN, STD, "cpu")


def image(n=2, h=64, w=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, h, w), generator=g, dtype=torch.uint8)


def test_window_starts_cover_the_image_and_end_flush():
    assert window_starts(100, 40, 30) == [0, 30, 60]
    assert window_starts(100, 100, 30) == [0] and window_starts(50, 80, 10) == [0]
    assert window_starts(1024, 512, 341) == [0, 341, 512]  # mmsegmentation's 3 rows on Cityscapes
    for length, win, stride in [(97, 32, 20), (64, 64, 1), (2048, 1024, 683)]:
        s = window_starts(length, win, stride)
        assert s[-1] + win == length and all(b - a <= stride for a, b in zip(s, s[1:]))


def test_slide_with_one_window_covering_the_image_equals_whole():
    torch.manual_seed(0)
    model = UNet(3, 5, base=8, depth=2, norm="group")
    x = Segmenter(model, InferenceSpec(), MEAN, STD, "cpu").preprocess(image())
    whole = seg(model).logits(x, (64, 96))
    slide = seg(model, mode="slide", crop=(64, 96), stride=(10, 10)).logits(x, (64, 96))
    torch.testing.assert_close(slide, whole, rtol=0, atol=0)


def test_overlapping_windows_average_to_whole_for_a_pointwise_model():
    """A 1x1 conv sees no context: every window gives the whole-image logits, so the per-pixel average of
    overlapping windows (sum / count) must equal them; a wrong count or offset would not."""
    torch.manual_seed(1)
    model = torch.nn.Conv2d(3, 4, 1)
    x = seg(model).preprocess(image(h=70, w=101))
    whole = seg(model).logits(x, (70, 101))
    for batch in (1, 3, 64):
        slide = seg(model, mode="slide", crop=(32, 48), stride=(13, 21), batch=batch).logits(x, (70, 101))
        torch.testing.assert_close(slide, whole, rtol=1e-6, atol=1e-6)


def test_slide_differs_from_whole_for_a_model_with_context():
    torch.manual_seed(0)
    model = UNet(3, 5, base=8, depth=2, norm="group")
    x = seg(model).preprocess(image())
    a = seg(model).logits(x, (64, 96))
    b = seg(model, mode="slide", crop=(32, 48), stride=(16, 24)).logits(x, (64, 96))
    assert (a - b).abs().max() > 1e-3


def symmetric_conv(cin, cout, k):
    c = torch.nn.Conv2d(cin, cout, k, padding=k // 2)
    with torch.no_grad():
        c.weight.copy_((c.weight + c.weight.flip(-1)) / 2)
    return c


def test_flip_tta_of_a_flip_equivariant_model_equals_no_tta():
    torch.manual_seed(2)
    model = torch.nn.Sequential(symmetric_conv(3, 8, 3), torch.nn.ReLU(), symmetric_conv(8, 5, 3))
    x = seg(model).preprocess(image())
    for mode in ("whole",
                 "slide"):  # a window grid that is its own mirror image: 0/24/48 of 96, 0/16/32 of 64
        plain = seg(model, mode=mode, crop=(32, 48), stride=(16, 24)).logits(x, (64, 96))
        flipped = seg(model, mode=mode, crop=(32, 48), stride=(16, 24), flip=True).logits(x, (64, 96))
        torch.testing.assert_close(flipped, plain, rtol=1e-5, atol=1e-5)
    # and the flip is really applied: a model that is not equivariant changes
    torch.manual_seed(3)
    asym = torch.nn.Conv2d(3, 5, 3, padding=1)
    x_ = seg(asym).preprocess(image())
    assert (seg(asym, flip=True).logits(x_, (64, 96)) - seg(asym).logits(x_, (64, 96))).abs().max() > 1e-3


def test_multiscale_averages_logits_resized_to_label_size():
    torch.manual_seed(4)
    model = UNet(3, 3, base=8, depth=2, norm="group").eval()
    s = seg(model, scales=(0.5, 1.0, 1.5), flip=True)
    x = s.preprocess(image(n=1))
    got = s.logits(x, (64, 96))
    ref = 0
    with torch.no_grad():
        for sc in (0.5, 1.0, 1.5):
            xs = F.interpolate(x, scale_factor=sc, mode="bilinear", align_corners=False) if sc != 1 else x
            for flip in (False, True):
                lg = model(xs.flip(-1)).flip(-1) if flip else model(xs)
                ref = ref + F.interpolate(lg, size=(64, 96), mode="bilinear", align_corners=False)
    torch.testing.assert_close(got, ref / 6, rtol=1e-5, atol=1e-5)


def test_logits_come_at_the_label_size_and_classes_batch_by_size():
    torch.manual_seed(5)
    model = UNet(3, 4, base=8, depth=2, norm="group")
    s = seg(model, scales=(0.5,))
    assert s.logits(s.preprocess(image()), (64, 96)).shape == (2, 4, 64, 96)
    ims = [image(1, 40, 60, seed=1)[0], image(1, 64, 96, seed=2)[0], image(1, 40, 60, seed=3)[0]]
    out = segment_images(s, ims)
    assert [tuple(o.shape) for o in out] == [(40, 60), (64, 96), (40, 60)]
    for im, o in zip(ims, out):  # batching by size does not change any image's result
        assert torch.equal(o, s.classes(s.preprocess(im[None]))[0])


def test_spec_from_config():
    from distseg.config import load_config
    from distseg.errors import UserError

    cfg = load_config(None, ["eval.mode=slide", "data.crop=[60,90]", "eval.flip=true", "eval.scales=[0.5,1]"])
    spec = InferenceSpec.from_config(cfg)
    assert spec.crop == (60, 90) and spec.stride == (40, 60) and spec.flip and spec.scales == (0.5, 1.0)
    assert spec.describe() == "slide 90x60/60x40 + flip @ 0.5,1"
    with pytest.raises(UserError, match="eval.mode=slide needs eval.crop"):
        InferenceSpec.from_config(load_config(None, ["eval.mode=slide", "data.crop=[]"]))
    with pytest.raises(UserError, match="eval.scales"):
        load_config(None, ["eval.scales=[]"])


def test_a_runs_segmenter_runs_in_its_training_precision_unless_told():
    from distseg.config import load_config

    cfg = load_config(None, ["train.mixed_precision=bf16"])
    model = torch.nn.Conv2d(3, 2, 1)
    assert [Segmenter.from_config(model, cfg, "cpu", p).dtype for p in (None, "run", "no", "fp16")] == \
        [torch.bfloat16, torch.bfloat16, None, torch.float16]
    from distseg.config import PRECISIONS
    from distseg.inference.segmenter import AUTOCAST_DTYPES

    assert set(AUTOCAST_DTYPES) == set(PRECISIONS), "every precision choice has its dtype"


def test_confusion_matrix_scores():
    cm = ConfusionMatrix(3)
    t = torch.tensor([0, 0, 1, 1, 2, 255, 2])
    p = torch.tensor([0, 1, 1, 1, 0, 2, 7])  # 7: a prediction outside the classes -> a miss only
    cm.update(p, t)
    s = cm.scores()
    assert s["iou"][0] == pytest.approx(1 / 3)  # tp 1, fn 1, fp 1
    assert s["iou"][1] == pytest.approx(2 / 3)  # tp 2, fp 1
    assert s["iou"][2] == 0.0
    assert s["pixels"] == 6
    assert s["miou"] == pytest.approx((1 / 3 + 2 / 3 + 0) / 3)
    empty = ConfusionMatrix(4)
    empty.update(torch.tensor([0]), torch.tensor([0]))
    assert math.isnan(empty.scores()["iou"][3]) and empty.scores()["miou"] == 1.0
