"""The loop's parts in this process, on a Run built from tiny parts (`Run.assemble`, Accelerator(cpu=True)):
the loss normalisation over an accumulation group, the step flags read one step late, a NaN or a lost
lease stopping before anything is written, stop requests, and the background checkpoint writer. At one
process the all-reduces are skipped: what depends on ranks is covered by the multi-process tests."""

import errno
import math
import os
import signal
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch

from distseg.config import load_config
from distseg.labels import IGNORE, get_scheme
from distseg.models import build_model
from distseg.models.losses import ohem_mask
from distseg.models.optim import build_optimizer, lr_at
from distseg.models.param_groups import build_param_groups, requested_grouping
from distseg.runs import checkpoint_writer
from distseg.runs.checkpoint import NotWritten, RunState, list_checkpoints, read_state
from distseg.runs.checkpoint_writer import CheckpointWriter, accelerate_state
from distseg.runs.run_dir import RunDir
from distseg.runs.run_lock import Holder, RunLocked, acquire
from distseg.training import loop, step_log
from distseg.training.loop import Diverged, checkpoint, settle, train_one_epoch, train_step
from distseg.training.run import Run
from distseg.training.step_flags import DEVICE, HOST, OneStepLate, StepFlags
from distseg.training.stopping import StopFlag

H, W, CLASSES = 16, 16, 19


class ListLoader:
    """Batches held in memory, keeping the batch contract; its position is RunState's, as the torch
    loader's."""

    keeps_position = False

    def __init__(self, batches):
        self.batches, self.skip = batches, 0

    def class_pixels(self):
        return np.ones(CLASSES)  # what the loss weights read

    @property
    def num_samples(self):
        return sum(len(b["key"]) for b in self.batches)

    def __len__(self):
        return len(self.batches)

    def set_epoch(self, epoch, skip_batches=0):
        self.skip = skip_batches

    def __iter__(self):
        yield from self.batches[self.skip:]


def batch(seed, n=2, ignore_rows=0, valid=None, corrupt=None):
    g = torch.Generator().manual_seed(seed)
    mask = torch.randint(0, CLASSES, (n, H, W), generator=g)
    mask[:, :ignore_rows] = IGNORE
    keys = [f"{seed}.{i}" for i in range(n)]
    return {"image": torch.randn(n, 3, H, W, generator=g), "mask": mask, "key": keys,
            "valid": torch.tensor(valid if valid is not None else [True] * n),
            "corrupt": torch.tensor(corrupt if corrupt is not None else [False] * n)}


@pytest.fixture
def signals():
    """StopFlag installs handlers for SIGINT/SIGTERM/SIGUSR1: give pytest its own back afterwards."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
    yield
    for s, h in saved.items():
        signal.signal(s, h)


@pytest.fixture
def fresh_accelerate():
    """Accelerate keeps one state per process: a fresh one for this test's Accelerator(cpu=True), and none
    left for the next test (on a GPU host an in-process evaluate would otherwise meet a CPU state)."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


@pytest.fixture
def make_run(tmp_path, signals, fresh_accelerate):
    from accelerate import Accelerator

    def make(batches, max_steps=100, **settings):
        o = {"output_dir": tmp_path, "name": "r", "model.base": 4, "model.depth": 2, "model.norm": "group",
             "optim.name": "sgd", "optim.lr": 0.5, "optim.momentum": 0.0, "optim.weight_decay": 0.0,
             "sched.warmup_steps": 0, "train.progress": "false", "train.log_every": 100,
             "train.async_checkpoint": "false"}
        o.update(settings)
        cfg = load_config(None, [f"{k}={v}" for k, v in o.items()])
        acc = Accelerator(cpu=True)
        torch.manual_seed(0)
        model = build_model(cfg, get_scheme(cfg.data.scheme).num_classes)
        groups = build_param_groups(model, requested_grouping(cfg.optim))
        model, optimizer = acc.prepare(model, build_optimizer(cfg, groups, on_cuda=False))
        loader = ListLoader(batches)
        RunDir.of(cfg).path.mkdir(parents=True)
        return Run.assemble(cfg, acc, model, optimizer, groups, loader, ListLoader(batches[:1]),
                            RunState(config="r"), max_steps=max_steps, stop=StopFlag())
    return make


