"""mapdet merge OUT --split SPLIT: join the shards of a multi-job pack into one manifest.

Run once after every `mapdet pack ... --job-index i --num-jobs n` job has finished (a SLURM
array's dependent job does this). Fails, naming the unfinished shards, if any job is incomplete.
"""

from __future__ import annotations

import argparse

from mapdet.shards.manifest import describe
from mapdet.shards.merge import merge


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("out", help="the pack output folder")
    p.add_argument("--split", required=True, choices=["training", "validation"])
    p.add_argument("--root", default=None, help="the raw download, recorded in the manifest (optional)")


def run(args: argparse.Namespace) -> int:
    manifest = merge(args.out, args.split, root=args.root)
    print(describe(manifest))
    return 0
