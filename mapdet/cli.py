"""The ``mapdet`` command line: one sub-command per wiring module.

Each wiring module exposes ``add_arguments(parser)`` and ``run(args) -> int`` (the exit code).
A user's mistake escaping a command (``USER_ERRORS``: a ValueError, such as a ``ConfigError``, or a
path that is missing, a folder, or not readable) is printed as one line and exits 2.
Modules are imported only when their command runs, so ``mapdet --help`` stays fast and a
command never pays for another's imports. The ``--config``/``--set`` of ``train`` and ``evaluate``
are checked before their module is imported (``CONFIG_FIRST``): it imports torch, accelerate and
torchvision (about 5 s), and a mistyped setting should be told at once.
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


# Exceptions that mean the user must fix an argument, a setting or a file: one line, exit 2.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError, PermissionError)
# Commands whose config is checked before their module is imported -> whether data.global_batch
# must split over the processes the launcher started.
CONFIG_FIRST = {"train": True, "evaluate": False}


def add_config_arguments(p: argparse.ArgumentParser, example: str = "optim.lr=0.01 train.max_steps=500") -> None:
    """The ``--config FILE`` and ``--set KEY=VALUE ...`` of a command that reads an experiment config."""
    p.add_argument("--config", default=None, help="experiment YAML (launch/configs/*.yaml); default: built-in defaults")
    p.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help=f"overrides, e.g. {example} (every key and its range: README, Configuration)",
    )


def _check_config_first(name: str, rest: list[str]) -> None:
    """Load the config that ``rest`` names (ConfigError: exit 2) without importing the command."""
    if name not in CONFIG_FIRST or "-h" in rest or "--help" in rest:
        return
    pre = argparse.ArgumentParser(add_help=False, exit_on_error=False)
    add_config_arguments(pre)
    try:
        known, _ = pre.parse_known_args(rest)
    except argparse.ArgumentError:
        return  # the command's own parser says what is wrong
    from mapdet import comm
    from mapdet.config import load_config

    load_config(known.config, known.set, processes=comm.launched_processes() if CONFIG_FIRST[name] else None)


def number(kind: type = int, lo: float | None = None, hi: float | None = None, open: str = ""):
    """An argparse type: a ``kind`` (int or float) within ``lo``..``hi``, a bound strict where
    ``open`` says ("lo", "hi", "both"), as ``mapdet.config.Range``; outside, argparse's error (exit 2)."""

    def parse(text: str):
        from mapdet.config import Range  # imported when a number is parsed: cocoeval never pays for it

        rule = Range(lo, hi, open)
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {rule.describe(kind)}, got {text!r}") from None
        if not rule.admits(value):
            raise argparse.ArgumentTypeError(f"{text} is not allowed: {rule.describe(kind)}")
        return value

    return parse


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
    try:
        _check_config_first(name, rest)
    except USER_ERRORS as e:
        sys.exit(_user_error(name, e))
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
    except USER_ERRORS as e:
        code = _user_error(name, e)
    sys.exit(code or 0)


def _user_error(name: str, e: Exception) -> int:
    """Print ``e`` as the one line a user reads (our errors say what to fix; a traceback would bury
    that: MAPDET_DEBUG=1 shows it); the exit code 2."""
    if os.environ.get("MAPDET_DEBUG"):
        raise e
    print(f"mapdet {name}: error: {e}", file=sys.stderr)
    return 2
