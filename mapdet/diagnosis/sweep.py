"""Measurements that need the model: RPN proposal recall by size and a post-processing sweep.

Both run the network once per image (``head_outputs``: transform, backbone, RPN, box head) on a
torchvision Faster R-CNN (``mapdet.modeling.detector.Detector``) in eval mode, over an iterable of
batches ``(images, targets, ...)``: images uint8 (3, H, W); targets dicts with ``boxes`` float
(N, 4) xyxy pixel-edge in that image, ``labels`` int64 (N,) category ids 1..K, ``image_id`` int,
optional ``iscrowd`` (N,).

The sweep then reruns only torchvision's own ``RoIHeads.postprocess_detections`` (score threshold,
per-class NMS, top-k) and ``transform.postprocess`` for each (NMS IoU, score threshold) pair, at
the largest detections-per-image value; smaller caps are the top-k prefix of that output (the
postprocess keeps detections sorted by score), so every grid point equals a full model run with
those three settings. Every grid point is scored at the headline maxDets (100 per image and class,
``records.HEADLINE_MAX_DETS``), where the AP is reported and the causes' impacts are read: a larger
per-image cap is worth only what it adds there.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch
from torchvision.ops import box_iou
from tqdm import tqdm

from mapdet.boxes import area, xyxy_to_xywh
from mapdet.diagnosis.caps import cap_per_image
from mapdet.diagnosis.postprocess import Postprocess, ProposalRecall, Sweep, SweepBest
from mapdet.diagnosis.records import HEADLINE_MAX_DETS
from mapdet.diagnosis.stats import points
from mapdet.evaluation.coco import evaluate_coco
from mapdet.evaluation.matching import MEDIUM, SMALL
from mapdet.structures import Detections


@dataclass
class HeadOutputs:
    """One batch after the network, before post-processing (resized-image frame)."""

    class_logits: torch.Tensor  # (sum P_i, K+1)
    box_regression: torch.Tensor  # (sum P_i, 4 (K+1))
    proposals: list[torch.Tensor]  # P_i x 4 xyxy, resized frame
    image_sizes: list[tuple[int, int]]  # resized (H, W)
    original_sizes: list[tuple[int, int]]  # stored (H, W)
    targets: list[dict] | None  # boxes resized into the model's frame


@torch.no_grad()
def head_outputs(model, images: list[torch.Tensor], targets: list[dict] | None = None) -> HeadOutputs:
    """Backbone + RPN + box head once, exactly as ``GeneralizedRCNN.forward`` runs them in eval."""
    model.eval()
    device = next(model.parameters()).device
    floats = [im.to(device).float() / 255 for im in images]
    original = [tuple(im.shape[-2:]) for im in floats]
    resized_in = None if targets is None else [{"boxes": t["boxes"].to(device).float()} for t in targets]
    image_list, resized = model.transform(floats, resized_in)
    features = model.backbone(image_list.tensors)
    if isinstance(features, torch.Tensor):
        features = OrderedDict([("0", features)])
    proposals, _ = model.rpn(image_list, features)
    heads = model.roi_heads
    pooled = heads.box_roi_pool(features, proposals, image_list.image_sizes)
    class_logits, box_regression = heads.box_predictor(heads.box_head(pooled))
    return HeadOutputs(class_logits, box_regression, proposals, image_list.image_sizes, original, resized)


def postprocess(model, out: HeadOutputs, nms_thresh: float, score_thresh: float, detections_per_img: int):
    """torchvision's post-processing with these settings: per image dicts in the stored frame."""
    heads = model.roi_heads
    saved = heads.nms_thresh, heads.score_thresh, heads.detections_per_img
    heads.nms_thresh, heads.score_thresh, heads.detections_per_img = nms_thresh, score_thresh, detections_per_img
    try:
        boxes, scores, labels = heads.postprocess_detections(
            out.class_logits, out.box_regression, out.proposals, out.image_sizes
        )
    finally:
        heads.nms_thresh, heads.score_thresh, heads.detections_per_img = saved
    result = [{"boxes": b, "scores": s, "labels": lab} for b, s, lab in zip(boxes, scores, labels)]
    return model.transform.postprocess(result, out.image_sizes, out.original_sizes)