def reference_step(run, group, ohem=None):
    """The group's summed pixel loss over its labelled (OHEM: kept) pixels, on a copy of the model: its
    gradient is what one training step must apply. Returns (copy with .grad, weights before, loss, count)."""
    before = {k: v.clone() for k, v in run.acc.unwrap_model(run.model).state_dict().items()}
    ref = build_model(run.cfg, CLASSES)
    ref.load_state_dict(before)
    total, count = 0.0, 0
    for b in group:
        target = torch.where(b["valid"].view(-1, 1, 1), b["mask"], torch.full_like(b["mask"], IGNORE))
        logits = ref(b["image"])
        if ohem is not None:
            target = torch.where(ohem_mask(logits, target, *ohem), target, torch.full_like(target, IGNORE))
        total = total + torch.nn.functional.cross_entropy(logits, target, ignore_index=IGNORE,
                                                           reduction="sum")
        count += int((target != IGNORE).sum())
    (total / count).backward()
    return ref, before, total.item(), count


def assert_stepped(run, ref, before):
    model = run.acc.unwrap_model(run.model)
    for name, p in ref.named_parameters():
        want = before[name] - run.cfg.optim.lr * p.grad
        assert torch.allclose(model.state_dict()[name], want, atol=1e-6), name


def test_train_step_normalises_by_the_labelled_pixels_of_the_whole_group(make_run):
    """Two micro-batches with different labelled pixels, one padded sample: one step equals the gradient
    of the group's summed pixel loss over its labelled pixels (not a mean of per-micro-batch means)."""
    group = [batch(1, ignore_rows=12, corrupt=[True, False]), batch(2, valid=[True, False])]
    run = make_run(group, **{"train.grad_accum": 2})
    ref, before, total, labelled = reference_step(run, group)
    flags = StepFlags.read(train_step(run, group))
    assert flags.norm == labelled == 2 * 4 * W + 1 * H * W
    assert flags.loss_sum == pytest.approx(total, rel=1e-5)
    assert (flags.images, flags.corrupt, flags.nonfinite, flags.stop) == (3, 1, 0, 0)
    assert_stepped(run, ref, before)


def test_each_group_steps_at_its_own_rate_through_the_schedule(make_run):
    """An encoder at 0.1 x the rate with a layer decay of 0.5 over its five stages: every step, during the
    warm-up and after it, moves each parameter by its own group's lr x its gradient (SGD, no momentum)."""
    batches = [batch(20 + i) for i in range(4)]
    run = make_run(batches, **{"model.encoder": "resnet18", "optim.encoder_lr_mult": 0.1,
                               "optim.layer_decay": 0.5, "sched.warmup_steps": 2})
    model = run.acc.unwrap_model(run.model)
    params = dict(model.named_parameters())
    scale = {id(p): g.lr_scale for g in run.groups for p in g.params}
    assert sorted(set(scale.values())) == pytest.approx([0.1 * 0.5 ** k for k in range(4, -1, -1)] + [1])
    for step, b in enumerate(batches):
        run.state.step = step
        ref, before, _, _ = reference_step(run, [b])
        train_step(run, [b])
        lr = lr_at(step, run.cfg, run.max_steps)
        for name, p in ref.named_parameters():
            want = before[name] - lr * scale[id(params[name])] * p.grad
            assert torch.allclose(params[name].detach(), want, atol=1e-6), (step, name)


