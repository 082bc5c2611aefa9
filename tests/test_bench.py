"""Benchmarks run and report every pipeline/variant asked for (numbers are shown, not asserted)."""

import json

import pytest
import torch

from conftest import assert_user_error, run_cli
from distseg.config import load_config
from distseg.models import build_model


def mfu_cells(text):
    """The MFU column of every timed row of a `bench train` table, and the peaks its heading names."""
    head = next(line for line in text.splitlines() if line.startswith("training step, "))
    cells = [[c.strip() for c in x.split("|")[1:-1]] for x in rows(text.split("\nlaunch-bound step:")[0])]
    return [c[7] for c in cells if c[7]], head.split("MFU against ")[1]


def assert_mfu_is_a_share(cells):
    for m in cells:  # a share of a peak: never above 100%, "-" where the row outran the measured peak
        assert m == "-" or 0 <= float(m) <= 100, m


def rows(text):
    heads = ("| pipeline", "| variant", "| image format", "| model")
    return [line for line in text.splitlines() if line.startswith("| ") and not line.startswith(heads)]


def test_bench_data_compares_pipelines(synth_root, shards, tmp_path):
    out = tmp_path / "b.md"
    p = run_cli("bench", "data", "--root", synth_root, "--batches", "3", "--out", out,
                f"data.shards={shards}", "data.batch_size=2", "data.num_workers=1", "data.crop=[64,128]")
    r = rows(p.stdout.split("\nshuffle:")[0])  # the pipeline table; the shuffle table follows it
    names = [x.split("|")[1].strip() for x in r]
    assert names == ["decode only: full image + mask, the loader's decoders (1 process)",
                     "training transform alone: bytes in memory -> augmented crop (1 process)",
                     "torch loader, CPU decode", "torch loader, GPU decode (nvJPEG)",
                     "DALI, CPU mode (device_id=None)", "DALI, mixed (GPU) decode + GPU augmentation",
                     "torchvision reference, PNG folder", "torchvision reference, same JPEG shards"]
    for line in r[:3] + r[4:5] + r[6:]:
        ips, cores, per_core = (float(v) for v in line.split("|")[2:5])
        assert ips > 0 and cores >= 0 and per_core > 0  # a tiny run may finish within one jiffy
    assert r[0].split("|")[5].strip() == "1.00x" and r[2].split("|")[5].strip().endswith("x")
    assert r[1].split("|")[6].strip() == "1.00x" and r[2].split("|")[6].strip().endswith("x")
    assert "skipped: no CUDA" in r[3] and "skipped: no CUDA" in r[5]
    assert "reduced (DCT) JPEG decode for" in p.stdout

    def lines(text):
        return [line for line in text.splitlines() if line.strip()]
    assert lines(out.read_text()) == lines(p.stdout)  # every table printed was appended to --out
    assert "| shards | 2 |" in p.stdout  # and the shuffle report
    j = json.loads(run_cli("bench", "data", "--root", synth_root, "--batches", "2", "--modes",
                           "decode,tv-jpg",
                           "--json", f"data.shards={shards}", "data.batch_size=2", "data.num_workers=0",
                           "data.crop=[64,128]").stdout)
    assert set(j["pipelines"]) == {"decode", "tv-jpg"} and j["pipelines"]["decode"]["vs_decode_only"] == 1.0


def test_bench_data_times_a_variant_beside_its_pipeline(shards):
    from distseg.bench.data import compare_pipelines, parse_mode, time_pipeline
    from distseg.errors import UserError
    from distseg.labels import get_scheme
    from distseg.shards.split import open_split

    cfg = load_config(None, [f"data.shards={shards}", "data.batch_size=2", "data.num_workers=0",
                             "data.crop=[32,64]"])
    opened = open_split(shards, "train", get_scheme("trainid"))
    rows, out = compare_pipelines({m: time_pipeline(m, cfg, None, opened, 2) for m in ("transform",
                                                                                       "transform+cat")})
    assert rows[1][0].endswith(", class-aware crops, data.cat_max_ratio=0.75") and rows[1][-1].endswith("x")
    assert out["transform+cat"]["vs_without_variant"] > 0 and out["transform"]["vs_without_variant"] is None
    assert cfg.data.cat_max_ratio == 0  # a variant's settings are its row's own
    for bad in ("decode+cat", "torch-cpu+nope"):
        with pytest.raises(UserError, match="unknown mode"):
            parse_mode(bad)


