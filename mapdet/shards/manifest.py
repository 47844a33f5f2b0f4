"""The shard manifest: what a packed split contains, read by every later stage.

``OUT/{split}.manifest.json`` (schema in shards/README.md)::

    {"format": "mapdet-shards/1", "split": "training", "version": "v2.0", "source": "panoptic",
     "class_set": "evaluated",                                             # or "all-instances"
     "classes": [{"id": 1, "name": "object--vehicle--car"}, ...],          # ids 1..K, 0 = background
     "not_evaluated": {"classes": ["object--sign--ambiguous", ...], "objects": {name: n},
                       "handling": "left-out"},                            # or "kept" (as classes)
     "num_samples": 18000, "num_instances": 1.2e6,
     "shards": [{"name": "training-000000.tar", "num_samples": 1000, "bytes": ..., "sha256": ...,
                 "keys": ["stem", ...]}, ...],                             # keys in tar order
     "class_stats": {"1": {"instances": n, "images": m, "crowd": c}, ...},
     "pack": {"max_side": 2048, "samples_per_shard": 1000, "quality": 95, ...},
     "skipped": [{"key": "stem", "reason": "..."}], "sanitized": {"clipped": n, "dropped": m},
     "coco": "training.coco.json"}

Read through ``mapdet.shards.source``: the folder may also be a URL or a ``pipe:`` command.

A pack from COCO detection JSON (``mapdet pack --coco``) has ``"version": "coco"``, ``"source":
"coco"``, ``"annotations"`` (the JSON's file name), ``"class_set": "all-categories"`` (or
``"chosen-categories"``), classes ``{"id": k, "name", "category_id": the file's own id,
"supercategory"}``, ``"left_out": {"classes": [names], "objects": {name: n}}`` (categories not
kept by ``--categories``) and ``"bad_annotations": [{"index", "id", "reason"}]`` in place of
``not_evaluated``; its sample keys are the image ids. Labels 1..K are positions in ``classes``
everywhere inside mapdet; every COCO file mapdet writes numbers categories by ``category_id``
(``category_ids``, ``by_category_id``), which a Vistas pack's classes lack (it is then the id).

Files are written atomically (temporary name, then ``os.replace``) so a killed job never leaves a
half-written manifest that looks complete.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np

from mapdet.shards.source import ShardSource, check_name, shard_source

FORMAT = "mapdet-shards/1"
_SPLIT_NAME = re.compile(r"[A-Za-z0-9_-]+")


def manifest_name(split: str) -> str:
    return f"{split}.manifest.json"


def coco_name(split: str) -> str:
    return f"{split}.coco.json"


def manifest_path(out: str | Path, split: str) -> Path:
    return Path(out) / manifest_name(split)


def coco_path(out: str | Path, split: str) -> Path:
    return Path(out) / coco_name(split)


def check_split_name(split: str) -> str:
    """``split``, refused (ValueError) unless letters, digits, ``_`` and ``-``: it names files and URLs."""
    if not _SPLIT_NAME.fullmatch(split):
        raise ValueError(f"--split {split!r}: use letters, digits, '_' and '-' only (e.g. training, val2017)")
    return split


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


class ManifestError(ValueError):
    """A missing or malformed manifest; the message says which file and what to run."""


class NoManifest(ManifestError):
    """The source holds no manifest of that split."""


def load_manifest(out: str | Path | ShardSource, split: str) -> dict:
    """The manifest of ``split`` in ``out`` (a folder, URL or pipe: source: ``mapdet.shards.source``).

    Every shard name it lists is checked to be a plain file name before anything opens it (a
    remote manifest must not smuggle shell syntax into a pipe: command or a path out of the folder).
    """
    source = shard_source(out)
    name = manifest_name(split)
    try:
        manifest = json.loads(source.read_bytes(name))
    except FileNotFoundError:
        raise NoManifest(f"no manifest {source.where(name)}{_missing_hint(source)}") from None
    except OSError as e:  # a StreamError names the file and the cause
        raise ManifestError(f"cannot read the manifest: {e}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ManifestError(f"{source.where(name)} is not valid JSON: {e}") from None
    if not isinstance(manifest, dict):
        kind = {list: "list", str: "string"}.get(type(manifest), type(manifest).__name__)
        raise ManifestError(f"{source.where(name)}: a JSON {kind}, not a manifest written by `mapdet pack`")
    if manifest.get("format") != FORMAT:
        raise ManifestError(f"{source.where(name)}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    for shard in manifest.get("shards", []):
        try:
            check_name(shard.get("name") if isinstance(shard, dict) else shard)
        except ValueError as e:
            raise ManifestError(f"{source.where(name)}: {e}") from None
    return manifest


def _missing_hint(source: ShardSource) -> str:
    if source.local_dir is None:
        return " (upload the manifests and COCO files beside the shards, or name another split)"
    out = source.local_dir
    found = sorted(p.name for p in out.glob("*.manifest.json")) if out.is_dir() else []
    return f" (found: {', '.join(found)})" if found else " (run `mapdet pack` first)"


def load_coco(out: str | Path | ShardSource, split: str) -> dict:
    """``{split}.coco.json`` of ``out``, read through the same source as the shards; ValueError
    (one line: exit 2) when it cannot be read."""
    source = shard_source(out)
    name = coco_name(split)
    try:
        return json.loads(source.read_bytes(name))
    except FileNotFoundError:
        raise ValueError(f"no COCO ground truth {source.where(name)} (`mapdet pack` writes it)") from None
    except OSError as e:
        raise ValueError(f"cannot read the COCO ground truth: {e}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{source.where(name)} is not valid JSON: {e}") from None


def class_names(manifest: dict) -> dict[int, str]:
    return {int(c["id"]): c["name"] for c in manifest["classes"]}


def is_coco_pack(manifest: dict) -> bool:
    """Packed from COCO detection JSON (a manifest or a pack plan): keys are image ids, and the
    user's own annotations file is the ground truth their results are scored against."""
    return manifest.get("source") == "coco"


