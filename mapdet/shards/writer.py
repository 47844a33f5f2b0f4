"""Pack a dataset split into WebDataset shards: deterministic, parallel, resumable, splittable.

The input is read by a reader: ``VistasReader`` (a raw Vistas split, ``pack``) or ``CocoReader``
(COCO detection JSON and its images, ``pack_from``). Its sorted list of sample keys is cut into
consecutive chunks of ``samples_per_shard``; chunk ``i`` becomes ``OUT/{split}-{i:06d}.tar`` no
matter how many jobs or processes pack it. Job ``j`` of ``n`` packs the chunks with ``i % n == j``,
so SLURM array tasks write disjoint shards and their outputs merge into the same dataset a single
job writes.

Each shard is written under ``.tmp`` and renamed, then a part file ``OUT/.parts/{shard}.json``
(counts, sha256, annotations, file names, skipped inputs) is written atomically. A shard is finished
exactly when its part file exists, so a rerun after a kill redoes only unfinished shards.
``mapdet.shards.merge`` turns the part files into the manifest and the COCO ground truth once every
shard is finished. The plan ``OUT/.parts/{split}.plan.json`` records the input's description
(``reader.plan()``) and the options that shape the bytes; a resume or another job must find the same.

Samples: ``__key__`` = the reader's key (Vistas: image stem; COCO: image id), ``jpg`` = the original
JPEG bytes when no resize is needed (else, or for another format, re-encoded at ``quality``),
``json`` = {image_id, width, height (stored image), orig_width, orig_height, boxes (xyxy
pixel-edge, stored image), labels (1..K), iscrowd}, plus ``area`` (the input's own object areas
scaled by the resize, COCO only). ``image_id`` is the input's own (COCO) or the image's 1-based
position in the split's sorted keys (Vistas).

Class set (Vistas): by default the classes Vistas' instance benchmark evaluates (``"instances"`` and
``"evaluate"`` in the config; ``class_set="evaluated"``); objects of the instance classes it does
not evaluate (v2.0's two ambiguous sign classes) are left out of records and COCO ground truth and
counted in the manifest's ``not_evaluated``. ``class_set="all-instances"`` (``mapdet pack
--all-instance-classes``) keeps every instance class. The plan, every part file and the manifest
record the class set; a resume or a merge over parts with another class set is refused.
"""

from __future__ import annotations

import io
import json
import multiprocessing as mp
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image
from tqdm import tqdm

from mapdet import boxes as box_ops
from mapdet.datasets.layout import CLASS_SETS
from mapdet.datasets.sample_files import BadSample, RawSample
from mapdet.datasets.vistas import VistasReader
from mapdet.fileio import atomic_open, read_json, write_json_atomic
from mapdet.shards.manifest import sha256_file, shard_name

LEGACY_CLASS_SET = "all-instances"  # what a plan or part file written before class sets were recorded used


@dataclass
class PackOptions:
    max_side: int | None = None  # longest stored side; None keeps images at full size
    samples_per_shard: int = 1000
    quality: int = 95  # JPEG quality of resized images
    workers: int = 1
    job_index: int = 0
    num_jobs: int = 1
    version: str | None = None  # None: detect from the download
    source: str = "auto"  # where boxes come from: auto | panoptic | instances
    class_set: str = "evaluated"  # evaluated (the benchmark's classes) | all-instances

    def content_key(self) -> dict:
        """The options that change shard bytes (a resume must use the same ones)."""
        return {"max_side": self.max_side, "samples_per_shard": self.samples_per_shard, "quality": self.quality}


def parts_dir(out: Path) -> Path:
    return Path(out) / ".parts"


def part_path(out: Path, split: str, index: int) -> Path:
    return parts_dir(out) / (shard_name(split, index) + ".json")


def plan_path(out: Path, split: str) -> Path:
    return parts_dir(out) / f"{split}.plan.json"


