"""The post-processing settings the sweep varies and what it measured: typed records.

torchvision applies three settings after the network (``Postprocess``): the score threshold, the
per-class NMS IoU and the detections kept per image. ``mapdet.diagnosis.sweep`` scores a grid of
them (``Sweep``, AP points at the headline maxDets) and the RPN's proposal recall
(``ProposalRecall``); ``Sweep.lever`` reads the best value of one setting with the other two as in
force (``LeverBest``), which the causes and their advice use.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from mapdet.diagnosis.records import HEADLINE_MAX_DETS


@dataclass
class SweepBest:
    nms_thresh: float
    score_thresh: float
    detections_per_img: int
    ap: float


@dataclass
class LeverBest:
    """The best value of one post-processing setting, the other two as in force (``Sweep.lever``)."""

    key: str  # config key, e.g. model.nms_thresh
    value: float | int
    current: float | int
    ap: float
    current_ap: float
    ap50: float
    current_ap50: float


# the sweep's settings and the config keys they are
SWEEP_KEYS = {
    "nms_thresh": "model.nms_thresh",
    "score_thresh": "model.score_thresh",
    "detections_per_img": "model.detections_per_img",
}


class Postprocess(NamedTuple):
    """The three settings of torchvision's post-processing that the sweep varies."""

    nms_thresh: float
    score_thresh: float
    detections_per_img: int


@dataclass
class Sweep:
    """AP (nms, score, dets) grids of the post-processing sweep (``mapdet.diagnosis.sweep``), read at ``max_dets``."""

    nms_thresh: list[float]
    score_thresh: list[float]
    detections_per_img: list[int]
    ap: list
    ap50: list
    best: SweepBest
    current_ap: float | None
    current: Postprocess | None  # the values in force
    num_images: int
    max_dets: int = HEADLINE_MAX_DETS

    def lever(self, name: str) -> LeverBest | None:
        """Best value of setting ``name`` (a ``SWEEP_KEYS`` key) with the other two at the values in
        force; among values within 0.05 AP of the best, the one closest to the value in force."""
        if self.current is None:
            return None
        axes = Postprocess._fields
        values = [self.nms_thresh, self.score_thresh, self.detections_per_img]
        at = [values[i].index(getattr(self.current, a)) for i, a in enumerate(axes)]
        axis = axes.index(name)
        line = [tuple(at[:axis]) + (k,) + tuple(at[axis + 1 :]) for k in range(len(values[axis]))]
        ap, ap50 = np.asarray(self.ap), np.asarray(self.ap50)
        aps = np.array([ap[i] for i in line])
        near = [k for k in range(len(aps)) if aps[k] >= aps.max() - 0.05]
        k = min(near, key=lambda k: abs(values[axis][k] - values[axis][at[axis]]))
        return LeverBest(
            SWEEP_KEYS[name],
            values[axis][k],
            values[axis][at[axis]],
            float(aps[k]),
            float(ap[tuple(at)]),
            float(ap50[line[k]]),
            float(ap50[tuple(at)]),
        )


@dataclass
class ProposalRecall:
    iou: float
    proposals_per_image: float
    recall: dict[str, float | None]
    num_gt: dict[str, int]