def bench_train_rows(*args):
    """`distseg bench train` at the suite's tiny sizes: (its output, the table's rows as cells). bf16 rows
    stay at 64x32 with the U-Net at base 8: a CPU without native bf16 emulates it at ~0.3 GFLOP/s."""
    p = run_cli("bench", "train", "--min-steps", "2", "--min-seconds", "30", "--warmup", "1", *args,
                "data.batch_size=2", "data.num_workers=0", "data.crop=[32,64]", "model.base=8",
                "model.depth=2")
    main = p.stdout.split("\nlaunch-bound step:")[0]  # the launch-bound table (--launch-bound) follows
    return p, [[c.strip() for c in x.split("|")[1:-1]] for x in rows(main)]


def test_bench_train_times_every_variant_and_feed_alike_against_plain_pytorch(shards):
    p, r = bench_train_rows("--variants", "plain,fp32,bf16+cl+compile", "--feeds", "synthetic,torch-cpu",
                            f"data.shards={shards}")
    got = [(x[0], x[2], x[3]) for x in r]
    synthetic, fed = "synthetic tensors", "torch loader, CPU decode"
    assert got == [("unet", v, f) for v, f in (("plain", synthetic), ("plain", fed), ("fp32", synthetic),
                                               ("fp32", fed), ("bf16+cl+compile", "-"))]
    for x in r:
        if x[2] == "bf16+cl+compile":  # no compiler for the CPU here: said, not timed
            assert x[4] == "skipped: compile runs on CUDA here"
            continue
        ips, tflops = float(x[4]), float(x[6])
        assert ips > 0 and tflops >= 0
        if x[3] == synthetic:
            assert x[5] == "1.00x"
        else:
            assert float(x[5].rstrip("x")) == pytest.approx(ips / float(next(
                y[4] for y in r if y[:3] == x[:3] and y[3] == synthetic)), abs=0.01)
        assert x[10].endswith("x") and (x[2] != "plain" or x[3] != synthetic or x[10] == "1.00x")
    assert "then 2 steps or 30 s" in p.stdout  # every row the same timing rule
    cells, peaks = mfu_cells(p.stdout)
    assert len(cells) == 4
    assert_mfu_is_a_share(cells)
    assert "in each row's dtype: " in peaks and "bf16 " in peaks and "fp32 " in peaks  # plain: bf16


def test_bench_train_rows_per_encoder_and_a_peak_only_in_the_rows_dtype():
    p, r = bench_train_rows("--variants", "fp32", "--encoders", "unet,resnet18", "--launch-bound", "4")
    assert [(x[0], x[2], x[3]) for x in r] == [("unet", "fp32", "synthetic tensors"),
                                                ("resnet18", "fp32", "synthetic tensors")]
    launch = [[c.strip() for c in x.split("|")[1:-1]]
              for x in p.stdout.split("\nlaunch-bound step:")[1].splitlines() if x.startswith("| ")][1:]
    assert [x[0] for x in launch] == ["plain PyTorch loop", "distseg: the training loop's train_step"]
    plain, real = ([float(v) for v in x[1:4]] for x in launch)
    assert min(plain + real) > 0  # wall ms, CPU ms and aten ops per step: measured, each
    # the table shows the ratios of the unrounded figures: those of the printed ones (bench.common.table's
    # 2 decimals, or 1 from 10 on) agree within that rounding and the ratio's own last digit
    for shown, a, b in zip(launch[1][4:], real, plain):
        assert shown.endswith("x") and abs(float(shown[:-1]) - a / b) <= 0.005 + 0.01 * a / b, (shown, a, b)
    cells, peaks = mfu_cells(p.stdout)
    assert len(cells) == 2 and "fp32 " in peaks and "bf16" not in peaks  # no bf16 row, no bf16 peak
    assert_mfu_is_a_share(cells)
    resnet = build_model(load_config(None, ["model.encoder=resnet18", "model.base=32"]), 19)
    params = f"{sum(p.numel() for p in resnet.parameters()) / 1e6:.1f}M, "
    assert r[1][1].startswith(params) and r[0][1].endswith(" MFLOP")  # the tiny U-Net reads as such
    assert "decoder width 32" in p.stdout
    p = run_cli("bench", "train", "--encoders", "resnet19", check=False)
    assert_user_error(p, "model.encoder")


@pytest.mark.parametrize("flops_per_s", [0.28e9, 81e9, 3e12],
                         ids=["emulated-bf16", "avx2-fp32", "amx-bf16"])
def test_a_cpu_matmul_peak_fits_its_budget_at_any_speed(flops_per_s):
    """The peak is measured against a simulated clock: products that take 2n^3 / flops_per_s, so the test
    is as fast on every CPU and the budget is checked exactly."""
    from distseg.bench.train import grown_matmul_rate

    now, sizes = [0.0], []

    def matmul(a, b):  # 256 is the fastest size (on a real CPU, cache effects can favour any size)
        n = a.shape[0]
        sizes.append(n)
        now[0] += 2 * n ** 3 / (flops_per_s * (1 if n == 256 else 0.8))

    rate, n = grown_matmul_rate(torch.bfloat16, 0.4, clock=lambda: now[0], matmul=matmul)
    assert now[0] <= 0.4 and sizes[0] == 64 and 256 in sizes  # within the budget, every size timed
    assert rate == pytest.approx(flops_per_s) and n == 256  # the fastest size and its rate
    last = sizes[-1]
    assert last == 2048 or now[0] + 16 * 2 * last ** 3 / (0.8 * flops_per_s) > 0.4  # the next would not fit


