"""Parameter groups (distseg/models/param_groups.py): every parameter of the plain U-Net and of an encoder
U-Net in exactly one group, norms and biases undecayed, the encoder at encoder_lr_mult x the decoder's rate
with a layer decay per stage; both optimizers take the groups; what a resume keeps or refuses."""

from pathlib import Path

import pytest
import torch

from distseg.config import load_config
from distseg.errors import UserError
from distseg.models import build_model
from distseg.models.optim import build_optimizer, lr_at, set_lr
from distseg.models.param_groups import ONE_GROUP, Grouping, build_param_groups, requested_grouping
from distseg.runs.checkpoint import RunState
from distseg.training.resume import check_group_sizes, check_grouping

NORMS = (torch.nn.modules.batchnorm._NormBase, torch.nn.GroupNorm, torch.nn.LayerNorm)
RESNET_STAGES = ("conv1", "bn1"), ("layer1",), ("layer2",), ("layer3",), ("layer4",)


def tiny(encoder, *extra):
    return load_config(None, [f"model.encoder={encoder}", "model.base=8", "model.depth=2", *extra])


def group_of(groups) -> dict[int, object]:
    """id(parameter) -> its group; fails if a parameter is in two."""
    out = {}
    for g in groups:
        for p in g.params:
            assert id(p) not in out, "a parameter in two groups"
            out[id(p)] = g
    return out


def undecayed_names(model) -> set[str]:
    """What must not decay, found from the modules rather than the shapes the rule looks at."""
    out = set()
    for mname, m in model.named_modules():
        for pname, _ in m.named_parameters(recurse=False):
            if isinstance(m, NORMS) or pname == "bias":
                out.add(f"{mname}.{pname}" if mname else pname)
    return out


@pytest.mark.parametrize("encoder", ["unet", "resnet18", "convnext_tiny", "timm:convnext_atto",
                                     "timm:efficientnet_b0"])
def test_every_parameter_in_one_group_and_norms_and_biases_undecayed(encoder):
    extra = [] if encoder == "unet" else ["optim.encoder_lr_mult=0.1", "optim.layer_decay=0.5"]
    cfg = tiny(encoder, *extra)
    model = build_model(cfg, 19)
    groups = build_param_groups(model, requested_grouping(cfg.optim))
    where = group_of(groups)
    named = dict(model.named_parameters())
    assert set(where) == {id(p) for p in named.values()}, "every parameter is in a group"
    must_not = undecayed_names(model)
    assert must_not
    for name, p in named.items():
        g = where[id(p)]
        if name in must_not:
            assert not g.decay, f"{name} is decayed"
        elif p.dim() == 4 and min(p.shape[:2]) > 1:
            assert g.decay, f"conv weight {name} is not decayed"
        if not name.startswith("encoder."):
            assert g.lr_scale == 1.0 and g.name.startswith("decoder"), name
    if "convnext" in encoder:  # layer scales (torchvision's are C x 1 x 1, timm's C): undecayed
        scale = [n for n in named if n.endswith(("layer_scale", ".gamma"))]
        assert scale and all(not where[id(named[n])].decay for n in scale)


def test_a_one_logit_head_is_a_weight_and_decays():
    """BCE on a binary scheme has a 1 x C x 1 x 1 head: one dimension above 1, still a weight matrix."""
    cfg = tiny("resnet18", "loss.bce=1", "loss.ce=0")
    model = build_model(cfg, 1)
    assert model.head.weight.shape[0] == 1
    where = group_of(build_param_groups(model, requested_grouping(cfg.optim)))
    assert where[id(model.head.weight)].decay and not where[id(model.head.bias)].decay


@pytest.mark.parametrize("encoder,stage_of", [
    ("torchvision convnext_tiny", {"features.0": 0, "features.1": 0, "features.2": 1, "features.3": 1,
                                   "features.4": 2, "features.5": 2, "features.6": 3, "features.7": 3}),
    ("timm:convnext_atto", {"stem_0": 0, "stem_1": 0, "stages_0": 0, "stages_1": 1, "stages_2": 2,
                            "stages_3": 3}),
    ("timm:efficientnet_b0", {"conv_stem": 0, "bn1": 0, "blocks.0": 0, "blocks.1": 1, "blocks.2": 2,
                              "blocks.3": 3, "blocks.4": 3, "blocks.5": 4, "blocks.6": 4})])
