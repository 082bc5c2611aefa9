"""An exported model scored as its run is (`distseg evaluate --model`): the ONNX and torch.export graphs'
official mIoU equals the run's own evaluate in the same precision and inference mode (whole, and slide:
a dynamic graph given the windows, a fixed one slid in windows of its size), a difference (flip votes of
an argmax graph) is stated in the output, an export from before the metadata record is scored from its
prose, a custom scheme scores from the record alone, and every bad input is one error line."""

import json
import zipfile

import numpy as np
import pytest

from conftest import run_cli
from distseg.config import load_config
from distseg.errors import UserError
from distseg.flows.evaluate import score_checkpoint, score_export
from distseg.flows.export_info import VERSION, read_info, record
from distseg.flows.exported import load_exported
from distseg.labels import get_scheme
from distseg.runs.run_dir import load_run

TOL = 1e-4


@pytest.fixture(scope="module")
def exports(one_proc_run, tmp_path_factory):
    """From the run (256x128 images, data.crop [96,192]): a dynamic ONNX graph, a .pt2 fixed at the training
    crop (smaller than the images: slid), an argmax .pt2 fixed at the images' size (whole)."""
    from distseg.flows.export import export_run

    loaded, out = load_run(one_proc_run), tmp_path_factory.mktemp("exports")
    return {"onnx": export_run(loaded, "onnx", str(out / "dynamic.onnx"), 128, 256, dynamic=True),
            "window": export_run(loaded, "pt2", str(out / "window.pt2"), 96, 192),
            "argmax": export_run(loaded, "pt2", str(out / "argmax.pt2"), 128, 256, argmax=True)}


@pytest.fixture(scope="module")
def run_miou(one_proc_run, synth_root):
    """The run's own `evaluate` mIoU on val's source images, by inference settings."""
    modes = {"whole": (), "slide": ("eval.mode=slide",), "flip": ("eval.flip=true",)}
    return {k: score_checkpoint(str(one_proc_run), root=str(synth_root), overrides=v, precision="no")["miou"]
            for k, v in modes.items()}


def test_exported_graphs_score_as_their_run(exports, run_miou, synth_root, capsys):
    root = str(synth_root)
    assert score_export(exports["onnx"], root=root)["miou"] == pytest.approx(run_miou["whole"], abs=TOL)
    slid = score_export(exports["onnx"], root=root, overrides=("eval.mode=slide",))
    assert slid["miou"] == pytest.approx(run_miou["slide"], abs=TOL) and slid["inference"] == \
        "slide 192x96/128x64"
    capsys.readouterr()
    window = score_export(exports["window"], root=root)
    assert window["miou"] == pytest.approx(run_miou["slide"], abs=TOL)
    out = capsys.readouterr().out
    assert "note: window.pt2 is fixed at 192x96, smaller than the images: slid in windows of its size" in out
    assert "(torch.export; fixed 192x96, uint8 in, logits out, precision no, scheme trainid)" in out
    assert score_export(exports["argmax"], root=root)["miou"] == pytest.approx(run_miou["whole"], abs=TOL)
    assert run_miou["slide"] != pytest.approx(run_miou["whole"], abs=TOL)  # the modes differ here


def test_a_difference_from_the_run_is_stated(exports, run_miou, synth_root, capsys):
    """Flip TTA on an argmax graph: its two views vote instead of averaging logits, and the output says so."""
    voted = score_export(exports["argmax"], root=str(synth_root), overrides=("eval.flip=true",))
    out = capsys.readouterr().out
    said = ("the graph outputs classes, not logits: flips vote per pixel where `distseg evaluate --run` "
            "averages logits")
    assert f"note: {said}" in out and said in voted["notes"]
    assert "inference whole + flip, where the run's own settings say whole" in voted["notes"]
    print(f"flip: argmax export {voted['miou']:.5f}, run {run_miou['flip']:.5f}")


