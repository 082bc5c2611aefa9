"""Every command in the README's ```bash blocks runs as written, in order, on synthetic data: only tiny model
settings are appended (and short benchmark options), so a README that drifts from the code fails here. Lines
marked `# needs GPUs` / `# needs a Slurm cluster` / `# needs an S3 endpoint` / `# needs a network` are skipped
(tests/test_slurm.py and tests/test_shards_storage.py run those paths against real servers);
`tools/test.sh` is this suite itself. Every repository path that the README, docs/*.md, the package's
docstrings and comments, tools/*.sh and slurm/* name exists."""

import ast
import io
import json
import os
import re
import shlex
import subprocess
import sys
import tokenize
import zipfile
from pathlib import Path

import pytest

from conftest import ROOT

README = ROOT / "README.md"
TINY = ["model.base=8", "model.depth=2", "model.norm=group", "data.crop=[64,128]", "data.batch_size=2",
        "data.val_batch_size=2", "data.num_workers=0", "train.epochs=1", "train.progress=false",
        "sched.warmup_steps=0", "train.mixed_precision=no"]
BENCH = {"data": ["--batches", "2", "--modes", "decode,torch-cpu"],
         "train": ["--min-steps", "1", "--warmup", "1", "--variants", "fp32", "--feeds", "synthetic"],
         "shard": ["--limit", "2"], "eval": ["--images", "1", "--size", "128x64", "--modes", "whole,slide",
                  "--precision", "no"],
         "index": ["--samples", "2000", "--workers", "1", "--no-dali"], "e2e": []}
MARKERS = ("# needs GPUs", "# needs a Slurm cluster", "# needs an S3 endpoint", "# needs a network")
# a path in the repository named in prose: one of these folders, then anything up to a space, quote or bracket
NAMED_PATH = re.compile(r"(?<![\w./-])((?:distseg|tools|configs|docs|slurm|tests)/[^\s`'\"()\[\]]*)")
# what stands for any name: <split>, NNNNNN, *, …, ..., {a,b}, $VAR / ${VAR}
PLACEHOLDER = re.compile(r"<[^>]*>|N{2,}|\*+|…|\.\.\.|\{[^}]*\}|\$\{?\w+\}?")
# a module named from inside the package, by its room: runs/summary.py, training/step_flags.StepFlags
ROOMS = "data|shards|models|inference|runs|training|flows|reporting|bench|commands"
FILE_TYPES = "yaml|json|html|md|tar|png|txt|sh"  # runs/x.json is a file of a run, not a module
ROOM_MODULE = re.compile(rf"(?<![\w./-])((?:{ROOMS})/\w+)(?:\.py\b|\.(?!(?:{FILE_TYPES})\b)[A-Za-z_])")


def readme_commands() -> list[str]:
    cmds = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                cmds.append(line)
    return cmds


def tinier(cmd: str) -> list[str]:
    """The command's words, with tiny settings appended where a model is built."""
    words = shlex.split(re.sub(r"\s+#.*$", "", cmd))
    if words[:2] == ["distseg", "bench"]:
        if "--tuned" in words:  # tuned.yaml holds TINY already; a setting it chose would be refused
            return words + [s for s in TINY if not s.startswith("data.num_workers=")]
        return words + BENCH[words[2]] + ([] if words[2] in ("shard", "index") else TINY)
    if "distseg/train.py" in words or words[:2] in (["distseg", "train"], ["distseg", "tune"]) or \
            words[0] == "tools/demo.sh":
        return words + TINY
    if words[:2] == ["distseg", "experiment"]:  # two seeds, the report left to the `distseg report` after it
        if "--seeds" in words:
            words[words.index("--seeds") + 1] = ",".join(words[words.index("--seeds") + 1].split(",")[:2])
        return words + ["--no-report"] + [a for setting in TINY for a in ("--set", setting)]
    return words


def named_paths(text: str) -> set[str]:
    """The repository paths a text names, as written less trailing punctuation and a `:function` tail;
    a room-relative module (`runs/summary.RunSummary`) as its file under distseg/."""
    out = set()
    for m in NAMED_PATH.finditer(text):
        path = re.sub(r"[.,;:!?]+$", "", m.group(1))
        out.add(re.sub(r":[\w.:]+$", "", path))
    for m in ROOM_MODULE.finditer(text):
        module = ROOT / "distseg" / m.group(1)
        out.add(f"distseg/{m.group(1)}" + ("" if module.is_dir() else ".py"))
    return out


def missing_paths(text: str, root: Path = ROOT) -> list[str]:
    """The paths a text names that are neither a file nor a folder under root; a name with placeholders
    counts when the glob it stands for matches something."""
    missing = []
    for path in sorted(named_paths(text)):
        pattern = PLACEHOLDER.sub("*", path).rstrip("/")
        found = any(root.glob(pattern)) if "*" in pattern else (root / pattern).exists()
        if not found:
            missing.append(path)
    return missing