def _to_detections(image_ids: list[int], outputs: list[dict]) -> Detections:
    return Detections.concat(
        Detections(
            np.full(len(o["scores"]), i), o["boxes"].cpu().numpy(), o["scores"].cpu().numpy(), o["labels"].cpu().numpy()
        )
        for i, o in zip(image_ids, outputs)
    )


def coco_from_targets(targets: list[dict], cat_ids: list[int]) -> dict:
    """COCO ground truth of the images seen (area = box area: size ranges are by box, not mask)."""
    images, anns = [], []
    for t in targets:
        h, w = t.get("size", (0, 0))
        images.append({"id": int(t["image_id"]), "width": int(w), "height": int(h)})
        crowd = t.get("iscrowd", torch.zeros(len(t["labels"]), dtype=torch.int64))
        boxes = t["boxes"].cpu().numpy()
        rows = zip(xyxy_to_xywh(boxes).tolist(), area(boxes).tolist(), t["labels"].tolist(), crowd.tolist())
        for box, a, c, cr in rows:
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": int(t["image_id"]),
                    "category_id": int(c),
                    "bbox": box,
                    "area": a,
                    "iscrowd": int(cr),
                }
            )
    return {"images": images, "annotations": anns, "categories": [{"id": int(k)} for k in cat_ids]}


@dataclass
class _ModelPass:
    """What one pass of the network over the images leaves for the measurements."""

    found: dict  # (nms, score) -> list of Detections, one per batch
    targets: list[dict]  # of the images seen, with their stored "size"
    hits: list  # proposal_hits of each batch
    proposals: list[int]  # per image


def _grid_values(values) -> list[float]:
    return sorted({float(v) for v in values})


def run_model_checks(
    model,
    batches,
    cat_ids: list[int],
    nms_thresh=(0.3, 0.5, 0.7),
    score_thresh=(0.0, 0.05, 0.3),
    detections_per_img=(100, 300, 1000),
    current=None,
    iou: float = 0.5,
    max_images: int | None = None,
    progress: bool = False,
) -> tuple[Sweep, ProposalRecall]:
    """(sweep, proposal_recall) over ``batches``; ``current`` = (nms, score, dets) of the model config.

    sweep: ``ap`` (len(nms), len(score), len(dets)) COCO AP points at the headline maxDets, ``ap50``
    the same, ``best``, ``current_ap``. proposal_recall: share of non-crowd GT boxes (by COCO size of
    the stored box) with IoU >= ``iou`` to some RPN proposal.
    """
    nms_v, score_v = _grid_values(nms_thresh), _grid_values(score_thresh)
    caps = sorted({int(c) for c in detections_per_img})
    if current is not None:
        current = Postprocess(float(current[0]), float(current[1]), int(current[2]))
        nms_v, score_v = _grid_values(nms_v + [current.nms_thresh]), _grid_values(score_v + [current.score_thresh])
        caps = sorted(set(caps) | {current.detections_per_img})
    grid = list(itertools.product(nms_v, score_v))
    seen = _model_pass(model, batches, grid, caps[-1], iou, max_images, progress)
    if not seen.targets:
        raise ValueError("the model checks saw no image: the loader is empty")
    gt = coco_from_targets(seen.targets, cat_ids)
    found = {p: Detections.concat(v) for p, v in seen.found.items()}
    sweep = evaluate_grid(gt, found, nms_v, score_v, caps, current)
    return sweep, _recall_by_size(seen.hits, iou, float(np.mean(seen.proposals)))


