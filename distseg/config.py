"""Training configuration: dataclasses, YAML load/dump, dotted overrides (a.b.c=value), validation.

Every mistake is a UserError naming the key, so `train.py` can stop with one clear line.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, get_type_hints

import yaml

from distseg.errors import UserError
from distseg.units import parse_bytes
from distseg.urls import redact

# The precisions a model trains and runs in (train.mixed_precision; every command's --precision), and the
# --precision value that means "the run's own train.mixed_precision", the default of every command that
# runs a model: then evaluate, predict and the report score a checkpoint as training's validation did.
PRECISIONS = ("no", "bf16", "fp16")
RUN_PRECISION = "run"


@dataclass
class StreamCfg:
    """One weighted training stream (an entry of data.streams): a split of a shards folder or URL."""

    shards: str  # folder or URL with <split>.json, as data.shards
    split: str = "train"  # the split read, <split>.json
    weight: float = 1.0  # its share of each epoch's samples: weight / the sum of the weights; > 0


def _exact(weights: list[float]) -> list[Fraction]:
    """Weights as exact fractions of what was written (0.1 is 1/10, not its binary neighbour), checked > 0."""
    if not weights:
        raise ValueError("no stream weights")
    exact = [Fraction(str(w)) for w in weights]  # ValueError for nan and inf
    if min(exact) <= 0:
        raise ValueError(f"stream weights must be > 0, got {list(weights)}")
    return exact


def stream_shares(weights: list[float], epoch_samples: int) -> list[int]:
    """Each stream's samples in an epoch of `epoch_samples`, in proportion to `weights`, by largest
    remainder: the floor of epoch_samples * w / sum(w) each, then the samples left one each to the largest
    fractional parts (a tie to the earlier stream). Exact (fractions, no float error); the shares sum to
    epoch_samples."""
    if epoch_samples < 0:
        raise ValueError(f"epoch_samples must be >= 0, got {epoch_samples}")
    exact = _exact(weights)
    quotas = [epoch_samples * w / sum(exact) for w in exact]
    shares = [math.floor(q) for q in quotas]
    by_remainder = sorted(range(len(quotas)), key=lambda i: (shares[i] - quotas[i], i))  # largest first
    for i in by_remainder[:epoch_samples - sum(shares)]:
        shares[i] += 1
    return shares


def default_epoch_samples(first_stream_size: int, weights: list[float], repeat: int = 1) -> int:
    """data.epoch_samples=0's epoch: the one whose share for the first stream (stream_shares) is exactly
    first_stream_size x repeat, so each of its samples is seen `repeat` times an epoch: the largest such size
    up to ceil(size x repeat / share_0), share_0 = w0 / sum(w), computed exactly (e.g. 2975 at 3:1: 3967,
    2975 + 992; 10 at 9:1: 11, not 12, which would give the first stream 11). Where rounding allows no exact
    share, that ceiling."""
    if first_stream_size < 0 or repeat < 1:
        raise ValueError(f"first_stream_size must be >= 0 and repeat >= 1, got {first_stream_size}, {repeat}")
    exact, target = _exact(weights), first_stream_size * repeat
    ceiling = math.ceil(target * sum(exact) / exact[0])
    for size in range(ceiling, target - 1, -1):  # the first stream's share falls by at most 1 a step
        first = stream_shares(weights, size)[0]
        if first == target:
            return size
        if first < target:
            break
    return ceiling


@dataclass
class DataCfg:
    """Where the shards are and how samples are loaded and augmented."""

    shards: str = "shards"  # folder or URL (s3://, http(s)://, file://, any fsspec URL) with <split>.json
    cache_dir: str = ""  # node-local shard cache, required for remote shards
    cache_size: str = "0"  # cache limit in bytes (K/M/G); 0 = no limit; least recently used shards go first
    shuffle: str = "global"  # global: one permutation per epoch | shards: per-rank shard windows (for caches)
    shuffle_window: int = 4  # with shuffle=shards: shards whose samples are shuffled together
    prefetch_shards: int = 2  # remote shards downloaded ahead of the one being read
    retries: int = 5  # tries per storage request (transient faults; exponential backoff)
    on_corrupt: str = "error"  # a sample that fails to decode: error | skip (padding, masked out, counted)
    verify: str = "node"  # shard sha256 checks: node (once per node, then trusted by stamp) | always
    repeat: int = 1  # passes over the train split per epoch, each its own shuffle and augmentation
    train_split: str = "train"  # the shards' split names (<split>.json)
    val_split: str = "val"
    streams: list[StreamCfg] = field(default_factory=list)  # weighted training streams, each {shards,
    # split, weight}; [] = train on data.shards / data.train_split. Validation reads data.shards /
    # data.val_split either way. In a config file, or data.streams=[{shards: a, weight: 3}, {shards: b}]
    epoch_samples: int = 0  # with data.streams: samples per epoch, shared by weight; 0 = one pass over the
    # first stream at its share, x data.repeat (which multiplies only this default). With data.sampling=rare
    # and no streams: draws per epoch; 0 = the split's samples x data.repeat
    sampling: str = "uniform"  # uniform (each sample once per pass) | rare: each slot draws a class by
    # exp((1 - its pixel share) / rare_temperature), then a sample holding it (DAFormer); needs shards with
    # per-sample class counts
    rare_temperature: float = 0.01  # with sampling=rare: lower draws the rare classes more (DAFormer: 0.01)
    rare_min_pixels: int = 3000  # with sampling=rare: a sample holds a class above this many of its pixels
    loader: str = "torch"  # torch | dali
    scheme: str = "trainid"  # the classes the shards were made with (distseg shard --scheme)
    batch_size: int = 8  # per process
    val_batch_size: int = 4  # per process
    num_workers: int = 2
    decode: str = "auto"  # cpu | gpu | auto (gpu when CUDA is present)
    crop: list[int] = field(default_factory=lambda: [512, 1024])  # H, W of training crops; [] = no crop
    scale: list[float] = field(default_factory=lambda: [0.5, 2.0])  # random rescale range
    flip: bool = True
    color: float = 0.2  # brightness/contrast/saturation jitter strength (0 = off)
    cat_max_ratio: float = 0.0  # class-aware crops: up to 10 crop offsets tried, the first kept whose labels
    # show 2+ classes, none holding this share or more (else the last); 0 = off; 0.75 as mmsegmentation
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])


@dataclass
class EvalCfg:
    """How validation, evaluate, predict and the report run the model (distseg/inference/segmenter.py)."""

    mode: str = "whole"  # whole | slide
    crop: list[int] = field(default_factory=list)  # slide window [height, width]; [] = data.crop
    stride: list[int] = field(default_factory=list)  # [height, width] between windows; [] = 2/3 of the window
    flip: bool = False  # horizontal-flip test-time augmentation
    scales: list[float] = field(default_factory=lambda: [1.0])  # input scales; logits averaged at label size
    batch: int = 4  # slide windows (or whole images) per forward pass: bounds inference memory


@dataclass
class ModelCfg:
    """The network: the plain U-Net, or a torchvision or timm encoder with a U-Net decoder."""
    encoder: str = "unet"  # unet (the plain U-Net) | a torchvision encoder: distseg.models.encoder_names()
    # | timm:NAME, a timm CNN's features_only stages (timm:resnet50d, timm:convnext_tiny; needs distseg[timm])
    pretrained: str = "none"  # encoder weights: none | imagenet (torchvision's, or timm's default tag from
    # the Hugging Face cache; downloaded once) | PATH: a state dict file of the network (timm: of the full
    # classification model) or a distseg run's checkpoint of the same encoder
    base: int = 64  # channels of the shallowest level: the U-Net's first level, or an encoder's decoder
    depth: int = 4  # number of down-sampling steps
    norm: str = "batch"  # batch | sync_batch | group | none
    channels_last: bool = True
    compile: bool = False


@dataclass
class LossCfg:
    """Weights of the loss terms (distseg/models/losses.py)."""
    ce: float = 1.0  # cross-entropy weight (the ignore label, labels.IGNORE, left out)
    dice: float = 0.0  # soft Dice weight
    bce: float = 0.0  # BCE-with-logits weight (binary schemes only; the model then has 1 output)
    class_weights: str = "none"  # CE class weights from the train pixel counts: none | inv_log | median_freq
    ohem: bool = False  # CE on hard pixels only (online hard example mining, as mmsegmentation's sampler)
    ohem_thresh: float = 0.7  # with ohem: keep pixels whose true-class probability is below this ...
    ohem_min_kept: int = 100000  # ... and at least this many per image of the micro-batch


@dataclass
class OptimCfg:
    """Optimizer (distseg/models/optim.py) and its parameter groups (distseg/models/param_groups.py: printed
    at the start, recorded in the run state)."""
    name: str = "adamw"  # adamw | sgd
    lr: float = 1e-3
    weight_decay: float = 1e-4
    momentum: float = 0.9  # sgd
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    fused: str = "auto"  # auto (on CUDA) | true | false
    no_decay: str = "auto"  # no weight decay on norm weights, biases, 1-d tensors and no_decay_names: auto
    # (true for a new run; a resumed run keeps what it recorded) | true | false
    no_decay_names: list[str] = field(default_factory=list)  # more parameters kept from weight decay, by
    # dotted name or its end, e.g. [pos_embed]
    encoder_lr_mult: float = 1.0  # the encoder's learning rate as a fraction of optim.lr (e.g. 0.1); 1 = same
    layer_decay: float = 1.0  # over the encoder's stages: the deepest at the encoder's rate, each shallower
    # one x this (e.g. 0.9); 1 = off


@dataclass
class SchedCfg:
    """Learning rate: linear warm-up, then poly decay."""
    warmup_steps: int = 0
    power: float = 0.9  # poly decay exponent
    min_lr: float = 0.0


@dataclass
class TrainCfg:
    """The loop: length, precision, checkpoints, resume, logging."""
    epochs: int = 10
    max_steps: int = 0  # optimizer steps; 0 = epochs x steps per epoch
    grad_accum: int = 1
    clip_grad: float = 0.0  # max grad norm; 0 = off
    mixed_precision: str = "no"  # no | bf16 | fp16
    seed: int = 0
    deterministic: bool = False  # deterministic algorithms, cuDNN autotuning off: a resume is bit-identical
    log_every: int = 10
    val_every: int = 1  # epochs
    ckpt_every: int = 0  # optimizer steps; 0 = only at epoch ends
    keep_last: int = 2
    async_checkpoint: bool = True  # write checkpoints on a thread while training goes on (Ctrl-C, stops wait)
    resume: str = "auto"  # auto | never | PATH to a checkpoint folder
    init_from: str = ""  # weights to start from (fine-tuning): a checkpoint folder or model.safetensors
    reset_head: bool = True  # with init_from: start the 1x1 head afresh (new classes)
    ema_decay: float = 0.0  # exponential moving average of the weights (e.g. 0.999); 0 = off
    tb_images: int = 4  # validation images shown in TensorBoard
    trackers: list[str] = field(default_factory=list)  # experiment trackers beside TensorBoard: wandb,
    # mlflow (the distseg[trackers] extra); rank 0 logs to them, a resumed run continues their runs
    tracker_project: str = "distseg"  # the W&B project and the MLflow experiment runs are logged under
    mlflow_uri: str = ""  # MLflow tracking URI (a server, sqlite:///...); empty = a file store in the run
    # folder (<run>/mlruns)
    progress: bool = True  # tqdm bar on rank 0


@dataclass
class Config:
    """A whole run's settings; saved as <output_dir>/<name>/config.yaml (distseg/runs/run_dir.py)."""
    name: str = "run"  # the run folder's name: <output_dir>/<name>
    output_dir: str = "runs"  # where run folders are made
    data: DataCfg = field(default_factory=DataCfg)
    model: ModelCfg = field(default_factory=ModelCfg)
    loss: LossCfg = field(default_factory=LossCfg)
    optim: OptimCfg = field(default_factory=OptimCfg)
    sched: SchedCfg = field(default_factory=SchedCfg)
    train: TrainCfg = field(default_factory=TrainCfg)
    eval: EvalCfg = field(default_factory=EvalCfg)


