"""The flows on CUDA against the CPU (marked `gpu`: skipped without CUDA): evaluate and predict in fp32 with
TF32 off give the same class maps on >= 99.9% of pixels and scores within 0.1 points; the torch.export file
run on CUDA equals the CPU within 1e-3."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import run_cli

pytestmark = pytest.mark.gpu

CPU = {"CUDA_VISIBLE_DEVICES": ""}
GPU_FP32 = {"NVIDIA_TF32_OVERRIDE": "0"}  # no TF32 in cuBLAS or cuDNN: fp32 against fp32


def test_evaluate_and_predict_on_the_gpu_equal_the_cpu(synth_root, one_proc_run, tmp_path):
    scores = {}
    for name, env in (("cpu", CPU), ("gpu", GPU_FP32)):
        run_cli("evaluate", "--run", one_proc_run, "--root", synth_root, "--precision", "no", "--json",
                tmp_path / f"{name}.json", env=env)
        scores[name] = json.loads((tmp_path / f"{name}.json").read_text())
        run_cli("predict", "--run", one_proc_run, "--out", tmp_path / name, "--root", synth_root, "--split",
                "val", "--precision", "no", env=env)
    assert abs(scores["cpu"]["miou"] - scores["gpu"]["miou"]) <= 0.001
    same = total = 0
    for f in sorted((tmp_path / "cpu").glob("*.png")):
        a, b = np.asarray(Image.open(f)), np.asarray(Image.open(tmp_path / "gpu" / f.name))
        same, total = same + int((a == b).sum()), total + a.size
    assert total and same / total >= 0.999


def test_the_exported_program_runs_on_cuda_as_on_the_cpu(one_proc_run, tmp_path):
    run_cli("export", "--run", one_proc_run, "--format", "pt2", "--out", tmp_path / "m.pt2", "--dynamic",
            env=dict(os.environ, **CPU))
    from torch.export.passes import move_to_device_pass

    ep = torch.export.load(str(tmp_path / "m.pt2"))
    x = torch.randint(0, 256, (2, 3, 96, 160), dtype=torch.uint8)
    with torch.no_grad():
        cpu = ep.module()(x)
        gpu = move_to_device_pass(ep, "cuda").module()(x.cuda()).cpu()
    torch.testing.assert_close(gpu, cpu, rtol=0, atol=1e-3)
