import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args, check=True, env=None, timeout=600, cwd=None):
    """Run `distseg ARGS` in a subprocess, as a user would; returns CompletedProcess."""
    e = dict(os.environ)
    e.update(env or {})
    p = subprocess.run([sys.executable, "-m", "distseg", *map(str, args)], capture_output=True, text=True,
                       env=e, timeout=timeout, cwd=cwd)
    if check and p.returncode != 0:
        raise AssertionError(f"distseg {' '.join(map(str, args))} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p


def assert_user_error(p, needle: str):
    """Exit 2, exactly one line on stderr mentioning `needle`, and no traceback."""
    assert p.returncode == 2, (p.returncode, p.stdout, p.stderr)
    lines = [l for l in p.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith("error: ") and needle in lines[0], lines[0]
    assert "Traceback" not in p.stderr


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory) -> Path:
    from distseg.data.synth import write_synth

    root = tmp_path_factory.mktemp("cityscapes")
    write_synth(root, {"train": 14, "val": 5, "test": 2}, width=256, height=128, seed=3, progress=False)
    return root


@pytest.fixture(scope="session")
def shards(synth_root, tmp_path_factory) -> Path:
    """train + val shards of the synthetic tree (trainid, jpg)."""
    from distseg.data.shard import ShardOptions, run_shard

    out = tmp_path_factory.mktemp("shards")
    for split, maxcount in (("train", 4), ("val", 2)):
        run_shard(synth_root, out, ShardOptions(split=split, maxcount=maxcount), progress=False, log=lambda *a: None)
    return out


def pytest_collection_modifyitems(config, items):
    import torch

    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs CUDA")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)
