"""The leaves: the Cityscapes label table and its schemes (against cityscapesscripts), and the config's
messages for every kind of mistake."""

import numpy as np
import pytest

from distseg.errors import UserError
from distseg.labels import IGNORE, LABELS, get_scheme

cs = pytest.importorskip("cityscapesscripts.helpers.labels")


def test_table_matches_cityscapesscripts():
    ours = [tuple(lab) for lab in LABELS]
    theirs = [(lab.name, lab.id, lab.trainId, lab.category, lab.categoryId, lab.hasInstances,
               lab.ignoreInEval, tuple(lab.color)) for lab in cs.labels]
    assert ours == theirs


def test_trainid_lut_matches_official_mapping():
    s = get_scheme("trainid")
    assert s.num_classes == 19
    for lab in cs.labels:
        if lab.id >= 0:
            want = lab.trainId if 0 <= lab.trainId < 255 else IGNORE
            assert s.lut[lab.id] == want, lab.name
    assert s.lut[IGNORE] == IGNORE
    # results exporter: trainId -> id is the official inverse
    assert [s.export_lut()[t] for t in range(19)] == [cs.trainId2label[t].id for t in range(19)]


def test_category_and_binary_schemes():
    cat = get_scheme("category")
    assert cat.class_names == ["flat", "construction", "object", "nature", "sky", "human", "vehicle"]
    for lab in cs.labels:
        if lab.id >= 0:
            want = IGNORE if (lab.ignoreInEval or lab.categoryId == 0) else lab.categoryId - 1
            assert cat.lut[lab.id] == want, lab.name
    auto = get_scheme("automobile")
    fg = {cs.name2label[n].id for n in ("car", "truck", "bus", "caravan", "trailer")}
    assert {i for i in range(256) if auto.lut[i] == 1} == fg
    assert set(np.unique(auto.lut[:34])) == {0, 1}
    person = get_scheme("person")
    assert [i for i in range(256) if person.lut[i] == 1] == [cs.name2label["person"].id]
    lid = get_scheme("labelid")
    assert (lid.remap(np.arange(34)) == np.arange(34)).all()


def test_custom_scheme(tmp_path):
    p = tmp_path / "drive.yaml"
    p.write_text("name: drive\nclasses:\n  - {name: road, labels: [road, parking]}\n"
                 "  - {name: vehicle, labels: [car, 27]}\ndefault: ignore\n")
    s = get_scheme(str(p))
    assert s.name == "drive" and s.class_names == ["road", "vehicle"]
    assert s.lut[7] == 0 and s.lut[9] == 0 and s.lut[26] == 1 and s.lut[27] == 1 and s.lut[23] == IGNORE
    p.write_text("classes:\n  - {name: a, labels: [road]}\n  - {name: b, labels: [road]}\n")
    with pytest.raises(UserError, match="two classes"):
        get_scheme(str(p))
    p.write_text("classes:\n  - {name: a, labels: [roadd]}\n")
    with pytest.raises(UserError, match="unknown Cityscapes label 'roadd'"):
        get_scheme(str(p))
    with pytest.raises(UserError, match="unknown scheme"):
        get_scheme("nope")


def test_config_errors(tmp_path):
    from distseg.config import load_config
    from distseg.errors import UserError

    cfg = load_config(None, ["train.epochs=3", "data.crop=[64,128]", "model.norm=group"])
    assert cfg.train.epochs == 3 and cfg.data.crop == [64, 128] and cfg.model.norm == "group"
    for ov, msg in [("train.epoch=3", "unknown key train.epoch"),
                    ("train.epochs=abc", "train.epochs must be int"),
                    ("model.norm=layer", "model.norm must be one of"), ("data.batch_size=0", "at least 1"),
                    ("trainepochs", "bad override")]:
        with pytest.raises(UserError, match=msg):
            load_config(None, [ov])
    with pytest.raises(UserError, match="config file not found"):
        load_config(tmp_path / "none.yaml")


def test_the_precision_a_model_runs_in_is_the_runs_own_unless_given():
    from distseg.config import PRECISIONS, RUN_PRECISION, inference_precision, load_config
    from distseg.errors import UserError

    cfg = load_config(None, ["train.mixed_precision=bf16"])
    assert inference_precision(RUN_PRECISION, cfg) == inference_precision(None, cfg) == "bf16"
    assert [inference_precision(p, cfg) for p in PRECISIONS] == list(PRECISIONS)
    with pytest.raises(UserError, match=f"train.mixed_precision must be one of {', '.join(PRECISIONS)}"):
        load_config(None, ["train.mixed_precision=fp8"])


def test_workers_are_capped_to_the_cores_with_one_note(monkeypatch, capsys):
    import os
    import warnings

    import torch

    from distseg import processes

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setattr(processes, "_NOTED", set())
    assert processes.usable_workers(2, "data.num_workers") == 2 and capsys.readouterr().out == ""
    assert processes.usable_workers(8, "data.num_workers") == 2
    assert processes.usable_workers(8, "data.num_workers") == 2  # the train and the val loader: one note
    assert capsys.readouterr().out == ("note: data.num_workers=8 is more than the 2 cores here: using 2 "
                                       "workers\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's own warning about too many workers would fail here
        torch.utils.data.DataLoader(range(4), num_workers=processes.usable_workers(8, "data.num_workers"))
        with pytest.raises(UserWarning, match="worker processes in total"):  # (and does, uncapped)
            torch.utils.data.DataLoader(range(4), num_workers=8)
