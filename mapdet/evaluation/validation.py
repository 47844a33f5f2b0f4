"""One validation pass, shared by ``mapdet train`` (periodic) and ``mapdet evaluate``.

Every rank runs the unwrapped model on its exactly-once share of the validation shards
(``mapdet.data.loaders.eval_loader``); image keys and summed losses are gathered and coverage is
checked against the manifest (a missing or duplicated image is an error naming the keys), both by
``mapdet.engine.inference.predict_everywhere``; the COCO scoring is split across ranks by category
(``mapdet.evaluation.coco.evaluate_coco``): each rank's detections (packed arrays, stored-image
coordinates, xyxy pixel-edge) go to the ranks that score their categories, so no rank holds every
detection. Detections are relabelled from the model's labels 1..K to the pack's COCO category ids
(``mapdet.shards.manifest.category_ids``) before scoring, so they match ``{split}.coco.json`` and
detections.json carries the ids of a COCO pack's own file. A rank keeps its own detections
(``Validation.detections``); ``stream_detections`` hands every rank's, one rank at a time, to the
main process for writing detections.json, so the main process never holds them all either (the
price: the other ranks wait while it writes). Ranks with uneven shares never wait inside the loop:
the only collectives come after it.

A corrupt sample or shard on any rank raises ``CorruptSample`` (naming shard and key) on every
rank. Images left out because ``eval.skip_corrupt`` is on are removed from the ground truth too
(their objects would otherwise count as misses) and reported as ``images_left_out``.
"""

from __future__ import annotations

from dataclasses import dataclass

from tqdm import tqdm

from mapdet import comm
from mapdet.config import EvalConfig
from mapdet.data.loaders import eval_keys, eval_loader
from mapdet.engine.inference import predict_everywhere
from mapdet.evaluation.coco import CocoResult, evaluate_coco
from mapdet.shards.manifest import by_category_id, category_ids, class_names, sample_key
from mapdet.shards.reader import CorruptSample
from mapdet.structures import Detections


@dataclass
class Validation:
    result: CocoResult
    detections: Detections  # this rank's (all of them in one process), COCO category ids; see stream_detections
    loss: dict[str, float]  # mean per image ({} without eval.val_loss)
    images: int
    left_out: list[dict]  # corrupt samples skipped (eval.skip_corrupt)


def validate(model, device, cfg: EvalConfig, shards, manifest: dict, gt: dict) -> Validation:
    """Collective: every rank calls it with the same arguments; every rank gets the result."""
    if not manifest["num_samples"]:  # COCO would score it -1 (no ground truth): no number is better
        raise ValueError(f"the {manifest['split']} split in {shards} has no images to evaluate")
    rank, world = comm.get_rank(), comm.get_world_size()
    loader = eval_loader(shards, manifest, cfg.batch_size, cfg.workers, rank, world, cfg.skip_corrupt)
    expected = [k for shard in manifest["shards"] for k in shard["keys"]]
    with tqdm(
        total=len(eval_keys(manifest, rank, world)),
        desc="validate",
        unit="img",
        disable=not comm.is_main_process(),
        leave=False,
    ) as bar:
        seen = predict_everywhere(
            model,
            loader,
            device,
            expected,
            f"evaluation of {manifest['split']}",
            with_loss=cfg.val_loss,
            progress=bar,
            # Only a corrupt sample or shard is an input error (exit 2): it reaches every rank as it was.
            catch=CorruptSample,
            describe=str,
            raise_as=CorruptSample,
        )
    if seen.skipped:
        gt = _without_images(gt, manifest, {sample["key"] for sample in seen.skipped})
    dets = seen.detections.relabel(category_ids(manifest["classes"]))
    result = evaluate_coco(gt, dets, max_dets=sorted({1, 10, 100, *cfg.max_dets}))
    mean_loss = {k: v / max(len(seen.keys), 1) for k, v in seen.loss_sum.items()}
    return Validation(result, dets, mean_loss, len(seen.keys), seen.skipped)


def stream_detections(v: Validation, consume) -> None:
    """Collective: ``consume(Detections)`` on the main process for every rank's detections, in
    rank order (the order ``evaluate_coco`` scored them in), one rank's at a time."""

    def unpack(data):
        consume(Detections.from_bytes(data))

    comm.stream_to_main(v.detections.to_bytes(), unpack if comm.is_main_process() else None)


def _without_images(gt: dict, manifest: dict, keys: set[str]) -> dict:
    drop = {im["id"] for im in gt["images"] if sample_key(manifest, im) in keys}
    return {
        **gt,
        "images": [im for im in gt["images"] if im["id"] not in drop],
        "annotations": [a for a in gt["annotations"] if a["image_id"] not in drop],
    }


def metrics_dict(v: Validation, manifest: dict, train_manifest: dict | None = None) -> dict:
    """metrics.json content: COCO summary, AP at each maxDets, per-class rows (by COCO category id),
    val loss, coverage."""
    num_train = None
    if train_manifest is not None:
        num_train = {int(c): s["instances"] for c, s in by_category_id(train_manifest)["class_stats"].items()}
    names = class_names(by_category_id(manifest))
    bbox = {**v.result.summary(), "per_class": v.result.per_class(names, num_train)}
    return {
        "bbox": bbox,
        "val_loss": v.loss,
        "images": v.images,
        "images_left_out": len(v.left_out),
        "left_out": v.left_out,
    }