def test_mfu_is_held_against_the_rows_own_dtype_and_never_exceeds_100_percent():
    from distseg.bench.train import Peaks

    now = [0.0]

    def matmul(a, b):  # fp32 at 100 GFLOP/s, bf16 emulated at 0.3 GFLOP/s
        now[0] += 2 * a.shape[0] ** 3 / (100e9 if a.dtype == torch.float32 else 0.3e9)

    peaks = Peaks(torch.device("cpu"), clock=lambda: now[0], matmul=matmul)
    assert peaks.describe() == "no row timed, no matmul peak measured"
    assert peaks.mfu("fp32", 0.05) == "50.00" and set(peaks.measured) == {torch.float32}
    assert peaks.mfu("tf32", 0.1) == "100.00" and set(peaks.measured) == {torch.float32}
    assert peaks.mfu("fp32", 0.2) == "-"  # outran the peak: the peak says nothing about this row
    assert peaks.mfu("bf16+cl", 0.00015) == "50.00" and set(peaks.measured) == {torch.float32, torch.bfloat16}
    assert peaks.mfu("plain", 0.3) == "-"
    only_bf16 = Peaks(torch.device("cpu"), clock=lambda: now[0], matmul=matmul)
    only_bf16.mfu("bf16", 0.0001)
    assert set(only_bf16.measured) == {torch.bfloat16}  # no fp32 row, no fp32 peak
    assert "fp32 0.1 TFLOP/s (" in peaks.describe() and "bf16 0.0003 TFLOP/s (" in peaks.describe()


@pytest.mark.gpu
def test_bench_train_on_cuda_holds_every_row_against_the_bf16_peak():
    p = run_cli("bench", "train", "--variants", "fp32,bf16+cl", "--min-steps", "5", "--min-seconds", "5",
                "--warmup", "2", "model.base=8", "model.depth=2", "data.crop=[64,128]", "data.batch_size=2")
    cells, peaks = mfu_cells(p.stdout)
    assert peaks.startswith("the measured bf16 matmul peak: bf16 ") and "fp32" not in peaks
    assert len(cells) == 2 and "-" not in cells  # the GPU's best: no row outruns it
    assert_mfu_is_a_share(cells)


def test_bench_shard(synth_root):
    p = run_cli("bench", "shard", "--root", synth_root, "--limit", "4")
    assert [x.split("|")[1].strip() for x in rows(p.stdout)] == ["png", "jpg q95"]


def test_bench_eval_runs_every_mode_through_the_segmenter():
    p = run_cli("bench", "eval", "--size", "96x64", "--images", "1", "--crop", "48x32", "--stride", "24x16",
                "--precision", "no", "model.base=8", "model.depth=2", "model.norm=group")
    r = rows(p.stdout.replace("| mode", "| pipeline"))
    assert [x.split("|")[1].strip() for x in r] == ["whole", "whole+flip", "slide", "slide+flip", "ms",
                                                    "ms+flip"]
    passes = {x.split("|")[1].strip(): float(x.split("|")[4]) for x in r}
    # 3x3 windows of 48x32 at stride 24x16 over 96x64, batch 4 -> 3 passes; flip doubles; 5 scales x 1 pass
    assert passes == {"whole": 1, "whole+flip": 2, "slide": 3, "slide+flip": 6, "ms": 5, "ms+flip": 10}
    assert "(slide: 9 windows of 48x32 per image, up to 4 per pass)" in p.stdout
    assert "| slide 48x32/24x16 |" in p.stdout  # as given: WIDTHxHEIGHT
    for line in r:
        assert float(line.split("|")[3]) > 0 and float(line.split("|")[5]) >= 0


def test_bench_eval_warns_when_the_window_exceeds_the_image():
    from distseg.bench.eval import slide_note

    note = slide_note((512, 256), (512, 1024), (341, 683), 4)
    assert note == (" (slide: 1 window of 1024x512 per image, up to 4 per pass); warning: the 1024x512 "
                    "window exceeds the 512x256 image, so slide covers it with one window and differs little "
                    "from whole")
    assert "warning" not in slide_note((2048, 1024), (512, 1024), (341, 683), 4)