def _model_pass(model, batches, grid, cap: int, iou: float, max_images: int | None, progress: bool) -> _ModelPass:
    """The network once per image (at most ``max_images``), post-processed at every grid point."""
    seen = _ModelPass({p: [] for p in grid}, [], [], [])
    bar = tqdm(desc="diagnose: model pass", unit="img", disable=not progress, total=max_images)
    for batch in batches:
        images, targets = batch[0], batch[1]
        if max_images is not None:
            room = max_images - len(seen.targets)
            images, targets = images[:room], targets[:room]
        if not images:
            break
        out = head_outputs(model, images, targets)
        ids = [int(t["image_id"]) for t in targets]
        for nms, score in grid:
            seen.found[(nms, score)].append(_to_detections(ids, postprocess(model, out, nms, score, cap)))
        seen.hits.append(proposal_hits(out, targets, iou))
        seen.proposals += [len(p) for p in out.proposals]
        seen.targets += [{**t, "size": tuple(im.shape[-2:])} for t, im in zip(targets, images)]
        bar.update(len(images))
    bar.close()
    return seen


def evaluate_grid(gt: dict, found: dict, nms_v, score_v, caps, current: Postprocess | None) -> Sweep:
    """The sweep's grids from ``found`` {(nms, score): Detections at the largest cap, sorted by score
    per image as torchvision keeps them}: each cap is the top-k of every image, scored at the headline maxDets."""
    ap = np.zeros((len(nms_v), len(score_v), len(caps)))
    ap50 = np.zeros_like(ap)
    for (i, n), (j, s) in itertools.product(enumerate(nms_v), enumerate(score_v)):
        for k, cap in enumerate(caps):
            r = evaluate_coco(gt, cap_per_image(found[(n, s)], cap), max_dets=(HEADLINE_MAX_DETS,))
            ap[i, j, k] = points(r.ap(max_dets=HEADLINE_MAX_DETS)) or 0.0
            ap50[i, j, k] = points(r.ap(iou=0.5, max_dets=HEADLINE_MAX_DETS)) or 0.0
    i, j, k = np.unravel_index(int(np.argmax(ap)), ap.shape)
    cur = None
    if current is not None:
        at = (
            nms_v.index(current.nms_thresh),
            score_v.index(current.score_thresh),
            caps.index(current.detections_per_img),
        )
        cur = float(ap[at])
    return Sweep(
        nms_thresh=list(nms_v),
        score_thresh=list(score_v),
        detections_per_img=list(caps),
        ap=ap.tolist(),
        ap50=ap50.tolist(),
        best=SweepBest(nms_v[i], score_v[j], caps[k], float(ap[i, j, k])),
        current_ap=cur,
        current=current,
        num_images=len(gt["images"]),
    )


def proposal_hits(out: HeadOutputs, targets: list[dict], iou: float) -> tuple[np.ndarray, np.ndarray]:
    """Per non-crowd GT box: (covered by a proposal at ``iou``, COCO area in the stored frame)."""
    hits, areas = [], []
    for props, resized, t in zip(out.proposals, out.targets, targets):
        crowd = t.get("iscrowd", torch.zeros(len(t["labels"]), dtype=torch.int64)).bool().cpu()
        boxes = resized["boxes"].cpu()[~crowd]
        stored = t["boxes"].float().cpu()[~crowd]
        if len(boxes) == 0:
            continue
        best = box_iou(boxes, props.cpu()).max(dim=1).values if len(props) else torch.zeros(len(boxes))
        hits.append((best >= iou).numpy())
        areas.append(area(stored.numpy()))
    return (np.concatenate(hits) if hits else np.zeros(0, bool)), (np.concatenate(areas) if areas else np.zeros(0))


def _recall_by_size(parts, iou: float, proposals_per_image: float) -> ProposalRecall:
    """Recall by COCO size from the ``proposal_hits`` of every batch."""
    hits = np.concatenate([hit for hit, _ in parts]) if parts else np.zeros(0, bool)
    area = np.concatenate([a for _, a in parts]) if parts else np.zeros(0)
    ranges = {
        "all": np.ones(len(area), bool),
        "small": area < SMALL,
        "medium": (area >= SMALL) & (area < MEDIUM),
        "large": area >= MEDIUM,
    }
    return ProposalRecall(
        iou,
        proposals_per_image,
        {k: (float(hits[m].mean()) if m.any() else None) for k, m in ranges.items()},
        {k: int(m.sum()) for k, m in ranges.items()},
    )
