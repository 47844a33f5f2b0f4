"""mapdet pack ROOT OUT --split training|validation: raw Vistas split -> WebDataset shards.
mapdet pack --coco ANNOTATIONS.json --images DIR OUT --split NAME: COCO detection JSON -> the same.

Writes OUT/{split}-NNNNNN.tar, and (once every shard of the split is finished) the manifest
OUT/{split}.manifest.json and COCO ground truth OUT/{split}.coco.json. Rerunning the same command
after a kill finishes the job without redoing finished shards. With --num-jobs N, run jobs
--job-index 0..N-1 (e.g. a SLURM array), then `mapdet merge OUT --split SPLIT`.

Vistas classes: those Vistas' instance benchmark scores ("instances" and "evaluate" in the config:
70 in v2.0, 37 in v1.2); objects of instance classes it does not evaluate (v2.0's ambiguous signs)
are left out and counted in the manifest. --all-instance-classes keeps every instance class. Every
job of a split must use the same setting (merge refuses a mix).

COCO JSON: the categories are the classes (--categories keeps some), numbered 1..K inside mapdet;
the manifest maps them back to the file's category ids, and every COCO file mapdet writes uses the
file's own category and image ids. Sample keys are the image ids. Bad input (a missing or
unreadable image, one whose size differs from the file's width/height, annotations on unknown
images or categories, malformed boxes) is left out and named in the manifest; a file that is not
COCO detection JSON exits 2. Name the splits training and validation to use the config defaults
(data.train_split, data.val_split).
"""

from __future__ import annotations

import argparse
from dataclasses import replace

from mapdet.cli import number
from mapdet.datasets.coco import CocoReader
from mapdet.datasets.layout import detect_version
from mapdet.shards.manifest import check_split_name, describe
from mapdet.shards.merge import merge
from mapdet.shards.writer import PackOptions, pack, pack_from

VISTAS_SPLITS = ("training", "validation")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.usage = (
        "%(prog)s ROOT OUT --split training|validation [options]\n"
        "       %(prog)s --coco JSON --images DIR OUT --split NAME [options]"
    )
    p.add_argument(
        "paths",
        nargs="+",
        metavar="PATH",
        help="ROOT OUT, one after the other: the Vistas download (holds config_v*.json, training/, "
        "validation/), then the output folder for shards, manifest and COCO ground truth; with --coco, OUT alone",
    )
    p.add_argument(
        "--split",
        required=True,
        help="which split: training or validation for Vistas; with --coco, the name to give it "
        "(letters, digits, _ and -; training/validation match the config defaults)",
    )
    coco = p.add_argument_group("COCO detection JSON")
    coco.add_argument("--coco", metavar="JSON", help="pack this COCO detection ground truth instead of a Vistas split")
    coco.add_argument("--images", metavar="DIR", help="the folder the JSON's file_name entries are relative to")
    coco.add_argument(
        "--categories",
        metavar="IDS_OR_NAMES",
        help="comma-separated category ids or names to keep as classes (default: every category)",
    )
    vistas = p.add_argument_group("Vistas download")
    vistas.add_argument(
        "--version", choices=["v1.2", "v2.0"], default=None, help="annotation version (default: detect; v2.0 if both)"
    )
    vistas.add_argument(
        "--source",
        choices=["auto", "panoptic", "instances"],
        default="auto",
        help="where boxes come from: panoptic JSON (fast) or 16-bit instance PNGs (default: panoptic when present)",
    )
    vistas.add_argument(
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
        "--quality", type=number(int, 1, 100), default=95, help="JPEG quality for re-encoded images (default 95)"
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
    root, out = _paths(args)
    opts = PackOptions(
        max_side=args.max_side,
        samples_per_shard=args.samples_per_shard,
        quality=args.quality,
        workers=args.workers,
        job_index=args.job_index,
        num_jobs=args.num_jobs,
    )
    if args.coco:
        categories = args.categories.split(",") if args.categories is not None else None
        done = pack_from(CocoReader(args.coco, args.images, categories), out, args.split, opts)
    else:
        class_set = "all-instances" if args.all_instance_classes else "evaluated"
        vistas = replace(opts, version=args.version or detect_version(root), source=args.source, class_set=class_set)
        done = pack(root, out, args.split, vistas)
    print(f"packed {len(done)} shard(s) of {args.split} into {out} (job {opts.job_index + 1}/{opts.num_jobs})")
    if opts.num_jobs > 1:
        print(f"when all {opts.num_jobs} jobs are done: mapdet merge {out} --split {args.split}")
        return 0
    manifest = merge(out, args.split, root=str(args.coco or root))
    print(describe(manifest))
    return 0


def _paths(args) -> tuple[str | None, str]:
    """(Vistas root or None, output folder), after checking the options fit the input."""
    if args.coco:
        vistas_only = [
            flag
            for flag, used in (
                ("--version", args.version),
                ("--source", args.source != "auto"),
                ("--all-instance-classes", args.all_instance_classes),
            )
            if used
        ]
        if vistas_only:
            raise ValueError(f"{', '.join(vistas_only)}: only for a Vistas download, not with --coco")
        if not args.images:
            raise ValueError("--coco needs --images DIR (the folder its file_name entries are relative to)")
        if len(args.paths) != 1:
            raise ValueError(f"with --coco give only the output folder, got {len(args.paths)} paths: {args.paths}")
        check_split_name(args.split)
        return None, args.paths[0]
    if args.images or args.categories is not None:
        raise ValueError("--images and --categories go with --coco ANNOTATIONS.json")
    if len(args.paths) != 2:
        raise ValueError(f"give the Vistas download and the output folder (ROOT OUT), got {args.paths}")
    if args.split not in VISTAS_SPLITS:
        raise ValueError(f"--split {args.split!r}: a Vistas split is one of {', '.join(VISTAS_SPLITS)}")
    return args.paths[0], args.paths[1]
