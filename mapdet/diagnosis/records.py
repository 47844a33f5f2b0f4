"""Typed records of a diagnosis: what ``measures``, ``causes``, ``figures`` and ``report`` pass each other.

Each record is a dataclass whose fields are the keys of its section of ``diagnosis.json``;
``to_json(record)`` gives that JSON (nested records as objects, numpy numbers as Python ones), and
a record whose JSON is laid out differently from its fields says so in its own ``to_json``. AP
values are AP points (0-100), None where undefined. The unit every cause's impact is in: ``UNIT``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # the model checks' and the run's records live with the modules that measure them
    from mapdet.diagnosis.curves import TrainingCurves
    from mapdet.diagnosis.postprocess import ProposalRecall, Sweep

HEADLINE_MAX_DETS = 100  # COCO's headline AP: at most 100 detections per image AND class
# Every cause's impact: COCO AP (IoU 0.5:0.95) at the headline maxDets gained by fixing that cause alone.
UNIT = {
    "metric": "COCO AP",
    "max_dets": HEADLINE_MAX_DETS,
    "column": "AP50",
    "why": "AP is the number the question is about (mAP, what `mapdet evaluate` and COCO report); AP50 alone "
    "cannot see a box placed at IoU 0.6 instead of 0.9, so localization could not be weighed against the "
    "other causes on its scale",
}


def to_json(x):
    """``x`` with records, NamedTuples, tuples and numpy values turned into JSON-ready values."""
    if hasattr(x, "to_json") and not isinstance(x, type):
        return x.to_json()
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return {f.name: to_json(getattr(x, f.name)) for f in dataclasses.fields(x)}
    if isinstance(x, tuple) and hasattr(x, "_asdict"):
        return {k: to_json(v) for k, v in x._asdict().items()}
    if isinstance(x, (list, tuple)):
        return [to_json(v) for v in x]
    if isinstance(x, dict):
        return {k: to_json(v) for k, v in x.items()}
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, np.generic):
        return x.item()
    return x


@dataclass
class Gain:
    """What one fix adds: COCO AP and AP50 points at the headline maxDets."""

    ap: float = 0.0
    ap50: float = 0.0


@dataclass
class Summary:
    AP: float | None
    AP50: float | None
    AP75: float | None
    APs: float | None
    APm: float | None
    APl: float | None
    AR100: float | None
    num_images: int
    num_gt: int
    num_dets: int


@dataclass
class TideSummary:
    """TIDE's decomposition (``mapdet.diagnosis.tide``): AP50 and dAP50 per error type, counts."""

    ap50: float
    errors: dict[str, float]
    counts: dict[str, int]
    dropped_by_cap: int
    outside_gt: int
    pos_thr: float
    bkg_thr: float
    max_dets: int


@dataclass
class ClassRow:
    id: int
    name: str
    ap: float | None
    ap50: float | None
    train_freq: float
    train_instances: int
    repeat_factor: float
    class_weight: float


@dataclass
class PerClass:
    """AP per class against its training frequency; ``rare``: ids in fewer than t of the images.
    ``threshold_derived``: t is not in force (no repeat threshold given) but ``measures.tail_threshold``
    of the class frequencies."""

    source: str
    repeat_threshold: float
    rows: list[ClassRow]
    spearman_ap_vs_freq: float | None
    zero_ap: list[ClassRow]
    rare: list[int]
    threshold_derived: bool = False


@dataclass
class IouCurve:
    iou: list[float]
    ap: list[float | None]


@dataclass
class CocoCurve:
    """AP against COCO's maxDets (per image AND class)."""

    max_dets: list[int]
    ap: list[float | None]
    ap50: list[float | None]


@dataclass
class PerImageCurve:
    """AP against a per-image cap over all classes (results truncated), read at the headline maxDets."""

    cap: list[int]
    ap: list[float]
    ap50: list[float]

    def at(self, k: int) -> Gain:
        i = self.cap.index(k)
        return Gain(self.ap[i], self.ap50[i])


@dataclass
class CapCurves:
    coco: CocoCurve
    per_image: PerImageCurve
    most_dets_per_image: int
    share_images_at_cap: float
    share_images_gt_over_100: float
    share_images_gt_over_cap: float
    gt_per_image_mean: float
    gt_per_image_max: int


