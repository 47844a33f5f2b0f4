"""The ``mapdet`` command line: one sub-command per wiring module.

Each wiring module exposes ``add_arguments(parser)`` and ``run(args) -> int`` (the exit code).
A ValueError or FileNotFoundError escaping a command is printed as one line and exits 2.
Modules are imported only when their command runs, so ``mapdet --help`` stays fast and a
command never pays for another's imports.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# command name -> (wiring module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "synth": ("mapdet.commands.synth", "write a synthetic dataset in the raw Mapillary Vistas layout"),
    "pack": ("mapdet.commands.pack", "pack a raw Vistas split into WebDataset shards with a manifest"),
    "merge": ("mapdet.commands.merge", "merge the slices of a multi-job pack into one manifest"),
    "verify": ("mapdet.commands.verify", "check every shard against its manifest and decode every sample"),
    "peek": ("mapdet.commands.peek", "stream a few batches from packed shards and print them"),
    "train": ("mapdet.commands.train", "train Faster R-CNN (use under `accelerate launch` for DDP)"),
    "evaluate": ("mapdet.commands.evaluate", "distributed COCO evaluation of a checkpoint on packed shards"),
    "predict": (
        "mapdet.commands.predict",
        "run a trained model on a folder of images or on shards: COCO results, drawn images",
    ),
    "cocoeval": ("mapdet.commands.cocoeval", "score a COCO results file against COCO ground truth"),
    "diagnose": ("mapdet.commands.diagnose", "explain low mAP: error decomposition, sweeps, report"),
    "weights": ("mapdet.commands.weights", "fetch torchvision's pretrained weights into torch's cache; list them"),
    "demo": ("mapdet.commands.demo", "run the whole system end to end on synthetic data"),
}


def image_size(text: str) -> tuple[int, int]:
    """argparse type of a ``WxH`` image size (width, height), each side >= 16 pixels."""
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WxH such as 512x384, got {text!r}") from None
    if w < 16 or h < 16:
        raise argparse.ArgumentTypeError(f"{text}: both sides must be at least 16 pixels")
    return w, h


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mapdet",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_module, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, description=help_text)
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        parser = _parser()
        if argv and argv[0] not in ("-h", "--help"):
            parser.error(f"unknown command {argv[0]!r}; choose from {', '.join(COMMANDS)}")
        parser.print_help()
        sys.exit(0 if argv else 2)
    name, rest = argv[0], argv[1:]
    module = importlib.import_module(COMMANDS[name][0])
    parser = argparse.ArgumentParser(
        prog=f"mapdet {name}",
        description=module.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    module.add_arguments(parser)
    args = parser.parse_args(rest)
    try:
        code = module.run(args)
    except (ValueError, FileNotFoundError) as e:
        # Our own errors say what to fix; a traceback would bury that. MAPDET_DEBUG=1 shows it.
        if os.environ.get("MAPDET_DEBUG"):
            raise
        print(f"mapdet {name}: error: {e}", file=sys.stderr)
        code = 2
    sys.exit(code or 0)
