"""Training throughput on the CPU: mapdet's pipeline vs a torchvision-references-style one (issue 3).

Both train the same model (``--config``, the demo's small preset) on the same synthetic shards with
the same batch size, DataLoader workers, warmup and step counts, in one process, through the same
``mapdet.engine.step.train_step``:

- mapdet:    ``TrainStream`` decodes uint8 images in the workers; ``BatchAugment`` (Kornia) runs
             inside the step on the training device, as ``mapdet train`` does;
- reference: decode + transforms.v2 augmentation in the workers (``train_pipelines.reference_batches``).

Phases alternate (round 1: mapdet then reference, round 2 the other way, ...) so a drifting machine
load hits both alike, and the headline is the median of the per-round ratios. Each phase starts from
the same initial weights and a fresh loader. data_wait = time blocked on the next batch / step time;
images_per_s = images / step time. worker_cpu_s_per_image counts the whole phase's worker CPU,
prefetched-but-unused batches included. The GPU grid is ``bench/bench_train_gpu.py``.

    .venv/bin/python bench/bench_train.py                                     # about 2 min on 2 idle cores
    .venv/bin/python bench/bench_train.py --images 40 --steps 5 --warmup 2 --rounds 1   # quick
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch
from train_pipelines import make_shards, no_augment, reference_batches

from mapdet import comm
from mapdet.cli import image_size
from mapdet.config import DataConfig, load_config
from mapdet.data.augment import BatchAugment
from mapdet.data.loaders import TrainStream
from mapdet.engine.optim import make_optimizer, make_scheduler
from mapdet.engine.step import TrainParts, train_step
from mapdet.modeling.build import build_model
from mapdet.shards.manifest import class_instance_counts
from mapdet.shards.reader import read_shard

REPO = Path(__file__).resolve().parents[1]


class _Timed:
    """Wraps the in-step augmentation to report its share of the step."""

    def __init__(self, fn):
        self.fn, self.seconds = fn, 0.0

    def __call__(self, images, targets):
        t = time.perf_counter()
        out = self.fn(images, targets)
        self.seconds += time.perf_counter() - t
        return out


def _cpu_s(who: int) -> float:
    r = resource.getrusage(who)
    return r.ru_utime + r.ru_stime


def run_phase(name: str, batches, augment, model0, cfg, accelerator, warmup: int, steps: int) -> dict:
    """``warmup`` then ``steps`` timed training steps from a copy of ``model0``; closes ``batches``."""
    model = copy.deepcopy(model0).train()
    optimizer = make_optimizer(model, cfg.optim)
    scheduler = make_scheduler(optimizer, cfg.optim, warmup + steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    timed = _Timed(augment)
    children0, load0 = _cpu_s(resource.RUSAGE_CHILDREN), os.getloadavg()[0]
    wait = step_s = aug_s = 0.0
    images = warm_images = 0
    for i in range(warmup + steps):
        if i == warmup:
            aug_s, main0 = timed.seconds, _cpu_s(resource.RUSAGE_SELF)
        res = train_step(TrainParts(accelerator, model, model, optimizer, scheduler, timed), batches, cfg.optim)
        if i < warmup:
            warm_images += res.images
        else:
            wait, step_s, images = wait + res.data_wait_s, step_s + res.step_time_s, images + res.images
    main_cpu = _cpu_s(resource.RUSAGE_SELF) - main0
    batches.close()  # the DataLoader's workers exit and are reaped, so RUSAGE_CHILDREN counts them
    workers_cpu = _cpu_s(resource.RUSAGE_CHILDREN) - children0
    return {
        "pipeline": name,
        "steps": steps,
        "images": images,
        "step_s": step_s / steps,
        "wait_s": wait,
        "time_s": step_s,
        "augment_s": timed.seconds - aug_s,
        "main_cpu_s": main_cpu,
        "worker_cpu_s_per_image": workers_cpu / (images + warm_images),
        "load_avg_1min": [round(load0, 2), round(os.getloadavg()[0], 2)],
    }


def summary(phases: list[dict]) -> dict:
    t = sum(p["time_s"] for p in phases)
    n = sum(p["images"] for p in phases)
    return {
        "pipeline": phases[0]["pipeline"],
        "images_per_s": round(n / t, 3),
        "data_wait": round(sum(p["wait_s"] for p in phases) / t, 4),
        "step_s": round(t / sum(p["steps"] for p in phases), 4),
        "augment_in_step": round(sum(p["augment_s"] for p in phases) / t, 4),
        "main_cpu_s_per_image": round(sum(p["main_cpu_s"] for p in phases) / n, 4),
        "worker_cpu_s_per_image": round(sum(p["worker_cpu_s_per_image"] for p in phases) / len(phases), 4),
    }


def cpu_comparison(args, tmp: Path) -> None:
    cfg = load_config(args.config)
    cfg.data = DataConfig(
        shards=str(tmp / "shards"),
        batch_size=args.batch_size or cfg.data.batch_size,
        workers=cfg.data.workers if args.workers is None else args.workers,
        shuffle_buffer=cfg.data.shuffle_buffer,
    )  # no repeat factors: both see plain data
    manifest = make_shards(tmp, args.images, args.size)
    samples = [s for sh in manifest["shards"] for s in read_shard(Path(cfg.data.shards) / sh["name"])]
    k = len(manifest["classes"])
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model0 = build_model(cfg.model, k + 1, class_instance_counts(manifest))
    accelerator = comm.make_accelerator(mixed_precision="no")
    print(
        json.dumps(
            {
                "setup": {
                    "images": len(samples),
                    "size": list(args.size),
                    "shards": len(manifest["shards"]),
                    "arch": cfg.model.arch,
                    "min_size": model0.transform.min_size[0],
                    "max_size": model0.transform.max_size,
                    "batch_size": cfg.data.batch_size,
                    "workers": cfg.data.workers,
                    "torch_threads": args.threads,
                    "warmup": args.warmup,
                    "steps": args.steps,
                    "rounds": args.rounds,
                    "cpus": os.cpu_count(),
                    "load_avg": [round(x, 2) for x in os.getloadavg()],
                    "config": args.config,
                }
            }
        ),
        flush=True,
    )
    pipelines = {
        "mapdet": lambda: (
            iter(TrainStream(cfg.data.shards, manifest, cfg.data, 0, 1, seed=0)),
            BatchAugment(cfg.augment).to(accelerator.device),
        ),
        "reference": lambda: (
            reference_batches(samples, cfg.augment, k, cfg.data.batch_size, cfg.data.workers, seed=0),
            no_augment,
        ),
    }
    phases: dict[str, list[dict]] = {name: [] for name in pipelines}
    for r in range(args.rounds):
        for name in list(pipelines)[:: 1 if r % 2 == 0 else -1]:
            batches, augment = pipelines[name]()
            p = run_phase(name, batches, augment, model0, cfg, accelerator, args.warmup, args.steps)
            phases[name].append(p)
            print(
                json.dumps(
                    {"phase": {"round": r + 1, **{k: round(v, 4) if isinstance(v, float) else v for k, v in p.items()}}}
                ),
                flush=True,
            )
    ours, ref = summary(phases["mapdet"]), summary(phases["reference"])
    print(json.dumps({"result": ours}))
    print(json.dumps({"result": ref}))
    per_round = [
        round((a["images"] / a["time_s"]) / (b["images"] / b["time_s"]), 3)
        for a, b in zip(phases["mapdet"], phases["reference"])
    ]
    median = statistics.median(per_round)  # robust to a load change that hits one round's phases unevenly
    print(
        json.dumps(
            {
                "ratio": {
                    "median_round_mapdet_vs_reference": round(median, 3),
                    "per_round": per_round,
                    "totals_mapdet_vs_reference": round(ours["images_per_s"] / ref["images_per_s"], 3),
                    "data_wait_mapdet": ours["data_wait"],
                    "data_wait_reference": ref["data_wait"],
                    "goal": "mapdet >= 1.0x reference on CPU (median round), data wait < 0.05",
                    "met": median >= 1.0 and ours["data_wait"] < 0.05,
                    "load_avg_end": [round(x, 2) for x in os.getloadavg()],
                }
            }
        )
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--config", default=str(REPO / "launch/configs/demo.yaml"), help="model/augment/optim sections come from here"
    )
    ap.add_argument("--images", type=int, default=200, help="synthetic training images")
    ap.add_argument("--size", type=image_size, default=(512, 384), help="synthetic image size WxH")
    ap.add_argument("--batch-size", type=int, default=None, help="default: the config's data.batch_size")
    ap.add_argument("--workers", type=int, default=None, help="DataLoader workers; default: the config's data.workers")
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the training process")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps at the start of each phase")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per phase")
    ap.add_argument("--rounds", type=int, default=6, help="each round runs both pipelines, order alternating")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cpu_comparison(args, Path(tmp))


if __name__ == "__main__":
    main()
