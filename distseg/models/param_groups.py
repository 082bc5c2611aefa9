"""Optimizer parameter groups, as fine-tuning recipes set them: no weight decay on norm weights, biases and
other vector-like tensors (and on names the config lists, e.g. position embeddings); the pretrained encoder
at a fraction of the decoder's learning rate; and a layer-wise decay of that rate over the encoder's stages,
the deepest stage at the encoder's rate and each shallower one `layer_decay` times the next.

A `Grouping` is what a run records in its state (runs/checkpoint.RunState.grouping): a checkpoint's
optimizer state fits only the groups it was made with, so a resume rebuilds exactly those
(training/resume.check_grouping). `ONE_GROUP` is what every run made before grouping existed trained with.

An encoder's stages are found by what each stage's output depends on in the autograd graph (a parameter
belongs to the shallowest stage it feeds), so one rule serves torchvision and timm encoders alike, without a
table of module names per network.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from distseg.errors import UserError


@dataclass(frozen=True)
class Grouping:
    """How a run splits its parameters into optimizer groups (config optim.no_decay, optim.no_decay_names,
    optim.encoder_lr_mult, optim.layer_decay, resolved)."""

    no_decay: bool = False
    no_decay_names: tuple[str, ...] = ()
    encoder_lr_mult: float = 1.0
    layer_decay: float = 1.0

    @classmethod
    def from_record(cls, record: dict | None) -> Grouping:
        """The grouping a run state recorded; None (a run made before grouping was recorded): one group."""
        if record is None:
            return ONE_GROUP
        try:
            r = record
            return cls(bool(r["no_decay"]), tuple(sorted(r["no_decay_names"])), float(r["encoder_lr_mult"]),
                       float(r["layer_decay"]))
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"the recorded parameter grouping {record!r} is damaged ({e!r})") from None

    def record(self, groups: list[ParamGroup] | None = None) -> dict:
        """What the run state stores (JSON), with each group's tensor count once the groups are built: a
        resume that would build other groups (another timm version cutting other stages) is then refused in
        one line, where the optimizer state would not load."""
        out = {**asdict(self), "no_decay_names": list(self.no_decay_names)}
        return {**out, "tensors": [len(g.params) for g in groups]} if groups is not None else out

    def describe(self) -> str:
        """One phrase: `one group`, or what differs from it."""
        parts = []
        if self.no_decay:
            names = f" and {', '.join(self.no_decay_names)}" if self.no_decay_names else ""
            parts.append(f"no decay on norms, biases, 1-d tensors{names}")
        if self.encoder_lr_mult != 1:
            parts.append(f"encoder lr x{self.encoder_lr_mult:g}")
        if self.layer_decay != 1:
            parts.append(f"layer decay {self.layer_decay:g}")
        return "; ".join(parts) or "one group"

    def settings(self) -> str:
        """The config overrides that ask for this grouping."""
        names = "[" + ",".join(self.no_decay_names) + "]"
        return (f"optim.no_decay={str(self.no_decay).lower()} optim.no_decay_names={names} "
                f"optim.encoder_lr_mult={self.encoder_lr_mult:g} optim.layer_decay={self.layer_decay:g}")


ONE_GROUP = Grouping()


def requested_grouping(optim_cfg, recorded: Grouping | None = None) -> Grouping:
    """The grouping a config asks for: optim.no_decay=auto takes what the run recorded, or true for a new
    run (`recorded` None)."""
    o = optim_cfg
    no_decay = (recorded.no_decay if recorded else True) if o.no_decay == "auto" else o.no_decay == "true"
    if o.no_decay_names and not no_decay:
        raise UserError(f"optim.no_decay_names={o.no_decay_names} needs optim.no_decay=true (this run's is "
                        "false): the names are kept from weight decay along with the norms and biases")
    return Grouping(no_decay, tuple(sorted(o.no_decay_names)), float(o.encoder_lr_mult), float(o.layer_decay))


@dataclass(frozen=True)
class ParamGroup:
    """One optimizer group: its parameters, its share of the base learning rate and its weight decay."""

    name: str
    params: tuple[nn.Parameter, ...]
    lr_scale: float
    decay: bool

    def line(self, lr: float, weight_decay: float) -> str:
        """`encoder stage 3   12 tensors   1,204,224 params  lr 1.0e-04  decay 0.05`: `lr` the run's base
        rate, `weight_decay` the one the optimizer applies to this group."""
        count = sum(p.numel() for p in self.params)
        return (f"  {self.name:<28} {len(self.params):>4} tensors {count:>12,} params  "
                f"lr {lr * self.lr_scale:.2e}  decay {weight_decay:g}")


def layer_weights(model: nn.Module) -> set[int]:
    """The ids of convolution and linear weights: decayed whatever their shape (a 1-logit head's 1 x C x 1 x 1
    kernel is a weight matrix, not a scale)."""
    kinds = (nn.modules.conv._ConvNd, nn.Linear)
    return {id(m.weight) for m in model.modules() if isinstance(m, kinds) and m.weight is not None}


def name_matches(name: str, listed: str) -> bool:
    """A name of optim.no_decay_names names a parameter whole or as its dotted name's end (`pos_embed` is
    `encoder.body.pos_embed`)."""
    return name == listed or name.endswith("." + listed)


def is_no_decay(name: str, p: torch.Tensor, extra: tuple[str, ...], weights: set[int]) -> bool:
    """Biases; tensors other than convolution and linear weights with at most one dimension above 1 (norm
    weights, layer scales such as torchvision ConvNeXt's C x 1 x 1, 1-d parameters); and any name listed
    (`name_matches`)."""
    vector_like = id(p) not in weights and sum(d > 1 for d in p.shape) <= 1
    listed = any(name_matches(name, n) for n in extra)
    return name.endswith(".bias") or vector_like or listed


def encoder_stages(encoder: nn.Module) -> dict[str, int]:
    """Each trainable encoder parameter's stage (0 = shallowest): the first stage output it reaches in the
    autograd graph, on a probe input in eval mode (no statistics move). A parameter no stage reaches is
    given the deepest."""
    params = {n: p for n, p in encoder.named_parameters() if p.requires_grad}
    if not params:
        return {}
    was_training = encoder.training
    encoder.eval()
    try:
        with torch.enable_grad():
            feats = encoder(torch.zeros(1, 3, 64, 64, device=next(iter(params.values())).device))
        stage: dict[str, int] = {}
        for i, f in enumerate(feats):
            left = [n for n in params if n not in stage]
            if not left:
                break
            grads = torch.autograd.grad(f.float().sum(), [params[n] for n in left], allow_unused=True,
                                        retain_graph=i < len(feats) - 1)
            stage.update({n: i for n, g in zip(left, grads) if g is not None})
    finally:
        encoder.train(was_training)
    return {n: stage.get(n, len(feats) - 1) for n in params}


def build_param_groups(model: nn.Module, grouping: Grouping) -> list[ParamGroup]:
    """The groups `grouping` asks for, in a fixed order (encoder stages shallow to deep, then the decoder;
    decayed before undecayed); one group holding every parameter in model order for ONE_GROUP, as runs made
    before grouping trained with."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if grouping == ONE_GROUP:
        return [ParamGroup("all", tuple(p for _, p in named), 1.0, True)]
    encoder = getattr(model, "encoder", None)
    if encoder is None and (grouping.encoder_lr_mult != 1 or grouping.layer_decay != 1):
        raise UserError("optim.encoder_lr_mult and optim.layer_decay need an encoder (model.encoder="
                        "resnet50, timm:convnext_tiny, ...): the plain U-Net has no pretrained part")
    check_names(named, grouping.no_decay_names)
    stages = encoder_stages(encoder) if encoder is not None and grouping.layer_decay != 1 else {}
    deepest = max(stages.values(), default=0)
    keyed: dict[tuple, list[nn.Parameter]] = {}
    weights = layer_weights(model)
    for name, p in named:
        decay = not (grouping.no_decay and is_no_decay(name, p, grouping.no_decay_names, weights))
        inner = name.removeprefix("encoder.")
        part = (0, stages.get(inner, 0)) if encoder is not None and name.startswith("encoder.") else (1, 0)
        keyed.setdefault((*part, not decay), []).append(p)
    groups = []
    for (part, stage, undecayed), params in sorted(keyed.items()):
        if part == 1:
            title, scale = "decoder", 1.0
        else:
            title = f"encoder stage {stage}" if stages else "encoder"
            scale = grouping.encoder_lr_mult * grouping.layer_decay ** (deepest - stage)
        title += ", no decay" if undecayed else ""
        groups.append(ParamGroup(title, tuple(params), scale, not undecayed))
    return groups


def check_names(named: list[tuple[str, nn.Parameter]], listed: tuple[str, ...]) -> None:
    """A name in optim.no_decay_names that matches no parameter is a typo that would silently decay it."""
    for n in listed:
        if not any(name_matches(name, n) for name, _ in named):
            example = named[0][0] if named else "none"
            raise UserError(f"optim.no_decay_names: {n!r} matches no parameter of this model (names are "
                            f"dotted paths or their ends, e.g. {example})")


def optimizer_groups(groups: list[ParamGroup], lr: float, weight_decay: float) -> list[dict]:
    """What torch optimizers take: each group's parameters, learning rate and weight decay."""
    return [{"params": list(g.params), "lr": lr * g.lr_scale,
             "weight_decay": weight_decay if g.decay else 0.0} for g in groups]
