"""Benchmark: memory, time and traffic of COCO evaluation on 1, 2 and 4 CPU ranks (issue 13 item 1).

Each rank holds what ``validate`` holds after inference: the COCO ground-truth dict and its own
contiguous share of the images' detections (packed ``Detections``, float32 xyxy), then runs
``evaluate_coco``, which routes detections to the rank scoring their category. One JSON line per
rank, then one summary line per world size:

- ``det_peak_mb``: peak RSS while the detections exist (generation + evaluation) minus the RSS
  just before (the kernel's VmHWM, reset through /proc/self/clear_refs): the memory that grows
  with the detections. ``peak_rss_mb``: the process's whole peak (interpreter, torch, GT dict).
- ``sent_mb``: bytes this rank sent to other ranks; ``local``/``scored``: rows it brought/scored.
- ``seconds``: evaluate_coco wall time, the slowest rank (the machine's 2 cores are shared by all
  ranks: 4 ranks run 2 at a time).

Every world size must give the same arrays (sha256 of precision/recall/scores, checked).
The before/after rows of bench/RESULTS.md (the all-gather path of commit 880f880, whose flat
``mapdet.evaluator`` no longer exists) were measured with this script as of commit 1121e5e, which
could import an older tree (``--allgather-from DIR``); that option is gone with the old module.

    .venv/bin/python bench/bench_eval_scale.py                             # 20000 x 300, 1,2,4 ranks
    .venv/bin/python bench/bench_eval_scale.py --images 2000 --ranks 1,2   # quick

Data: per block of 250 images (seeded by block, so any split gives the same set): about 30 GT
per image over --classes classes with Zipf-like frequencies, sizes 6-500 px, 2% crowd; per image
the --dets highest-scoring of 0-3 jittered copies per object (10% relabelled) and false positives.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

BLOCK = 250  # images per generated block
W, H = 1600.0, 1200.0


def _freq(num_classes: int) -> np.ndarray:
    f = 1.0 / np.arange(1, num_classes + 1) ** 1.1
    return f / f.sum()


def _gt_block(block: int, args):
    """GT of one block as arrays: image id, class, xywh (n, 4), crowd."""
    rng = np.random.default_rng([args.seed, block, 0])
    first = block * BLOCK + 1
    ids = np.arange(first, min(first + BLOCK, args.images + 1))
    img = np.repeat(ids, rng.poisson(30, len(ids)))
    n = len(img)
    cls = rng.choice(args.classes, n, p=_freq(args.classes)) + 1
    size, aspect = np.exp(rng.uniform(np.log(6), np.log(500), n)), np.exp(rng.normal(0, 0.5, n))
    w, h = np.clip(size * aspect, 2, W), np.clip(size / aspect, 2, H)
    xywh = np.stack([rng.uniform(0, W - w), rng.uniform(0, H - h), w, h], 1)
    return ids, img, cls, xywh, rng.random(n) < 0.02


def make_gt(args) -> dict:
    images, anns = [], []
    for block in range((args.images + BLOCK - 1) // BLOCK):
        ids, img, cls, xywh, crowd = _gt_block(block, args)
        images += [{"id": i, "width": int(W), "height": int(H)} for i in ids.tolist()]
        area = (xywh[:, 2] * xywh[:, 3] * 0.8).tolist()
        anns += [
            {"id": len(anns) + j + 1, "image_id": i, "category_id": c, "bbox": b, "area": a, "iscrowd": int(k)}
            for j, (i, c, b, a, k) in enumerate(zip(img.tolist(), cls.tolist(), xywh.tolist(), area, crowd.tolist()))
        ]
    return {
        "images": images,
        "annotations": anns,
        "categories": [{"id": c, "name": f"class{c}"} for c in range(1, args.classes + 1)],
    }


def make_detections(block: int, args):
    """One block's detections: exactly min(--dets, made) per image, as Detections arrays."""
    from mapdet.boxes import xywh_to_xyxy
    from mapdet.structures import Detections

    ids, img, cls, xywh, _ = _gt_block(block, args)
    rng = np.random.default_rng([args.seed, block, 1])
    src = np.repeat(np.arange(len(img)), rng.integers(0, 4, len(img)))
    jit = rng.normal(0, 0.12, (len(src), 4))
    w, h = xywh[src, 2], xywh[src, 3]
    box = np.stack(
        [xywh[src, 0] + jit[:, 0] * w, xywh[src, 1] + jit[:, 1] * h, w * np.exp(jit[:, 2]), h * np.exp(jit[:, 3])], 1
    )
    relabel = rng.random(len(src)) < 0.1
    label = np.where(relabel, rng.integers(1, args.classes + 1, len(src)), cls[src])
    score = np.clip(rng.beta(4, 2, len(src)) - np.abs(jit).sum(1), 0.01, 1)
    nfp = args.dets * len(ids)  # enough false positives for every image; the cap trims them
    fw = np.exp(rng.uniform(np.log(4), np.log(400), nfp))
    fh = np.minimum(fw * np.exp(rng.normal(0, 0.5, nfp)), H - 1)
    fp = np.stack([rng.uniform(0, W - fw), rng.uniform(0, H - fh), fw, fh], 1)
    img_all = np.concatenate([img[src], np.repeat(ids, args.dets)])
    box = np.concatenate([box, fp]).round(2)
    label = np.concatenate([label, rng.choice(args.classes, nfp, p=_freq(args.classes)) + 1])
    score = np.concatenate([score, rng.beta(1, 6, nfp)])
    order = np.lexsort((-score, img_all))
    starts = np.searchsorted(img_all[order], ids)
    keep = order[(np.arange(len(order)) - np.repeat(starts, np.diff(np.r_[starts, len(order)]))) < args.dets]
    return Detections(img_all[keep], xywh_to_xyxy(box[keep]), score[keep], label[keep])


