"""Cityscapes label table and remap schemes.

Every remap is a 256-entry uint8 lookup table built from this one table, so the shard writer, the
loaders (load-time remap of a `labelid` shard) and the results exporter (class -> labelId) cannot
disagree. IGNORE (255) is the one ignore label everywhere.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np

from distseg.errors import UserError

IGNORE = 255


class Label(NamedTuple):
    """One row of the Cityscapes label table (cityscapesScripts' labels.py)."""
    name: str
    id: int
    trainId: int
    category: str
    categoryId: int
    hasInstances: bool
    ignoreInEval: bool
    color: tuple[int, int, int]


# fmt: off
LABELS: list[Label] = [
    Label("unlabeled",             0, 255, "void",         0, False, True,  (0, 0, 0)),
    Label("ego vehicle",           1, 255, "void",         0, False, True,  (0, 0, 0)),
    Label("rectification border",  2, 255, "void",         0, False, True,  (0, 0, 0)),
    Label("out of roi",            3, 255, "void",         0, False, True,  (0, 0, 0)),
    Label("static",                4, 255, "void",         0, False, True,  (0, 0, 0)),
    Label("dynamic",               5, 255, "void",         0, False, True,  (111, 74, 0)),
    Label("ground",                6, 255, "void",         0, False, True,  (81, 0, 81)),
    Label("road",                  7,   0, "flat",         1, False, False, (128, 64, 128)),
    Label("sidewalk",              8,   1, "flat",         1, False, False, (244, 35, 232)),
    Label("parking",               9, 255, "flat",         1, False, True,  (250, 170, 160)),
    Label("rail track",           10, 255, "flat",         1, False, True,  (230, 150, 140)),
    Label("building",             11,   2, "construction", 2, False, False, (70, 70, 70)),
    Label("wall",                 12,   3, "construction", 2, False, False, (102, 102, 156)),
    Label("fence",                13,   4, "construction", 2, False, False, (190, 153, 153)),
    Label("guard rail",           14, 255, "construction", 2, False, True,  (180, 165, 180)),
    Label("bridge",               15, 255, "construction", 2, False, True,  (150, 100, 100)),
    Label("tunnel",               16, 255, "construction", 2, False, True,  (150, 120, 90)),
    Label("pole",                 17,   5, "object",       3, False, False, (153, 153, 153)),
    Label("polegroup",            18, 255, "object",       3, False, True,  (153, 153, 153)),
    Label("traffic light",        19,   6, "object",       3, False, False, (250, 170, 30)),
    Label("traffic sign",         20,   7, "object",       3, False, False, (220, 220, 0)),
    Label("vegetation",           21,   8, "nature",       4, False, False, (107, 142, 35)),
    Label("terrain",              22,   9, "nature",       4, False, False, (152, 251, 152)),
    Label("sky",                  23,  10, "sky",          5, False, False, (70, 130, 180)),
    Label("person",               24,  11, "human",        6, True,  False, (220, 20, 60)),
    Label("rider",                25,  12, "human",        6, True,  False, (255, 0, 0)),
    Label("car",                  26,  13, "vehicle",      7, True,  False, (0, 0, 142)),
    Label("truck",                27,  14, "vehicle",      7, True,  False, (0, 0, 70)),
    Label("bus",                  28,  15, "vehicle",      7, True,  False, (0, 60, 100)),
    Label("caravan",              29, 255, "vehicle",      7, True,  True,  (0, 0, 90)),
    Label("trailer",              30, 255, "vehicle",      7, True,  True,  (0, 0, 110)),
    Label("train",                31,  16, "vehicle",      7, True,  False, (0, 80, 100)),
    Label("motorcycle",           32,  17, "vehicle",      7, True,  False, (0, 0, 230)),
    Label("bicycle",              33,  18, "vehicle",      7, True,  False, (119, 11, 32)),
    Label("license plate",        -1,  -1, "vehicle",      7, False, True,  (0, 0, 142)),
]
# fmt: on

NAME2LABEL = {lab.name: lab for lab in LABELS}
ID2LABEL = {lab.id: lab for lab in LABELS}
CATEGORIES = ["flat", "construction", "object", "nature", "sky", "human", "vehicle"]
CATEGORY_COLORS = {  # the colour of each category's most common label
    "flat": (128, 64, 128), "construction": (70, 70, 70), "object": (153, 153, 153),
    "nature": (107, 142, 35), "sky": (70, 130, 180), "human": (220, 20, 60), "vehicle": (0, 0, 142),
}
BUILTIN_SCHEMES = ("trainid", "category", "automobile", "person", "labelid")


@dataclass
class Scheme:
    """A remap from Cityscapes labelIds to training classes (0..num_classes-1, IGNORE = ignore)."""

    name: str
    class_names: list[str]
    lut: np.ndarray  # (256,) uint8: labelId -> class value
    colors: list[tuple[int, int, int]]
    to_label_id: list[int]  # class value -> labelId, for the official results format
    source: str = ""  # path of a custom YAML scheme, "" for a built-in one
    eval_classes: list[int] = field(default_factory=list)  # classes that count in mIoU

    @property
    def num_classes(self) -> int:
        """Number of training classes (IGNORE is not one)."""
        return len(self.class_names)

    @property
    def official(self) -> bool:
        """Its class maps export to Cityscapes label ids: the official results format and scores apply."""
        return not self.source and self.name in ("trainid", "labelid")

    def remap(self, label_ids: np.ndarray) -> np.ndarray:
        """Map a labelIds array (any integer dtype) to class values (uint8)."""
        return self.lut[np.asarray(label_ids, dtype=np.uint8)]

    def palette(self) -> np.ndarray:
        """(256, 3) uint8 colours indexed by class value; ignore is black."""
        pal = np.zeros((256, 3), np.uint8)
        for i, c in enumerate(self.colors):
            pal[i] = c
        return pal

    def export_lut(self) -> np.ndarray:
        """(256,) uint8: class value -> labelId (ignore -> 0 'unlabeled')."""
        lut = np.zeros(256, np.uint8)
        for i, lid in enumerate(self.to_label_id):
            lut[i] = lid
        return lut

    def fingerprint(self) -> str:
        """Short hash of the LUT and class names: two schemes with one fingerprint remap identically."""
        h = hashlib.sha256(self.lut.tobytes() + "\0".join(self.class_names).encode())
        return h.hexdigest()[:16]

    def describe(self) -> dict:
        """Name, classes and fingerprint, as stored in manifests and checkpoints."""
        return {"name": self.name, "num_classes": self.num_classes, "class_names": self.class_names,
                "fingerprint": self.fingerprint(), "source": self.source}


def _table_lut(mapping: dict[int, int]) -> np.ndarray:
    lut = np.full(256, IGNORE, np.uint8)
    for lid, cls in mapping.items():
        if 0 <= lid < 256:
            lut[lid] = cls
    return lut


def _binary(name: str, members: list[str]) -> Scheme:
    ids = {NAME2LABEL[m].id for m in members}
    # every real label is either foreground or background: a binary task has nothing to ignore
    lut = np.zeros(256, np.uint8)
    for lid in ids:
        lut[lid] = 1
    fg = NAME2LABEL[members[0]]
    return Scheme(name, ["background", name], lut, [(0, 0, 0), fg.color], [0, fg.id], eval_classes=[0, 1])


def _trainid() -> Scheme:
    train = sorted((lab for lab in LABELS if 0 <= lab.trainId < IGNORE), key=lambda lab: lab.trainId)
    lut = _table_lut({lab.id: lab.trainId for lab in LABELS if lab.id >= 0})
    return Scheme("trainid", [lab.name for lab in train], lut, [lab.color for lab in train],
                  [lab.id for lab in train], eval_classes=list(range(len(train))))


def _category() -> Scheme:
    mapping = {lab.id: lab.categoryId - 1 for lab in LABELS
               if lab.id >= 0 and lab.categoryId > 0 and not lab.ignoreInEval}
    first = {}
    for lab in LABELS:
        if lab.id >= 0 and lab.id in mapping:
            first.setdefault(mapping[lab.id], lab.id)
    return Scheme("category", list(CATEGORIES), _table_lut(mapping), [CATEGORY_COLORS[c] for c in CATEGORIES],
                  [first[i] for i in range(len(CATEGORIES))], eval_classes=list(range(len(CATEGORIES))))


def _labelid() -> Scheme:
    real = [lab for lab in LABELS if lab.id >= 0]
    lut = np.arange(256, dtype=np.uint8)
    lut[IGNORE] = IGNORE
    return Scheme("labelid", [lab.name for lab in real], lut, [lab.color for lab in real],
                  [lab.id for lab in real], eval_classes=[lab.id for lab in real if not lab.ignoreInEval])


def _custom(path: Path) -> Scheme:
    import yaml

    try:
        spec = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise UserError(f"cannot read scheme file {path}: {e}") from None
    where = f"scheme file {path}"
    if not isinstance(spec, dict) or not isinstance(spec.get("classes"), list) or not spec["classes"]:
        raise UserError(f"{where}: expected a mapping with a non-empty list 'classes' "
                        "(each {name: ..., labels: [...]})")
    names, colors, to_id, mapping = [], [], [], {}
    for i, entry in enumerate(spec["classes"]):
        if not isinstance(entry, dict) or "name" not in entry or not isinstance(entry.get("labels"), list):
            raise UserError(f"{where}: classes[{i}] needs 'name' and a list 'labels'")
        for lab in entry["labels"]:
            label = NAME2LABEL.get(lab) if isinstance(lab, str) else ID2LABEL.get(lab)
            if label is None or label.id < 0:
                raise UserError(f"{where}: classes[{i}] ({entry['name']}): unknown Cityscapes label {lab!r}")
            if label.id in mapping:
                raise UserError(f"{where}: label {label.name!r} is listed in two classes")
            mapping[label.id] = i
        first = (NAME2LABEL.get(entry["labels"][0]) if isinstance(entry["labels"][0], str)
                 else ID2LABEL[entry["labels"][0]]) if entry["labels"] else ID2LABEL[0]
        names.append(str(entry["name"]))
        colors.append(tuple(entry.get("color", first.color)))
        to_id.append(first.id)
    if len(names) > 254:
        raise UserError(f"{where}: at most 254 classes")
    default = spec.get("default", "ignore")
    if default == "ignore":
        fill = IGNORE
    elif default in names:
        fill = names.index(default)
    else:
        raise UserError(f"{where}: 'default' must be 'ignore' or one of the class names, not {default!r}")
    for lab in LABELS:
        if lab.id >= 0 and lab.id not in mapping:
            mapping[lab.id] = fill
    name = str(spec.get("name", path.stem))
    return Scheme(name, names, _table_lut(mapping), colors, to_id, source=str(path),
                  eval_classes=list(range(len(names))))


# the Cityscapes spellings people type: trainIds, labelIds, categoryId, ... (case and plural ignored)
ALIASES = {"trainids": "trainid", "labelids": "labelid", "categories": "category", "categoryid": "category",
           "categoryids": "category", "automobiles": "automobile", "persons": "person", "people": "person"}


def get_scheme(name: str) -> Scheme:
    """A built-in scheme by name (any case, Cityscapes spellings such as trainIds), or a YAML file."""
    if not name.endswith((".yaml", ".yml")):
        name = ALIASES.get(name.lower(), name.lower())
    if name == "trainid":
        return _trainid()
    if name == "category":
        return _category()
    if name == "automobile":
        return _binary("automobile", ["car", "truck", "bus", "caravan", "trailer"])
    if name == "person":
        return _binary("person", ["person"])
    if name == "labelid":
        return _labelid()
    p = Path(name)
    if p.suffix in (".yaml", ".yml"):
        if not p.is_file():
            raise UserError(f"scheme file not found: {p}")
        return _custom(p)
    raise UserError(f"unknown scheme {name!r}: use one of {', '.join(BUILTIN_SCHEMES)} or a .yaml file")
