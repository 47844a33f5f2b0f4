"""Merge a finished pack: the part files of every shard become ``{split}.manifest.json`` and
``{split}.coco.json`` (the COCO ground truth of the classes), written atomically.

A merge runs once every pack job has finished (``merge`` names the unfinished shards otherwise)
and refuses parts packed with different class sets, whose label ids would not agree.

The COCO file uses the input's own numbering: a pack from COCO JSON keeps its category ids (the
manifest's ``category_id`` of each class), image ids, file names and each annotation's own
``area`` (scaled with the image); a Vistas pack's category ids are the class ids 1..K, its image
ids 1..n, and ``area`` is the box's. Boxes are in stored-image pixels either way.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mapdet import boxes as box_ops
from mapdet.fileio import read_json, write_json_atomic
from mapdet.shards.manifest import category_ids, coco_category, is_coco_pack, shard_name
from mapdet.shards.writer import LEGACY_CLASS_SET, part_path, plan_path


def merge(out: str | Path, split: str, root: str | None = None) -> dict:
    """Write ``{split}.manifest.json`` and ``{split}.coco.json`` from finished part files.

    Raises ``ValueError`` naming the unfinished shards when some job has not completed.
    """
    out = Path(out)
    if not plan_path(out, split).exists():
        raise ValueError(f"{out} has no {split} pack in progress ({plan_path(out, split)} missing)")
    plan = read_json(plan_path(out, split), "pack plan")
    parts, missing = [], []
    for i in range(plan["num_shards"]):
        p = part_path(out, split, i)
        if p.exists():
            parts.append(read_json(p, "pack part"))
        else:
            missing.append(shard_name(split, i))
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise ValueError(
            f"{len(missing)} of {plan['num_shards']} {split} shards are not finished: "
            f"{', '.join(missing[:5])}{more}; rerun the pack job(s) that own them"
        )
    _check_class_sets(out, split, plan, parts)
    manifest = _manifest(plan, parts, split, root)
    write_json_atomic(out / f"{split}.coco.json", _coco(plan, parts), indent=None)
    write_json_atomic(out / f"{split}.manifest.json", manifest)
    return manifest


def _check_class_sets(out: Path, split: str, plan: dict, parts: list[dict]) -> None:
    """Refuse a merge over shards packed with different class sets (their label ids differ).

    The plan already refuses a job whose options differ from the first job's, but two jobs that
    start at once, or a plan deleted between jobs, can still leave parts of both kinds.
    """
    want = plan.get("class_set", LEGACY_CLASS_SET)
    sets: dict[str, list[str]] = {}
    for part in parts:
        sets.setdefault(part.get("class_set", LEGACY_CLASS_SET), []).append(shard_name(split, part["index"]))
    if set(sets) != {want}:
        found = "; ".join(
            f"{cs}: {', '.join(names[:5])}{' ...' if len(names) > 5 else ''}" for cs, names in sorted(sets.items())
        )
        option = "--categories" if is_coco_pack(plan) else "--all-instance-classes"
        raise ValueError(
            f"{out}: the {split} shards were packed with different class sets ({found}; the plan "
            f"says {want}); their label ids do not agree, so they cannot be merged. Repack the "
            f"split into a fresh folder with the same {option} setting for every job"
        )


def _not_evaluated(plan: dict, parts: list[dict], stats: dict) -> dict:
    """The manifest's account of Vistas' not-evaluated instance classes and their objects."""
    class_set = plan.get("class_set", LEGACY_CLASS_SET)
    names = plan.get("not_evaluated", [])
    if class_set == "evaluated":
        objects = {name: sum(p.get("left_out", {}).get(name, 0) for p in parts) for name in names}
        return {"classes": names, "objects": objects, "handling": "left-out"}
    ids = {c["name"]: str(c["id"]) for c in plan["classes"]}
    objects = {name: stats[ids[name]]["instances"] + stats[ids[name]]["crowd"] for name in names if name in ids}
    return {"classes": names, "objects": objects, "handling": "kept"}


def _left_out(plan: dict, parts: list[dict]) -> dict:
    """A COCO pack's account of the categories ``--categories`` left out and their objects."""
    names = plan["left_out"]
    objects = {name: sum(p.get("left_out", {}).get(name, 0) for p in parts) for name in names}
    return {"classes": names, "objects": objects}


def _source_fields(plan: dict, parts: list[dict], stats: dict) -> dict:
    """What the manifest says about classes outside the class set, and faults of the input's JSON."""
    if is_coco_pack(plan):
        return {
            "annotations": plan["annotations"],
            "left_out": _left_out(plan, parts),
            "bad_annotations": plan["bad_annotations"],
        }
    return {"not_evaluated": _not_evaluated(plan, parts, stats)}


def _manifest(plan: dict, parts: list[dict], split: str, root: str | None) -> dict:
    stats = {str(c["id"]): {"instances": 0, "images": 0, "crowd": 0} for c in plan["classes"]}
    sanitized = box_ops.SanitizeCounts()
    for part in parts:
        sanitized.add(box_ops.SanitizeCounts(**part["sanitized"]))
        for rec in part["records"]:
            labels, crowd = np.asarray(rec["labels"], int), np.asarray(rec["iscrowd"], int)
            for k in np.unique(labels[crowd == 0]):
                stats[str(k)]["images"] += 1
            for k, c in zip(labels, crowd):
                stats[str(k)]["crowd" if c else "instances"] += 1
    shards = [
        {key: p[key] for key in ("name", "num_samples", "bytes", "sha256", "keys")} for p in parts if p["num_samples"]
    ]
    return {
        "format": "mapdet-shards/1",
        "split": split,
        "version": plan["version"],
        "source": plan["source"],
        "class_set": plan.get("class_set", LEGACY_CLASS_SET),
        "classes": plan["classes"],
        **_source_fields(plan, parts, stats),
        "num_samples": sum(s["num_samples"] for s in shards),
        "num_instances": sum(v["instances"] for v in stats.values()),
        "num_inputs": plan["num_inputs"],
        "shards": shards,
        "class_stats": stats,
        "pack": {**plan["options"], "root": root},
        "skipped": [s for p in parts for s in p["skipped"]],
        "sanitized": {"clipped": sanitized.clipped, "dropped": sanitized.dropped},
        "coco": f"{split}.coco.json",
    }


def _coco(plan: dict, parts: list[dict]) -> dict:
    images, annotations = [], []
    category_of = category_ids(plan["classes"])
    for part in parts:
        # parts written before file names were recorded: Vistas' f"{stem}.jpg"
        file_names = part.get("file_names") or [f"{key}.jpg" for key in part["keys"]]
        for file_name, rec in zip(file_names, part["records"]):
            images.append(
                {"id": rec["image_id"], "file_name": file_name, "width": rec["width"], "height": rec["height"]}
            )
            xywh = box_ops.xyxy_to_xywh(np.asarray(rec["boxes"], float).reshape(-1, 4)).tolist()
            areas = rec.get("area") or [box[2] * box[3] for box in xywh]
            for box, label, crowd, area in zip(xywh, rec["labels"], rec["iscrowd"], areas):
                annotations.append(
                    {
                        "id": len(annotations) + 1,  # COCO ids start at 1: 0 breaks pycocotools' matching
                        "image_id": rec["image_id"],
                        "category_id": int(category_of[label]),
                        "bbox": box,
                        "area": area,
                        "iscrowd": int(crowd),
                    }
                )
    categories = [coco_category(c) for c in plan["classes"]]
    return {
        "info": {"description": f"mapdet {plan['split']}"},
        "images": images,
        "annotations": annotations,
        "categories": categories,
    }
