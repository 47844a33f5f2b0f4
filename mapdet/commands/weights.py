"""mapdet weights fetch NAME... [--dir DIR] | mapdet weights list [--dir DIR]

``fetch`` downloads torchvision's pretrained weights into torch's cache ($TORCH_HOME/hub/checkpoints)
with torchvision's hash check, where there is network; training then reads them by name
(``model.weights: torchvision:FasterRCNN_ResNet50_FPN_V2_Weights.COCO_V1``) and never downloads.
``list`` prints the supported names, the key and arch each fits, and what is in the cache.
See ``mapdet.modeling.pretrained`` for the names and the cache.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mapdet.modeling.pretrained import NAMES, cache_dir, cache_path, fetch, kind_and_arch, resolve


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    f = sub.add_parser("fetch", help="download weights into torch's cache (hash checked)")
    f.add_argument("names", nargs="+", metavar="NAME", help="e.g. " + NAMES[0])
    f.add_argument("--dir", default=None, help="download here instead of $TORCH_HOME/hub/checkpoints")
    ls = sub.add_parser("list", help="the supported names and what is in the cache")
    ls.add_argument("--dir", default=None, help="look here instead of $TORCH_HOME/hub/checkpoints")


def run(args: argparse.Namespace) -> int:
    if args.action == "fetch":
        fetch(args.names, args.dir)
        if args.dir and Path(args.dir).resolve() != cache_dir().resolve():
            print(f"training reads {cache_dir()}; set TORCH_HOME so that $TORCH_HOME/hub/checkpoints is {args.dir}")
        return 0
    target = cache_dir(args.dir)
    if target.exists() and not target.is_dir():
        raise ValueError(f"--dir {target} is a file, not a folder")
    print(f"cache: {target}")
    known = set()
    for spec in NAMES:
        weights = resolve(spec)
        path = cache_path(weights, target)
        known.add(path.name)
        kind, arch = kind_and_arch(weights)
        key = "model.weights" if kind == "detector" else "model.backbone_weights"
        state = "in the cache" if path.is_file() else "missing"
        print(f"  {spec:<64} {key} (arch {arch}): {state}, {path.name}")
    others = sorted(p.name for p in target.glob("*") if p.is_file() and p.name not in known) if target.is_dir() else []
    if others:
        print(f"also in the cache: {', '.join(others)}")
    return 0
