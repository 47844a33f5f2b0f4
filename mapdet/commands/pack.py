"""mapdet pack ROOT OUT --split training|validation: raw Vistas split -> WebDataset shards.

Writes OUT/{split}-NNNNNN.tar, and (once every shard of the split is finished) the manifest
OUT/{split}.manifest.json and COCO ground truth OUT/{split}.coco.json. Rerunning the same command
after a kill finishes the job without redoing finished shards. With --num-jobs N, run jobs
--job-index 0..N-1 (e.g. a SLURM array), then `mapdet merge OUT --split SPLIT`.

Classes: those Vistas' instance benchmark scores ("instances" and "evaluate" in the config: 70 in
v2.0, 37 in v1.2); objects of instance classes it does not evaluate (v2.0's ambiguous signs) are
left out and counted in the manifest. --all-instance-classes keeps every instance class. Every job
of a split must use the same setting (merge refuses a mix).
"""

from __future__ import annotations

import argparse

from mapdet.cli import number
from mapdet.datasets.layout import detect_version
from mapdet.shards.manifest import describe
from mapdet.shards.merge import merge
from mapdet.shards.writer import PackOptions, pack


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("root", help="the Vistas download (holds config_v*.json, training/, validation/)")
    p.add_argument("out", help="output folder for shards, manifest and COCO ground truth")
    p.add_argument("--split", required=True, choices=["training", "validation"], help="which split to pack")
    p.add_argument(
        "--version", choices=["v1.2", "v2.0"], default=None, help="annotation version (default: detect; v2.0 if both)"
    )
    p.add_argument(
        "--source",
        choices=["auto", "panoptic", "instances"],
        default="auto",
        help="where boxes come from: panoptic JSON (fast) or 16-bit instance PNGs (default: panoptic when present)",
    )
    p.add_argument(
        "--all-instance-classes",
        action="store_true",
        help='keep every config label with "instances": true as a class (v2.0: 72, the two ambiguous '
        'sign classes included); default: only those Vistas evaluates ("evaluate": true; v2.0: 70, '
        "v1.2: 37), whose other objects are left out",
    )
    p.add_argument(
        "--max-side",
        type=number(int, 1),
        default=None,
        metavar="PX",
        help="resize so the longest side is at most PX (boxes scaled exactly); default: keep full size",
    )
    p.add_argument(
        "--quality", type=number(int, 1, 100), default=95, help="JPEG quality for resized images (default 95)"
    )
    p.add_argument(
        "--samples-per-shard", type=number(int, 1), default=1000, metavar="N", help="images per shard (default 1000)"
    )
    p.add_argument("--workers", type=number(int, 1), default=1, metavar="N", help="packing processes (default 1)")
    p.add_argument(
        "--job-index", type=number(int, 0), default=0, metavar="I", help="this job's index in [0, --num-jobs)"
    )
    p.add_argument(
        "--num-jobs", type=number(int, 1), default=1, metavar="N", help="independent jobs sharing the split (default 1)"
    )


def run(args: argparse.Namespace) -> int:
    opts = PackOptions(
        max_side=args.max_side,
        samples_per_shard=args.samples_per_shard,
        quality=args.quality,
        workers=args.workers,
        job_index=args.job_index,
        num_jobs=args.num_jobs,
        version=args.version or detect_version(args.root),
        source=args.source,
        class_set="all-instances" if args.all_instance_classes else "evaluated",
    )
    done = pack(args.root, args.out, args.split, opts)
    print(f"packed {len(done)} shard(s) of {args.split} into {args.out} (job {opts.job_index + 1}/{opts.num_jobs})")
    if opts.num_jobs > 1:
        print(f"when all {opts.num_jobs} jobs are done: mapdet merge {args.out} --split {args.split}")
        return 0
    manifest = merge(args.out, args.split, root=str(args.root))
    print(describe(manifest))
    return 0
