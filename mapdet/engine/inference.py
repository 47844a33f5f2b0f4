"""Inference: the model over one rank's share of images, and over all ranks' shares gathered.

``predict(model, loader, device, with_loss)``: the unwrapped model in eval mode on one rank's
loader; detections go to the CPU as packed arrays (``Detections``). With ``with_loss`` the same
batch is also run in training mode under ``no_grad`` with BatchNorm kept in eval mode and the RNG
forked, so the validation loss changes no model state and no random stream. ``mapdet evaluate``,
training's validation and ``mapdet predict`` all run this loop.

``predict_everywhere(model, loader, device, expected, what, ...)`` is collective (every rank calls
it): each rank runs ``predict`` over its own share (``data.eval_loader`` for shards,
``imagefolder.image_loader`` for a folder: contiguous ranges, no padding). The image keys seen, the
unreadable images, the loss sums and an error are gathered on every rank, and the keys checked
against ``expected``: an image seen twice, or neither seen nor reported unreadable, is an error
naming it. An exception on one rank (of the kind the caller names) is raised on every rank, so no
rank waits forever in a collective. The detections stay on their rank. Training's validation and
``mapdet evaluate`` (``evaluation.validation``) and ``predict_gathered`` are built on it.

``predict_gathered(model, loader, device, expected)`` is ``mapdet predict``'s: ``predict_everywhere``
without the loss, any exception raised on every rank as ``RuntimeError``; then the detections go
to the main process only, one rank's packed rows at a time (``comm.stream_to_main``): 36 bytes per
box there, nothing gathered on the other ranks.

Detections are ``evaluator.Detections``: boxes float32 (M, 4) xyxy pixel-edge in the frame of the
image as read (the model resizes internally and maps its boxes back; ``to_original``: scaled to the
image the pack read), labels = the model's 1..K (callers ``relabel`` them to COCO category ids),
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
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from mapdet import comm
from mapdet.engine.step import to_device
from mapdet.fileio import atomic_open
from mapdet.modeling.roi_heads import unweighted_loss
from mapdet.structures import Detections


@dataclass
class Predictions:
    detections: Detections  # this rank's, stored-image coordinates
    keys: list[str]  # image keys seen, in order
    loss_sum: dict[str, float]  # summed over images (divide by len(keys) for the mean)
    skipped: list[dict]  # corrupt samples left out (only with skip_corrupt)


@torch.no_grad()
def predict(
    model, loader, device, with_loss: bool, progress=None, on_batch=None, to_original: bool = False
) -> Predictions:
    """Run ``model`` (unwrapped) over one rank's evaluation loader.

    ``on_batch(batch, detections)``, when given, is called after each batch with the batch (its
    images still at hand, e.g. to draw on) and one ``Detections`` per image, in stored-image
    coordinates. With ``to_original`` the detections returned are then scaled to the image the
    pack read (``target["orig_size"]``), the frame of a COCO pack's own annotations.
    """
    parts, keys, loss_sum, skipped = [], [], {}, []
    was_training = model.training
    for batch in loader:
        skipped += batch.bad
        if not batch.images:
            continue
        images, targets = to_device(batch, device)
        floats = [im.float() / 255 for im in images]
        model.eval()
        outputs = model(floats)
        for t, out in zip(targets, outputs):
            keys.append(t["key"])
            parts.append(_pack(t["image_id"], out))
        if on_batch is not None:
            on_batch(batch, parts[-len(outputs) :])
        if to_original:
            parts[-len(outputs) :] = map(_in_original, parts[-len(outputs) :], batch.targets, batch.images)
        if with_loss:
            for k, v in validation_loss(model, floats, targets).items():
                loss_sum[k] = loss_sum.get(k, 0.0) + v * len(images)
        if progress is not None:
            progress.update(len(images))
    model.train(was_training)
    return Predictions(Detections.concat(parts), keys, loss_sum, skipped)


def validation_loss(model, images: list[torch.Tensor], targets: list[dict]) -> dict[str, float]:
    """torchvision's training losses on a batch, unweighted (``model.unweighted_loss``: one definition
    of the validation loss wherever it is shown), changing neither weights, BN stats nor RNG."""
    clean = [{"boxes": t["boxes"][t["iscrowd"] == 0], "labels": t["labels"][t["iscrowd"] == 0]} for t in targets]
    devices = [images[0].device.index] if images[0].is_cuda else []
    with torch.random.fork_rng(devices=devices), unweighted_loss(model):  # RPN/RoI sampling draws random numbers
        # Seeded by the batch, not by whatever the caller's RNG holds: training's validation at step N
        # and `mapdet evaluate` of checkpoint N then sample the same anchors and RoIs (same number).
        torch.manual_seed(int(targets[0]["image_id"]))
        model.train()
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.eval()  # keep running statistics untouched
        losses = model(images, clean)
        model.eval()
    out = {k: float(v) for k, v in losses.items()}
    out["loss"] = sum(out.values())
    return out


def _pack(image_id: int, out: dict) -> Detections:
    n = len(out["scores"])
    return Detections(
        image_id=np.full(n, image_id, dtype=np.int64),
        boxes=out["boxes"].float().cpu().numpy().reshape(-1, 4),
        scores=out["scores"].float().cpu().numpy(),
        labels=out["labels"].cpu().numpy().astype(np.int64),
    )


def _in_original(dets: Detections, target: dict, image: torch.Tensor) -> Detections:
    """``dets`` of a stored image scaled to the original it was resized from (the packer's scaling undone)."""
    h, w = image.shape[-2:]
    ow, oh = target.get("orig_size", (w, h))
    boxes = dets.boxes.astype(np.float64) * np.array([ow / w, oh / h, ow / w, oh / h])
    return Detections(dets.image_id, boxes, dets.scores, dets.labels)


class CoverageError(RuntimeError):
    """Inference did not see every expected image exactly once."""


def check_exactly_once(expected: list[str], keys: list[str], lost: set[str], what: str) -> None:
    """Raise ``CoverageError`` naming the images of ``expected`` seen twice, not seen (and not in
    ``lost``, the unreadable ones), or seen but not expected."""
    counts = collections.Counter(keys)
    duplicated = sorted(k for k, c in counts.items() if c > 1)
    missing = sorted(set(expected) - set(counts) - lost)
    unknown = sorted(set(counts) - set(expected))
    problems = [
        f"{name} {len(v)}: {', '.join(v[:5])}{' ...' if len(v) > 5 else ''}"
        for name, v in (("duplicated", duplicated), ("missing", missing), ("unexpected", unknown))
        if v
    ]
    if problems:
        raise CoverageError(f"{what} did not see each image exactly once: " + "; ".join(problems))


class _Seen(NamedTuple):
    """What every rank tells the others after ``predict`` (one all_gather_object)."""

    keys: list[str]  # image keys it predicted
    skipped: list[dict]  # unreadable images it left out
    loss_sum: dict[str, float]  # summed over its images ({} without the loss)
    error: str | None  # its caught exception, described; raised on every rank


@dataclass
class Everywhere:
    """``predict_everywhere``'s result: the same on every rank but ``detections``."""

    detections: Detections  # this rank's only, stored-image coordinates
    keys: list[str]  # image keys predicted, all ranks, in rank order
    skipped: list[dict]  # unreadable images, all ranks: {"shard", "key", "reason", "samples"}
    loss_sum: dict[str, float]  # summed over all ranks' images ({} without ``with_loss``)


def _rank_and_type(e: BaseException) -> str:
    return f"rank {comm.get_rank()}: {type(e).__name__}: {e}"


def predict_everywhere(
    model,
    loader,
    device,
    expected: list[str],
    what: str,
    *,
    with_loss: bool = False,
    progress=None,
    on_batch=None,
    to_original: bool = False,
    catch: type[BaseException] = Exception,
    describe: Callable[[BaseException], str] = _rank_and_type,
    raise_as: Callable[[str], BaseException] = RuntimeError,
) -> Everywhere:
    """Collective: every rank calls it, and each makes exactly one collective call
    (``comm.all_gather_object``) after its ``predict``, whether that succeeded or raised ``catch``.

    ``predict`` runs over this rank's ``loader`` (``progress``, ``on_batch``, ``to_original``: its).
    An exception of type ``catch`` there is turned into ``describe(e)`` and gathered; then every
    rank raises ``raise_as`` of the first rank's message (default: any exception, as
    ``RuntimeError("rank R: Type: message")``). An exception of another type propagates on its rank
    alone, before the gather (the other ranks then wait in it until the process group's timeout).
    Otherwise every rank checks the gathered keys with ``check_exactly_once(expected, ..., what)``
    (a ``CoverageError`` on every rank alike) and returns the same ``Everywhere`` but for its own
    detections.
    """
    try:
        preds, error = predict(model, loader, device, with_loss, progress, on_batch, to_original), None
    except catch as e:  # raised on every rank below, so none waits in the gather
        preds, error = Predictions(Detections.empty(), [], {}, []), describe(e)
    seen = comm.all_gather_object(_Seen(preds.keys, preds.skipped, preds.loss_sum, error))
    errors = [s.error for s in seen if s.error]
    if errors:
        raise raise_as(errors[0])
    keys = [k for s in seen for k in s.keys]
    skipped = [b for s in seen for b in s.skipped]
    check_exactly_once(expected, keys, {b["key"] for b in skipped}, what)
    loss_sum = collections.Counter()
    for s in seen:
        loss_sum.update(s.loss_sum)
    return Everywhere(preds.detections, keys, skipped, dict(loss_sum))


@dataclass
class Gathered:
    detections: Detections | None  # main process: all ranks', sorted by image id; None elsewhere
    images: int  # images predicted, all ranks
    bad: list[dict]  # unreadable images, all ranks: {"shard", "key", "reason", "samples"}


def predict_gathered(
    model, loader, device, expected: list[str], progress=None, on_batch=None, to_original: bool = False
) -> Gathered:
    """Collective: ``model`` (unwrapped, eval) over this rank's ``loader``; see the module docstring
    (``to_original``: ``predict``'s)."""
    seen = predict_everywhere(
        model,
        loader,
        device,
        expected,
        "prediction",
        progress=progress,
        on_batch=on_batch,
        to_original=to_original,
    )
    # The main process alone receives the detections, one rank's packed rows at a time.
    received: list[Detections] = []
    main = comm.is_main_process()
    comm.stream_to_main(
        seen.detections.to_bytes(), (lambda b: received.append(Detections.from_bytes(b))) if main else None
    )
    if not main:
        return Gathered(None, len(seen.keys), seen.skipped)
    found = Detections.concat(received)
    return Gathered(found.take(np.argsort(found.image_id, kind="stable")), len(seen.keys), seen.skipped)


def write_results(
    path,
    detections: Detections,
    score_thresh: float = 0.0,
    file_names: dict[int, str] | None = None,
    chunk: int = 100_000,
) -> int:
    """Write the COCO results of the detections scoring at least ``score_thresh`` to ``path`` (see
    the module docstring); returns how many. Converted ``chunk`` detections at a time: a dict per
    box costs ~50x its packed row, too much for millions of boxes at once. The bytes are those of
    ``json.dumps`` of the whole list."""
    kept = detections.take(detections.scores >= score_thresh)
    with atomic_open(path) as f:  # a killed run leaves no half-written results
        f.write("[")
        for start in range(0, len(kept), chunk):
            part = kept.take(slice(start, start + chunk)).to_coco_results()
            if file_names is not None:
                part = [{"image_id": r["image_id"], "file_name": file_names[r["image_id"]], **r} for r in part]
            f.write((", " if start else "") + json.dumps(part)[1:-1])
        f.write("]")
    return len(kept)


def describe_bad(bad: list[dict], limit: int = 20) -> str:
    """Lines naming each unreadable image (shard and key, or the file) and why."""
    lines = [f"  {b['shard'] + ': ' if b.get('shard') else ''}{b['key']}: {b['reason']}" for b in bad[:limit]]
    if len(bad) > limit:
        lines.append(f"  ... and {len(bad) - limit} more")
    return "\n".join(lines)
