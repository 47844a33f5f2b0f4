"""Write a synthetic dataset in the exact raw Mapillary Vistas layout.

The result reads like a real Vistas download (config, JPEG images, 8-bit label PNGs, 16-bit
instance PNGs, panoptic PNGs + COCO panoptic JSON), with long-tailed classes, thin poles, empty
and dense images and crowd segments. Same seed, same bytes.

    mapdet synth data/synth --version v2.0 --train 300 --val 60 --seed 0
    mapdet pack data/synth shards --split training
"""

from __future__ import annotations

import argparse
import sys
import time

from mapdet.cli import image_size, number
from mapdet.datasets.synthetic.writer import SynthConfig, synthesize


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", help="folder to write the dataset root into (created if missing)")
    parser.add_argument(
        "--version",
        choices=["v2.0", "v1.2"],
        default="v2.0",
        help="Vistas release layout to imitate (default: %(default)s)",
    )
    parser.add_argument(
        "--train", type=number(int, 0), default=100, metavar="N", help="images in training/ (default: %(default)s)"
    )
    parser.add_argument(
        "--val", type=number(int, 0), default=20, metavar="M", help="images in validation/ (default: %(default)s)"
    )
    parser.add_argument(
        "--seed", type=number(int, 0), default=0, help="same seed, byte-identical files (default: %(default)s)"
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the config files and split folders of a dataset already in OUT",
    )
    parser.add_argument(
        "--size",
        type=image_size,
        default=SynthConfig.size,
        metavar="WxH",
        help="image size in pixels (default: 512x384)",
    )
    parser.add_argument(
        "--object-scale",
        type=number(float, 0, open="lo"),
        default=SynthConfig.object_scale,
        metavar="F",
        help="multiply every object's size by F (default: %(default)s)",
    )
    parser.add_argument(
        "--max-objects",
        type=number(int, 1),
        default=SynthConfig.max_objects,
        metavar="N",
        help="cap on objects in an ordinary image; dense images hold more (default: %(default)s)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="processes drawing images; the files are the same for any N (default: %(default)s)",
    )


def run(args: argparse.Namespace) -> int:
    cfg = SynthConfig(size=args.size, object_scale=args.object_scale, max_objects=args.max_objects)
    start = time.perf_counter()
    try:
        out = synthesize(
            args.out,
            version=args.version,
            n_train=args.train,
            n_val=args.val,
            seed=args.seed,
            cfg=cfg,
            progress=True,
            overwrite=args.overwrite,
            workers=args.workers,
        )
    except FileExistsError as e:
        print(f"mapdet synth: error: {e}", file=sys.stderr)
        return 2
    print(
        f"wrote {args.train} training + {args.val} validation images ({args.version}, "
        f"{cfg.size[0]}x{cfg.size[1]}, seed {args.seed}) to {out} in {time.perf_counter() - start:.1f} s"
    )
    return 0
