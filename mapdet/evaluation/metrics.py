"""COCO bbox metrics read from the accumulated arrays: summary, per-class rows, metrics.json, tables.

Every number is a mean over the entries > -1 of pycocotools' ``precision`` (T, R, K, A, M) or
``recall`` (T, K, A, M) array, taken with the same indexing as ``COCOeval.summarize`` so that the
float summation order, and hence the value, is identical. Scale 0-1; -1 where undefined (no
non-ignored GT in any selected category).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mapdet.evaluation.matching import AREA_LABELS
from mapdet.fileio import write_text_atomic

# key -> (AP or AR, IoU, area, maxDets) for COCOeval.stats[0..11] with maxDets [1, 10, 100]
_STATS = {
    "AP": ("ap", None, "all", 100),
    "AP50": ("ap", 0.5, "all", 100),
    "AP75": ("ap", 0.75, "all", 100),
    "APs": ("ap", None, "small", 100),
    "APm": ("ap", None, "medium", 100),
    "APl": ("ap", None, "large", 100),
    "AR1": ("ar", None, "all", 1),
    "AR10": ("ar", None, "all", 10),
    "AR100": ("ar", None, "all", 100),
    "ARs": ("ar", None, "small", 100),
    "ARm": ("ar", None, "medium", 100),
    "ARl": ("ar", None, "large", 100),
}


@dataclass
class CocoResult:
    """The arrays of ``COCOeval.accumulate()`` for bbox, exactly as pycocotools computes them.

    precision, scores: (T iou_thrs, R=101 recall points, K cat_ids, A=4 areas, M max_dets);
    recall: (T, K, A, M); num_gt: (K,) non-crowd GT boxes per category. ``traffic``: what this
    rank held and moved to compute it (``mapdet.evaluation.routing.Traffic`` as a dict).
    """

    precision: np.ndarray
    recall: np.ndarray
    scores: np.ndarray
    iou_thrs: np.ndarray
    cat_ids: list[int]
    max_dets: list[int]
    area_labels: list[str] = field(default_factory=lambda: list(AREA_LABELS))
    num_gt: np.ndarray | None = None
    traffic: dict | None = None

    def ap(self, iou: float | None = None, area: str = "all", max_dets: int = 100, cat_id: int | None = None) -> float:
        """Mean precision (AP) like ``COCOeval._summarize(1, ...)``; -1 if undefined."""
        return self._mean(self.precision, iou, area, max_dets, cat_id)

    def ar(self, max_dets: int, area: str = "all", iou: float | None = None, cat_id: int | None = None) -> float:
        """Mean final recall (AR) like ``COCOeval._summarize(0, ...)``; -1 if undefined."""
        return self._mean(self.recall[:, None], iou, area, max_dets, cat_id)

    def _mean(self, s, iou, area, max_dets, cat_id) -> float:
        if area not in self.area_labels:
            raise ValueError(f"unknown area range {area!r}; choose from {self.area_labels}")
        aind = [self.area_labels.index(area)]
        mind = [i for i, m in enumerate(self.max_dets) if m == max_dets]
        if iou is not None:
            s = s[np.flatnonzero(np.isclose(self.iou_thrs, iou, rtol=0, atol=1e-9))]
        if cat_id is not None:
            if cat_id not in self.cat_ids:
                raise ValueError(f"category {cat_id} was not evaluated; categories: {self.cat_ids}")
            s = s[:, :, [self.cat_ids.index(cat_id)]]
        s = s[:, :, :, aind, mind]
        defined = s[s > -1]
        return float(np.mean(defined)) if defined.size else -1.0

    def summary(self) -> dict:
        """COCOeval.stats as named values, plus ``AP_at_maxdets`` {str(maxDets): AP}."""
        out = {
            key: self.ap(iou, area, m) if kind == "ap" else self.ar(m, area, iou)
            for key, (kind, iou, area, m) in _STATS.items()
        }
        out["AP_at_maxdets"] = {str(m): self.ap(max_dets=m) for m in self.max_dets}
        out["max_dets"] = list(self.max_dets)
        return out

    def per_class(self, names: dict[int, str], num_train: dict[int, int] | None = None) -> list[dict]:
        """One row per category: AP and AP50 at maxDets 100, AP_max at the largest maxDets."""
        rows = []
        for k, cat in enumerate(self.cat_ids):
            rows.append(
                {
                    "category_id": int(cat),
                    "name": names.get(cat, str(cat)),
                    "AP": self.ap(cat_id=cat),
                    "AP50": self.ap(iou=0.5, cat_id=cat),
                    "AP_max": self.ap(max_dets=self.max_dets[-1], cat_id=cat),
                    "num_gt": int(self.num_gt[k]) if self.num_gt is not None else None,
                    "num_train": None if num_train is None else int(num_train.get(cat, 0)),
                }
            )
        return rows


def write_metrics(
    result: CocoResult, path: str | Path, names: dict[int, str], num_train: dict[int, int] | None = None
) -> dict:
    """Write ``{"bbox": {summary..., "per_class": [...]}}`` to ``path`` (atomically); return it."""
    metrics = {"bbox": {**result.summary(), "per_class": result.per_class(names, num_train)}}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(metrics, indent=2) + "\n")
    return metrics


def _cell(value: float) -> str:
    return "-" if value is None or value < 0 else f"{value:.3f}"


def format_summary(summary: dict) -> str:
    """The summary as aligned ``name value`` lines, AP at every maxDets last."""
    lines = [f"{key:<7}{_cell(summary[key]):>7}" for key in _STATS]
    lines += [f"AP@{m:<4}{_cell(v):>7}" for m, v in summary["AP_at_maxdets"].items()]
    return "\n".join(lines)


def format_table(rows: list[dict]) -> str:
    """Per-class rows as a fixed-width table ("-" where AP is undefined)."""
    width = max([len(str(r["name"])) for r in rows] + [4])
    head = f"{'id':>4}  {'name':<{width}}  {'AP':>6}  {'AP50':>6}  {'APmax':>6}  {'GT':>7}  {'train':>7}"
    lines = [head, "-" * len(head)]
    for r in rows:
        train = "-" if r.get("num_train") is None else str(r["num_train"])
        gt = "-" if r.get("num_gt") is None else str(r["num_gt"])
        lines.append(
            f"{r['category_id']:>4}  {r['name']!s:<{width}}  {_cell(r['AP']):>6}  "
            f"{_cell(r['AP50']):>6}  {_cell(r['AP_max']):>6}  {gt:>7}  {train:>7}"
        )
    return "\n".join(lines)