def _status() -> dict:
    """VmRSS and VmHWM (peak since the last reset) in MB."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return {k: int(fields[k].split()[0]) / 1024 for k in ("VmRSS", "VmHWM")}


def _digest(result) -> str:
    h = hashlib.sha256()
    for a in (result.precision, result.recall, result.scores):
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


def rank_main(rank: int, world: int, port: int, args, out: str) -> None:
    """One rank: build GT, reset the peak, make this rank's detections, evaluate, report."""
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch.distributed as dist

    from mapdet import comm
    from mapdet.evaluation.coco import evaluate_coco
    from mapdet.structures import Detections

    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=1800))
    gt = make_gt(args)
    blocks = (args.images + BLOCK - 1) // BLOCK
    lo, hi = blocks * rank // world, blocks * (rank + 1) // world
    base = _status()["VmRSS"]
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    dets = Detections.concat(make_detections(b, args) for b in range(lo, hi))
    local, local_mb = len(dets), sum(a.nbytes for a in (dets.image_id, dets.boxes, dets.scores, dets.labels)) / 2**20
    comm.barrier()
    start = time.perf_counter()
    result = evaluate_coco(gt, dets, max_dets=(1, 10, 100, args.dets))
    seconds = time.perf_counter() - start
    traffic = result.traffic or {}
    row = {
        "ranks": world,
        "rank": rank,
        "path": "route by category",
        "images": args.images,
        "dets_per_image": args.dets,
        "classes": args.classes,
        "local": local,
        "local_packed_mb": round(local_mb, 1),
        "scored": traffic.get("scored"),
        "sent_mb": round(traffic.get("sent_bytes", 0) / 2**20, 1),
        "det_peak_mb": round(_status()["VmHWM"] - base, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "seconds": round(seconds, 2),
        "digest": _digest(result),
        "AP": result.summary()["AP"],
    }
    Path(out, f"rank{rank}.json").write_text(json.dumps(row))
    if world > 1:
        dist.destroy_process_group()


def run_world(world: int, args) -> list[dict]:
    import torch.multiprocessing as mp
    from bench_eval import free_port

    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(rank_main, args=(world, free_port(), args, tmp), nprocs=world)
        rows = [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(world)]
    for row in rows:
        print(json.dumps(row), flush=True)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=20000)
    parser.add_argument("--dets", type=int, default=300, help="detections per image")
    parser.add_argument("--classes", type=int, default=38)
    parser.add_argument("--ranks", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 4])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    peaks, digests = {}, set()
    for world in args.ranks:
        rows = run_world(world, args)
        peaks[world] = max(r["det_peak_mb"] for r in rows)
        digests |= {r["digest"] for r in rows}
        summary = {
            "summary": True,
            "ranks": world,
            "path": rows[0]["path"],
            "max_det_peak_mb": peaks[world],
            "max_peak_rss_mb": max(r["peak_rss_mb"] for r in rows),
            "max_sent_mb": max(r["sent_mb"] for r in rows),
            "max_scored_fraction": round(max(r["scored"] or 0 for r in rows) / sum(r["local"] for r in rows), 3),
            "seconds": max(r["seconds"] for r in rows),
        }
        if 1 in peaks:
            summary["det_peak_vs_1_rank"] = round(peaks[world] / peaks[1], 3)
        print(json.dumps(summary), flush=True)
    assert len(digests) == 1, f"world sizes disagree: {digests}"
    return 0


if __name__ == "__main__":
    sys.exit(main())
