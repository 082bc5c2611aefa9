"""Benchmarks run and report every pipeline/variant asked for (numbers are shown, not asserted)."""

import re

from conftest import run_cli


def rows(text):
    return [l for l in text.splitlines() if l.startswith("| ") and not l.startswith("| pipeline")
            and not l.startswith("| variant") and not l.startswith("| image format")]


def test_bench_data_compares_pipelines(synth_root, shards, tmp_path):
    out = tmp_path / "b.md"
    p = run_cli("bench", "data", "--root", synth_root, "--batches", "3", "--out", out, f"data.shards={shards}",
                "data.batch_size=2", "data.num_workers=1", "data.crop=[64,128]")
    r = rows(p.stdout)
    assert [x.split("|")[1].strip() for x in r] == [
        "raw Cityscapes PNG folder (seed)", "torch loader, CPU decode", "torch loader, GPU decode (nvJPEG)",
        "DALI, CPU mode (device_id=None)"]
    for line in (r[0], r[1], r[3]):
        assert float(line.split("|")[2]) > 0
    assert "skipped: no CUDA" in r[2]
    assert out.read_text().strip() == p.stdout.strip()


def test_bench_train_reports_throughput_and_mfu(shards):
    p = run_cli("bench", "train", "--variants", "fp32,bf16", "--steps", "2", "--warmup", "1", "--loader",
                f"data.shards={shards}", "data.batch_size=2", "data.num_workers=0", "data.crop=[64,128]",
                "model.base=8", "model.depth=2")
    r = rows(p.stdout)
    assert [x.split("|")[1].strip() for x in r] == ["fp32", "bf16"]
    for line in r:
        ips, tflops, mfu = (float(v) for v in line.split("|")[2:5])
        assert ips > 0 and tflops > 0 and mfu > 0
    assert re.search(r"[0-9.]+ TFLOP/image", p.stdout)


def test_bench_shard(synth_root):
    p = run_cli("bench", "shard", "--root", synth_root, "--limit", "4")
    assert [x.split("|")[1].strip() for x in rows(p.stdout)] == ["png", "jpg q95"]