def test_on_shards_as_the_run(exports, one_proc_run, shards):
    ours = score_export(exports["onnx"], shards=str(shards))
    theirs = score_checkpoint(str(one_proc_run), shards=str(shards), precision="no")
    assert ours["official"] is False and ours["miou"] == pytest.approx(theirs["miou"], abs=TOL)


def rewrite_onnx(src, dst, change):
    """A copy of an ONNX file whose metadata_props went through `change(dict) -> dict`."""
    import onnx

    model = onnx.load(str(src))
    meta = change({e.key: e.value for e in model.metadata_props})
    del model.metadata_props[:]
    for k, v in meta.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = k, v
    onnx.save(model, str(dst))
    return dst


def test_an_export_from_before_the_record_is_scored_from_its_prose(exports, run_miou, synth_root, tmp_path):
    def old(meta):
        return {k: v for k, v in meta.items() if k != "distseg"}

    before = rewrite_onnx(exports["onnx"], tmp_path / "old.onnx", old)
    scores = score_export(before, root=str(synth_root))
    assert scores["miou"] == pytest.approx(run_miou["whole"], abs=TOL)
    assert "metadata from before version 1" in load_exported(before).describe()
    custom = rewrite_onnx(before, tmp_path / "custom.onnx", lambda m: dict(m, scheme="drive"))
    with pytest.raises(UserError, match="predates .* 'scheme' \\('drive'\\) is not a built-in scheme.*"
                                        "export it again with `distseg export`"):
        load_exported(custom)
    shapeless = rewrite_onnx(before, tmp_path / "shapeless.onnx", lambda m: dict(m, shape="any"))
    with pytest.raises(UserError, match="'shape' \\('any'\\) says neither"):
        load_exported(shapeless)


def test_a_custom_scheme_scores_from_the_record_alone(tmp_path):
    yaml = tmp_path / "drive.yaml"
    yaml.write_text("name: drive\nclasses:\n  - {name: road, labels: [road, parking]}\n"
                    "  - {name: vehicle, labels: [car, truck, bus]}\ndefault: ignore\n")
    scheme = get_scheme(str(yaml))
    rec = record(load_config(None, ["eval.flip=true"]), scheme, "w", True, False, (64, 128))
    yaml.unlink()
    info = read_info({"distseg": json.dumps(rec)}, "m.onnx")
    got = info.scheme
    assert got.fingerprint() == scheme.fingerprint() and got.class_names == ["road", "vehicle"]
    assert got.to_label_id == scheme.to_label_id and got.eval_classes == [0, 1] and not got.official
    assert np.array_equal(got.remap(np.array([7, 9, 26, 11])), [0, 0, 1, 255])
    assert info.size == (64, 128) and info.uint8 and not info.classes
    assert "eval.flip=true" in info.run_overrides()
    newer = dict(rec, version=VERSION + 1)
    with pytest.raises(UserError, match=f"version {VERSION + 1}; this distseg reads up to {VERSION}"):
        read_info({"distseg": json.dumps(newer)}, "m.onnx")


def test_each_difference_from_the_run_is_named():
    from types import SimpleNamespace

    from distseg.flows.exported import differences
    from distseg.inference.segmenter import InferenceSpec

    cfg = load_config(None, ["train.mixed_precision=bf16"])
    rec = record(cfg, get_scheme("trainid"), "w", True, True, None)
    graph = SimpleNamespace(info=read_info({"distseg": json.dumps(rec)}, "m.onnx"))
    notes = differences(graph, InferenceSpec("slide", (64, 128), (64, 128), scales=(0.5, 1.0)))
    assert notes == [
        "the export computes in precision no; its run trained in bf16, which `distseg evaluate --run` uses "
        "by default (pass it --precision no to compare like with like)",
        "inference slide 128x64/128x64 @ 0.5,1, where the run's own settings say whole",
        "the graph outputs classes, not logits: scales vote per pixel where `distseg evaluate --run` "
        "averages logits",  # windows that do not overlap do not vote
        "the uint8 graph sees rescaled images rounded to whole pixel values"]