def test_convnext_and_efficientnet_stages(encoder, stage_of):
    """ConvNeXt: the stem goes with stage 0 and each downsample with the stage it opens; EfficientNet's
    feature stages are blocks 0, 1, 2, 4 and 6, so blocks 3 and 5 go with the next stage they feed."""
    cfg = tiny(encoder.split()[-1], "optim.layer_decay=0.5")
    model = build_model(cfg, 19)
    where = group_of(build_param_groups(model, requested_grouping(cfg.optim)))
    seen = set()
    for name, p in model.named_parameters():
        if name.startswith("encoder.body."):
            inner = name.removeprefix("encoder.body.")
            prefix = next(k for k in stage_of if inner == k or inner.startswith(k + "."))
            assert where[id(p)].name.startswith(f"encoder stage {stage_of[prefix]}"), name
            seen.add(prefix)
    assert seen == set(stage_of)


@pytest.mark.parametrize("encoder", ["resnet18", "timm:resnet10t"])
def test_encoder_stages_get_the_multiplier_and_the_layer_decay(encoder):
    """ResNet's stages, as torchvision's and timm's feature extractors both cut them: the stem (conv1, bn1)
    up to the first ReLU, then layer1..layer4."""
    cfg = tiny(encoder, "optim.encoder_lr_mult=0.1", "optim.layer_decay=0.5")
    model = build_model(cfg, 19)
    where = group_of(build_param_groups(model, requested_grouping(cfg.optim)))
    for name, p in model.named_parameters():
        if not name.startswith("encoder.body."):
            continue
        stage = next(i for i, prefixes in enumerate(RESNET_STAGES)
                     if name.removeprefix("encoder.body.").startswith(prefixes))
        assert where[id(p)].lr_scale == pytest.approx(0.1 * 0.5 ** (4 - stage)), name
        assert where[id(p)].name.startswith(f"encoder stage {stage}"), name

    flat = tiny("resnet18", "optim.encoder_lr_mult=0.1")  # no layer decay: one encoder rate
    model = build_model(flat, 19)
    scales = {g.name: g.lr_scale for g in build_param_groups(model, requested_grouping(flat.optim))}
    assert scales == {"encoder": 0.1, "encoder, no decay": 0.1, "decoder": 1.0, "decoder, no decay": 1.0}


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_both_optimizers_decay_only_what_they_should_and_follow_each_groups_schedule(name):
    cfg = tiny("resnet18", f"optim.name={name}", "optim.lr=0.1", "optim.weight_decay=0.5", "optim.momentum=0",
               "optim.encoder_lr_mult=0.1", "optim.layer_decay=0.5", "sched.warmup_steps=3")
    model = build_model(cfg, 19)
    groups = build_param_groups(model, requested_grouping(cfg.optim))
    opt = build_optimizer(cfg, groups, on_cuda=False)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # a step then only applies the weight decay
    for step in range(5):
        set_lr(opt, groups, lr_at(step, cfg, 10))
        for g, group in zip(opt.param_groups, groups):
            assert g["lr"] == pytest.approx(lr_at(step, cfg, 10) * group.lr_scale)
    opt.step()
    where = group_of(groups)
    for n, p in model.named_parameters():
        moved = not torch.equal(p.detach(), before[n])
        assert moved == (where[id(p)].decay and bool(before[n].abs().max() > 0)), n
    assert lr_at(0, cfg, 10) < lr_at(3, cfg, 10) == 0.1 > lr_at(4, cfg, 10), "warm-up, then poly"


def test_one_group_is_the_old_optimizer_and_old_states_mean_one_group():
    model = build_model(tiny("resnet18"), 19)
    (g,) = build_param_groups(model, ONE_GROUP)
    assert list(g.params) == list(model.parameters()) and g.decay and g.lr_scale == 1
    assert Grouping.from_record(None) == ONE_GROUP
    new = requested_grouping(tiny("unet").optim)
    assert new.no_decay and Grouping.from_record(new.record()) == new


