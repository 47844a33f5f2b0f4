"""mapdet peek OUT [--split S] [--batches N] [--eval]: stream a few batches and print them.

A quick look at what training (default: the resampled, shuffled stream) or evaluation (--eval:
the exactly-once stream) will see from packed shards, with the decode rate. OUT is a folder, an
http(s):// base URL or a pipe: command with {name} (``mapdet.shards.source``).
"""

from __future__ import annotations

import argparse
import itertools
import time

from mapdet.cli import number
from mapdet.config import DataConfig
from mapdet.data.loaders import TrainStream, eval_loader
from mapdet.shards.manifest import class_names, load_manifest
from mapdet.shards.source import SOURCE_HELP


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("out", help=SOURCE_HELP)
    p.add_argument("--split", default="training")
    p.add_argument("--batches", type=number(int, 1), default=3)
    p.add_argument("--batch-size", type=number(int, 1), default=4)
    p.add_argument("--workers", type=number(int, 0), default=1)
    p.add_argument(
        "--repeat-threshold",
        type=number(float, 0, 1, open="lo"),
        default=None,
        help="repeat-factor sampling t (default off)",
    )
    p.add_argument("--eval", action="store_true", help="the exactly-once evaluation stream instead")


def run(args: argparse.Namespace) -> int:
    manifest = load_manifest(args.out, args.split)
    names = class_names(manifest)
    if args.eval:
        batches = eval_loader(args.out, manifest, args.batch_size, args.workers, rank=0, world=1)
    else:
        cfg = DataConfig(batch_size=args.batch_size, workers=args.workers, repeat_threshold=args.repeat_threshold)
        batches = TrainStream(args.out, manifest, cfg, rank=0, world=1, seed=0)
    start, n_images = time.perf_counter(), 0
    for i, batch in enumerate(itertools.islice(batches, args.batches)):
        n_images += len(batch.images)
        print(f"batch {i}: {len(batch.images)} images")
        for image, target in zip(batch.images, batch.targets):
            counts = {}
            for k in target["labels"].tolist():
                counts[names[k]] = counts.get(names[k], 0) + 1
            top = ", ".join(f"{n.split('--')[-1]} x{c}" for n, c in sorted(counts.items(), key=lambda x: -x[1])[:4])
            print(
                f"  {target['key']}: uint8 {tuple(image.shape)}, {len(target['labels'])} boxes ({top or 'no objects'})"
            )
        for b in batch.bad:
            print(f"  BAD {b['shard']} {b['key']}: {b['reason']}")
    rate = n_images / max(time.perf_counter() - start, 1e-9)
    print(f"read {n_images} images from {args.out} ({args.split}) at {rate:.1f} images/s")
    return 0
