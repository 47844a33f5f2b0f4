"""Inference over every rank's share of an image source, gathered and checked: each image exactly once.

``predict_gathered(model, loader, device, expected)`` is collective (every rank calls it): each rank
runs ``engine.predict`` (the loop ``mapdet evaluate`` uses, without the loss) over its own share
(``data.eval_loader`` for shards, ``imagefolder.image_loader`` for a folder: contiguous ranges, no
padding). The image keys seen and the unreadable images are gathered on every rank and checked
against ``expected``: an image seen twice, or neither seen nor reported unreadable, is an error
naming it. An exception on one rank is raised on every rank, so no rank waits forever in a
collective. The detections go to the main process only, one rank's packed rows at a time
(``comm.stream_to_main``): 36 bytes per box there, nothing gathered on the other ranks.

Detections are ``evaluator.Detections``: boxes float32 (M, 4) xyxy pixel-edge in the frame of the
image as read (the model resizes internally and maps its boxes back), labels = category ids 1..K,
sorted by image id (stable: within an image, the model's order, highest score first). So the output
does not depend on the number of processes or loader workers.

``write_results(path, detections, score_thresh, file_names)``: the COCO results list, ``bbox`` as
``[x, y, w, h]`` (``w = x2 - x1``, by ``Detections.xywh``: a shard's results carry the numbers of
``mapdet evaluate``'s detections.json), plus ``file_name`` when ``file_names`` (image id -> name)
is given.
"""

from __future__ import annotations

import collections
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mapdet import comm
from mapdet.engine.step import predict
from mapdet.evaluation.coco import Detections
from mapdet.evaluation.validation import CoverageError

@dataclass
class Gathered:
    detections: Detections | None  # main process: all ranks', sorted by image id; None elsewhere
    images: int  # images predicted, all ranks
    bad: list[dict]  # unreadable images, all ranks: {"shard", "key", "reason", "samples"}


def predict_gathered(model, loader, device, expected: list[str], progress=None, on_batch=None) -> Gathered:
    """Collective: ``model`` (unwrapped, eval) over this rank's ``loader``; see the module docstring."""
    try:
        preds, error = predict(model, loader, device, with_loss=False, progress=progress, on_batch=on_batch), None
    except Exception as e:  # noqa: BLE001 - raised on every rank below, so none waits in a collective
        preds, error = None, f"rank {comm.get_rank()}: {type(e).__name__}: {e}"
    parts = comm.all_gather_object(([], [], error) if preds is None else (preds.keys, preds.skipped, error))
    errors = [p[2] for p in parts if p[2]]
    if errors:
        raise RuntimeError(errors[0])
    keys = [k for p in parts for k in p[0]]
    bad = [b for p in parts for b in p[1]]
    _check_once(expected, keys, bad)
    # The main process alone receives the detections, one rank's packed rows at a time.
    received: list[Detections] = []
    main = comm.is_main_process()
    comm.stream_to_main(preds.detections.to_bytes(), (lambda b: received.append(Detections.from_bytes(b))) if main else None)
    if not main:
        return Gathered(None, len(keys), bad)
    found = Detections.concat(received)
    return Gathered(found.take(np.argsort(found.image_id, kind="stable")), len(keys), bad)


def _check_once(expected: list[str], keys: list[str], bad: list[dict]) -> None:
    counts = collections.Counter(keys)
    lost = {b["key"] for b in bad}
    duplicated = sorted(k for k, c in counts.items() if c > 1)
    missing = sorted(set(expected) - set(counts) - lost)
    unknown = sorted(set(counts) - set(expected))
    problems = [f"{name} {len(v)}: {', '.join(v[:5])}{' ...' if len(v) > 5 else ''}"
                for name, v in (("duplicated", duplicated), ("missing", missing), ("unexpected", unknown)) if v]
    if problems:
        raise CoverageError("prediction did not see each image exactly once: " + "; ".join(problems))


def write_results(path, detections: Detections, score_thresh: float = 0.0,
                  file_names: dict[int, str] | None = None, chunk: int = 100_000) -> int:
    """Write the COCO results of the detections scoring at least ``score_thresh`` to ``path`` (see
    the module docstring); returns how many. Converted ``chunk`` detections at a time: a dict per
    box costs ~50x its packed row, too much for millions of boxes at once. The bytes are those of
    ``json.dumps`` of the whole list."""
    kept = detections.take(detections.scores >= score_thresh)
    tmp = Path(f"{path}.tmp")  # renamed when complete: a killed run leaves no half-written results
    with open(tmp, "w") as f:
        f.write("[")
        for start in range(0, len(kept), chunk):
            part = kept.take(slice(start, start + chunk)).to_coco_results()
            if file_names is not None:
                part = [{"image_id": r["image_id"], "file_name": file_names[r["image_id"]], **r} for r in part]
            f.write((", " if start else "") + json.dumps(part)[1:-1])
        f.write("]")
    os.replace(tmp, path)
    return len(kept)


def describe_bad(bad: list[dict], limit: int = 20) -> str:
    """Lines naming each unreadable image (shard and key, or the file) and why."""
    lines = [f"  {b['shard'] + ': ' if b.get('shard') else ''}{b['key']}: {b['reason']}" for b in bad[:limit]]
    if len(bad) > limit:
        lines.append(f"  ... and {len(bad) - limit} more")
    return "\n".join(lines)
