"""Installed like a library: the wheel, built without build isolation, installs into an environment that
already has its torch (a venv layered over the repository's .venv, as a cluster's site environment)
without replacing anything, and works from there; a missing optional extra is one line naming it.

The wheel is built from a copy of the files the build reads, never in the checkout: setuptools writes its
build/ and *.egg-info folders beside pyproject.toml, and two builds there (two xdist workers, or a user's
`pip install -e .` during the tests) remove each other's files. The module's tests also share one xdist
group, so its fixture (the build, the venv, the data) is made once, by one worker."""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from conftest import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("install")]


def source_copy(dest: Path) -> Path:
    """The files pyproject.toml builds the wheel from (its metadata, the readme it names, the package),
    copied to `dest`, without caches."""
    dest.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, dest / name)
    shutil.copytree(ROOT / "distseg", dest / "distseg", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return dest


def run(cmd, **kw):
    p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=900, **kw)
    words = " ".join(map(str, cmd))
    assert p.returncode == 0, f"{words} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p


TORCH = "import json, torch; print(json.dumps([torch.__version__, torch.__file__]))"


@pytest.fixture(scope="module")
def site_env(tmp_path_factory):
    """A venv whose base packages are .venv's (through a .pth file, as a site's module environment puts
    its torch on the path), with the distseg wheel installed from no index: pip may not download anything,
    so every dependency range must accept what is already there."""
    tmp = tmp_path_factory.mktemp("install")
    wheels = tmp / "wheels"
    src = source_copy(tmp / "src")
    run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-w", wheels, src],
        cwd=tmp)
    wheel = next(wheels.glob("distseg-*.whl"))
    venv = tmp / "site"
    run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", venv])
    py = venv / "bin" / "python"
    site = Path(run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    (site / "_site_torch.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    before = json.loads(run([py, "-c", TORCH]).stdout)
    env = dict(os.environ, OMP_NUM_THREADS="1", PATH=f"{venv / 'bin'}:{os.environ['PATH']}")
    run([py, "-m", "pip", "install", "--no-index", wheel], env=env, cwd=tmp)
    distseg = [py, "-m", "distseg"]  # data made by the installed distseg, for the tests below
    run([*distseg, "synth", "--out", tmp / "cs", "--train", 4, "--val", 2, "--test", 0, "--size", "128x64"],
        env=env, cwd=tmp)
    for split in ("train", "val"):
        run([*distseg, "shard", "--root", tmp / "cs", "--split", split, "--out", tmp / "shards"], env=env,
            cwd=tmp)
    return py, env, tmp, before


def test_the_wheel_installs_over_a_site_torch_and_trains(site_env):
    py, env, tmp, before = site_env
    where = run([py, "-c", "import distseg; print(distseg.__file__)"], env=env, cwd=tmp).stdout.strip()
    assert "site-packages" in where and str(ROOT) not in where, where
    assert json.loads(run([py, "-c", TORCH], env=env, cwd=tmp).stdout) == before  # same torch, same place
    distseg = [py, "-m", "distseg"]
    assert run([*distseg, "--version"], env=env, cwd=tmp).stdout.strip().endswith("0.1.0")
    assert "shard" in run([*distseg, "--help"], env=env, cwd=tmp).stdout
    assert (tmp / "shards" / "train.json").is_file()  # synth -> shard ran from the install (the fixture)
    run([*distseg, "train", "output_dir=runs", "name=t", f"data.shards={tmp / 'shards'}", "model.base=8",
         "model.depth=2", "model.norm=group", "data.crop=[64,128]", "data.batch_size=2",
         "data.val_batch_size=2", "data.num_workers=0", "train.epochs=1", "train.progress=false"], env=env,
        cwd=tmp)
    assert json.loads((tmp / "runs" / "t" / "summary.json").read_text())["finished"]


BLOCK = "import sys\nfor m in {mods!r}: sys.modules[m] = None\nfrom distseg.cli import main\nmain({argv!r})\n"


@pytest.mark.parametrize("mods,argv,needle", [
    (["matplotlib"], ["report", "--run", "runs/t"],
     'distseg report needs matplotlib: pip install "distseg[report]"'),
    (["onnx"], ["export", "--run", "runs/t", "--format", "onnx", "--out", "m.onnx"],
     'pip install "distseg[export]"'),
    (["nvidia", "nvidia.dali"], ["train", "output_dir=runs", "name=d", "data.loader=dali"],
     'data.loader=dali needs DALI: pip install "distseg[dali]"'),
    (["s3fs"], ["train", "output_dir=runs", "name=u", "data.shards=s3://bucket/shards"],
     'pip install "distseg[storage]"'),
], ids=["report", "export", "dali", "storage"])
def test_a_missing_extra_is_one_line_naming_it(site_env, mods, argv, needle):
    py, env, tmp, _ = site_env
    p = subprocess.run([py, "-c", BLOCK.format(mods=mods, argv=argv)], capture_output=True, text=True,
                       env=env, cwd=tmp, timeout=300)
    assert p.returncode == 2, p.stderr[-3000:]
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], p.stderr[-3000:]
    if mods == ["matplotlib"]:  # the rest of the command line still works, and says what is missing
        help_text = subprocess.run([py, "-c", BLOCK.format(mods=mods, argv=["--help"])], capture_output=True,
                                   text=True, env=env, cwd=tmp).stdout
        assert "report" in help_text and "not installed here" in help_text