@dataclass
class InferredCap:
    cap: int
    images_at_cap: int
    evidence: int
    images_with_dets: int


@dataclass
class CapChoice:
    """The cap the diagnosis uses and how it was chosen (``mapdet.diagnosis.caps.resolve_cap``)."""

    given_cap: int | None
    given_from: str | None
    inferred: InferredCap | None
    model_cap: int
    results_cap: int | None
    cap_note: str | None
    cap_source: str


@dataclass
class CapEstimate:
    """What the objects beyond the results' own cap would add (``caps.cap_estimate``): ``dAP`` in
    TIDE's AP50, ``gain`` the same objects removed from the ground truth, scored by COCO."""

    cap: int | None
    images: int = 0
    missed_gt: int = 0
    dAP: float = 0.0
    tide_max_dets: int = 0
    gain: Gain = field(default_factory=Gain)


@dataclass
class MaxDets:
    """The ``max_dets`` section: curves, the cap chosen and the estimate, flat in the JSON."""

    curves: CapCurves
    choice: CapChoice
    estimate: CapEstimate

    @property
    def model_cap(self) -> int:
        return self.choice.model_cap

    def to_json(self) -> dict:
        return {**to_json(self.curves), **to_json(self.choice), "estimate": to_json(self.estimate)}


@dataclass
class MissGroup:
    group: str
    cause: str
    definition: str
    count: int
    dAP: float  # TIDE's miss fix on this group alone, AP50
    dAP_in_order: float  # what it adds after the groups before it, AP50
    gain: Gain  # the group removed from the ground truth, scored by COCO


@dataclass
class MissBreakdown:
    cap: int
    precedence: list[str]
    count: int
    dAP: float
    groups: list[MissGroup]

    def group(self, name: str) -> MissGroup:
        return next(g for g in self.groups if g.group == name)


@dataclass
class ModelInput:
    min_size: int
    max_size: int
    arch: str


@dataclass
class SizeStats:
    """Object sizes against the model's input and anchors (``mapdet.diagnosis.sizes``); dicts by COCO size."""

    ap: dict[str, float | None]
    ap50: dict[str, float | None]
    share_gt: dict[str, float]
    bins: list[float]
    hist_original: list[int]
    hist_model_input: list[int]
    anchor_sizes: list[float]
    model_input: ModelInput
    anchors_from: str
    share_below_smallest_anchor_half: float
    median_side_model_input: float
    side_p10_model_input: float  # 10th percentile of sqrt(area) at the model's input
    input_scale_median: float  # median factor the images are resized by to the model's input


@dataclass
class Fixes:
    """COCO AP gained by each of TIDE's fixes applied to the results (``mapdet.diagnosis.fixes``)."""

    reference_iou: float
    loc: Gain
    cls: Gain
    dupe: Gain
    bkg: Gain
    moved_boxes: int  # boxes the loc fix moved to their reference IoU


@dataclass
class Cause:
    cause: str
    impact: float  # COCO AP points at the headline maxDets (UNIT)
    impact_ap50: float
    evidence: str
    advice: str
    set: list[str]  # ``--set`` overrides to try, computed from the evidence and the config in force
    method: str


@dataclass
class Diagnosis:
    """Everything ``mapdet diagnose`` measured; ``to_json`` is the body of ``diagnosis.json``."""

    summary: Summary
    tide: TideSummary
    per_class: PerClass
    iou_curve: IouCurve
    max_dets: MaxDets
    miss_breakdown: MissBreakdown
    size: SizeStats
    fixes: Fixes
    causes: list[Cause] = field(default_factory=list)
    training_curves: TrainingCurves | None = None
    sweep: Sweep | None = None
    proposal_recall: ProposalRecall | None = None

    def cause(self, name: str) -> Cause:
        return next(c for c in self.causes if c.cause == name)

    def to_json(self) -> dict:
        out = {
            "summary": to_json(self.summary),
            "tide": to_json(self.tide),
            "errors": dict(self.tide.errors),
            "counts": dict(self.tide.counts),
        }
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name not in ("summary", "tide") and value is not None:
                out[f.name] = to_json(value)
        out["impact_unit"] = dict(UNIT)
        return out
