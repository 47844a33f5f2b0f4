"""Detections to the rank that scores their category: one all-to-all of packed rows.

COCO evaluation and accumulation are independent per category, so each rank scores a share of
the categories and needs only their detections. Every rank starts with its own detections as
packed rows (``mapdet.evaluation.inputs``: NARROW 28-byte rows of float32 xyxy boxes, or WIDE 48-byte
rows of float64 COCO xywh) and its per-category counts; after ``share_categories`` every rank
knows the same owner of each category, and ``route`` sends each row to its owner with
``comm.all_to_all_bytes``: no per-box Python objects, no pickling, and no rank ever holds more
detections than its own plus those of its categories.

Order is kept: a rank receives the rows of each source rank in source-rank order, each in the
source's order, i.e. exactly the rows of its categories in the order of the concatenation of all
ranks' detections, which is what pycocotools' stable tie-breaking (file order) sees.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from mapdet import comm
from mapdet.evaluation.inputs import WIDE, widen


@dataclass
class Traffic:
    """What one rank held and moved for one evaluation (bytes are row bytes; counts are rows).

    Read as ``CocoResult.traffic`` (``to_dict``) by bench/bench_eval_scale.py and the rank tests.
    """

    local: int  # detections this rank brought
    scored: int  # detections of its categories, from every rank
    row_bytes: int  # 28 (NARROW, float32 xyxy) or 48 (WIDE, float64 xywh)
    sent_bytes: int  # to other ranks
    received_bytes: int  # from other ranks

    def to_dict(self) -> dict:
        return asdict(self)


def balanced_owners(cost: np.ndarray, world: int) -> np.ndarray:
    """int64 (K,): the rank scoring each category, greedy largest-cost-first onto the least
    loaded rank. Deterministic, so every rank computes the same owners from the same ``cost``."""
    owner, load = np.zeros(len(cost), np.int64), np.zeros(world)
    for k in np.argsort(-cost, kind="stable"):
        r = int(np.argmin(load))
        owner[k] = r
        load[r] += cost[k] + 1  # + 1: categories without boxes still spread over ranks
    return owner


def share_categories(gt_counts: np.ndarray, det_counts: np.ndarray, world: int) -> np.ndarray:
    """Owners balanced by the work each category brings: its GT plus all ranks' detections.

    ``det_counts`` (world, K): every rank's detections per category (gathered, so identical on
    every rank)."""
    return balanced_owners(gt_counts + det_counts.sum(0), world)


def route(rows: np.ndarray, owner: np.ndarray, wide: bool) -> tuple[np.ndarray, Traffic]:
    """This rank's rows of every rank, for the categories it owns; and the traffic.

    Collective. ``wide``: some rank holds WIDE rows, so all send WIDE (exact either way).
    """
    rows = widen(rows) if wide else rows
    rank, world = comm.get_rank(), comm.get_world_size()
    if world == 1:
        return rows, Traffic(len(rows), len(rows), rows.dtype.itemsize, 0, 0)
    dest = owner[rows["cat"]]
    order = np.argsort(dest, kind="stable")  # stable: each destination gets rows in input order
    sizes = np.bincount(dest, minlength=world) * rows.dtype.itemsize
    send = rows[order].view(np.uint8)
    got, got_sizes = comm.all_to_all_bytes(send, sizes.tolist())
    dtype = WIDE if wide else rows.dtype
    traffic = Traffic(
        len(rows),
        len(got) // dtype.itemsize,
        dtype.itemsize,
        int(sizes.sum() - sizes[rank]),
        int(sum(got_sizes) - got_sizes[rank]),
    )
    return got.view(dtype), traffic