CHOICES = {
    "data.loader": ("torch", "dali"), "eval.mode": ("whole", "slide"), "data.shuffle": ("global", "shards"),
    "data.on_corrupt": ("error", "skip"), "data.verify": ("node", "always"),
    "data.sampling": ("uniform", "rare"),
    "loss.class_weights": ("none", "inv_log", "median_freq"),
    "data.decode": ("cpu", "gpu", "auto"),
    "model.norm": ("batch", "sync_batch", "group", "none"), "optim.name": ("adamw", "sgd"),
    "optim.fused": ("auto", "true", "false"), "optim.no_decay": ("auto", "true", "false"),
    "train.mixed_precision": PRECISIONS,
}


def inference_precision(precision: str | None, cfg: Config) -> str:
    """The precision to run a model in: `precision`, or for `run` (or None) the run's train.mixed_precision,
    so that a checkpoint scores what training's validation printed for it."""
    return cfg.train.mixed_precision if precision in (None, RUN_PRECISION) else precision


def _check_keys(cls, data: dict, where: str) -> None:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        bad = sorted(map(str, unknown))[0]
        close = difflib.get_close_matches(bad, sorted(names), n=1, cutoff=0.6)
        hint = f"did you mean {where + '.' if where else ''}{close[0]}?" if close else \
            f"known: {', '.join(sorted(names))}"
        raise UserError(f"config: unknown key {where + '.' if where else ''}{bad} ({hint})")