def test_what_a_resume_keeps_and_refuses():
    ckpt = Path("runs/r/checkpoints/step-00000003")
    old = RunState(step=3, batch_size=2)  # grouping None: made before grouping was recorded
    notes = []
    assert check_grouping(tiny("unet"), ckpt, old, notes.append) == ONE_GROUP and not notes, "the defaults"
    recipe = tiny("resnet18", "optim.no_decay=true", "optim.encoder_lr_mult=0.729", "optim.layer_decay=0.9")
    assert check_grouping(recipe, ckpt, old, notes.append) == ONE_GROUP, "its config could not have chosen"
    assert notes == [f"note: {ckpt} was made before parameter groups were recorded: it resumes with its one "
                     "group; this config's groups (no decay on norms, biases, 1-d tensors; encoder lr "
                     "x0.729; layer decay 0.9) apply to new runs"]

    grouped = Grouping(no_decay=True, encoder_lr_mult=0.1, layer_decay=0.9)
    state = RunState(step=3, batch_size=2, grouping=grouped.record())
    assert check_grouping(tiny("resnet18", "optim.encoder_lr_mult=0.1", "optim.layer_decay=0.9"), ckpt,
                          state, notes.append) == grouped
    with pytest.raises(UserError, match=r"encoder lr x0.1; layer decay 0.9.*optim.encoder_lr_mult=0.1 "):
        check_grouping(tiny("resnet18", "optim.layer_decay=0.9"), ckpt, state, notes.append)
    recorded_one = RunState(grouping=ONE_GROUP.record())  # a new run made with optim.no_decay=false
    with pytest.raises(UserError, match=r'groups "one group", this start asks for "no decay on norms.*'
                                        r'resume with optim.no_decay=false'):
        check_grouping(tiny("unet", "optim.no_decay=true"), ckpt, recorded_one, notes.append)
    names = RunState(grouping=Grouping(True, ("b", "a")).record())
    assert check_grouping(tiny("unet", "optim.no_decay_names=[a,b]"), ckpt, names, notes.append).no_decay
    with pytest.raises(UserError, match="recorded parameter grouping .* is damaged"):
        check_grouping(tiny("unet"), ckpt, RunState(grouping={"no_decay": True}), notes.append)


def test_groups_that_do_not_fit_the_checkpoint_are_one_line():
    model = build_model(tiny("resnet18"), 19)
    grouping = requested_grouping(tiny("resnet18").optim)
    groups = build_param_groups(model, grouping)
    ckpt = Path("runs/r/checkpoints/step-00000003")
    check_group_sizes(ckpt, RunState(grouping=grouping.record(groups)), groups)
    check_group_sizes(ckpt, RunState(grouping=grouping.record()), groups)  # recorded without sizes
    sizes = [len(g.params) for g in groups]
    other = {**grouping.record(groups), "tensors": [sizes[0] + 1, sizes[1] - 1, *sizes[2:]]}
    now = ", ".join(map(str, sizes))
    with pytest.raises(UserError, match=rf"builds parameter groups of \[{now}\] tensors"):
        check_group_sizes(ckpt, RunState(grouping=other), groups)


def test_settings_that_do_not_fit_are_one_line():
    with pytest.raises(UserError, match="need an encoder"):
        build_param_groups(build_model(tiny("unet"), 19), requested_grouping(tiny("unet",
                                                                                   "optim.layer_decay=0.9").optim))
    with pytest.raises(UserError, match="'pos_embed' matches no parameter"):
        cfg = tiny("unet", "optim.no_decay_names=[pos_embed]")
        build_param_groups(build_model(cfg, 19), requested_grouping(cfg.optim))
    with pytest.raises(UserError, match="needs optim.no_decay=true"):
        requested_grouping(tiny("unet", "optim.no_decay=false", "optim.no_decay_names=[head.weight]").optim)
    for bad in ("optim.layer_decay=1.5", "optim.encoder_lr_mult=0", "optim.no_decay=maybe"):
        with pytest.raises(UserError, match=bad.split("=")[0]):
            tiny("unet", bad)
    cfg = tiny("unet", "optim.no_decay_names=[head.weight]")  # a listed name is kept from decay
    model = build_model(cfg, 19)
    where = group_of(build_param_groups(model, requested_grouping(cfg.optim)))
    assert not where[id(model.head.weight)].decay
