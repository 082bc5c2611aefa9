"""Synthetic Cityscapes-format data: street-like scenes a U-Net can learn, deterministic by seed.

The tree has the real layout and file names (leftImg8bit/<split>/<city>/<city>_<seq>_<frame>_leftImg8bit.png,
gtFine/... _gtFine_labelIds.png, _color.png, _instanceIds.png), so every tool that reads Cityscapes reads
it. Each class has its own colour family and texture, with random geometry, so the task is learnable but not
trivial.

With a `train_extra` count (`distseg synth --extra N`) the tree also has coarse labels as the real dataset
has them: leftImg8bit/train_extra (cities of the real train_extra, bad-honnef among them) with only
gtCoarse/train_extra, and gtCoarse/train and gtCoarse/val beside every fine image. A coarse map is its fine
map with every region (a value of the instanceIds map: an object, or a class's stuff) eroded by a margin, so
boundaries stay 'unlabeled' (0), and some regions left out entirely, chosen by (seed, split, index). Without
train_extra not a byte changes.

The plain scenes hold 10 of the 19 train classes, car in every image. With `rare` (`distseg synth --rare`) a
few images also hold a small object of a real rare class: a bus, a rider (on a bicycle) or a motorcycle,
each in 1 image of 20 (`rare_kinds`), drawn over the scene with a generator of its own, so every other image,
and every pixel of these images outside the objects, keeps its bytes. Without `rare` not a byte changes.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from distseg.files import atomic_save_png
from distseg.labels import ID2LABEL, NAME2LABEL

CITIES = {"train": ["aachen", "bochum"], "val": ["frankfurt"], "test": ["berlin"],
          "train_extra": ["augsburg", "bad-honnef", "bamberg", "bayreuth", "dortmund"]}
COARSE_SPLITS = ("train", "val", "train_extra")  # the real gtCoarse has these (test has no coarse labels)
COARSE_DROP = {"stuff": 0.1, "object": 0.3}  # the chance that a region has no coarse label at all
L = {name: NAME2LABEL[name].id for name in
     ("unlabeled", "ego vehicle", "road", "sidewalk", "building", "pole", "traffic sign", "vegetation",
      "sky", "person", "car", "rider", "bus", "motorcycle", "bicycle")}
RARE = ("bus", "rider", "motorcycle")  # real Cityscapes classes (labelIds 28, 25, 32) the plain scenes lack;
# a rider rides a bicycle (33), which so appears in as many images
RARE_PERIOD, RARE_SPAN = 20, 12  # each in one image of every 20, among the period's first 12 (val has 12)


def _jitter(rng: np.random.Generator, base: tuple[int, int, int], amount: int) -> tuple[int, int, int]:
    return tuple(int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255)) for c in base)


class Canvas:
    """The three images of a scene drawn together: every shape goes into the RGB image with its colour, into
    the labelIds image with its label, and into the instanceIds image with its instance id (or its label
    for a class without instances), so the three always agree."""

    def __init__(self, width: int, height: int):
        self.W, self.H = width, height
        self.img, self.lab, self.inst = (Image.new(m, (width, height)) for m in ("RGB", "L", "I"))
        self._draws = [ImageDraw.Draw(im) for im in (self.img, self.lab, self.inst)]

    def draw(self, kind: str, xy, label: int, color, instance: int | None = None, **kw) -> None:
        """One shape (`rectangle`, `ellipse`, `polygon`, `line`) in all three images."""
        for d, fill in zip(self._draws, (color, label, label if instance is None else instance)):
            getattr(d, kind)(xy, fill=fill, **kw)


@dataclass
class Road:
    """Where the road runs: its vanishing point's x and half widths at the horizon and at the bottom."""

    horizon: int
    vx: int
    half_top: float
    half_bot: float


