"""Every command in the README's ```bash blocks runs as written, in order within its section's chain
(`CHAINS`), on synthetic data: only tiny model settings are appended (and short benchmark options), so a
README that drifts from the code fails here. Lines marked `# needs GPUs` / `# needs a Slurm cluster` /
`# needs an S3 endpoint` / `# needs a network` are skipped (tests/test_slurm.py and
tests/test_shards_storage.py run those paths against real servers); `tools/test.sh` is this suite itself.
Every repository path that the README, docs/*.md, the package's docstrings and comments, tools/*.sh and
slurm/* name exists."""

import ast
import io
import json
import os
import re
import shlex
import shutil
import sys
import tokenize
import zipfile
from pathlib import Path

import pytest

from conftest import ROOT, ZYGOTE

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


def readme_commands() -> list[tuple[str, str]]:
    """Every command of the README's ```bash blocks, in order, with the heading of the section it is in."""
    cmds, section, block = [], "", None
    for line in README.read_text().replace("\\\n", " ").splitlines():
        if block is None and line.startswith("#"):
            section = line.lstrip("#").strip()
        elif line.startswith("```"):
            block = [] if line == "```bash" and block is None else None
        elif block is not None and line.strip() and not line.strip().startswith("#"):
            cmds.append((section, line.strip()))
    return cmds


# The README's commands as independent chains, so the suite's workers run them side by side: each chain runs
# its sections' commands in order in its own folder, after those of the chains it needs (run once, shared
# read-only through links). The coarse chain writes its own data/ (its synth line adds train_extra).
CHAINS = {"demo": (["Set up and run"], []), "data": (["Data"], []),  # longest first, after what others need
          "seed": (["Resuming on a different number of GPUs", "Experiments and reports"], ["data"]),
          "training": (["Training", "Experiment trackers", "Rare classes", "Evaluation and prediction"],
                       ["data"]),
          "models": (["Models, losses and export", "Scoring an exported model"], ["data"]),
          "tuning": (["Tuning for this machine"], ["demo"]),
          "benchmarks": (["Benchmarks"], ["data", "demo"]),
          "coarse": (["Coarse data and mixing datasets"], ["data"])}
SKIPPED_ONLY = ["Data on object storage", "Slurm"]  # every line there is marked: it needs what CI has not


def skipped(cmd: str) -> bool:
    return any(m in cmd for m in MARKERS) or cmd.startswith("tools/test.sh")


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


def chain_commands(chain: str) -> list[str]:
    return [cmd for section, cmd in readme_commands() if section in CHAINS[chain][0]]


def test_the_chains_hold_every_readme_command_once():
    owned = [section for sections, _ in CHAINS.values() for section in sections] + SKIPPED_ONLY
    assert len(owned) == len(set(owned)), owned
    assert {section for section, _ in readme_commands()} <= set(owned)
    assert all(skipped(cmd) for section, cmd in readme_commands() if section in SKIPPED_ONLY)
    # test.sh, 8-GPU training, the 8 -> 4 GPU resume (tests/test_training_operators.py runs it on CPU
    # processes), two sbatch lines, four S3 lines (tests/test_shards_storage.py runs those against a real S3
    # server), two ImageNet downloads, the GPU check (its --dry-run is tests/test_bench.py's): nothing else
    assert len([cmd for _, cmd in readme_commands() if skipped(cmd)]) == 13
    ran = [cmd for chain in CHAINS for cmd in chain_commands(chain) if not skipped(cmd)]
    assert any(c.startswith("tools/demo.sh") for c in ran) and len(ran) >= 40, ran


def run_readme_command(cmd: str, cwd: Path, env: dict) -> str:
    """One command as written (plus `tinier`'s settings), its stdout returned; `distseg ...` (the console
    script itself) and `python ...` through the suite's preloaded interpreter (tests/zygote.py)."""
    words = tinier(cmd)
    where = ROOT if cmd.startswith("tools/") else cwd  # the README runs tools/ from the repo root
    argv = [sys.executable, shutil.which("distseg", path=env["PATH"]), *words[1:]] if words[0] == "distseg" \
        else [sys.executable, *words[1:]] if words[0] == "python" else words
    p = ZYGOTE.run(argv, env, where, 900, as_written=words)
    assert p.returncode == 0, \
        f"README command failed ({p.returncode}): {cmd}\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}"
    return p.stdout


def chain_env(base: Path, chain: str) -> dict:
    """The environment a chain's commands run in: the README's `export` lines of the chains it needs, then
    its own as they come."""
    env = dict(os.environ, OMP_NUM_THREADS="1", DEMO_DIR=str(base / chain / "demo"),
               PATH=f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}")
    env.pop("CITYSCAPES_DATASET", None)
    for need in CHAINS[chain][1]:
        for cmd in chain_commands(need):
            if cmd.startswith("export "):
                export(env, cmd)
    return env


def export(env: dict, cmd: str) -> None:
    key, value = cmd.split()[1].split("=", 1)
    env[key] = value


