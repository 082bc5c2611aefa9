"""Where a training start continues from: the resume policy (`train.resume=auto|never|fresh|PATH`), the model
settings a run cannot change, a layout change (processes x batch x accumulation) and the restore itself.

A run folder is never mixed up with another run: a resume across changed model settings is refused naming
them, `never` refuses a folder with checkpoints, `fresh` moves the old run aside (distseg/training/setup.py).
"""

from __future__ import annotations

import math
from pathlib import Path

from distseg import run_files as files
from distseg.config import Config, load_config
from distseg.data.batch import Loader
from distseg.data.streams import describe_streams, sampling_record, stream_record
from distseg.errors import UserError
from distseg.labels import get_scheme
from distseg.models import out_channels
from distseg.models.param_groups import ONE_GROUP, Grouping, ParamGroup, requested_grouping
from distseg.runs.checkpoint import RunState, damage, list_checkpoints
from distseg.runs.run_dir import RunDir

# settings that change the weights' shapes or meaning: a run cannot resume across a change of these
MODEL_KEYS = ("model.encoder", "model.base", "model.depth", "model.norm", "data.scheme")


def model_differences(saved: Config, cfg: Config) -> list[str]:
    """Settings in MODEL_KEYS that differ between a run's saved config and this one, as `key old -> new`."""
    out = []
    for key in MODEL_KEYS:
        sec, name = key.split(".")
        a, b = getattr(getattr(saved, sec), name), getattr(getattr(cfg, sec), name)
        if a != b:
            out.append(f"{key} {a} -> {b}")
    if not out:
        n = get_scheme(cfg.data.scheme).num_classes
        a, b = out_channels(saved, n), out_channels(cfg, n)
        if a != b:
            out.append(f"model outputs {a} -> {b} (loss.bce alone uses one logit)")
    return out


def choose_resume(cfg: Config, log) -> Path | None:
    """The checkpoint to resume from (None: a fresh start), after checking the run folder may be used: the
    newest complete and undamaged one; a damaged one is reported by name and the previous one taken."""
    run, r = RunDir.of(cfg), cfg.train.resume
    ckpts = list_checkpoints(run.checkpoints)
    if r not in ("auto", "never", "fresh"):
        problem = damage(Path(r)) if Path(r).is_dir() else f"{r} is not a checkpoint folder"
        if problem:
            raise UserError(f"cannot resume from {r}: {problem}")
        return Path(r)
    if r == "never" and ckpts:
        raise UserError(f"{run.path} holds checkpoints of an earlier run (newest: {ckpts[-1].name}): "
                        "continue it with train.resume=auto, move it aside and start again with "
                        "train.resume=fresh, or choose another name=...")
    if r != "auto" or not ckpts:
        return None
    if run.config.is_file():
        try:
            diff = model_differences(load_config(run.config), cfg)
        except UserError:
            diff = []
        if diff:
            raise UserError(f"{run.path} was trained with other model settings ({'; '.join(diff)}): resume "
                            "with the old settings, or start a new run with name=... or train.resume=fresh")
    for ck in reversed(ckpts):
        problem = damage(ck)
        if problem is None:
            return ck
        log(f"warning: checkpoint {ck} is damaged ({problem}): resuming from the one before it")
    raise UserError(f"every checkpoint in {run.checkpoints} is damaged: start again with train.resume=fresh")


def check_layout(cfg: Config, world: int, ckpt: Path, state: RunState, log,
                 shares: list[int] | None = None, sizes: list[int] | None = None, samples: int = 0) -> None:
    """Resuming in another layout (processes x data.batch_size x train.grad_accum): allowed when the global
    batch is the same, and then the interrupted epoch continues exactly where it stopped, each sample once
    (the global shuffle is one permutation cut into global batches, whatever their split over processes).
    A different global batch would change what a step is, the step count and the learning-rate schedule:
    refused. Shard-window shuffling assigns shards per rank: it resumes mid-epoch only in its own layout."""
    if state.batch_size and state.repeat != cfg.data.repeat:
        raise UserError(f"{ckpt} was trained with data.repeat={state.repeat} (passes per epoch), this start "
                        f"has {cfg.data.repeat}: an epoch and the learning-rate schedule would change; keep "
                        f"data.repeat={state.repeat}, or start a new run with name=... (train.init_from="
                        "its best weights to continue from them)")
    check_streams(cfg, ckpt, state, shares, sizes)
    check_sampling(cfg, ckpt, state, samples, shares)
    old = (state.world, state.batch_size, state.grad_accum)
    new = (world, cfg.data.batch_size, cfg.train.grad_accum)
    if old == new or not state.batch_size:
        return
    layout = "{} process(es) x data.batch_size {} x train.grad_accum {}".format
    if math.prod(old) != math.prod(new):
        raise UserError(f"{ckpt} was trained with a global batch of {math.prod(old)} ({layout(*old)}), this "
                        f"start has {math.prod(new)} ({layout(*new)}): choose data.batch_size and "
                        f"train.grad_accum so that processes x batch x accumulation = {math.prod(old)}, "
                        "or start a new run with name=...")
    if state.batch_in_epoch and "shards" in (state.shuffle, cfg.data.shuffle):
        raise UserError(f"{ckpt} stopped mid-epoch with data.shuffle={state.shuffle}, {layout(*old)}: with "
                        "data.shuffle=shards each rank reads its own shard windows, so resume mid-epoch in "
                        "that same layout, or from an epoch-end checkpoint")
    consumed = state.batch_in_epoch * old[0] * old[1]  # samples of this epoch already trained on
    state.batch_in_epoch = consumed // (new[0] * new[1])
    log(f"resuming {layout(*old)} as {layout(*new)}: the same global batch of {math.prod(new)}")


