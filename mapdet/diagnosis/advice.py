"""Advice that fits the run: ``--set`` overrides per cause, from its evidence and the config in force.

``advise(cause, d, config)`` returns ``Advice(set, text)``. Each cause has an ordered list of
levers (``LEVERS``); the first lever that can still move gives the set. For every lever:

- no override repeats the value in force (the config given with ``--config``, arch defaults
  filled in); a lever whose values are all in force is said to be, and the next lever is given;
- a lever at its limit (class weights already on, anchors that already fit the smallest boxes,
  an input already enlarged 2x, ...) is named with why, and the next lever is given;
- a setting applied after the network (``model.score_thresh``, ``model.nms_thresh``,
  ``model.detections_per_img``) takes the best value the post-processing sweep found with the
  other two as in force, and the text gives the AP the sweep measured there; without a sweep
  (no ``--checkpoint``) a step from the value in force, said to be unmeasured.

Without a config (no ``--config``) nothing is known to be in force: ``set`` is empty and the text
names the settings. A cause with no measured impact gets no set.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from mapdet.config import ARCH_LAYOUT, Config
from mapdet.diagnosis.curves import EXTEND
from mapdet.diagnosis.records import Diagnosis

# What each cause's settings are, for a diagnosis without a config
GENERIC = {
    "detection_cap": "raise model.detections_per_img (the post-processing sweep, --checkpoint, measures the best)",
    "class_imbalance": "repeat-factor sampling (data.repeat_threshold) and class weights "
    "(model.class_weights=inv_sqrt)",
    "localization": "box-regression loss weight (model.box_loss_weight), a larger input (model.min_size/max_size), "
    "longer training",
    "classification": "class weights (model.class_weights), repeat-factor sampling (data.repeat_threshold), "
    "longer training",
    "duplicates": "a lower model.nms_thresh (the sweep, --checkpoint, measures the best)",
    "background": "more background RoIs per image (model.roi_batch_size_per_image), longer training; a higher "
    "model.score_thresh never raises COCO AP (it only cuts the low end of the ranking)",
    "missed": "a lower model.score_thresh, more proposals (model.rpn_post_nms_top_n_test), a larger input "
    "(model.min_size)",
    "small_objects": "smaller anchors (model.anchor_sizes) or a larger input (model.min_size/max_size)",
    "under_training": "train longer (train.max_steps); a run on fewer processes than its config was tuned for "
    "takes fewer images per step unless the config sets data.global_batch",
}
ROUND_INPUT = 32  # input sizes advised are multiples of this (the backbone's coarsest stride)
_CAP_STEPS = (100, 300, 1000, 3000, 10000)
UNMEASURED = "unmeasured: pass --checkpoint for the post-processing sweep to measure it"
_MIN_NMS, _MIN_SCORE, _MAX_ROIS, _MAX_PROPOSALS, _MAX_INPUT_SCALE = 0.3, 0.05, 512, 2000, 2.0


@dataclass
class Advice:
    set: list[str]
    text: str


@dataclass
class Move:
    """A lever that can move: overrides (key, value) and why."""

    pairs: list[tuple[str, object]]
    text: str


@dataclass
class Limit:
    """A lever at its limit, and why; the next lever is tried."""

    text: str


@dataclass
class _Context:
    d: Diagnosis
    cfg: Config
    model: object  # the model section with arch defaults filled in


def advise(cause: str, d: Diagnosis, cfg: Config | None, impact: float) -> Advice:
    """The overrides for ``cause`` (see the module docstring)."""
    if cfg is None:
        return Advice([], GENERIC[cause] + " (pass --config for overrides that fit the run)")
    if impact <= 0:
        return Advice([], "nothing measured to fix")
    from mapdet.modeling.build import resolve_config

    ctx = _Context(d, cfg, resolve_config(cfg.model))
    notes: list[str] = []
    for lever in LEVERS[cause]:
        step = lever(ctx)
        if step is None:
            continue
        if isinstance(step, Limit):
            notes.append(step.text)
            continue
        pairs = [(k, v) for k, v in step.pairs if not _same(_in_force(ctx, k), v)]
        if not pairs:
            notes.append(", ".join(f"{k}={_fmt(v)}" for k, v in step.pairs) + " is already in force")
            continue
        return Advice([f"{k}={_fmt(v)}" for k, v in pairs], "; ".join([step.text, *notes]))
    return Advice([], "; ".join(notes + ["no lever left to advise"]))


def _in_force(ctx: _Context, key: str):
    section, name = key.split(".")
    return getattr(ctx.model if section == "model" else getattr(ctx.cfg, section), name)


def _same(a, b) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _fmt(v) -> str:
    """A value as ``--set`` parses it back (YAML)."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(_fmt(x) for x in v) + "]"
    return str(v)