def _build(cls, data: dict, where: str):
    if not isinstance(data, dict):
        raise UserError(f"config: {where or 'top level'} must be a mapping")
    hints = get_type_hints(cls)
    _check_keys(cls, data, where)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        key, val, typ = f"{where}.{f.name}" if where else f.name, data[f.name], hints[f.name]
        if dataclasses.is_dataclass(typ):
            kwargs[f.name] = _build(typ, val or {}, key)
        else:
            kwargs[f.name] = _coerce(val, typ, key)
    return cls(**kwargs)


@dataclass(frozen=True)
class _Override:
    """A command-line value: YAML-parsed for numbers, lists and booleans, but its text is kept, because
    YAML 1.1 reads a bare `no` as false and a string setting (train.mixed_precision=no) must stay "no"."""

    text: str
    parsed: Any


def _entries(cls, val: Any, key: str) -> list:
    """A list of mappings (data.streams), each entry built as a `cls`: from a config file, or from an
    override written as a YAML flow list. An entry's values are taken as YAML typed them (a split `no` or
    `2019` is refused, not turned into text), and its mistakes name the entry: data.streams[1].weight."""
    fields = dataclasses.fields(cls)
    shape = "{" + ", ".join(f.name for f in fields) + "}"
    example = f"{key}=[{{shards: a, weight: 3}}, {{shards: b, split: train_extra}}]"
    if isinstance(val, _Override):
        if isinstance(val.parsed, str) and val.text.lstrip().startswith("["):
            raise UserError(f"config: {key}={val.text} is not a valid YAML flow list: write {example}")
        val = val.parsed
    if val is None:
        return []
    if isinstance(val, dict):
        raise UserError(f"config: {key} is a list, set whole: a `- {shape}` entry each in a config file, or "
                        f"{example}")
    if not isinstance(val, list):
        raise UserError(f"config: {key} must be a list of {shape} mappings (a `- {{...}}` entry each in a "
                        f"config file, or {example}), got {val!r}")
    hints, out = get_type_hints(cls), []
    for i, entry in enumerate(val):
        where = f"{key}[{i}]"
        if not isinstance(entry, dict):
            raise UserError(f"config: {where} must be a mapping {shape}, got {entry!r}")
        _check_keys(cls, entry, where)
        for f in fields:
            required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            v = entry.get(f.name)
            if f.name not in entry:
                if required:
                    raise UserError(f"config: {where}.{f.name} is missing (each entry is {shape}; "
                                    f"{f.name} is required)")
            elif v is None:
                raise UserError(f"config: {where}.{f.name} is empty")
            elif hints[f.name] is str and not isinstance(v, str):
                quote = f" (quote it: {f.name}: '{v}')" if isinstance(v, (int, float)) else ""
                if isinstance(v, bool):
                    quote = f" (YAML reads yes/no/on/off as booleans: quote it, e.g. {f.name}: 'no')"
                raise UserError(f"config: {where}.{f.name} must be a string, got {v!r}{quote}")
            elif hints[f.name] is float and isinstance(v, str) and _number(v) is not None:
                entry = {**entry, f.name: _number(v)}  # YAML 1.1 reads 1e-3 as text: a number, as elsewhere
            elif hints[f.name] is float and (isinstance(v, bool) or not isinstance(v, (int, float))):
                raise UserError(f"config: {where}.{f.name} must be a number, got {v!r}")
        out.append(_build(cls, entry, where))
    return out