def test_bad_inputs_are_one_line(exports, shards, synth_root, tmp_path, monkeypatch):
    cases = {tmp_path / "gone.onnx": "file not found", tmp_path / "notes.txt": "not an exported model",
             tmp_path / "junk.onnx": "onnxruntime cannot load it",
             tmp_path / "junk.pt2": "not a torch.export"}
    for path, needle in cases.items():
        if "gone" not in path.name:
            path.write_text("not a model")
        with pytest.raises(UserError, match=needle):
            load_exported(path)
    with pytest.raises(UserError, match="precision no as exported.*--precision bf16 cannot apply"):
        score_export(exports["onnx"], root=str(synth_root), precision="bf16")
    with pytest.raises(UserError, match="fixed at 256x128, larger than the 192x96 images \\(scaled\\)"):
        score_export(exports["argmax"], root=str(synth_root), overrides=("eval.scales=[0.75,1.0]",))
    category = get_scheme("category")

    def other_scheme(meta):
        rec = json.loads(meta["distseg"])
        rec["scheme"] = record(load_config(None), category, "", True, False, None)["scheme"]
        return dict(meta, distseg=json.dumps(rec))

    wrong = rewrite_onnx(exports["onnx"], tmp_path / "category.onnx", other_scheme)
    with pytest.raises(UserError, match="shards of scheme 'trainid' but .*category.onnx predicts scheme "
                                        "'category'"):
        score_export(wrong, shards=str(shards))
    foreign = rewrite_onnx(exports["onnx"], tmp_path / "foreign.onnx", lambda m: {})
    with pytest.raises(UserError, match="carries no distseg metadata"):
        load_exported(foreign)
    monkeypatch.setitem(__import__("sys").modules, "onnxruntime", None)
    with pytest.raises(UserError, match='pip install "distseg\\[export\\]"'):
        load_exported(exports["onnx"])


def test_the_pt2_record_and_the_command_line(exports, one_proc_run, synth_root, tmp_path):
    from distseg.commands.evaluate import evaluate

    with zipfile.ZipFile(exports["window"]) as z:
        meta = json.loads(z.read(next(n for n in z.namelist() if n.endswith("distseg.json"))))
    assert meta["shape"] == "fixed 96x192 (H x W)" and meta["distseg"]["size"] == [96, 192]
    assert meta["distseg"]["run"]["settings"]["data.crop"] == [96, 192]
    with pytest.raises(UserError, match="pass one of --run RUN"):
        evaluate.main(["--run", str(one_proc_run), "--model", str(exports["onnx"])], standalone_mode=False)
    with pytest.raises(UserError, match="--model scores the file's"):
        evaluate.main(["--model", str(exports["onnx"]), "--weights", "raw"], standalone_mode=False)
    p = run_cli("evaluate", "--model", exports["onnx"], "--root", synth_root, "--split", "val", "--json",
                tmp_path / "s.json")
    assert "dynamic.onnx (onnxruntime; dynamic, uint8 in, logits out" in p.stdout
    assert "Score Average" in p.stdout
    assert json.loads((tmp_path / "s.json").read_text())["model"] == str(exports["onnx"])


def test_bench_eval_times_the_export_beside_the_model(exports, one_proc_run):
    from distseg.bench.eval import bench_eval

    cfg = load_config(one_proc_run / "config.yaml")
    out = bench_eval(cfg, ["slide", "ms"], (256, 128), 1, 1, "no", (64, 128), (64, 128),
                     exported=str(exports["argmax"]))
    rows = {line.split("|")[1].strip(): line.split("|")[2:4] for line in out.splitlines()
            if line.startswith("| ") and not line.startswith("| mode")}
    assert list(rows) == ["slide", "ms", "slide, export", "ms, export"]
    assert rows["slide, export"][0].strip() == "slide 256x128/128x64" and float(rows["slide, export"][1]) > 0
    refused = rows["ms, export"][0]
    assert "refused: " in refused and "larger than the 192x96 images (scaled)" in refused
    assert "rows `, export`: " in out
    assert "argmax.pt2 (torch.export; fixed 256x128, uint8 in, classes out" in out