# --- levers: (context) -> Move | Limit | None (not applicable) ---------------------------------


def _train_longer(c: _Context) -> Move:
    steps = c.cfg.train.max_steps
    return Move(
        [("train.max_steps", EXTEND * steps)],
        f"train {EXTEND}x as long ({EXTEND * steps} steps instead of {steps}; the LR milestones are shares of "
        "train.max_steps and move with it)",
    )


def _sweep_lever(name: str, better, where: str):
    """The sweep's best value of ``name`` if it lies on the side ``better`` (value, in force) accepts."""

    def lever(c: _Context) -> Move | Limit | None:
        sw = c.d.sweep
        best = sw.lever(name) if sw is not None else None
        if best is None:
            return None
        if best.value == best.current or not better(best.value, best.current):
            return Limit(
                f"the post-processing sweep finds no {where} {best.key} than {_fmt(best.current)} that raises AP "
                f"(its best there: {_fmt(best.value)})"
            )
        return Move(
            [(best.key, best.value)],
            f"{best.key}={_fmt(best.value)} is the post-processing sweep's best with the other settings as in "
            f"force: AP {best.ap:.1f} (AP50 {best.ap50:.1f}) against {best.current_ap:.1f} at {_fmt(best.current)}, "
            f"on its {sw.num_images} images (maxDets {sw.max_dets})",
        )

    return lever


def _cap_guess(c: _Context) -> Move | Limit | None:
    if c.d.sweep is not None:
        return None
    md, cur = c.d.max_dets, c.model.detections_per_img
    curve = md.curves.per_image
    here = curve.at(md.model_cap).ap if md.model_cap in curve.cap else None
    above = {k: a for k, a in zip(curve.cap, curve.ap) if k > cur}
    ap = max(above.values(), default=None)
    if here is not None and ap is not None and ap > here:
        k = min(k for k, a in above.items() if a == ap)  # of equal APs, the smallest cap
        return Move([("model.detections_per_img", k)], f"the results truncated to {k} per image give AP {ap:.1f}")
    need = md.curves.gt_per_image_max
    if cur >= need:
        return Limit(f"model.detections_per_img={cur} already exceeds the most objects in an image ({need})")
    k = next(k for k in (*_CAP_STEPS, need) if k >= need and k > cur)
    return Move([("model.detections_per_img", k)], f"{k} covers the most objects in an image ({need}); {UNMEASURED}")


def _nms_step(c: _Context) -> Move | Limit | None:
    if c.d.sweep is not None:
        return None
    cur = c.model.nms_thresh
    if cur <= _MIN_NMS:
        return Limit(f"model.nms_thresh={cur} is already low (lower suppresses neighbouring objects of a class)")
    new = max(_MIN_NMS, round(cur - 0.1, 2))
    return Move([("model.nms_thresh", new)], f"a lower NMS IoU removes more duplicates; {UNMEASURED}")


def _score_step(c: _Context) -> Move | Limit | None:
    if c.d.sweep is not None:
        return None
    cur = c.model.score_thresh
    if cur <= _MIN_SCORE:
        return Limit(f"model.score_thresh={cur} already keeps low-scoring detections")
    return Move([("model.score_thresh", _MIN_SCORE)], f"keep low-scoring detections; {UNMEASURED}")


def _rebalance(c: _Context) -> Move | Limit:
    t = c.d.per_class.repeat_threshold
    pairs = []
    if c.cfg.data.repeat_threshold is None:
        pairs.append(("data.repeat_threshold", t))
    if c.cfg.model.class_weights == "none":
        pairs.append(("model.class_weights", "inv_sqrt"))
    if pairs:
        rows = c.d.per_class.rows
        below = sum(r.train_freq < t for r in rows if r.train_freq > 0)
        return Move(
            pairs,
            f"rebalance the training: images with classes in fewer than {t:.0%} of the images repeated "
            f"(repeat-factor sampling; {below} of the {len(rows)} classes are below t, the rarest repeated "
            f"{max((r.repeat_factor for r in rows), default=1.0):.1f}x) and/or the loss weighted by 1/sqrt(instances)",
        )
    return Limit(
        f"repeat-factor sampling (data.repeat_threshold={_fmt(c.cfg.data.repeat_threshold)}) and class weights "
        f"(model.class_weights={c.cfg.model.class_weights}) are already on"
    )