def pack(root: str | Path, out: str | Path, split: str, opts: PackOptions) -> list[int]:
    """Pack this job's shards of the Vistas ``split`` under ``root``; returns the shard indices packed."""
    if opts.class_set not in CLASS_SETS:
        raise ValueError(f"class_set must be one of {CLASS_SETS}, got {opts.class_set!r}")
    reader = VistasReader(root, split, version=opts.version, source=opts.source, class_set=opts.class_set)
    return pack_from(reader, out, split, opts)


def pack_from(reader, out: str | Path, split: str, opts: PackOptions) -> list[int]:
    """Pack this job's shards of ``split`` from ``reader`` (``keys()``, ``read(key) -> RawSample``,
    ``plan()``, ``class_set``, ``nothing_to_pack``); returns the shard indices packed by this call.
    Only the options that shape the bytes and the job's share are used (not version/source/class_set)."""
    if not 0 <= opts.job_index < opts.num_jobs:
        raise ValueError(f"--job-index {opts.job_index} must be in [0, --num-jobs={opts.num_jobs})")
    if opts.samples_per_shard < 1:
        raise ValueError("--samples-per-shard must be at least 1")
    out = Path(out)
    keys = reader.keys()
    if not keys:
        raise ValueError(reader.nothing_to_pack)
    parts_dir(out).mkdir(parents=True, exist_ok=True)  # only once the input reads: a bad one leaves nothing
    chunks = [keys[i : i + opts.samples_per_shard] for i in range(0, len(keys), opts.samples_per_shard)]
    _write_plan(out, split, reader, opts, len(keys), len(chunks))
    mine = [i for i in range(len(chunks)) if i % opts.num_jobs == opts.job_index]
    todo = [i for i in mine if not part_path(out, split, i).exists()]
    tasks = [(i, chunks[i], i * opts.samples_per_shard + 1) for i in todo]
    desc = f"pack {split} (job {opts.job_index + 1}/{opts.num_jobs})"
    global _READER, _TASK_CONTEXT
    _READER, _TASK_CONTEXT = reader, (out, split, opts)
    bar = tqdm(total=len(mine), initial=len(mine) - len(todo), desc=desc, unit="shard")
    if opts.workers > 1 and len(tasks) > 1:
        # fork: workers inherit the reader (and its parsed panoptic JSON) instead of re-reading it.
        with mp.get_context("fork").Pool(min(opts.workers, len(tasks))) as pool:
            for _ in pool.imap_unordered(pack_shard, tasks):
                bar.update()
    else:
        for task in tasks:
            pack_shard(task)
            bar.update()
    bar.close()
    return todo


def _write_plan(out: Path, split: str, reader, opts: PackOptions, n_inputs: int, n_shards: int) -> None:
    plan = {
        "split": split,
        "num_inputs": n_inputs,
        "num_shards": n_shards,
        "options": opts.content_key(),
        **reader.plan(),
    }
    path = plan_path(out, split)
    if path.exists():
        old = read_json(path, "pack plan")
        if old != plan:
            diff = sorted(k for k in plan if plan[k] != old.get(k))
            raise ValueError(
                f"{out} already holds a {split} pack made with different inputs or options "
                f"(differs in: {', '.join(diff)}); pack into a fresh folder or delete {parts_dir(out)}"
            )
        return
    write_json_atomic(path, plan)


# Set in the parent before forking so each worker reuses them without pickling.
_READER = None
_TASK_CONTEXT: tuple | None = None