def test_train_step_with_ohem_divides_by_the_kept_pixels_of_the_whole_group(make_run):
    """OHEM's kept pixels are known only after each forward: the summed gradients are divided by the
    group's kept count afterwards, giving the same step as the group's loss over its kept pixels."""
    group = [batch(12, ignore_rows=6), batch(13)]
    run = make_run(group, **{"train.grad_accum": 2, "loss.ohem": "true", "loss.ohem_min_kept": 20})
    ohem = (run.cfg.loss.ohem_thresh, run.cfg.loss.ohem_min_kept)
    ref, before, total, kept = reference_step(run, group, ohem)
    flags = StepFlags.read(train_step(run, group))
    assert flags.norm == kept < 2 * 2 * H * W
    assert_stepped(run, ref, before)


def test_a_new_slot_reads_back_wherever_it_stands():
    """A sum or flag added to StepFlags (here after the host flags) packs and reads by name."""
    @dataclass(frozen=True)
    class Extended(StepFlags):
        crops_retried: float = field(default=0.0, metadata={"kind": DEVICE, "doc": "a new per-step sum"})
        disk_low: float = field(default=0.0, metadata={"kind": HOST, "doc": "a new stop reason"})

    host = dict.fromkeys(Extended.names(HOST), 0.0) | {"disk_low": 1.0, "ckpt_busy": 1.0}
    sums = Extended.sums("cpu", loss_sum=torch.tensor(2.0), norm=torch.tensor(4.0), images=torch.tensor(2),
                         corrupt=torch.tensor(1), crops_retried=torch.tensor(7))
    f = Extended.read(Extended.pack(sums, **host))
    assert (f.loss_sum, f.norm, f.images, f.corrupt, f.crops_retried, f.nonfinite) == (2, 4, 2, 1, 7, 0)
    assert (f.disk_low, f.ckpt_busy, f.stop) == (1, 1, 0)
    assert float(Extended.view(Extended.pack(sums, **host)).norm) == 4


def test_step_flags_are_one_vector_read_one_step_late():
    host = dict.fromkeys(StepFlags.names(HOST), 0.0) | {"stop": 1.0, "ckpt_failed": 1.0}
    sums = StepFlags.sums("cpu", loss_sum=torch.tensor(float("nan")), norm=torch.tensor(4.0),
                          images=torch.tensor(2), corrupt=torch.tensor(0))
    f = StepFlags.read(StepFlags.pack(sums, **host))
    assert (f.nonfinite, f.norm, f.images, f.stop, f.ckpt_failed, f.ctrl_c) == (1, 4, 2, 1, 1, 0)
    assert math.isnan(f.loss_sum)
    with pytest.raises(TypeError, match="lease_lost"):
        StepFlags.pack(sums, stop=1.0)
    late = OneStepLate()
    v1, v2 = StepFlags.pack(sums * 0, **host), StepFlags.pack(sums * 0 + 1, **host)
    assert late.swap(v1, step=1, epoch=1) is None
    got = late.swap(v2, step=2, epoch=1)
    assert (got.step, got.flags.norm) == (1, 0)
    assert (late.take().step, late.take()) == (2, None)


def test_a_non_finite_loss_stops_before_its_checkpoint_is_written(make_run):
    bad = batch(3)
    bad["image"][0, 0, 0, 0] = float("nan")
    run = make_run([bad, batch(4)], **{"train.ckpt_every": 1})
    with pytest.raises(Diverged, match="loss is not finite at step 1 .*last good checkpoint: none"):
        train_one_epoch(run)
    assert list_checkpoints(run.dir.checkpoints) == []
    assert not run.dir.checkpoints.exists() or not any(run.dir.checkpoints.iterdir())