def _stronger_repeat(c: _Context) -> Move | Limit | None:
    t, rows = c.cfg.data.repeat_threshold, c.d.per_class.rows
    if t is None or not rows:
        return None
    most = max(r.train_freq for r in rows)
    if t >= most:
        return Limit(
            f"data.repeat_threshold={_fmt(t)} already reaches the most frequent class (in {most:.0%} of the images): "
            "every class is repeated, a higher t changes no class's share"
        )
    new = round(min(2 * t, 1.0), 3)
    seen = [r.train_freq for r in rows if r.train_freq > 0]
    rarest = min(seen) if seen else most
    return Move(
        [("data.repeat_threshold", new)],
        f"repeat rare classes more: at t={_fmt(new)} the rarest class is repeated {math.sqrt(new / rarest):.1f}x per "
        f"epoch instead of {math.sqrt(t / rarest):.1f}x",
    )


def _box_weight(c: _Context) -> Move | None:
    w = c.cfg.model.box_loss_weight
    if w >= 1.0:
        return None
    return Move([("model.box_loss_weight", 1.0)], f"the box-regression loss is weighted {_fmt(w)}: 1 is torchvision's")


def _larger_input(c: _Context) -> Move | Limit:
    scale = c.d.size.input_scale_median
    if scale >= _MAX_INPUT_SCALE:
        return Limit(f"the images are already enlarged {scale:.1f}x at the model's input")
    lo, hi = (ROUND_INPUT * round(1.5 * v / ROUND_INPUT) for v in (c.model.min_size, c.model.max_size))
    return Move(
        [("model.min_size", lo), ("model.max_size", hi)],
        f"a 1.5x larger input: boxes gain pixels at the model's input (median box side there "
        f"{c.d.size.median_side_model_input:.0f} px)",
    )


def _more_rois(c: _Context) -> Move | Limit:
    cur = c.model.roi_batch_size_per_image
    if cur >= _MAX_ROIS:
        return Limit(f"model.roi_batch_size_per_image={cur} already samples torchvision's {_MAX_ROIS} RoIs per image")
    new = min(_MAX_ROIS, 2 * cur)
    why = "more background RoIs per image teach the box head to reject background"
    return Move([("model.roi_batch_size_per_image", new)], why)


def _more_proposals(c: _Context) -> Move | Limit:
    cur = c.model.rpn_post_nms_top_n_test
    pr = c.d.proposal_recall
    if pr is not None and (pr.recall.get("all") or 0.0) >= 0.95:
        return Limit(f"the RPN's proposals already cover {pr.recall['all']:.0%} of the objects at IoU {pr.iou}")
    if cur >= _MAX_PROPOSALS:
        return Limit(f"model.rpn_post_nms_top_n_test={cur} already keeps {_MAX_PROPOSALS} or more proposals")
    return Move([("model.rpn_post_nms_top_n_test", min(_MAX_PROPOSALS, 2 * cur))], "more proposals per image")


def _anchor_levels(c: _Context) -> list[float]:
    from mapdet.modeling.build import STOCK_ANCHOR_SIZES

    if c.model.anchor_sizes is not None:
        return list(c.model.anchor_sizes)
    return STOCK_ANCHOR_SIZES[c.model.arch][: ARCH_LAYOUT[c.model.arch][0]]


def _smaller_anchors(c: _Context) -> Move | Limit:
    s, levels = c.d.size, _anchor_levels(c)
    smallest, p10 = min(levels), s.side_p10_model_input
    below = f"{s.share_below_smallest_anchor_half:.0%} of boxes are smaller than half of it at the model's input"
    if p10 <= 0 or smallest <= 2 * p10:
        return Limit(f"the smallest anchor ({smallest:g} px) already fits the small boxes: {below}")
    factor = 2 ** math.ceil(math.log2(smallest / (2 * p10)))
    new = [max(2, round(a / factor)) for a in levels]
    return Move(
        [("model.anchor_sizes", new)],
        f"anchors {factor}x smaller: the smallest ({smallest:g} px) is more than twice the 10th percentile box "
        f"side at the model's input ({p10:.0f} px); {below}",
    )


LEVERS = {
    "detection_cap": [_sweep_lever("detections_per_img", lambda v, cur: v != cur, "other"), _cap_guess],
    "class_imbalance": [_rebalance, _stronger_repeat, _train_longer],
    "localization": [_box_weight, _larger_input, _train_longer],
    "classification": [_rebalance, _train_longer],
    "duplicates": [_sweep_lever("nms_thresh", lambda v, cur: v < cur, "lower"), _nms_step, _train_longer],
    "background": [_sweep_lever("score_thresh", lambda v, cur: v > cur, "higher"), _more_rois, _train_longer],
    "missed": [
        _sweep_lever("score_thresh", lambda v, cur: v < cur, "lower"),
        _sweep_lever("nms_thresh", lambda v, cur: v > cur, "higher"),
        _score_step,
        _more_proposals,
        _larger_input,
        _train_longer,
    ],
    "small_objects": [_smaller_anchors, _larger_input, _train_longer],
    "under_training": [_train_longer],
}