def _number(text: str) -> float | None:
    """The float a string spells (`1e-3`), or None."""
    try:
        return float(text)
    except ValueError:
        return None


def _coerce(val: Any, typ, key: str):
    origin = getattr(typ, "__origin__", None)
    if origin is list and dataclasses.is_dataclass(typ.__args__[0]):
        return _entries(typ.__args__[0], val, key)
    if isinstance(val, _Override):  # a string setting takes YAML's string (quotes removed), else the text
        val = (val.parsed if isinstance(val.parsed, str) else val.text) if typ is str else val.parsed
    elif typ is str and isinstance(val, bool) and key == "train.mixed_precision":
        val = "no" if val is False else val  # `mixed_precision: no` in a YAML file
    try:
        if typ is bool:
            if isinstance(val, bool):
                return val
            if str(val).lower() in ("true", "1", "yes", "on"):
                return True
            if str(val).lower() in ("false", "0", "no", "off"):
                return False
            raise ValueError
        if typ is int:
            if isinstance(val, bool) or (isinstance(val, float) and not val.is_integer()):
                raise ValueError
            return int(val)
        if typ is float:
            if isinstance(val, bool):
                raise ValueError
            return float(val)
        if typ is str:
            if isinstance(val, (dict, list)):
                raise ValueError
            return "" if val is None else str(val).lower() if isinstance(val, bool) else str(val)
        if origin is list:
            if val is None:
                return []
            if not isinstance(val, (list, tuple)):
                raise ValueError
            (inner,) = typ.__args__
            return [_coerce(v, inner, key) for v in val]
    except (TypeError, ValueError):
        pass
    else:
        return val
    name = getattr(typ, "__name__", str(typ))
    if origin is list and isinstance(val, str) and "," in val:  # data.crop=64,128 on a command line
        raise UserError(f"config: {key} must be a list, written {key}=[{val.strip('[]()')}]")
    raise UserError(f"config: {key} must be {name}, got {val!r}")