def check_streams(cfg: Config, ckpt: Path, state: RunState, shares: list[int] | None,
                  sizes: list[int] | None) -> None:
    """A run resumes with the streams, weights, epoch shares and stream sizes it was trained with, or not at
    all: each would change what an epoch is, which samples a pass draws, and the learning-rate schedule."""
    if not state.batch_size:
        return
    now = stream_record(cfg.data, shares, sizes) if cfg.data.streams else []
    if now != state.streams:
        then = describe_streams(state.streams)
        raise UserError(f"{ckpt} was trained with other data.streams (then: {then}; now: "
                        f"{describe_streams(now)}): an epoch, its samples and the learning-rate schedule "
                        "would change; resume with those, or start a new run with name=... "
                        "(train.init_from=its best weights to continue from them)")


def check_sampling(cfg: Config, ckpt: Path, state: RunState, samples: int, shares: list[int] | None) -> None:
    """A run resumes with the data.sampling it was trained with (a run made before rare sampling: uniform):
    another would change every epoch's draws, and the interrupted one's."""
    if not state.batch_size:
        return
    now = sampling_record(cfg.data, samples, shares) if cfg.data.sampling == "rare" else {}
    if now != state.sampling:
        show = ("data.sampling={sampling} data.rare_temperature={temperature:g} "
                "data.rare_min_pixels={min_pixels} ({draws} draws per epoch)").format
        then = show(**state.sampling) if state.sampling else "data.sampling=uniform"
        raise UserError(f"{ckpt} was trained with {then}, this start has "
                        f"{show(**now) if now else 'data.sampling=uniform'}: every epoch's draws would "
                        "change; resume with those, or start a new run with name=... (train.init_from=its "
                        "best weights to continue from them)")


def check_grouping(cfg: Config, ckpt: Path, state: RunState, log) -> Grouping:
    """The parameter grouping a resumed run continues with: its own, since its optimizer state fits only
    those groups. A run made before grouping was recorded has one group, whatever this config asks (a note
    says so: its config could not have chosen); a run that recorded its grouping takes it where the config
    leaves the choice (optim.no_decay=auto) and refuses a setting that asks for other groups."""
    if state.grouping is None:
        o = cfg.optim
        if o.no_decay != "auto" or o.no_decay_names or o.encoder_lr_mult != 1 or o.layer_decay != 1:
            log(f"note: {ckpt} was made before parameter groups were recorded: it resumes with its one "
                f"group; this config's groups ({requested_grouping(o).describe()}) apply to new runs")
        return ONE_GROUP
    try:
        then = Grouping.from_record(state.grouping)
        now = requested_grouping(cfg.optim, then)
    except UserError as e:
        raise UserError(f"{ckpt}: {e}") from None
    if now != then:
        raise UserError(f"{ckpt} was trained with parameter groups \"{then.describe()}\", this start asks "
                        f"for \"{now.describe()}\": its optimizer state fits only its own groups; resume "
                        f"with {then.settings()}, or start a new run with name=... (train.init_from=its best "
                        "weights to fine-tune with the new groups)")
    return then


def check_group_sizes(ckpt: Path, state: RunState, groups: list[ParamGroup]) -> None:
    """The groups rebuilt for a resumed run hold as many tensors each as its checkpoint's did (another timm
    version may cut an encoder's stages elsewhere): else one line, where loading the optimizer state would
    fail with a traceback."""
    then = (state.grouping or {}).get("tensors")
    now = [len(g.params) for g in groups]
    if then is not None and then != now:
        raise UserError(f"{ckpt}: this code builds parameter groups of {now} tensors for the run, its "
                        f"checkpoint holds groups of {then} (another timm or distseg version?): resume with "
                        "the versions it was trained with, or start a new run (train.init_from=its weights)")


def restore(acc, ckpt: Path, state: RunState, train_loader: Loader) -> None:
    """Accelerate's state (weights, optimizer, RNG) and, where the loader keeps its own position (DALI), that
    position; the torch loader's is `state.batch_in_epoch` (data/batch.Loader)."""
    acc.load_state(str(ckpt))
    loader_state = ckpt / files.rank_file(files.LOADER_STATE, acc.process_index)
    if train_loader.keeps_position:
        if loader_state.is_file() and state.world == acc.num_processes:
            train_loader.load_state_dict(loader_state.read_bytes())
        elif state.batch_in_epoch:
            raise UserError(f"{ckpt} was written with another loader or process count; the DALI reader "
                            "position cannot be restored mid-epoch (resume from an epoch-end checkpoint)")
    acc.print(f"resumed from {ckpt} (step {state.step}, {state.position()})")