def chain_folder(base: Path, chain: str) -> Path:
    """The chain's folder: links to the repository's configs, package and slurm scripts, and to what the
    chains it needs made (demo/, data/, shards/cityscapes/), read there, never written."""
    folder = base / chain
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("configs", "distseg", "slurm"):
        (folder / name).symlink_to(ROOT / name)
    needs = CHAINS[chain][1]
    if "demo" in needs:
        (folder / "demo").symlink_to(base / "demo" / "demo")
    if "data" in needs:
        if chain != "coarse":  # its synth line writes data/ again, with train_extra
            (folder / "data").symlink_to(base / "data" / "data")
        (folder / "shards").mkdir()
        (folder / "shards" / "cityscapes").symlink_to(base / "data" / "shards" / "cityscapes")
    return folder


def ensure_chain(base: Path, chain: str) -> Path:
    """The chain run once per suite: by the first worker that needs it, the others waiting for it. Each
    command's stdout is kept in the chain's folder (NN.out); a chain that failed fails its dependents with
    its error, not by running again."""
    from filelock import FileLock

    folder = base / chain
    with FileLock(str(base / f"{chain}.lock")):
        if (base / f"{chain}.failed").is_file():
            pytest.fail(f"README chain {chain} failed earlier:\n" + (base / f"{chain}.failed").read_text())
        if not (folder / ".done").is_file():
            folder = chain_folder(base, chain)
            env = chain_env(base, chain)
            try:
                for i, cmd in enumerate(chain_commands(chain)):
                    if cmd.startswith("export "):
                        export(env, cmd)
                    elif not skipped(cmd):
                        (folder / f"{i:02d}.out").write_text(run_readme_command(cmd, folder, env))
            except AssertionError as e:
                (base / f"{chain}.failed").write_text(str(e))
                raise
            (folder / ".done").touch()
    return folder


@pytest.fixture(scope="session")
def readme_base(tmp_path_factory, request) -> Path:
    """Where the chains run: shared by the suite's xdist workers (the folder above each worker's own)."""
    base = tmp_path_factory.getbasetemp()
    base = (base.parent if hasattr(request.config, "workerinput") else base) / "readme"
    base.mkdir(exist_ok=True)
    return base


@pytest.mark.slow
@pytest.mark.early
@pytest.mark.parametrize("chain", list(CHAINS))
def test_every_readme_command_runs_as_written(readme_base, chain):
    for need in CHAINS[chain][1]:
        ensure_chain(readme_base, need)
    CHECKS[chain](ensure_chain(readme_base, chain))


def check_demo(d: Path):
    assert (ROOT / "tools" / "demo.sh").is_file() and (d / "demo" / "report.html").is_file()
    # the path from the demo's outputs: its run evaluated, predicted and exported where it is
    assert len(list((d / "demo" / "results").glob("*_pred_labelIds.png"))) == 16
    assert json.loads((d / "demo" / "flip.json").read_text())["inference"] == "whole + flip"
    assert (d / "demo" / "synth.pt2").stat().st_size > 0


def check_data(d: Path):
    assert json.loads((d / "shards" / "cityscapes" / "train.json").read_text())["total"] == 48


def check_tuning(d: Path):
    assert "settings changed:" in (d / "tuned.yaml").read_text()
    assert (d / "runs" / "synth_tuned" / "summary.json").is_file()


def check_training(d: Path):
    for run in ("cityscapes_unet", "two", "tracked"):
        assert (d / "runs" / run / "summary.json").is_file(), run
    draws = json.loads((d / "runs" / "rare" / "summary.json").read_text())["sampling"]["class_draws"]
    assert min(draws["bus"], draws["rider"], draws["motorcycle"]) > 0  # synth --rare's classes are drawn
    assert json.loads((d / "scores.json").read_text())["miou"] is not None
    assert len(list((d / "results").glob("*_pred_labelIds.png"))) == 12
    assert len(list((d / "overlays").glob("*_overlay.png"))) == 12
    with zipfile.ZipFile(d / "submission.zip") as z:
        assert len(z.namelist()) == 4


def check_seed(d: Path):
    for run in ("automobile", "person", "seed/person_finetuned-seed1"):
        assert (d / "runs" / run / "summary.json").is_file(), run
    assert (d / "runs" / "seed" / "compare.html").stat().st_size > 0
    assert set(json.loads((d / "runs" / "seed" / "summary.json").read_text())["spread"]) == {
        "person_finetuned", "person_scratch"}


def check_coarse(d: Path):
    mixed = json.loads((d / "runs" / "coarse_mix" / "summary.json").read_text())
    assert [st["images"] for st in mixed["streams"]] == [48, 16]  # one epoch: 48 fine at 3:1, 16 coarse
    assert json.loads((d / "coarse-scores.json").read_text())["miou"] is not None


def check_models(d: Path):
    assert (d / "runs" / "timm_resnet18d" / "summary.json").is_file()
    assert (d / "resnet18.onnx").stat().st_size > 0 and (d / "resnet18.pt2").stat().st_size > 0
    assert json.loads((d / "resnet18-onnx.json").read_text())["model"] == "resnet18.onnx"


def check_benchmarks(d: Path):
    outs = {cmd: d / f"{i:02d}.out" for i, cmd in enumerate(chain_commands("benchmarks")) if not skipped(cmd)}
    assert len(outs) >= 9
    for cmd, out in outs.items():  # each printed its Markdown table
        assert "|---|" in out.read_text(), (cmd, out.read_text()[-2000:])


CHECKS = {"demo": check_demo, "data": check_data, "tuning": check_tuning, "training": check_training,
          "seed": check_seed, "coarse": check_coarse, "models": check_models, "benchmarks": check_benchmarks}