def pack_shard(task: tuple[int, list[str], int]) -> None:
    index, keys, first_image_id = task
    out, split, opts = _TASK_CONTEXT
    name = shard_name(split, index)
    samples, skipped, counts, left_out = [], [], box_ops.SanitizeCounts(), {}
    for offset, key in enumerate(keys):
        try:
            raw = _READER.read(key)
            jpg, record, sanitized = encode_sample(raw, first_image_id + offset, opts)
        except BadSample as e:
            skipped.append({"key": key, "reason": str(e)})
            continue
        counts.add(sanitized)
        for cls, n in (raw.left_out or {}).items():
            left_out[cls] = left_out.get(cls, 0) + n
        samples.append((key, jpg, record, raw.file_name))
    part = {
        "index": index,
        "name": None,
        "num_samples": len(samples),
        "bytes": 0,
        "sha256": None,
        "class_set": _READER.class_set,
    }
    if samples:
        part.update(_write_tar(Path(out) / name, samples))
    part.update(
        keys=[s[0] for s in samples],
        records=[s[2] for s in samples],
        file_names=[s[3] for s in samples],
        skipped=skipped,
        sanitized=asdict(counts),
        left_out=dict(sorted(left_out.items())),
    )
    write_json_atomic(part_path(out, split, index), part, indent=None)


def _write_tar(path: Path, samples: list[tuple[str, bytes, dict]]) -> dict:
    with atomic_open(path, "wb") as f:
        # mtime fixed and keys sorted by TarWriter: the same input gives byte-identical shards.
        with wds.TarWriter(f, encoder=False, mtime=0.0, user="mapdet", group="mapdet") as sink:
            for key, jpg, record, _ in samples:
                sink.write({"__key__": key, "jpg": jpg, "json": json.dumps(record).encode()})
    return {"name": path.name, "bytes": path.stat().st_size, "sha256": sha256_file(path)}


def encode_sample(raw: RawSample, image_id: int, opts: PackOptions):
    """JPEG bytes and the sample record for one raw image, resized so its longest side <= max_side.

    ``image_id`` is used when the input has none of its own (``raw.image_id``). Returns
    ``(jpg_bytes, record, SanitizeCounts)``; raises ``BadSample`` for an undecodable image.
    """
    width, height = raw.width, raw.height
    if opts.max_side and max(width, height) > opts.max_side:
        s = opts.max_side / max(width, height)
        new_w, new_h = max(1, round(width * s)), max(1, round(height * s))
        jpg = _resized_jpeg(raw.image_path, (new_w, new_h), opts.quality)
    else:
        new_w, new_h = width, height
        jpg = raw.image_path.read_bytes()  # untouched original bytes
        if not jpg.startswith(b"\xff\xd8"):  # a PNG (COCO JSON may name any format): shards hold JPEG
            jpg = _resized_jpeg(raw.image_path, (new_w, new_h), opts.quality)
    # Scale by the realised size ratio per axis: exact for pixel-edge boxes after rounding.
    sx, sy = new_w / width, new_h / height
    kept, keep, counts = box_ops.sanitize(box_ops.scale(raw.boxes, sx, sy), new_w, new_h)
    record = {
        "image_id": raw.image_id if raw.image_id is not None else image_id,
        "width": new_w,
        "height": new_h,
        "orig_width": width,
        "orig_height": height,
        "boxes": kept.tolist(),
        "labels": np.asarray(raw.labels)[keep].astype(int).tolist(),
        "iscrowd": np.asarray(raw.iscrowd)[keep].astype(int).tolist(),
    }
    if raw.area is not None:
        # The input's own areas (segments, not boxes: they decide COCO's size ranges), resized with
        # the image; the stored box's area where the input has none.
        area = np.asarray(raw.area, np.float64)[keep] * (sx * sy)
        record["area"] = np.where(np.isnan(area), box_ops.area(kept), area).tolist()
    return jpg, record, counts


def _resized_jpeg(path: Path, size: tuple[int, int], quality: int) -> bytes:
    try:
        with Image.open(path) as im:
            # draft() lets libjpeg decode at 1/2, 1/4, 1/8 scale: far cheaper for 12+ MP images.
            im.draft("RGB", size)
            im = im.convert("RGB").resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0)
    except (OSError, Image.DecompressionBombError) as e:
        raise BadSample(f"{path}: cannot decode image ({e})") from e
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()
