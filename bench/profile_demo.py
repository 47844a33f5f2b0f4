"""Where the demo's CPU training step spends its time (issue 19): one process, the demo config.

Builds the demo's model, optimizer, scheduler and augmentation exactly as ``mapdet train`` does,
streams the demo's training shards, and times each part of ``--steps`` training steps (on the CPU
every op runs synchronously, so a clock around a part is its cost; by default the process's CPU
time, see ``--clock``): loading, augmentation, the model's resize/normalise transform, backbone
(trunk + FPN), RPN (head, anchors, proposals, its loss), RoI heads (pooling, box head, sampling,
loss), backward and the optimizer. Prints one JSON line per
setting with milliseconds per step and shares, so the levers can be chosen by measurement:

    python bench/profile_demo.py --shards demo/shards                       # the demo recipe, 1 thread, 4 images
    python bench/profile_demo.py --shards demo/shards --threads 2 --images 8   # 1 process x 2 threads
    python bench/profile_demo.py --shards demo/shards --set model.min_size=256 model.max_size=341

A 2-process demo runs 4 images per process with 1 torch thread each (accelerate sets it); the
1-process demo runs 8 images with 2 threads. Whole-run figures (thread settings, validation passes)
come from ``mapdet demo``'s own stage timings (bench/bench_demo.py).
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from mapdet.config import load_config
from mapdet.data.augment import BatchAugment
from mapdet.data.loaders import TrainStream
from mapdet.engine.optim import make_optimizer, make_scheduler
from mapdet.modeling.build import build_model
from mapdet.shards.manifest import class_instance_counts, class_names, load_manifest

REPO = Path(__file__).resolve().parents[1]
PARTS = ("transform", "backbone", "rpn", "roi_heads")


def timed_parts(model, clock: dict, now) -> None:
    """Add each top-level part's forward time to ``clock`` (ms) through forward hooks."""
    for name in PARTS:
        module = getattr(model, name)
        started = {}

        def pre(_m, _inp, name=name, started=started):
            started[name] = now()

        def post(_m, _inp, _out, name=name, started=started):
            clock[name] += 1e3 * (now() - started[name])

        module.register_forward_pre_hook(pre)
        module.register_forward_hook(post)


def profile(cfg, steps: int, warmup: int, now) -> dict:
    manifest = load_manifest(cfg.data.shards, cfg.data.train_split)
    model = build_model(cfg.model, len(class_names(manifest)) + 1, class_instance_counts(manifest))
    model.train()
    optimizer = make_optimizer(model, cfg.optim)
    scheduler = make_scheduler(optimizer, cfg.optim, cfg.train.max_steps)
    augment = BatchAugment(cfg.augment)
    batches = iter(TrainStream(cfg.data.shards, manifest, cfg.data, 0, 1, cfg.train.seed))
    clock: dict[str, float] = collections.defaultdict(float)
    timed_parts(model, clock, now)
    per_step = []
    for step in range(warmup + steps):
        if step == warmup:
            clock.clear()
        t0 = now()
        batch = next(batches)
        t1 = now()
        with torch.no_grad():
            images, targets = augment(list(batch.images), batch.targets)
        t2 = now()
        losses = model(images, [{"boxes": t["boxes"], "labels": t["labels"]} for t in targets])
        t3 = now()
        sum(losses.values()).backward()
        t4 = now()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.clip_norm or float("inf"))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        t5 = now()
        if step >= warmup:
            for key, ms in (("data", t1 - t0), ("augment", t2 - t1), ("backward", t4 - t3), ("optimizer", t5 - t4)):
                clock[key] += 1e3 * ms
            clock["forward"] += 1e3 * (t3 - t2)
            per_step.append(1e3 * (t5 - t0))
    ms = {k: round(v / steps, 1) for k, v in clock.items()}
    ms["forward_other"] = round(ms["forward"] - sum(ms.get(p, 0.0) for p in PARTS), 1)
    total = statistics.median(per_step)
    order = ("data", "augment", *PARTS, "forward_other", "backward", "optimizer")
    return {
        "ms_per_step": {k: ms.get(k, 0.0) for k in order},
        "share": {k: round(ms.get(k, 0.0) / sum(per_step) * steps, 3) for k in order},
        "median_step_ms": round(total, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", required=True, help="the demo's shards (mapdet demo's DIR/shards)")
    ap.add_argument("--config", default=str(REPO / "launch/configs/demo.yaml"))
    ap.add_argument("--set", nargs="*", default=[], help="config overrides after the config file")
    ap.add_argument("--images", type=int, default=4, help="images per step (4: one of the demo's 2 processes)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: as accelerate sets per process)")
    ap.add_argument("--clock", choices=("cpu", "wall"), default="cpu", help="process CPU time (default) or wall")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    overrides = [f"data.shards={args.shards}", "data.global_batch=null", f"data.batch_size={args.images}", *args.set]
    cfg = load_config(args.config, overrides)
    # CPU seconds of this process (all its torch threads; the loader's worker process is not counted):
    # unlike wall time, barely moved by other work on the machine, which is what makes a lever's
    # gain visible on a shared 2-core machine. --clock wall for the user's view.
    now = time.process_time if args.clock == "cpu" else time.perf_counter
    row = profile(cfg, args.steps, args.warmup, now)
    row.update({"images": args.images, "threads": args.threads, "clock": args.clock, "set": args.set})
    print(json.dumps({"profile_demo": row}), flush=True)


if __name__ == "__main__":
    sys.exit(main())
