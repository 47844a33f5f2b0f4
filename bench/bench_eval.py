"""Benchmark: mapdet's COCO evaluator at 1 and N ranks vs pycocotools and faster-coco-eval.

Prints one JSON line per measurement (wall seconds and CPU seconds of the slowest rank, best of
--repeat; pycocotools, the slow baseline, runs once) with the machine's load average: on a shared
machine wall time depends on free cores, CPU time shows how the work splits. Asserts that every engine
gives the same numbers: mapdet's arrays, 12 summary stats and per-class AP bitwise equal to
pycocotools', faster-coco-eval's within 1e-9.

    .venv/bin/python bench/bench_eval.py                      # 2000 images, 38 classes, 100 and 300
    .venv/bin/python bench/bench_eval.py --images 200 --dets 100 --repeat 1   # quick

Data: random but realistic. About 30 GT per image over 38 classes with Zipf-like frequencies,
sizes 6-500 px, 2% crowd; detections are jittered copies of GT (10% with a wrong class) plus
false positives, exactly --dets per image. The N-rank run is `accelerate launch` with
launch/accelerate/cpu2.yaml; its time is measured inside the processes (launch excluded).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from mapdet.evaluation.metrics import CocoResult

REPO = Path(__file__).resolve().parents[1]


def make_dataset(num_images: int, num_classes: int, dets_per_image: int, seed: int = 0):
    """(COCO ground-truth dict, list of COCO result dicts) for a 1600x1200 street-like set."""
    rng = np.random.default_rng(seed)
    W, H = 1600.0, 1200.0
    freq = 1.0 / np.arange(1, num_classes + 1) ** 1.1
    freq /= freq.sum()
    images, anns, dets = [], [], []
    for img_id in range(1, num_images + 1):
        images.append({"id": img_id, "width": int(W), "height": int(H), "file_name": f"{img_id}.jpg"})
        n = rng.poisson(30)
        cls = rng.choice(num_classes, n, p=freq) + 1
        size = np.exp(rng.uniform(np.log(6), np.log(500), n))
        aspect = np.exp(rng.normal(0, 0.5, n))
        w, h = np.clip(size * aspect, 2, W), np.clip(size / aspect, 2, H)
        x, y = rng.uniform(0, W - w), rng.uniform(0, H - h)
        crowd = rng.random(n) < 0.02
        for i in range(n):
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": img_id,
                    "category_id": int(cls[i]),
                    "bbox": [float(x[i]), float(y[i]), float(w[i]), float(h[i])],
                    "area": float(w[i] * h[i] * 0.8),
                    "iscrowd": int(crowd[i]),
                }
            )
        src = np.repeat(np.arange(n), rng.integers(0, 4, n))  # 0-3 detections per object
        jit = rng.normal(0, 0.12, (len(src), 4))
        box = np.stack(
            [
                x[src] + jit[:, 0] * w[src],
                y[src] + jit[:, 1] * h[src],
                w[src] * np.exp(jit[:, 2]),
                h[src] * np.exp(jit[:, 3]),
            ],
            1,
        )
        label = np.where(rng.random(len(src)) < 0.1, rng.integers(1, num_classes + 1, len(src)), cls[src])
        score = np.clip(rng.beta(4, 2, len(src)) - np.abs(jit).sum(1), 0.01, 1)
        nfp = max(dets_per_image - len(src), 0)
        fw = np.exp(rng.uniform(np.log(4), np.log(400), nfp))
        fh = np.minimum(fw * np.exp(rng.normal(0, 0.5, nfp)), H - 1)
        fp = np.stack([rng.uniform(0, W - fw), rng.uniform(0, H - fh), fw, fh], 1)
        box = np.concatenate([box, fp]).round(2)
        label = np.concatenate([label, rng.choice(num_classes, nfp, p=freq) + 1])
        score = np.concatenate([score, rng.beta(1, 6, nfp)]).astype(np.float32)
        for j in np.argsort(-score, kind="stable")[:dets_per_image]:
            dets.append(
                {"image_id": img_id, "category_id": int(label[j]), "bbox": box[j].tolist(), "score": float(score[j])}
            )
    cats = [{"id": c, "name": f"class{c}"} for c in range(1, num_classes + 1)]
    return {"images": images, "annotations": anns, "categories": cats}, dets


class Clock:
    """Wall and CPU seconds of a block: CPU time shows the work split even when cores are busy."""

    def __enter__(self):
        self.times = np.array([time.perf_counter(), time.process_time()])
        return self

    def __exit__(self, *_exc):
        self.times = np.array([time.perf_counter(), time.process_time()]) - self.times


def best_time(fn, repeat: int):
    """``fn() -> (output, [wall, cpu])`` run ``repeat`` times; the last output, the best times."""
    best, out = np.full(2, np.inf), None
    for _ in range(repeat):
        out, times = fn()
        best = np.minimum(best, times)
    return out, best


def run_reference(name: str, gt: dict, dets: list, max_dets: list[int]):
    """One single-process run of pycocotools or faster-coco-eval; input copies not timed."""
    if name == "pycocotools":
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    else:
        from faster_coco_eval import COCO
        from faster_coco_eval import COCOeval_faster as COCOeval
    gt, dets = copy.deepcopy(gt), copy.deepcopy(dets)  # both mutate their inputs
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        with Clock() as clock:
            E = COCOeval(coco_gt, coco_gt.loadRes(dets), "bbox")
            E.params.maxDets = max_dets
            E.evaluate()
            E.accumulate()
        E.summarize()
    out = {k: np.asarray(E.eval[k]) for k in ("precision", "recall", "scores")}
    if name == "pycocotools":
        return {**out, "stats": np.asarray(E.stats)}, clock.times
    # faster-coco-eval's summary takes AP at the largest maxDets (pycocotools: 100) and lays its
    # stats out differently, so its summary is read from its arrays the pycocotools way
    p = E.params
    return arrays(CocoResult(*out.values(), p.iouThrs, list(p.catIds), list(p.maxDets))), clock.times


def run_mapdet(gt, dets, max_dets, engine="numpy"):
    from mapdet.evaluation.coco import evaluate_coco

    with Clock() as clock:
        result = evaluate_coco(gt, dets, max_dets=max_dets, engine=engine)
    return result, clock.times


def per_class_ap(precision: np.ndarray, m: int) -> np.ndarray:
    out = []
    for k in range(precision.shape[2]):
        s = precision[:, :, k, 0, m]
        out.append(np.mean(s[s > -1]) if (s > -1).any() else -1.0)
    return np.array(out)


def check_same(ref: dict, got: dict, exact: bool, what: str) -> None:
    for key in ("precision", "recall", "scores", "stats"):
        a, b = ref[key], got[key]
        if exact:
            assert a.shape == b.shape and np.array_equal(a, b), f"{what}: {key} differs"
        else:
            assert np.abs(a - b).max() <= 1e-9, f"{what}: {key} differs by {np.abs(a - b).max()}"
    for m in range(ref["precision"].shape[-1]):
        diff = np.abs(per_class_ap(ref["precision"], m) - per_class_ap(got["precision"], m)).max()
        assert diff <= (0 if exact else 1e-9), f"{what}: per-class AP differs by {diff}"


STATS = ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"]


def arrays(result) -> dict:
    """A CocoResult's arrays and its summary in the order of pycocotools' ``stats``."""
    summary = result.summary()
    out = {k: getattr(result, k) for k in ("precision", "recall", "scores")}
    return {**out, "stats": np.array([summary[k] for k in STATS])}


def worker(args) -> int:
    """Inside `accelerate launch`: every rank makes the same set and brings its contiguous share
    of the detections (as after distributed inference); rank 0 saves arrays + time."""
    import torch
    from accelerate import PartialState

    from mapdet import comm
    from mapdet.evaluation.inputs import detections_from_results

    PartialState(cpu=not torch.cuda.is_available())
    gt, dets = make_dataset(args.images, args.classes, args.dets[0], args.seed)
    if args.packed:
        dets = detections_from_results(dets)
    lo, hi = comm.share(len(dets), comm.get_rank(), comm.get_world_size())
    dets = dets[lo:hi] if isinstance(dets, list) else dets.take(slice(lo, hi))
    max_dets = sorted({1, 10, 100, args.dets[0]})
    best = np.full(2, np.inf)
    for _ in range(args.repeat):
        comm.barrier()
        result, times = run_mapdet(gt, dets, max_dets, args.engine)
        best = np.minimum(best, np.max(comm.all_gather_object(times), axis=0))  # slowest rank
    if comm.is_main_process():
        np.savez(args.out, times=best, world=comm.get_world_size(), **arrays(result))
    comm.barrier()
    return 0


def free_port() -> int:
    """A free local port: cpu2.yaml's fixed port may be taken by another launch."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args, dets: int, packed: bool, engine: str):
    """Run `worker` under accelerate launch with --ranks processes; (arrays, [wall, cpu])."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.npz"
        cmd = [
            str(REPO / ".venv/bin/accelerate"),
            "launch",
            "--config_file",
            str(REPO / "launch/accelerate/cpu2.yaml"),
            "--num_processes",
            str(args.ranks),
            "--main_process_port",
            str(free_port()),
            str(Path(__file__).resolve()),
            "--worker",
            "--out",
            str(out),
            "--images",
            str(args.images),
            "--classes",
            str(args.classes),
            "--dets",
            str(dets),
            "--seed",
            str(args.seed),
            "--repeat",
            str(args.repeat),
            "--engine",
            engine,
        ]
        cmd += ["--packed"] if packed else []
        subprocess.run(cmd, check=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
        data = np.load(out)
        assert int(data["world"]) == args.ranks, "the launched processes did not connect"
        return {k: data[k] for k in ("precision", "recall", "scores", "stats")}, data["times"]


def emit(case: dict, engine: str, ranks: int, times, base) -> None:
    """One JSON line; ``times`` and ``base`` (pycocotools') are [wall, cpu] seconds."""
    row = {
        **case,
        "engine": engine,
        "ranks": ranks,
        "seconds": round(float(times[0]), 3),
        "cpu_seconds_per_rank": round(float(times[1]), 3),
        "speedup_vs_pycocotools": round(float(base[0] / times[0]), 1),
        "load_avg_1min": round(os.getloadavg()[0], 2),
    }  # other work on the machine skews times
    print(json.dumps(row), flush=True)


def bench_case(args, dets_per_image: int) -> None:
    from mapdet.evaluation.inputs import detections_from_results

    gt, dets = make_dataset(args.images, args.classes, dets_per_image, args.seed)
    max_dets = sorted({1, 10, 100, dets_per_image})
    case = {
        "images": args.images,
        "classes": args.classes,
        "gt": len(gt["annotations"]),
        "dets_per_image": dets_per_image,
        "detections": len(dets),
        "max_dets": max_dets,
    }
    ref, base = run_reference("pycocotools", gt, dets, max_dets)  # slow: once
    emit(case, "pycocotools", 1, base, base)
    faster, times = best_time(lambda: run_reference("faster-coco-eval", gt, dets, max_dets), args.repeat)
    check_same(ref, faster, exact=False, what="faster-coco-eval")
    emit(case, "faster-coco-eval", 1, times, base)
    packed = detections_from_results(dets)
    for name, inputs in (("mapdet (COCO dicts)", dets), ("mapdet (packed)", packed)):
        result, times = best_time(lambda inputs=inputs: run_mapdet(gt, inputs, max_dets), args.repeat)
        if inputs is dets:  # packed boxes are float32-rounded: other inputs, other numbers
            check_same(ref, arrays(result), exact=True, what=name)
        emit(case, name, 1, times, base)
    if args.ranks > 1:
        for name, packed_input in (("mapdet (COCO dicts)", False), ("mapdet (packed)", True)):
            got, times = launch(args, dets_per_image, packed_input, "numpy")
            single = arrays(run_mapdet(gt, packed if packed_input else dets, max_dets)[0])
            check_same(single, got, exact=True, what=f"{name} at {args.ranks} ranks")
            emit(case, name, args.ranks, times, base)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--classes", type=int, default=38)
    parser.add_argument(
        "--dets",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[100, 300],
        help="detections per image, comma-separated cases",
    )
    parser.add_argument("--ranks", type=int, default=2, help="processes for the distributed run (1: skip it)")
    parser.add_argument(
        "--repeat", type=int, default=3, help="runs per measurement, the best counts (pycocotools runs once)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--packed", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--engine", default="numpy", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)
    for dets_per_image in args.dets:
        bench_case(args, dets_per_image)
    return 0


if __name__ == "__main__":
    sys.exit(main())