def python_prose(path: Path) -> str:
    """A module's docstrings and comments: what a person reads, not the code (whose paths import checks)."""
    src = path.read_text()
    parts = [ast.get_docstring(node, clean=False) or "" for node in ast.walk(ast.parse(src))
             if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
    parts += [tok.string for tok in tokenize.generate_tokens(io.StringIO(src).readline)
              if tok.type == tokenize.COMMENT]
    return "\n".join(parts)


def documents() -> dict[str, str]:
    """Every text that names repository paths for people, by its path."""
    texts = {p: p.read_text() for p in [README, *sorted((ROOT / "docs").glob("*.md")),
                                        *sorted((ROOT / "tools").glob("*.sh")),
                                        *sorted(p for p in (ROOT / "slurm").iterdir() if p.is_file())]}
    texts |= {p: python_prose(p) for p in sorted((ROOT / "distseg").rglob("*.py"))}
    return {str(p.relative_to(ROOT)): text for p, text in texts.items()}


def test_missing_paths_finds_a_missing_file_and_reads_placeholders():
    text = ("See distseg/nowhere.py:run, `tools/test.sh`, docs/ARCHITECTURE.md. and distseg/cli.py:main; "
            "configs/<name>.yaml, slurm/*.sh, distseg/data/… and (tests/test_zzz_<room>.py)")
    assert missing_paths(text) == ["distseg/nowhere.py", "tests/test_zzz_<room>.py"]
    assert named_paths("https://example.org/distseg/x.py and ../elsewhere/tools/y.sh") == set()
    rooms = "runs/summary.RunSummary, training/nowhere.py, shards/cityscapes, runs/x/config.yaml, runs/a.json"
    assert missing_paths(rooms) == ["distseg/training/nowhere.py"]


def test_every_named_path_exists():
    stale = [f"{doc}: {path}" for doc, text in documents().items() for path in missing_paths(text)]
    assert not stale, "paths named that are not in the repository:\n" + "\n".join(stale)


@pytest.mark.slow
def test_every_readme_command_runs_as_written(tmp_path):
    for name in ("configs", "distseg", "slurm"):
        (tmp_path / name).symlink_to(ROOT / name)
    env = dict(os.environ, OMP_NUM_THREADS="1", DEMO_DIR=str(tmp_path / "demo"),
               PATH=f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}")
    env.pop("CITYSCAPES_DATASET", None)
    ran, skipped = [], []
    for cmd in readme_commands():
        if any(m in cmd for m in MARKERS) or cmd.startswith("tools/test.sh"):
            skipped.append(cmd)
            continue
        if cmd.startswith("export "):
            key, value = cmd.split()[1].split("=", 1)
            env[key] = value
            continue
        cwd = ROOT if cmd.startswith("tools/") else tmp_path  # the README runs tools/ from the repo root
        p = subprocess.run(tinier(cmd), cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
        assert p.returncode == 0, \
            f"README command failed ({p.returncode}): {cmd}\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}"
        ran.append(cmd)
    # test.sh, 8-GPU training, the 8 -> 4 GPU resume (tests/test_training_operators.py runs it on CPU
    # processes), two sbatch lines, four S3 lines (tests/test_shards_storage.py runs those against a real S3
    # server), two ImageNet downloads, the GPU check (its --dry-run is tests/test_bench.py's): nothing else
    assert len(skipped) == 13, skipped
    assert any(c.startswith("tools/demo.sh") for c in ran) and len(ran) >= 20, ran
    # what the commands were for is there
    assert json.loads((tmp_path / "scores.json").read_text())["miou"] is not None
    assert len(list((tmp_path / "results").glob("*_pred_labelIds.png"))) == 12
    assert len(list((tmp_path / "overlays").glob("*_overlay.png"))) == 12
    assert (tmp_path / "runs" / "timm_resnet18d" / "summary.json").is_file()
    assert (tmp_path / "resnet18.onnx").stat().st_size > 0 and (tmp_path / "resnet18.pt2").stat().st_size > 0
    assert json.loads((tmp_path / "resnet18-onnx.json").read_text())["model"] == "resnet18.onnx"
    with zipfile.ZipFile(tmp_path / "submission.zip") as z:
        assert len(z.namelist()) == 4
    for run in ("cityscapes_unet", "two", "automobile", "person", "seed/person_finetuned-seed1"):
        assert (tmp_path / "runs" / run / "summary.json").is_file(), run
    assert (tmp_path / "runs" / "seed" / "compare.html").stat().st_size > 0
    assert set(json.loads((tmp_path / "runs" / "seed" / "summary.json").read_text())["spread"]) == {
        "person_finetuned", "person_scratch"}
    mixed = json.loads((tmp_path / "runs" / "coarse_mix" / "summary.json").read_text())
    assert [st["images"] for st in mixed["streams"]] == [48, 16]  # one epoch: 48 fine at 3:1, 16 coarse
    assert json.loads((tmp_path / "coarse-scores.json").read_text())["miou"] is not None
    draws = json.loads((tmp_path / "runs" / "rare" / "summary.json").read_text())["sampling"]["class_draws"]
    assert min(draws["bus"], draws["rider"], draws["motorcycle"]) > 0  # synth --rare's classes are drawn
    assert (ROOT / "tools" / "demo.sh").is_file() and (tmp_path / "demo" / "report.html").is_file()
    # the path from the demo's outputs: its run evaluated, predicted and exported where it is
    assert len(list((tmp_path / "demo" / "results").glob("*_pred_labelIds.png"))) == 16
    assert json.loads((tmp_path / "demo" / "flip.json").read_text())["inference"] == "whole + flip"
    assert (tmp_path / "demo" / "synth.pt2").stat().st_size > 0