def test_a_lost_lease_stops_at_the_next_step_without_writing(make_run):
    run = make_run([batch(5), batch(6), batch(7)], **{"train.ckpt_every": 1})
    lease = acquire(run.dir, print)
    try:
        run = Run(**{**run.__dict__, "lease": lease})
        settle(run, train_step(run, [batch(5)]))
        # what the heartbeat thread finds: step 1 was clean, step 2's flags carry the loss
        lease.lost_to = Holder("node-elsewhere", 99, "1", "", "2026-12-03T00:00:00", "t" * 32)
        settle(run, train_step(run, [batch(6)]))
        with pytest.raises(RunLocked, match="taken over by .*node-elsewhere"):
            checkpoint(run)
        assert list_checkpoints(run.dir.checkpoints) == []
    finally:
        lease.release()


@pytest.mark.parametrize("sig,interrupted", [(signal.SIGUSR1, False), (signal.SIGINT, True)])
def test_a_stop_request_checkpoints_and_ends_the_epoch(make_run, sig, interrupted):
    run = make_run([batch(i) for i in range(6)])
    os.kill(os.getpid(), sig)  # heard before step 1: its flags say so, read after step 2 is queued
    train_one_epoch(run)
    proc = run.process
    assert (proc.stop_asked, proc.preempted, proc.interrupted) == (True, True, interrupted)
    assert run.state.step == 2
    assert [c.name for c in list_checkpoints(run.dir.checkpoints)] == ["step-00000002"]
    assert read_state(list_checkpoints(run.dir.checkpoints)[0]).batch_in_epoch == 2


def test_the_checkpoint_writer_renames_only_a_complete_checkpoint(make_run, monkeypatch):
    run = make_run([batch(8)])
    settle(run, train_step(run, [batch(8)]))
    run.state.step = 1
    monkeypatch.setenv("DISTSEG_CHECKPOINT_THROTTLE", "0.3")  # a slow disk: the write is seen in flight
    writer = CheckpointWriter(run.acc, run.dir.checkpoints, keep_last=2)
    final = writer.begin(run.state)
    tmp = run.dir.checkpoints / ".step-00000001.tmp"
    assert tmp.is_dir() and not final.exists() and writer.flags() == (1.0, 0.0)
    weights = {k: v.clone() for k, v in run.acc.unwrap_model(run.model).state_dict().items()}
    settle(run, train_step(run, [batch(9)]))  # training goes on while it writes
    assert writer.wait() == final
    assert final.is_dir() and not tmp.exists() and list_checkpoints(run.dir.checkpoints) == [final]
    assert read_state(final).step == 1
    run.acc.load_state(str(final))
    for k, v in run.acc.unwrap_model(run.model).state_dict().items():
        assert torch.equal(v, weights[k]), f"{k}: the checkpoint holds the weights of its step"


def test_a_failed_checkpoint_write_is_flagged_and_raised_not_lost(make_run, monkeypatch):
    run = make_run([batch(10)])
    run.state.step = 1
    checkpoint(run)  # a good one first: the error names it as what a rerun resumes from

    def full_disk(*args):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(checkpoint_writer, "write_accelerate_files", full_disk)
    writer = CheckpointWriter(run.acc, run.dir.checkpoints, keep_last=2)
    run.state.step = 2
    writer.begin(run.state)
    writer.thread.join()
    busy, failed = writer.flags()
    assert (busy, failed) == (0.0, 1.0), "the thread's failure must reach the step's flags"
    with pytest.raises(NotWritten, match="step-00000002.*No space left.*newest complete checkpoint is "
                                         ".*step-00000001"):
        writer.observe(busy, failed)
    assert not (run.dir.checkpoints / ".step-00000002.tmp").exists()
    assert [c.name for c in list_checkpoints(run.dir.checkpoints)] == ["step-00000001"]


def test_accelerate_privates_the_writer_reads_are_where_it_expects(make_run):
    """checkpoint_writer.accelerate_state reads Accelerate's private attributes: this fails loudly (an
    AttributeError or a wrong count) when an Accelerate release moves them."""
    run = make_run([batch(11)])
    ema = torch.optim.swa_utils.AveragedModel(run.acc.unwrap_model(run.model))
    run.acc.register_for_checkpointing(ema)
    state = accelerate_state(run.acc)
    assert set(state) == {"models", "optimizers", "scaler", "custom", "step"}
    assert len(state["models"]) == 1 and set(state["models"][0]) == set(run.model.state_dict())
    assert len(state["optimizers"]) == 1 and "param_groups" in state["optimizers"][0]
    assert len(state["custom"]) == 1 and isinstance(state["step"], int) and state["scaler"] is None