def _set_dotted(d: dict, dotted: str, value: Any) -> None:
    if "[" in dotted:  # data.streams[0].weight=2
        raise UserError(f"config override {dotted}: a list's entries are not set one by one; set the whole "
                        f"list: {dotted.split('[')[0]}=[...]")
    parts = dotted.split(".")
    for p in parts[:-1]:
        nxt = d.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise UserError(f"config override {dotted}: {p} is not a section")
        d = nxt
    d[parts[-1]] = value


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """YAML file (optional) + `a.b=value` overrides -> validated Config."""
    data: dict = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise UserError(f"config file not found: {p}")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise UserError(f"config file {p} is not valid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(data, dict):
            raise UserError(f"config file {p} must hold a mapping")
    for ov in overrides:
        if ov.startswith("-"):
            raise UserError(f"unrecognized argument {ov} (settings are written section.key=value, without "
                            "dashes: e.g. train.epochs=2)")
        if "=" not in ov:
            raise UserError(f"bad override {ov!r}: use section.key=value, e.g. train.epochs=5")
        k, v = ov.split("=", 1)
        try:
            parsed = yaml.safe_load(v) if v != "" else ""
        except yaml.YAMLError:
            parsed = v
        _set_dotted(data, k.strip(), _Override(v, parsed))
    cfg = _build(Config, data, "")
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Check value ranges and combinations; raise one UserError naming the key."""
    for key, allowed in CHOICES.items():
        sec, name = key.split(".")
        val = getattr(getattr(cfg, sec), name)
        if val not in allowed:
            raise UserError(f"config: {key} must be one of {', '.join(allowed)}, got {val!r}")
    d, t = cfg.data, cfg.train
    positive = {"data.batch_size": d.batch_size, "data.val_batch_size": d.val_batch_size,
                "model.base": cfg.model.base,
                "model.depth": cfg.model.depth, "train.grad_accum": t.grad_accum,
                "train.log_every": t.log_every,
                "train.val_every": t.val_every, "train.keep_last": t.keep_last, "data.repeat": d.repeat}
    for k, v in positive.items():
        if v < 1:
            raise UserError(f"config: {k} must be at least 1, got {v}")
    if d.num_workers < 0 or t.epochs < 0 or t.max_steps < 0 or t.ckpt_every < 0:
        raise UserError("config: data.num_workers, train.epochs, train.max_steps and train.ckpt_every must "
                        "be >= 0")
    if t.epochs == 0 and t.max_steps == 0:
        raise UserError("config: set train.epochs or train.max_steps")
    if d.crop and (len(d.crop) != 2 or min(d.crop) < 1):
        raise UserError(f"config: data.crop must be [height, width] or [], got {d.crop}")
    if len(d.scale) != 2 or not 0 < d.scale[0] <= d.scale[1]:
        raise UserError(f"config: data.scale must be [min, max] with 0 < min <= max, got {d.scale}")
    if len(d.mean) != 3 or len(d.std) != 3 or min(d.std) <= 0:
        raise UserError("config: data.mean and data.std need 3 values, std > 0")
    if not 0 <= d.color < 1:
        raise UserError("config: data.color must be in [0, 1)")
    if not 0 <= d.cat_max_ratio < 1 or (d.cat_max_ratio and not d.crop):
        raise UserError(f"config: data.cat_max_ratio must be 0 (off) or in (0, 1) with a data.crop, got "
                        f"{d.cat_max_ratio} (crop {d.crop})")
    if d.shuffle_window < 1 or d.prefetch_shards < 0 or d.retries < 1:
        raise UserError("config: data.shuffle_window and data.retries must be >= 1, data.prefetch_shards >= "
                        "0")
    parse_bytes(d.cache_size, "config: data.cache_size")
    _validate_streams(d)
    if d.sampling == "rare" and (d.loader == "dali" or d.shuffle == "shards"):
        raise UserError("config: data.sampling=rare draws every slot into one global order through the torch "
                        "loader: set data.loader=torch and data.shuffle=global")
    if not d.rare_temperature > 0 or d.rare_min_pixels < 0:
        raise UserError(f"config: data.rare_temperature must be > 0 and data.rare_min_pixels >= 0, got "
                        f"{d.rare_temperature:g} and {d.rare_min_pixels}")
    e = cfg.eval
    for key, v in (("eval.crop", e.crop), ("eval.stride", e.stride)):
        if v and (len(v) != 2 or min(v) < 1):
            raise UserError(f"config: {key} must be [height, width] or [], got {v}")
    if not e.scales or min(e.scales) <= 0:
        raise UserError(f"config: eval.scales must be a non-empty list of positive scales, got {e.scales}")
    if e.batch < 1:
        raise UserError(f"config: eval.batch must be at least 1, got {e.batch}")
    lo = cfg.loss
    if lo.ohem and (lo.ce <= 0 or lo.dice > 0 or lo.bce > 0):
        raise UserError("config: loss.ohem selects hard pixels for cross-entropy alone: set loss.ce > 0 and "
                        "loss.dice=0, loss.bce=0 (its loss is normalised by the kept pixels of all ranks and "
                        "accumulation steps)")
    if not 0 < lo.ohem_thresh <= 1 or lo.ohem_min_kept < 0:
        raise UserError("config: loss.ohem_thresh must be in (0, 1] and loss.ohem_min_kept >= 0")
    if not 0 <= t.ema_decay < 1:
        raise UserError(f"config: train.ema_decay must be in [0, 1), got {t.ema_decay}")
    if cfg.optim.lr <= 0:
        raise UserError("config: optim.lr must be > 0")
    if cfg.optim.encoder_lr_mult <= 0 or not 0 < cfg.optim.layer_decay <= 1:
        raise UserError("config: optim.encoder_lr_mult must be > 0 and optim.layer_decay in (0, 1] (1 = off),"
                        f" got {cfg.optim.encoder_lr_mult:g} and {cfg.optim.layer_decay:g}")
    if min(cfg.loss.ce, cfg.loss.dice, cfg.loss.bce) < 0 or cfg.loss.ce + cfg.loss.dice + cfg.loss.bce == 0:
        raise UserError("config: loss weights must be >= 0 and not all 0")
    if not cfg.name or "/" in cfg.name:
        raise UserError(f"config: name must be a plain folder name, got {cfg.name!r}")
    _validate_trackers(t)


TRACKERS = ("wandb", "mlflow")


def _validate_trackers(t: TrainCfg) -> None:
    unknown = [x for x in t.trackers if x not in TRACKERS]
    if unknown or len(set(t.trackers)) != len(t.trackers):
        raise UserError(f"config: train.trackers lists each of {', '.join(TRACKERS)} at most once, got "
                        f"{t.trackers}")
    if not t.tracker_project.strip():
        raise UserError("config: train.tracker_project must name a W&B project / MLflow experiment")


def _validate_streams(d: DataCfg) -> None:
    seen: dict[tuple[str, str], int] = {}
    for i, s in enumerate(d.streams):
        where = f"data.streams[{i}]"
        if not s.shards.strip():
            raise UserError(f"config: {where}.shards must name a shards folder or URL, got ''")
        if not s.split.strip():
            raise UserError(f"config: {where}.split must name a split, got ''")
        if not s.weight > 0:  # NaN included
            raise UserError(f"config: {where}.weight must be > 0, got {s.weight:g}")
        if math.isinf(s.weight):
            raise UserError(f"config: {where}.weight must be finite, got {s.weight:g}")
        # the same place compared as saved (credentials and query removed, no trailing slash)
        pair = (redact(s.shards).rstrip("/"), s.split)
        if pair in seen:
            raise UserError(f"config: {where} repeats data.streams[{seen[pair]}] (shards {redact(s.shards)}, "
                            f"split {s.split}): one stream per shards and split; merge them, adding the "
                            "weights")
        seen[pair] = i
    if d.epoch_samples < 0:
        raise UserError(f"config: data.epoch_samples must be >= 0, got {d.epoch_samples}")
    if d.epoch_samples and not d.streams and d.sampling != "rare":
        raise UserError("config: data.epoch_samples is the epoch's length with data.streams or "
                        "data.sampling=rare; otherwise an epoch is data.repeat passes over data.train_split")
    if d.epoch_samples and d.repeat != 1:
        raise UserError(f"config: data.epoch_samples={d.epoch_samples} sets the epoch's length itself: leave "
                        "data.repeat=1 (it multiplies the default, data.epoch_samples=0)")


def to_dict(cfg: Config) -> dict:
    """The config as nested plain dicts."""
    return dataclasses.asdict(cfg)


# a setting whose value is a credential by its name (a word of it: api_key, wandb_token, db_password; not
# monkey): written as *** in config.yaml and tracker parameters
SECRET_NAME = re.compile(r"(^|[_.-])(api_?key|key|token|secret|password|passwd|pwd|credentials?)([_.-]|$)",
                         re.IGNORECASE)


def redacted(d: Any, name: str = "") -> Any:
    """Nested settings safe to save or send to a tracker: URLs without passwords or signatures
    (urls.redact) and the values of credential-named keys (SECRET_NAME) as `***`."""
    if isinstance(d, dict):
        return {k: redacted(v, k) for k, v in d.items()}
    if isinstance(d, list):
        return [redacted(v, name) for v in d]
    if SECRET_NAME.search(name) and d not in ("", None):
        return "***"
    return redact(d) if isinstance(d, str) else d


def dump_config(cfg: Config) -> str:
    """The config as YAML (what runs/<name>/config.yaml holds), with credentials removed (`redacted`)."""
    return yaml.safe_dump(redacted(to_dict(cfg)), sort_keys=False)


def flat_settings(cfg: Config) -> dict[str, Any]:
    """The redacted settings as `section.key: value` (lists as their YAML flow text): a tracker's
    parameters."""
    out: dict[str, Any] = {}

    def walk(d: dict, prefix: str) -> None:
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            else:
                out[prefix + k] = v if isinstance(v, (int, float, str, bool)) or v is None else \
                    yaml.safe_dump(v, default_flow_style=True).strip()
    walk(redacted(to_dict(cfg)), "")
    return out


def _comments(cls) -> dict[str, str]:
    """A config dataclass's field comments (`name: type = default  # comment`, continued on the lines below
    that hold only a comment), read from its source: the comments beside the defaults are the settings'
    documentation, kept in one place."""
    import inspect
    import re

    out: dict[str, str] = {}
    last = None
    for line in inspect.getsource(cls).splitlines():
        m = re.match(r"\s+(\w+): [^#]*?(?:#\s*(.*))?$", line)
        more = re.match(r"\s+#\s*(.*)$", line)
        if m:
            last = m.group(1)
            out[last] = m.group(2) or ""
        elif more and last and out[last]:
            out[last] += " " + more.group(1)
        else:
            last = None
    return out


def _as_override(v: Any) -> str:
    """A value as it is written on a command line: data.crop=[512,1024], train.progress=true, data.streams as
    a YAML flow list ([{shards: a, split: train, weight: 3.0}, ...])."""
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, list) and v and dataclasses.is_dataclass(v[0]):
        flow = [dataclasses.asdict(e) for e in v]
        return yaml.safe_dump(flow, default_flow_style=True, sort_keys=False, width=math.inf).strip()
    if isinstance(v, list):
        return f"[{','.join(map(_as_override, v))}]"
    return "''" if v == "" else str(v)


def _entry_rows(key: str, cls) -> list[tuple[str, str]]:
    """The fields of a list's entries (data.streams[].weight), each with its documentation and default:
    shown, not set one by one."""
    notes, rows = _comments(cls), []
    for f in dataclasses.fields(cls):
        default = "required" if f.default is dataclasses.MISSING else f"default {_as_override(f.default)}"
        rows.append((f"{key}[].{f.name}", f"{notes.get(f.name, '')} ({default})"))
    return rows


def settings_table(cfg: Config | None = None) -> str:
    """Every setting as `section.key=value  # what it means`: the defaults, or a config's values. A list of
    mappings (data.streams) is one setting, a YAML flow list, followed by its entries' fields (`key[].field`,
    no value) and what they mean."""
    cfg = cfg or Config()
    rows = []  # (text, note)
    for section in dataclasses.fields(Config):
        value = getattr(cfg, section.name)
        if not dataclasses.is_dataclass(value):
            rows.append((f"{section.name}={_as_override(value)}", _comments(Config).get(section.name, "")))
            continue
        notes, hints = _comments(type(value)), get_type_hints(type(value))
        for f in dataclasses.fields(value):
            key = f"{section.name}.{f.name}"
            rows.append((f"{key}={_as_override(getattr(value, f.name))}", notes.get(f.name, "")))
            entry = getattr(hints[f.name], "__args__", (None,))[0]
            if getattr(hints[f.name], "__origin__", None) is list and dataclasses.is_dataclass(entry):
                rows += _entry_rows(key, entry)
    # aligned on the usual widths; a long value (a config's streams) is not padded to, its note follows it
    width = max(len(t) for t, _ in rows if len(t) <= 40)
    return "\n".join(f"{t:<{width}}  # {note}" if note else t for t, note in rows)
