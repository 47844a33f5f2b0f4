"""mapdet merge OUT --split SPLIT: join the shards of a multi-job pack into one manifest.

Run once after every `mapdet pack ... --job-index i --num-jobs n` job has finished (a SLURM
array's dependent job does this). Fails, naming the unfinished shards, if any job is incomplete.
"""

from __future__ import annotations

import argparse

from mapdet.shards.manifest import check_split_name, describe
from mapdet.shards.merge import merge


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("out", help="the pack output folder")
    p.add_argument("--split", required=True, help="the split the pack jobs packed (e.g. training, validation)")
    p.add_argument("--root", default=None, help="the raw download or COCO JSON, recorded in the manifest (optional)")


def run(args: argparse.Namespace) -> int:
    manifest = merge(args.out, check_split_name(args.split), root=args.root)
    print(describe(manifest))
    return 0