def draw_sky_and_buildings(c: Canvas, rng: np.random.Generator, horizon: int) -> None:
    """A vertical blue gradient, then a row of blocks with windows."""
    W, H = c.W, c.H
    top, bottom = np.array(_jitter(rng, (90, 140, 210), 25)), np.array(_jitter(rng, (170, 200, 235), 20))
    for y in range(horizon + 1):
        t = y / max(horizon, 1)
        c.draw("line", [(0, y), (W, y)], L["sky"], tuple(int(v) for v in top * (1 - t) + bottom * t))
    x = int(-rng.integers(0, W // 8))
    while x < W:
        bw = int(rng.integers(W // 10, W // 4))
        btop = int(rng.integers(int(H * 0.05), max(int(H * 0.06), horizon - H // 10)))
        color = _jitter(rng, (110, 100, 95), 40)
        c.draw("rectangle", [x, btop, x + bw, horizon + H // 20], L["building"], color)
        win = tuple(max(0, v - 55) for v in color)
        ws = max(2, W // 80)
        for wy in range(btop + ws, horizon - ws, ws * 3):
            for wx in range(x + ws, x + bw - ws, ws * 3):
                c.draw("rectangle", [wx, wy, wx + ws, wy + ws], L["building"], win)
        x += bw + int(rng.integers(0, W // 30))


def draw_trees(c: Canvas, rng: np.random.Generator, horizon: int) -> None:
    """Trees behind the sidewalk: a trunk (pole) and a crown (vegetation)."""
    W, H = c.W, c.H
    for _ in range(int(rng.integers(1, 4))):
        cx, cy = int(rng.integers(0, W)), int(horizon - rng.integers(0, H // 8))
        r = int(rng.integers(H // 14, H // 7))
        c.draw("rectangle", [cx - max(1, r // 6), cy, cx + max(1, r // 6), horizon + H // 20], L["pole"],
               _jitter(rng, (90, 70, 50), 10))
        c.draw("ellipse", [cx - r, cy - 2 * r, cx + r, cy], L["vegetation"], _jitter(rng, (60, 130, 40), 25))


def draw_ground(c: Canvas, rng: np.random.Generator, horizon: int) -> Road:
    """Sidewalk everywhere below the horizon, then the road as a trapezoid to a vanishing point with a
    dashed centre line (still road)."""
    W, H = c.W, c.H
    c.draw("rectangle", [0, horizon, W, H], L["sidewalk"], _jitter(rng, (200, 180, 190), 20))
    road = Road(horizon, int(W * rng.uniform(0.35, 0.65)), W * 0.04, W * rng.uniform(0.42, 0.6))
    vx, half_top, half_bot = road.vx, road.half_top, road.half_bot
    corners = [(vx - half_top, horizon), (vx + half_top, horizon), (W / 2 + half_bot, H),
               (W / 2 - half_bot, H)]
    c.draw("polygon", corners, L["road"], _jitter(rng, (85, 75, 90), 12))
    for k in range(6):
        t0, t1 = (k + 0.2) / 6, (k + 0.6) / 6
        ya, yb = horizon + (H - horizon) * t0 ** 1.5, horizon + (H - horizon) * t1 ** 1.5
        xa = vx + (W / 2 - vx) * (ya - horizon) / (H - horizon)
        xb = vx + (W / 2 - vx) * (yb - horizon) / (H - horizon)
        c.draw("line", [(xa, ya), (xb, yb)], L["road"], (200, 200, 190),
               width=max(1, int(W / 200 * (1 + 3 * t1))))
    return road


def draw_poles(c: Canvas, rng: np.random.Generator, horizon: int) -> None:
    """Poles with signs along the sidewalk."""
    W, H = c.W, c.H
    for _ in range(int(rng.integers(0, 3))):
        px, pw = int(rng.integers(0, W)), max(2, W // 150)
        ptop = int(horizon - rng.integers(H // 10, H // 4))
        pbot = int(horizon + rng.integers(H // 20, H // 5))
        c.draw("rectangle", [px, ptop, px + pw, pbot], L["pole"], _jitter(rng, (150, 150, 150), 15))
        s = max(3, W // 50)
        c.draw("rectangle", [px - s, ptop - s, px + pw + s, ptop + s], L["traffic sign"],
               _jitter(rng, (220, 210, 20), 20))


def draw_car(c: Canvas, rng: np.random.Generator, road: Road, depth: float, iid: int) -> None:
    """A car on the road at `depth` (0 at the horizon, 1 at the bottom): body, cabin, windows, wheels."""
    W, H = c.W, c.H
    y, scale = road.horizon + (H - road.horizon) * depth, 0.15 + 0.85 * depth
    cw, ch = W * 0.16 * scale, H * 0.12 * scale
    span = road.half_top + (road.half_bot - road.half_top) * depth
    cx = road.vx + (W / 2 - road.vx) * depth + rng.uniform(-0.7, 0.7) * span
    color = tuple(int(v) for v in rng.integers(20, 235, 3))
    c.draw("rectangle", [cx - cw / 2, y - ch, cx + cw / 2, y - ch * 0.2], L["car"], color, iid)
    c.draw("rectangle", [cx - cw / 3, y - ch * 1.45, cx + cw / 3, y - ch], L["car"],
           tuple(min(255, v + 30) for v in color), iid)
    c.draw("rectangle", [cx - cw / 3.6, y - ch * 1.35, cx + cw / 3.6, y - ch * 1.02], L["car"], (40, 50, 60),
           iid)
    for wx in (cx - cw / 3, cx + cw / 3):
        c.draw("ellipse", [wx - ch * 0.22, y - ch * 0.42, wx + ch * 0.22, y], L["car"], (15, 15, 15), iid)


def draw_person(c: Canvas, rng: np.random.Generator, road: Road, depth: float, iid: int) -> None:
    """A pedestrian beside the road at `depth`: torso, legs, head."""
    W, H = c.W, c.H
    y, scale = road.horizon + (H - road.horizon) * depth, 0.15 + 0.85 * depth
    ph, pw = H * 0.28 * scale, W * 0.022 * scale
    side = rng.choice([-1.0, 1.0])
    off = road.half_top + (road.half_bot - road.half_top) * depth + rng.uniform(2, W * 0.08)
    cx = road.vx + (W / 2 - road.vx) * depth + side * off
    cloth = tuple(int(v) for v in rng.integers(20, 200, 3))
    c.draw("rectangle", [cx - pw, y - ph * 0.85, cx + pw, y - ph * 0.45], L["person"], cloth, iid)
    c.draw("rectangle", [cx - pw * 0.8, y - ph * 0.45, cx + pw * 0.8, y], L["person"],
           _jitter(rng, (40, 40, 70), 20), iid)
    c.draw("ellipse", [cx - pw * 0.7, y - ph, cx + pw * 0.7, y - ph * 0.83], L["person"],
           _jitter(rng, (225, 180, 150), 20), iid)


def _place(c: Canvas, rng: np.random.Generator, road: Road, depth: float, width: float, edge: bool
           ) -> tuple[float, float, float]:
    """(x, y, scale) of a rare object `width` wide at `depth`: on the road (`edge`: near one of its edges),
    kept inside the image so that all of it is seen."""
    y, scale = road.horizon + (c.H - road.horizon) * depth, 0.15 + 0.85 * depth
    span = road.half_top + (road.half_bot - road.half_top) * depth
    off = rng.choice([-1.0, 1.0]) * rng.uniform(0.55, 0.9) if edge else rng.uniform(-0.5, 0.5)
    x = road.vx + (c.W / 2 - road.vx) * depth + off * span
    return float(np.clip(x, width / 2 + 1, c.W - width / 2 - 1)), y, scale


def draw_bus(c: Canvas, rng: np.random.Generator, road: Road, iid: int) -> None:
    """A bus far down the road: a long, tall yellow body, a band of windows, two wheels."""
    depth = float(rng.uniform(0.05, 0.35))
    bw = max(8.0, c.W * 0.3 * (0.15 + 0.85 * depth))
    x, y, scale = _place(c, rng, road, depth, bw, edge=False)
    bh = max(5.0, c.H * 0.2 * scale)
    c.draw("rectangle", [x - bw / 2, y - bh, x + bw / 2, y - bh * 0.12], L["bus"],
           _jitter(rng, (225, 190, 40), 25), iid)
    c.draw("rectangle", [x - bw * 0.45, y - bh * 0.9, x + bw * 0.45, y - bh * 0.55], L["bus"], (35, 45, 60),
           iid)
    r = max(1.0, bh * 0.15)
    for wx in (x - bw * 0.32, x + bw * 0.32):
        c.draw("ellipse", [wx - r, y - 2 * r, wx + r, y], L["bus"], (15, 15, 15), iid)


def draw_two_wheeler(c: Canvas, rng: np.random.Generator, road: Road, kind: str, iid: int
                     ) -> tuple[float, float, float]:
    """A motorcycle (two wheels, a red body) or a bicycle (two wheels, a thin blue frame) near the road's
    edge; returns its (x, top, width) for a rider."""
    depth = float(rng.uniform(0.2, 0.6))
    mw = max(5.0, c.W * 0.06 * (0.15 + 0.85 * depth))
    x, y, scale = _place(c, rng, road, depth, mw, edge=True)
    mh, r = max(4.0, c.H * 0.07 * scale), max(1.0, mw * 0.2)
    for wx in (x - mw / 2 + r, x + mw / 2 - r):
        c.draw("ellipse", [wx - r, y - 2 * r, wx + r, y], L[kind], (20, 20, 20), iid)
    if kind == "motorcycle":
        c.draw("rectangle", [x - mw * 0.3, y - mh, x + mw * 0.3, y - r], L[kind],
               _jitter(rng, (190, 30, 30), 30), iid)
    else:
        frame = [(x - mw / 2 + r, y - r), (x, y - mh), (x + mw / 2 - r, y - r)]
        c.draw("line", frame, L[kind], _jitter(rng, (40, 90, 200), 30), iid, width=max(1, int(mw / 8)))
    return x, y - mh, mw


def draw_rider(c: Canvas, rng: np.random.Generator, road: Road, iids: tuple[int, int]) -> None:
    """A rider on a bicycle: the bicycle (its own instance), then a torso in an orange jacket and a white
    helmet above it."""
    x, top, mw = draw_two_wheeler(c, rng, road, "bicycle", iids[1])
    th, tw = max(3.0, mw * 0.9), max(1.0, mw * 0.18)
    c.draw("rectangle", [x - tw, top - th, x + tw, top + th * 0.2], L["rider"],
           _jitter(rng, (240, 120, 20), 20), iids[0])
    c.draw("ellipse", [x - tw * 1.2, top - th * 1.5, x + tw * 1.2, top - th * 0.95], L["rider"],
           _jitter(rng, (235, 235, 235), 10), iids[0])


def draw_objects(c: Canvas, rng: np.random.Generator, road: Road, rare: Sequence[str] = (),
                 rare_gen: np.random.Generator | None = None) -> None:
    """Cars and people, drawn far to near so that nearer ones cover farther ones, then the `rare` objects
    (drawn with `rare_gen`, so the scene's own generator and every other pixel are untouched) over them, so
    that each one is seen; instance ids as Cityscapes numbers them (label x 1000 + index)."""
    objects = [("car", float(rng.uniform(0.15, 0.95))) for _ in range(int(rng.integers(1, 5)))]
    objects += [("person", float(rng.uniform(0.05, 0.9))) for _ in range(int(rng.integers(0, 4)))]
    count = {"car": 0, "person": 0}
    for kind, depth in sorted(objects, key=lambda o: o[1]):
        iid = L[kind] * 1000 + count[kind]
        count[kind] += 1
        (draw_car if kind == "car" else draw_person)(c, rng, road, depth, iid)
    for kind in rare:  # one object of each kind at most (`rare_kinds`): instance index 0
        if kind == "bus":
            draw_bus(c, rare_gen, road, L[kind] * 1000)
        elif kind == "motorcycle":
            draw_two_wheeler(c, rare_gen, road, kind, L[kind] * 1000)
        else:
            draw_rider(c, rare_gen, road, (L[kind] * 1000, L["bicycle"] * 1000))


def render_scene(rng: np.random.Generator, width: int, height: int, rare: Sequence[str] = (),
                 rare_gen: np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One scene: (RGB uint8 HxWx3, labelIds uint8 HxW, instanceIds int32 HxW), back to front; `rare`
    objects drawn with `rare_gen` (`rare_kinds`, `rare_rng`)."""
    c = Canvas(width, height)
    horizon = int(height * rng.uniform(0.38, 0.52))
    draw_sky_and_buildings(c, rng, horizon)
    draw_trees(c, rng, horizon)
    road = draw_ground(c, rng, horizon)
    draw_poles(c, rng, horizon)
    draw_objects(c, rng, road, rare, rare_gen)
    # the ego vehicle's hood at the bottom (void in Cityscapes, ignored by training)
    hood = int(height * rng.uniform(0.03, 0.08))
    c.draw("ellipse", [-width * 0.1, height - hood, width * 1.1, height + hood], L["ego vehicle"],
           (20, 20, 25))
    # sensor noise and exposure
    rgb = np.asarray(c.img, dtype=np.float32) * rng.uniform(0.8, 1.15)
    rgb += rng.normal(0.0, 5.0, rgb.shape)
    return (np.clip(rgb, 0, 255).astype(np.uint8), np.asarray(c.lab, np.uint8).copy(),
            np.asarray(c.inst, np.int32).copy())


def color_image(label_ids: np.ndarray) -> np.ndarray:
    """RGBA colour rendering of a labelIds map, as in gtFine *_color.png."""
    pal = np.zeros((256, 4), np.uint8)
    for lid, lab in ID2LABEL.items():
        if lid >= 0:
            pal[lid] = (*lab.color, 255)
    return pal[label_ids]


def sample_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator of one synthetic image: a function of (seed, split, index) only."""
    return np.random.default_rng([seed, zlib.crc32(split.encode()), index])


def rare_kinds(seed: int, split: str, index: int) -> list[str]:
    """The rare classes image `index` of a split shows with `synth --rare`: each class of RARE in one image
    of every RARE_PERIOD (5%), at a place among the period's first RARE_SPAN drawn by (seed, split, period),
    the classes at different places. So any split of 12 images or more holds each of them, and an image's
    content stays a function of (seed, split, index) alone, whatever the number of images asked."""
    period, place = divmod(index, RARE_PERIOD)
    gen = np.random.default_rng([seed, zlib.crc32(split.encode()), period, zlib.crc32(b"rare")])
    places = gen.permutation(RARE_SPAN)[:len(RARE)]
    return [kind for kind, at in zip(RARE, places) if at == place]


def rare_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator of an image's rare objects: apart from the scene's own (whose other pixels stay)."""
    return np.random.default_rng([seed, zlib.crc32(split.encode()), index, zlib.crc32(b"rare objects")])


def coarse_margin(width: int, height: int) -> int:
    """How far (in pixels, square window) a coarse label stays inside its region: 1 at 128x64, 4 at 512x256,
    16 at 2048x1024."""
    return max(1, round(min(width, height) / 64))


def interior(regions: np.ndarray, margin: int) -> np.ndarray:
    """True where every pixel within `margin` (a (2m+1)^2 window, the image edge repeated) is in the same
    region: the regions eroded by `margin`."""
    h, w = regions.shape
    p = np.pad(regions, margin, mode="edge")
    lo, hi = p[:h], p[:h]
    for k in range(1, 2 * margin + 1):  # rows, then columns: a separable min/max filter
        lo, hi = np.minimum(lo, p[k:k + h]), np.maximum(hi, p[k:k + h])
    lo2, hi2 = lo[:, :w], hi[:, :w]
    for k in range(1, 2 * margin + 1):
        lo2, hi2 = np.minimum(lo2, lo[:, k:k + w]), np.maximum(hi2, hi[:, k:k + w])
    return lo2 == hi2


def coarse_labels(lab: np.ndarray, inst: np.ndarray, rng: np.random.Generator, margin: int
                  ) -> tuple[np.ndarray, np.ndarray]:
    """A fine scene's coarse (labelIds, instanceIds): each region (a value of `inst`: an object, or a
    class's stuff) eroded by `margin`, and regions chosen by `rng` left unlabelled (at least one: an object
    when there is one); 0 elsewhere."""
    ids = np.unique(inst)
    objects = ids >= 1000  # instance ids are label x 1000 + index
    drop = ids[rng.random(len(ids)) < np.where(objects, COARSE_DROP["object"], COARSE_DROP["stuff"])]
    if not len(drop) and len(ids) > 1:
        pool = ids[objects] if objects.any() else ids
        drop = pool[[int(rng.integers(len(pool)))]]
    keep = interior(inst, margin) & ~np.isin(inst, drop)
    return np.where(keep, lab, L["unlabeled"]).astype(np.uint8), np.where(keep, inst, 0).astype(np.int32)


def coarse_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """Which regions of a scene the coarse labels leave out: a function of (seed, split, index), apart from
    the scene's own generator (so the fine files do not change)."""
    return np.random.default_rng([seed, zlib.crc32(split.encode()), index, zlib.crc32(b"gtCoarse")])


def stem_of(split: str, i: int) -> tuple[str, str]:
    """(city, <city>_<seq>_<frame>) of image i of a split."""
    cities = CITIES.get(split, [split])
    city = cities[i % len(cities)]
    frame = "000000" if split == "train_extra" else "000019"
    return city, f"{city}_{i // len(cities):06d}_{frame}"


def _write_gt(out: Path, kind: str, split: str, city: str, stem: str, lab: np.ndarray, inst: np.ndarray
              ) -> None:
    gt_dir = out / kind / split / city
    gt_dir.mkdir(parents=True, exist_ok=True)
    atomic_save_png(Image.fromarray(lab), gt_dir / f"{stem}_{kind}_labelIds.png")
    atomic_save_png(Image.fromarray(color_image(lab)), gt_dir / f"{stem}_{kind}_color.png")
    atomic_save_png(Image.fromarray(inst.astype(np.uint16)), gt_dir / f"{stem}_{kind}_instanceIds.png")


def write_one(out: Path, split: str, i: int, width: int, height: int, seed: int, coarse: bool = False,
              rare: bool = False) -> None:
    """Render and write image i of a split: its camera image, the three gtFine files (not for train_extra)
    and, with `coarse` (always for train_extra), the three gtCoarse files of a split that has them; with
    `rare`, its rare objects (`rare_kinds`)."""
    city, stem = stem_of(split, i)
    kinds = rare_kinds(seed, split, i) if rare else []
    rgb, lab, inst = render_scene(sample_rng(seed, split, i), width, height, kinds, rare_rng(seed, split, i))
    img_dir = out / "leftImg8bit" / split / city
    img_dir.mkdir(parents=True, exist_ok=True)
    atomic_save_png(Image.fromarray(rgb), img_dir / f"{stem}_leftImg8bit.png")
    if split != "train_extra":
        _write_gt(out, "gtFine", split, city, stem, lab, inst)
    if (coarse or split == "train_extra") and split in COARSE_SPLITS:
        c_lab, c_inst = coarse_labels(lab, inst, coarse_rng(seed, split, i), coarse_margin(width, height))
        _write_gt(out, "gtCoarse", split, city, stem, c_lab, c_inst)


def write_synth(out: Path, counts: dict[str, int], width: int = 512, height: int = 256, seed: int = 0,
                progress: bool = True, workers: int = 1, rare: bool = False) -> int:
    """Write a Cityscapes-format tree under `out` in `workers` processes (each image depends on (seed,
    split, index) alone, so any number of workers writes the same files); returns the number written.
    A `train_extra` count adds coarse labels: gtCoarse for train_extra and beside each train and val image.
    `rare` adds the rare classes' objects (bus, rider on a bicycle, motorcycle) to 1 image in 20 each."""
    from concurrent.futures import ProcessPoolExecutor
    from functools import partial

    from tqdm import tqdm

    todo = [(split, i) for split, n in counts.items() for i in range(n)]
    coarse = bool(counts.get("train_extra"))
    one = partial(write_one, out, width=width, height=height, seed=seed, coarse=coarse, rare=rare)
    with tqdm(total=len(todo), desc="synth", unit="img", disable=not progress) as bar:
        if workers <= 1:
            for split, i in todo:
                one(split, i)
                bar.update(1)
        else:
            with ProcessPoolExecutor(workers) as pool:
                for _ in pool.map(one, *zip(*todo), chunksize=4):
                    bar.update(1)
    return len(todo)
