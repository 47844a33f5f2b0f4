"""mapdet cocoeval --gt GT.json --results DT.json [--max-dets 100,300] [--out metrics.json]

Score a COCO bbox results file (from any detector) against COCO ground truth with numbers equal
to pycocotools' COCOeval, much faster. Prints the per-class table and the summary (AP, AP50, ...
AR100 as pycocotools' stats, plus AP at every --max-dets) and writes metrics.json with --out.
maxDets 1, 10 and 100 are always evaluated.

Under ``accelerate launch --config_file launch/accelerate/cpu2.yaml -m mapdet cocoeval ...`` (or
torchrun) the processes join one gloo group; each reads both files, packs its contiguous share of
the results and the categories are split across the processes (``evaluator.evaluate_coco``); only
the main process prints and writes.
Exit codes: 0 ok, 2 bad input (missing or malformed file, results that do not fit the GT).

Start-up is part of the cost of a command that takes seconds: a single process never imports
torch or accelerate (about 1.5 s), and JSON is parsed by orjson (``fileio.read_json``) with the
cyclic garbage collector paused, its objects then frozen out of later collections (the parser makes
millions of objects that are never garbage; collecting them while they are made more than doubles
the parse time, and every later collection would walk them again).
"""

from __future__ import annotations

import argparse
import gc
import os
import sys

from mapdet.evaluation.coco import ENGINES, evaluate_coco, format_summary, format_table, write_metrics
from mapdet.fileio import read_json


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gt", required=True, help="COCO ground truth JSON (images, annotations, categories)")
    p.add_argument(
        "--results", required=True, help="COCO results JSON: a list of {image_id, category_id, bbox [x,y,w,h], score}"
    )
    p.add_argument(
        "--max-dets", default="100,300", help="comma-separated maxDets to report AP at (1, 10, 100 are always added)"
    )
    p.add_argument("--out", default=None, help="write metrics.json here")
    p.add_argument(
        "--engine",
        default="auto",
        choices=ENGINES,
        help="auto = mapdet's exact numpy engine; the others are for cross-checks",
    )


class InputError(ValueError):
    """Bad input the user must fix; exit code 2."""


def run(args: argparse.Namespace) -> int:
    from mapdet import comm

    joined = _join_processes()
    try:
        return _score(args, comm)
    finally:
        if joined:
            import torch.distributed as dist

            dist.destroy_process_group()


def _score(args: argparse.Namespace, comm) -> int:
    try:
        max_dets = _max_dets(args.max_dets)
        gt = _load_json(args.gt, "ground truth")
        results = _load_json(args.results, "results")
        result = evaluate_coco(gt, _own_share(results, comm), max_dets=max_dets, engine=args.engine)
    except (InputError, ValueError) as e:  # every rank learns of any rank's bad input
        if comm.is_main_process():
            print(f"mapdet cocoeval: error: {e}", file=sys.stderr)
        return 2
    if comm.is_main_process():
        names = {int(c["id"]): str(c.get("name", c["id"])) for c in gt["categories"]}
        rows = result.per_class(names)
        print(format_table(rows))
        print(format_summary(result.summary()))
        print(f"{len(results)} detections on {len(gt['images'])} images, {comm.get_world_size()} process(es)")
        if args.out:
            write_metrics(result, args.out, names)
            print(f"wrote {args.out}")
    comm.barrier()
    return 0


def _own_share(results, comm):
    """This rank's contiguous share of the results list (all of it in one process): concatenated
    in rank order the shares are the file, the order ``evaluate_coco`` scores."""
    if not isinstance(results, list):
        return results  # evaluate_coco names the problem
    lo, hi = comm.share(len(results), comm.get_rank(), comm.get_world_size())
    return results[lo:hi]


def _join_processes() -> bool:
    """Join the launcher's gloo group when started with WORLD_SIZE > 1 (accelerate, torchrun).

    The arrays exchanged live on the CPU, so gloo serves on GPU machines too, and the launcher's
    environment (MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE) connects all processes by itself.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return False
    import torch.distributed as dist

    dist.init_process_group("gloo")
    return True


def _max_dets(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise InputError(f"--max-dets must be comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise InputError(f"--max-dets values must be >= 1, got {text!r}")
    return values


def _load_json(path: str, what: str):
    """``fileio.read_json`` with the garbage collector paused, then its objects frozen (see the
    module docstring); a missing or malformed file raises ``ValueError`` naming it."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        parsed = read_json(path, what)
    finally:
        if enabled:
            gc.enable()
    gc.freeze()  # the parsed objects live to the end: later collections need not walk them again
    return parsed