def category_id(c: dict) -> int:
    """The COCO category id of a manifest class: the input's own, else the class id."""
    return int(c.get("category_id", c["id"]))


def category_ids(classes: list[dict]) -> np.ndarray:
    """int64 (K + 1,): the COCO category id of each label 0..K (0, background, stays 0)."""
    lut = np.zeros(len(classes) + 1, np.int64)
    for c in classes:
        lut[int(c["id"])] = category_id(c)
    return lut


def coco_category(c: dict) -> dict:
    """A manifest class as a COCO ``categories`` entry (Vistas: supercategory = the name's first part)."""
    return {"id": category_id(c), "name": c["name"], "supercategory": c.get("supercategory", c["name"].split("--")[0])}


def by_category_id(manifest: dict) -> dict:
    """The manifest with classes and ``class_stats`` numbered by COCO category id, as the COCO files
    are (per-class tables of evaluation and diagnosis); the manifest itself for a Vistas pack."""
    ids = {str(c["id"]): category_id(c) for c in manifest["classes"]}
    if all(str(v) == k for k, v in ids.items()):
        return manifest
    stats = manifest.get("class_stats", {})
    return {
        **manifest,
        "classes": [{**c, "id": category_id(c)} for c in manifest["classes"]],
        "class_stats": {str(ids[k]): v for k, v in stats.items()},
    }


def sample_key(manifest: dict, image: dict) -> str:
    """The sample key of an image of the split's COCO file: its id (COCO pack), its file stem (Vistas)."""
    return str(image["id"]) if is_coco_pack(manifest) else image["file_name"].rsplit(".", 1)[0]


def class_instance_counts(manifest: dict) -> list[int]:
    """Training instances per class, index k-1 for class id k (length K), for class weights."""
    stats = manifest.get("class_stats", {})
    return [int(stats.get(str(c["id"]), {}).get("instances", 0)) for c in manifest["classes"]]


def class_image_fractions(manifest: dict) -> dict[int, float]:
    """f(c): the share of training images containing class c (repeat-factor sampling's input)."""
    n = max(int(manifest["num_samples"]), 1)
    stats = manifest.get("class_stats", {})
    return {int(c["id"]): int(stats.get(str(c["id"]), {}).get("images", 0)) / n for c in manifest["classes"]}


def classes_mismatch(a: dict, b: dict) -> str | None:
    """Why two splits' manifests cannot share a model (different classes or class sets), or None.

    Training and validation must be packed with the same class set: label ids are positions in it.
    """
    if a["classes"] == b["classes"]:
        return None
    set_a, set_b = a.get("class_set", "all-instances"), b.get("class_set", "all-instances")
    if is_coco_pack(a) or is_coco_pack(b):
        fix = "pack both from COCO JSON with the same categories (the same --categories)"
    elif set_a != set_b:
        fix = "pack both with the same --all-instance-classes setting"
    else:
        fix = "pack both from the same Vistas config and version"
    return (
        f"{a['split']} ({len(a['classes'])} classes, class set {set_a}) and {b['split']} "
        f"({len(b['classes'])} classes, class set {set_b}) have different classes: {fix}"
    )


def describe(manifest: dict) -> str:
    """A few lines for the terminal: size, classes, and every fault the packer counted."""
    origin = (
        f"COCO JSON {manifest['annotations']}"
        if is_coco_pack(manifest)
        else f"{manifest['version']}, boxes from {manifest['source']}"
    )
    lines = [
        f"{manifest['split']}: {manifest['num_samples']} images, {manifest['num_instances']} objects, "
        f"{len(manifest['shards'])} shards, {len(manifest['classes'])} classes ({origin})"
    ]
    lo = manifest.get("left_out")
    if lo and lo["classes"]:
        names, more = ", ".join(lo["classes"][:10]), " ..." if len(lo["classes"]) > 10 else ""
        lines.append(
            f"{len(lo['classes'])} categor{'y' if len(lo['classes']) == 1 else 'ies'} not kept by --categories "
            f"({names}{more}): {sum(lo['objects'].values())} object(s) left out"
        )
    bad = manifest.get("bad_annotations")
    if bad:
        lines.append(f"left out {len(bad)} bad annotation(s) (listed in the manifest's 'bad_annotations'):")
        lines += [f"  annotation {b['id']} (#{b['index']}): {b['reason']}" for b in bad[:10]]
    ne = manifest.get("not_evaluated")
    if ne and ne["classes"]:
        n = sum(ne["objects"].values())
        what = (
            "left out (not classes; --all-instance-classes keeps them)"
            if ne["handling"] == "left-out"
            else "kept as classes (--all-instance-classes)"
        )
        lines.append(
            f"class set {manifest['class_set']}: {len(ne['classes'])} instance class(es) Vistas does not "
            f"evaluate ({', '.join(ne['classes'])}) with {n} object(s) {what}"
        )
    if manifest["skipped"]:
        lines.append(f"skipped {len(manifest['skipped'])} bad input(s) (listed in the manifest's 'skipped'):")
        lines += [f"  {s['key']}: {s['reason']}" for s in manifest["skipped"][:10]]
    s = manifest["sanitized"]
    if s["clipped"] or s["dropped"]:
        lines.append(f"sanitised boxes: {s['clipped']} clipped to the image, {s['dropped']} without area dropped")
    return "\n".join(lines)
