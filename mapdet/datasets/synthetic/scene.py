"""One synthetic street scene: the background, the objects (placed, painted far to near, the mostly
hidden ones removed), the masks; the classes it draws are in ``mapdet.datasets.synthetic.classes``.

``render(rng, cfg, names, version)`` returns a ``Scene`` whose maps are (H, W): ``label`` uint8
config index, ``instance`` uint16 config index * 256 + instance (0 for stuff pixels), ``objects``
int32 kept object 1..n (0 = stuff), and ``rgb`` uint8 (H, W, 3). ``panoptic(...)`` turns a scene
into COCO panoptic segments (bbox [x, y, w, h], w = max_col - min_col + 1) and the id map.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mapdet.datasets.synthetic import shapes
from mapdet.datasets.synthetic.classes import STUFF, THINGS


@dataclass
class Scene:
    rgb: np.ndarray  # uint8 (H, W, 3)
    label: np.ndarray  # uint8 (H, W) config index
    instance: np.ndarray  # uint16 (H, W) config index * 256 + instance number (0 for stuff)
    objects: np.ndarray  # int32 (H, W) kept object 1..n, 0 = stuff
    object_label: np.ndarray  # int64 (n + 1,) config index of each kept object (entry 0 unused)
    object_crowd: np.ndarray  # uint8 (n + 1,)


@dataclass
class _Planned:
    thing: int  # index into THINGS
    x0: int
    y0: int
    h: int
    w: int
    members: int  # 0: one instance; > 0: a crowd of that many


def render(rng, cfg, names: list[str], version: str) -> Scene:
    w, h = cfg.size
    v = int(version == "v2.0")
    index = {name: i for i, name in enumerate(names)}
    stuff = {key: index.get(spec[0][v], -1) for key, spec in STUFF.items()}
    label, rgb, horizon = _background(rng, w, h, stuff)
    planned = sorted(_plan(rng, cfg, w, h, horizon), key=lambda p: p.y0 + p.h)  # far to near
    objects, obj_rgb, drawn = _paint(rng, planned, w, h)
    if rng.random() < 0.2:  # the camera car's bonnet hides the bottom rows
        rows = slice(h - max(1, h // 20), h)
        objects[rows], label[rows] = 0, stuff["ego"]
    objects, kept = _drop_hidden(objects, planned, drawn, cfg)
    object_label = np.array([0] + [index[THINGS[p.thing].names[v]] for p in kept], np.int64)
    object_crowd = np.array([0] + [p.members > 0 for p in kept], np.uint8)
    is_obj = objects > 0
    label = np.where(is_obj, object_label[objects], label).astype(np.uint8)
    number = _instance_numbers(object_label[1:])
    instance = np.where(is_obj, object_label[objects] * 256 + number[objects], label.astype(np.int64) * 256)
    image = np.where(is_obj[..., None], obj_rgb, rgb) + rng.normal(0, cfg.noise_std, rgb.shape)
    return Scene(
        np.clip(image, 0, 255).astype(np.uint8), label, instance.astype(np.uint16), objects, object_label, object_crowd
    )


def _instance_numbers(labels: np.ndarray) -> np.ndarray:
    """(n + 1,) numbers 1, 2, ... counted separately per class; entry 0 is for stuff."""
    number = np.zeros(len(labels) + 1, np.int64)
    for c in np.unique(labels):
        at = np.flatnonzero(labels == c)
        if len(at) > 255:
            raise ValueError(f"{len(at)} instances of label {c} in one image; the 16-bit PNG holds 255")
        number[at + 1] = np.arange(1, len(at) + 1)
    return number


def _background(rng, w: int, h: int, stuff: dict[str, int]):
    """Stuff labels (H, W) uint8, colours (H, W, 3) float32 and the horizon row."""
    y, x = np.arange(h)[:, None], np.arange(w)[None, :]
    horizon = int(h * rng.uniform(0.35, 0.55))
    label = np.where(y < horizon, stuff["sky"], stuff["road"]).repeat(w, 1).astype(np.uint8)
    t = (y / max(horizon, 1))[..., None]
    sky = np.float32([110, 160, 230]) * (1 - t) + np.float32([205, 220, 240]) * t
    rgb = np.where((y < horizon)[..., None], sky, np.float32([85, 85, 90])).repeat(w, 1).astype(np.float32)
    centre = w * rng.uniform(0.4, 0.6)  # of the road, which widens towards the camera
    road = (y >= horizon) & (np.abs(x - centre) <= w * 0.08 + (y - horizon) / max(h - horizon, 1) * w * 0.55)
    dashes = road & (np.abs(x - centre) < 1 + 3 * (y - horizon) / h) & ((y // 12) % 2 == 0)
    regions = [(stuff["sidewalk"], (y >= horizon) & ~road, (175, 170, 160), 6)]
    windows = ((x % 14) < 7) & ((y % 18) < 9)
    for _ in range(rng.integers(2, 7)):
        top = horizon - int(h * rng.uniform(0.08, 0.35))
        x0, bw = rng.uniform(-0.1, 1.0) * w, rng.uniform(0.1, 0.35) * w
        building = (y >= top) & (y < horizon) & (x >= x0) & (x < x0 + bw)
        base = rng.choice([(150, 130, 110), (120, 110, 100), (170, 160, 140), (100, 95, 95)])
        regions += [(stuff["building"], building, base, 8), (stuff["building"], building & windows, (60, 60, 70), 4)]
    for _ in range(rng.integers(0, 4)):
        cx, cy = rng.uniform(0, w), horizon - rng.uniform(0, 0.1) * h
        rx, ry = rng.uniform(0.05, 0.15) * w, rng.uniform(0.04, 0.12) * h
        regions.append((stuff["vegetation"], ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 <= 1, (50, 110, 40), 30))
    regions.append((stuff["marking"], dashes, (235, 235, 225), 4))
    if rng.random() < 0.08:  # a tram: looks like a thing, is stuff in Vistas
        y0, x0 = horizon - int(0.1 * h), rng.uniform(0, 0.6) * w
        regions.append(
            (stuff["on-rails"], (y >= y0) & (y < horizon + 0.1 * h) & (x >= x0) & (x < x0 + 0.35 * w), (0, 120, 140), 6)
        )
    for index, mask, colour, noise in regions:
        mask = np.broadcast_to(mask, (h, w))
        label[mask] = index
        rgb[mask] = np.asarray(colour, np.float32) + rng.normal(0, noise, (int(mask.sum()), 3))
    return label, rgb, horizon


def _plan(rng, cfg, w: int, h: int, horizon: int) -> list[_Planned]:
    """What to draw: nothing, a dense crowd of small common objects, or a long-tailed mix."""
    u = rng.random()
    if u < cfg.empty_share:
        return []
    if u < cfg.empty_share + cfg.dense_share:
        common = [k for k, t in enumerate(THINGS) if t.share >= 0.05]  # rare classes stay rare
        weights = np.array([THINGS[k].share * THINGS[k].mean_count for k in common])
        kinds = rng.choice(common, size=rng.integers(*cfg.dense_objects, endpoint=True), p=weights / weights.sum())
        return [_place(rng, cfg, int(k), w, h, horizon, cfg.dense_scale) for k in kinds]
    kinds = []
    for k, t in enumerate(THINGS):
        share = cfg.class_shares.get(t.names[0], cfg.class_shares.get(t.names[1], t.share))
        if rng.random() < share:
            kinds += [k] * (1 + rng.poisson(t.mean_count - 1))
    kinds = rng.permutation(np.array(kinds, np.int64))[: cfg.max_objects]
    planned = [_place(rng, cfg, int(k), w, h, horizon, 1.0) for k in kinds]
    if rng.random() < cfg.crowd_share:
        crowdable = [k for k, t in enumerate(THINGS) if t.crowd]
        k = int(rng.choice(crowdable))
        planned.append(_place(rng, cfg, k, w, h, horizon, 1.0, members=int(rng.integers(3, 7))))
    return planned


def _place(rng, cfg, k: int, w: int, h: int, horizon: int, scale: float, members: int = 0) -> _Planned:
    t = THINGS[k]
    if t.place == "ground":  # nearer objects stand lower and look bigger
        depth = rng.uniform(0.05, 1.0)
        scale *= 0.3 + 0.7 * depth
    else:
        scale *= rng.uniform(0.5, 1.0)
    oh = rng.uniform(*t.height) * h * scale * cfg.object_scale
    ow = oh * rng.uniform(*t.aspect) * (0.7 * members if members else 1)
    oh, ow = max(cfg.min_side, round(oh)), max(cfg.min_side, round(ow))
    oh, ow = min(oh, h), min(ow, w)  # a large --object-scale must not outgrow the image
    if t.place == "ground":
        y0 = round(horizon + depth * (h - horizon)) - oh
    elif t.place == "air":
        y0 = round(rng.uniform(0.04 * h, horizon + 0.05 * h) - oh / 2)
    else:
        y0 = round(rng.uniform(0.02 * h, max(0.02 * h, horizon - oh)))
    x0 = round(rng.uniform(-0.15 * ow, w - 0.85 * ow))
    return _Planned(k, x0, y0, oh, ow, members)


def _paint(rng, planned: list[_Planned], w: int, h: int):
    """Objects painted in list order (later ones occlude): id map (H, W), colours, drawn areas."""
    objects = np.zeros((h, w), np.int32)
    rgb = np.zeros((h, w, 3), np.float32)
    drawn = np.zeros(len(planned) + 1, np.int64)
    for k, p in enumerate(planned, start=1):
        draw = THINGS[p.thing].draw
        mask, colours = shapes.group(draw, rng, p.h, p.w, p.members) if p.members else draw(rng, p.h, p.w)
        ys, xs = slice(max(p.y0, 0), min(p.y0 + p.h, h)), slice(max(p.x0, 0), min(p.x0 + p.w, w))
        if ys.start >= ys.stop or xs.start >= xs.stop:
            continue
        crop = (slice(ys.start - p.y0, ys.stop - p.y0), slice(xs.start - p.x0, xs.stop - p.x0))
        mask, colours = mask[crop], colours[crop]
        objects[ys, xs][mask] = k
        rgb[ys, xs][mask] = colours[mask]
        drawn[k] = mask.sum()
    return objects, rgb, drawn


def _drop_hidden(objects: np.ndarray, planned: list[_Planned], drawn: np.ndarray, cfg):
    """Remove objects mostly hidden by nearer ones; renumber the rest 1..n in paint order."""
    visible = np.bincount(objects.ravel(), minlength=len(planned) + 1)
    keep = (visible >= cfg.min_pixels) & (visible >= cfg.min_visible * drawn)
    keep[0] = False
    renumber = np.zeros(len(keep), np.int32)
    renumber[keep] = np.arange(1, keep.sum() + 1)
    return renumber[objects], [planned[k - 1] for k in np.flatnonzero(keep)]


def panoptic(rng, scene: Scene, void_of: np.ndarray) -> tuple[list[dict], np.ndarray]:
    """COCO panoptic segments_info of a scene and its segment id map (H, W) uint32 (0 = void)."""
    n = len(scene.object_label) - 1
    stuff = [int(i) for i in np.unique(scene.label[scene.objects == 0]) if not void_of[i]]
    ids = _distinct_ids(rng, n + len(stuff))
    thing_ids = np.concatenate([[0], ids[:n]]).astype(np.uint32)
    stuff_ids = np.zeros(len(void_of), np.uint32)
    stuff_ids[stuff] = ids[n:]
    pan = np.where(scene.objects > 0, thing_ids[scene.objects], stuff_ids[scene.label])
    segments = [
        _segment(pan == thing_ids[k], thing_ids[k], scene.object_label[k], scene.object_crowd[k])
        for k in range(1, n + 1)
    ]
    segments += [_segment(pan == stuff_ids[i], stuff_ids[i], i, 0) for i in stuff]
    return segments, pan


def _segment(mask: np.ndarray, seg_id, index, crowd) -> dict:
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    bbox = [cols[0], rows[0], cols[-1] - cols[0] + 1, rows[-1] - rows[0] + 1]  # w = max - min + 1
    return {
        "id": int(seg_id),
        "category_id": int(index) + 1,
        "area": int(mask.sum()),
        "bbox": [int(b) for b in bbox],
        "iscrowd": int(crowd),
    }


def _distinct_ids(rng, n: int) -> np.ndarray:
    """n distinct segment ids in 1 .. 2^24 - 1 (any RGB colour but black)."""
    while True:
        ids = rng.integers(1, 1 << 24, n)
        if len(np.unique(ids)) == n:
            return ids