def test_bench_e2e_times_a_whole_run_through_the_real_entry(shards, tmp_path):
    p = run_cli("bench", "e2e", "--steps", "2", "--keep", tmp_path / "kept", f"data.shards={shards}",
                "data.batch_size=2", "data.val_batch_size=2", "data.num_workers=1", "data.crop=[64,128]",
                "model.base=8", "model.depth=2", "model.norm=group", "train.epochs=2", "data.repeat=2")
    table = {line.split("|")[1].strip(): line.split("|")[2].strip() for line in p.stdout.splitlines()
             if line.startswith("| ") and not line.startswith("| measure")}
    s = json.loads((tmp_path / "kept" / "e2e" / "summary.json").read_text())
    t = s["timing"]
    assert s["steps"] == 28 and t["images"] == 56  # 14 samples x 2 passes x 2 epochs, batch 2
    assert float(table["whole run img/s (images / wall time from process start)"]) == \
        round(t["whole_run_img_per_s"], 2)
    assert 0 < t["start_up_s"] < t["wall_s"] and t["steady_img_per_s"] > t["whole_run_img_per_s"]
    assert t["first_step_of_epoch_vs_inner"] > 0 and t["validation_img_per_s"] > 0
    assert table["whole run / synthetic step"].endswith("x")
    assert "data.repeat 2, 28 steps in 2 epochs" in p.stdout


@pytest.mark.early
def test_the_gpu_check_dry_run_runs_every_phase(tmp_path):
    """tools/gpu-check.sh --dry-run on the CPU with tiny sizes: without --phases every phase runs and reports
    (as its help says), GPU rows say why not; so the command a GPU holder runs cannot rot unnoticed."""
    import subprocess

    from conftest import ROOT

    out = tmp_path / "report.md"
    args = ["--dry-run", "--out", str(out), "--data", str(tmp_path / "gc")]
    p = subprocess.run(["bash", str(ROOT / "tools" / "gpu-check.sh"), *args], capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    report = out.read_text()
    assert "FAILED" not in report and "- GPU: none (no CUDA)" in report
    for phase in ("tests", "step", "loader", "data", "eval", "train", "tune"):
        assert f"## {phase} (" in report and f"phase {phase}: " in p.stdout
    assert "tests/test_training_gpu.py::test_kill_and_resume_on_cuda" in report  # collected, not run
    assert "| unet | " in report.split("## step")[1] and "| plain | synthetic tensors |" in report
    step = report.split("## step")[1].split("## loader")[0]
    cells, peaks = mfu_cells(step)
    assert len(cells) == 3 and "bf16 " in peaks and "fp32 " in peaks  # plain, fp32, bf16+cl
    assert_mfu_is_a_share(cells)
    assert "torch loader, nvJPEG | skipped: no CUDA" in report
    assert "DALI, mixed (GPU) decode + GPU augmentation | skipped: no CUDA" in report
    assert "| whole run img/s (images / wall time from process start) |" in report
    assert "| evaluate |" in report and "| export |" in report and "| all |" in report
    tune = report.split("## tune")[1]
    assert "| 1 | as given |" in tune and "choice: " in tune and "| tuned / config |" in tune


def test_bench_data_profile_gives_every_part_of_the_loaders_work_a_measured_time(shards):
    from distseg.bench.data import PART_NAMES, bench_data

    cfg = load_config(None, [f"data.shards={shards}", "data.batch_size=2", "data.num_workers=1",
                             "data.crop=[32,64]"])
    text = bench_data(cfg, None, "train", 3, ["transform"], profile=True)
    table = text.split("CPU time per image by part")[1]
    lines = [line for line in table.splitlines() if line.startswith("| ") and "ms per image" not in line]
    cells = {(c[0], c[1]): float(c[2]) for c in ([x.strip() for x in ln.split("|")[1:-1]] for ln in lines)}
    worker = {k: cells["worker", PART_NAMES[k]] for k in ("reads", "decode", "transform", "collate",
                                                          "hand-off", "total")}
    main = {k: cells["main", PART_NAMES[k]] for k in ("wait", "receive", "finish")}
    assert min(v for k, v in worker.items() if k != "hand-off") > 0 and worker["hand-off"] >= 0
    assert min(main.values()) > 0  # each part measured, in the worker and in the main process
    parts = sum(v for k, v in worker.items() if k != "total")
    assert parts == pytest.approx(worker["total"], abs=0.02) or parts < worker["total"]
    beyond = cells["worker", "beyond decode and transform (reads, collate, hand-off)"]
    assert beyond == pytest.approx(worker["total"] - worker["decode"] - worker["transform"], abs=0.02)
    assert ("reference", "transform-only row, wall time: decode + transform in one process") in cells
    assert "6 images in the workers' window, 6 in the main process's" in text  # 3 batches of 2, warm-up apart
