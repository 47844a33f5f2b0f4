"""Pack a raw Vistas split into WebDataset shards: deterministic, parallel, resumable, splittable.

The sorted list of image stems is cut into consecutive chunks of ``samples_per_shard``; chunk ``i``
becomes ``OUT/{split}-{i:06d}.tar`` no matter how many jobs or processes pack it. Job ``j`` of
``n`` packs the chunks with ``i % n == j``, so SLURM array tasks write disjoint shards and their
outputs merge into the same dataset a single job writes.

Each shard is written under ``.tmp`` and renamed, then a part file ``OUT/.parts/{shard}.json``
(counts, sha256, annotations, skipped inputs) is written atomically. A shard is finished exactly
when its part file exists, so a rerun after a kill redoes only unfinished shards.
``mapdet.shards.merge`` turns the part files into the manifest and the COCO ground truth once every
shard is finished.

Samples: ``__key__`` = image stem, ``jpg`` = the original JPEG bytes when no resize is needed
(else re-encoded at ``quality``), ``json`` = {image_id, width, height (stored image),
orig_width, orig_height, boxes (xyxy pixel-edge, stored image), labels (1..K), iscrowd}.

Class set: by default the classes Vistas' instance benchmark evaluates (``"instances"`` and
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
from mapdet.datasets.sample_files import BadSample
from mapdet.datasets.vistas import RawSample, VistasReader
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
    """Pack this job's shards of ``split``; returns the shard indices packed by this call."""
    if not 0 <= opts.job_index < opts.num_jobs:
        raise ValueError(f"--job-index {opts.job_index} must be in [0, --num-jobs={opts.num_jobs})")
    if opts.samples_per_shard < 1:
        raise ValueError("--samples-per-shard must be at least 1")
    if opts.class_set not in CLASS_SETS:
        raise ValueError(f"class_set must be one of {CLASS_SETS}, got {opts.class_set!r}")
    out = Path(out)
    reader = VistasReader(root, split, version=opts.version, source=opts.source, class_set=opts.class_set)
    stems = reader.stems()
    if not stems:
        raise ValueError(f"{Path(root) / split / 'images'} holds no .jpg images: nothing to pack")
    parts_dir(out).mkdir(parents=True, exist_ok=True)  # only once the input reads: a bad one leaves nothing
    chunks = [stems[i : i + opts.samples_per_shard] for i in range(0, len(stems), opts.samples_per_shard)]
    _write_plan(out, split, reader, opts, len(stems), len(chunks))
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


def _write_plan(out: Path, split: str, reader: VistasReader, opts: PackOptions, n_inputs: int, n_shards: int) -> None:
    plan = {
        "split": split,
        "version": reader.version,
        "source": reader.source,
        "num_inputs": n_inputs,
        "num_shards": n_shards,
        "options": opts.content_key(),
        "class_set": reader.class_set,
        "classes": [{"id": c.id, "name": c.name} for c in reader.classes],
        "not_evaluated": reader.not_evaluated,  # instance classes Vistas does not evaluate
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
_READER: VistasReader | None = None
_TASK_CONTEXT: tuple | None = None


def pack_shard(task: tuple[int, list[str], int]) -> None:
    index, stems, first_image_id = task
    out, split, opts = _TASK_CONTEXT
    name = shard_name(split, index)
    samples, skipped, counts, left_out = [], [], box_ops.SanitizeCounts(), {}
    for offset, stem in enumerate(stems):
        try:
            raw = _READER.read(stem)
            jpg, record, sanitized = encode_sample(raw, first_image_id + offset, opts)
        except BadSample as e:
            skipped.append({"key": stem, "reason": str(e)})
            continue
        counts.add(sanitized)
        for cls, n in (raw.left_out or {}).items():
            left_out[cls] = left_out.get(cls, 0) + n
        samples.append((stem, jpg, record))
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
        skipped=skipped,
        sanitized=asdict(counts),
        left_out=dict(sorted(left_out.items())),
    )
    write_json_atomic(part_path(out, split, index), part, indent=None)


def _write_tar(path: Path, samples: list[tuple[str, bytes, dict]]) -> dict:
    with atomic_open(path, "wb") as f:
        # mtime fixed and keys sorted by TarWriter: the same input gives byte-identical shards.
        with wds.TarWriter(f, encoder=False, mtime=0.0, user="mapdet", group="mapdet") as sink:
            for stem, jpg, record in samples:
                sink.write({"__key__": stem, "jpg": jpg, "json": json.dumps(record).encode()})
    return {"name": path.name, "bytes": path.stat().st_size, "sha256": sha256_file(path)}


def encode_sample(raw: RawSample, image_id: int, opts: PackOptions):
    """JPEG bytes and the sample record for one raw image, resized so its longest side <= max_side.

    Returns ``(jpg_bytes, record, SanitizeCounts)``; raises ``BadSample`` for an undecodable image.
    """
    width, height = raw.width, raw.height
    if opts.max_side and max(width, height) > opts.max_side:
        s = opts.max_side / max(width, height)
        new_w, new_h = max(1, round(width * s)), max(1, round(height * s))
        jpg = _resized_jpeg(raw.image_path, (new_w, new_h), opts.quality)
    else:
        new_w, new_h = width, height
        jpg = raw.image_path.read_bytes()  # untouched original bytes
    # Scale by the realised size ratio per axis: exact for pixel-edge boxes after rounding.
    scaled = box_ops.scale(raw.boxes, new_w / width, new_h / height)
    kept, keep, counts = box_ops.sanitize(scaled, new_w, new_h)
    record = {
        "image_id": image_id,
        "width": new_w,
        "height": new_h,
        "orig_width": width,
        "orig_height": height,
        "boxes": kept.tolist(),
        "labels": np.asarray(raw.labels)[keep].astype(int).tolist(),
        "iscrowd": np.asarray(raw.iscrowd)[keep].astype(int).tolist(),
    }
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