def test_the_optimizer_stepped_past_accelerates_wrapper_makes_the_wrappers_update(fresh_accelerate):
    """Without a GradScaler, step_optimizer steps the optimizer Accelerate wraps directly: the update, and
    the gradients dropped after it, are the wrapper's own."""
    from accelerate import Accelerator

    from distseg.training.loop import step_optimizer

    acc = Accelerator(cpu=True)
    cfg = load_config(None, ["model.base=4", "model.depth=2"])
    stepped = []
    for step in (lambda opt: (opt.step(), opt.zero_grad(set_to_none=True)), step_optimizer):
        torch.manual_seed(0)
        model = build_model(cfg, CLASSES)
        model, opt = acc.prepare(model, build_optimizer(cfg, build_param_groups(model, requested_grouping(
            cfg.optim)), on_cuda=False))
        for seed in (1, 2):  # two steps: AdamW's second uses the state the first left
            b = batch(seed)
            torch.nn.functional.cross_entropy(model(b["image"]), b["mask"], ignore_index=IGNORE).backward()
            step(opt)
        assert all(p.grad is None for p in model.parameters())
        stepped.append(model.state_dict())
    for k, v in stepped[0].items():
        assert torch.equal(v, stepped[1][k]), k


def test_step_optimizer_steps_the_wrapped_optimizer_itself(fresh_accelerate, monkeypatch):
    """The direct path is taken (a renamed Accelerate attribute would fall back to the wrapper silently)."""
    from accelerate import Accelerator
    from accelerate.optimizer import AcceleratedOptimizer

    from distseg.training.loop import step_optimizer

    acc = Accelerator(cpu=True)
    model, opt = acc.prepare(torch.nn.Linear(2, 2), torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), 0.1))
    calls = []
    monkeypatch.setattr(AcceleratedOptimizer, "step", lambda self, *a, **k: calls.append("wrapper"))
    monkeypatch.setattr(opt.optimizer, "step", lambda *a, **k: calls.append("inner"))
    step_optimizer(opt)
    assert calls == ["inner"]


class FakeClock:
    """time.time() for the loop and the step logger: it moves only when the test says."""

    def __init__(self):
        self.now = 1000.0

    def time(self):
        return self.now


def test_each_step_line_shows_that_steps_own_time_across_short_epochs(make_run, monkeypatch, capsys):
    """Three epochs of three 1-second steps of 2 images, 50 s of validation between epochs, a line per step:
    every line says 2.0 img/s and the time left at 1 s per step, at the epoch ends as well."""
    clock = FakeClock()
    monkeypatch.setattr(loop, "time", clock)
    monkeypatch.setattr(step_log, "time", clock)
    real_step = loop.train_step

    def one_second_step(run, group):
        clock.now += 1.0
        return real_step(run, group)

    monkeypatch.setattr(loop, "train_step", one_second_step)
    run = make_run([batch(i) for i in range(3)], max_steps=9, **{"train.log_every": 1, "train.epochs": 3})
    for _ in range(3):  # what train() does around each epoch
        train_one_epoch(run)
        settle(run)
        run.state.epoch += 1
        run.state.batch_in_epoch = 0
        clock.now += 50.0  # validation and the checkpoint: no step's time
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    assert [int(line.split()[1].split("/")[0]) for line in lines] == list(range(1, 10)), lines
    for k, line in enumerate(lines, start=1):
        assert " 2.0 img/s " in line, line
        assert line.endswith(f"eta {9 - k}s"), line
