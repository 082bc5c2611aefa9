"""Benchmarks run and report every pipeline/variant asked for (numbers are shown, not asserted)."""

import json

import pytest

from conftest import assert_user_error, run_cli
from distseg.config import load_config
from distseg.models import build_model


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


def test_bench_train_times_every_variant_and_feed_alike_against_plain_pytorch(shards):
    p = run_cli("bench", "train", "--variants", "plain,fp32,bf16+cl+compile", "--feeds",
                "synthetic,torch-cpu", "--min-steps", "2", "--min-seconds", "30", "--warmup", "1",
                "--encoders", "unet,resnet18",
                f"data.shards={shards}", "data.batch_size=2", "data.num_workers=0", "data.crop=[64,128]",
                "model.base=8", "model.depth=2")
    r = [[c.strip() for c in x.split("|")[1:-1]] for x in rows(p.stdout)]
    got = [(x[0], x[2], x[3]) for x in r]
    synthetic, fed = "synthetic tensors", "torch loader, CPU decode"
    assert got == [(m, v, f) for m in ("unet", "resnet18") for v, f in
                   (("plain", synthetic), ("plain", fed), ("fp32", synthetic), ("fp32", fed),
                    ("bf16+cl+compile", "-"))]
    for x in r:
        if x[2] == "bf16+cl+compile":  # no compiler for the CPU here: said, not timed
            assert x[4] == "skipped: compile runs on CUDA here"
            continue
        ips, tflops, mfu = (float(v) for v in (x[4], x[6], x[7]))
        assert ips > 0 and tflops >= 0 and mfu >= 0
        if x[3] == synthetic:
            assert x[5] == "1.00x"
        else:
            assert float(x[5].rstrip("x")) == pytest.approx(ips / float(next(
                y[4] for y in r if y[:3] == x[:3] and y[3] == synthetic)), abs=0.01)
        assert x[10].endswith("x") and (x[2] != "plain" or x[3] != synthetic or x[10] == "1.00x")
    assert "then 2 steps or 30 s" in p.stdout  # every row the same timing rule
    resnet = build_model(load_config(None, ["model.encoder=resnet18", "model.base=32"]), 19)
    params = f"{sum(p.numel() for p in resnet.parameters()) / 1e6:.1f}M, "
    assert all(x[1].startswith(params) for x in r if x[0] == "resnet18")
    assert "decoder width 32" in p.stdout
    p = run_cli("bench", "train", "--encoders", "resnet19", check=False)
    assert_user_error(p, "model.encoder")


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


def test_the_gpu_check_dry_run_runs_every_phase(tmp_path):
    """tools/gpu-check.sh on the CPU with tiny sizes: every phase runs and reports, GPU rows say why not; so
    the command a GPU holder runs cannot rot unnoticed."""
    import subprocess

    from conftest import ROOT

    out = tmp_path / "report.md"
    args = ["--dry-run", "--phases", "tests,step,loader,data,eval,train", "--out", str(out), "--data",
            str(tmp_path / "gc")]
    p = subprocess.run(["bash", str(ROOT / "tools" / "gpu-check.sh"), *args], capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    report = out.read_text()
    assert "FAILED" not in report and "- GPU: none (no CUDA)" in report
    for phase in ("tests", "step", "loader", "data", "eval", "train"):
        assert f"## {phase} (" in report and f"phase {phase}: " in p.stdout
    assert "tests/test_training_gpu.py::test_kill_and_resume_on_cuda" in report  # collected, not run
    assert "| unet | " in report.split("## step")[1] and "| plain | synthetic tensors |" in report
    assert "torch loader, nvJPEG | skipped: no CUDA" in report
    assert "DALI, mixed (GPU) decode + GPU augmentation | skipped: no CUDA" in report
    assert "| whole run img/s (images / wall time from process start) |" in report
    assert "| evaluate |" in report and "| export |" in report and "| all |" in report
