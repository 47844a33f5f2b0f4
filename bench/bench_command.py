"""Benchmark: ``mapdet cocoeval`` as a whole command (process start to exit) vs pycocotools (issue 13 item 3).

Writes bench_eval's set (default 2000 images, 38 classes, 300 detections per image) as COCO JSON
files, then times each command from process start to exit, round by round and interleaved so
that other load on the machine hits every command alike; prints one JSON line per command
(median and best seconds over the rounds) and one summary line with the ratios:

- ``pycocotools, maxDets N``: the standard script: COCO(gt), loadRes(results file), COCOeval
  "bbox" (maxDets [1, 10, 100], pycocotools' default, or [1, 10, 100, 300]), evaluate,
  accumulate, summarize.
- ``mapdet, maxDets N``: ``python -m mapdet cocoeval --max-dets N`` (the same maxDets; 300 is
  mapdet's default), 1 process.
- ``mapdet, empty results``: the same on ``[]``: start-up, GT reading and printing alone.
- ``launcher``: ``accelerate launch`` (launch/accelerate/cpu2.yaml, 2 processes) of an empty
  script; ``launcher + group``: of a script that joins the gloo group and leaves it, the least
  any 2-process program pays.
- ``mapdet, 2 processes``: ``accelerate launch ... -m mapdet cocoeval --max-dets 300``.

Checks: mapdet's 12 summary stats equal pycocotools' ``stats`` exactly (both maxDets), and the
2-process metrics.json equals the 1-process one byte for byte.

    .venv/bin/python bench/bench_command.py                       # 3 rounds, about 5 minutes
    .venv/bin/python bench/bench_command.py --images 200 --rounds 1   # quick
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_eval import REPO, STATS, free_port, make_dataset

PYCOCOTOOLS = """
import json, sys
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
gt = COCO(sys.argv[1])
E = COCOeval(gt, gt.loadRes(sys.argv[2]), "bbox")
E.params.maxDets = [int(m) for m in sys.argv[3].split(",")]
E.evaluate()
E.accumulate()
E.summarize()
json.dump(E.stats.tolist(), open(sys.argv[4], "w"))
"""
MAX_DETS = (100, 300)
JOIN = "import torch.distributed as d; d.init_process_group('gloo'); d.barrier(); d.destroy_process_group()\n"


def commands(tmp: Path) -> dict[str, list[str]]:
    py = [sys.executable]
    launch = [
        str(Path(sys.executable).with_name("accelerate")),
        "launch",
        "--config_file",
        str(REPO / "launch/accelerate/cpu2.yaml"),
        "--main_process_port",
        "{port}",
    ]
    cocoeval = ["-m", "mapdet", "cocoeval", "--gt", str(tmp / "gt.json"), "--max-dets"]
    out = {}
    for m in MAX_DETS:
        out[f"pycocotools, maxDets {m}"] = [
            *py,
            "-c",
            PYCOCOTOOLS,
            str(tmp / "gt.json"),
            str(tmp / "dt.json"),
            f"1,10,100{',300' * (m == 300)}",
            str(tmp / f"stats{m}.json"),
        ]
        out[f"mapdet, maxDets {m}"] = [
            *py,
            *cocoeval,
            str(m),
            "--results",
            str(tmp / "dt.json"),
            "--out",
            str(tmp / f"one{m}.json"),
        ]
    return {
        **out,
        "mapdet, empty results": [*py, *cocoeval, "300", "--results", str(tmp / "empty.json")],
        "launcher": [*launch, str(tmp / "empty.py")],
        "launcher + group": [*launch, str(tmp / "join.py")],
        "mapdet, 2 processes": [
            *launch,
            *cocoeval,
            "300",
            "--results",
            str(tmp / "dt.json"),
            "--out",
            str(tmp / "two.json"),
        ],
    }


def timed(cmd: list[str]) -> float:
    cmd = [c.replace("{port}", str(free_port())) for c in cmd]
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    seconds = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"failed ({done.returncode}): {' '.join(cmd)[:300]}\n{done.stderr[-3000:]}")
    return seconds


def check(tmp: Path) -> None:
    for m in MAX_DETS:
        ref = json.loads((tmp / f"stats{m}.json").read_text())
        got = [json.loads((tmp / f"one{m}.json").read_text())["bbox"][k] for k in STATS]
        assert got == ref, f"maxDets {m}: mapdet {got} != pycocotools {ref}"
    assert (tmp / "two.json").read_bytes() == (tmp / "one300.json").read_bytes(), "2 processes differ from 1"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--classes", type=int, default=38)
    parser.add_argument("--dets", type=int, default=300, help="detections per image")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        gt, dets = make_dataset(args.images, args.classes, args.dets, args.seed)
        (tmp / "gt.json").write_text(json.dumps(gt))
        (tmp / "dt.json").write_text(json.dumps(dets))
        (tmp / "empty.json").write_text("[]")
        (tmp / "empty.py").write_text("")
        (tmp / "join.py").write_text(JOIN)
        cmds = commands(tmp)
        times: dict[str, list[float]] = {name: [] for name in cmds}
        for _ in range(args.rounds):
            for name, cmd in cmds.items():
                times[name].append(timed(cmd))
        check(tmp)
    case = {"images": args.images, "classes": args.classes, "detections": len(dets), "rounds": args.rounds}
    med = {name: statistics.median(t) for name, t in times.items()}
    for name, t in times.items():
        print(
            json.dumps(
                {
                    **case,
                    "command": name,
                    "median_s": round(med[name], 2),
                    "best_s": round(min(t), 2),
                    "all_s": [round(x, 2) for x in t],
                }
            ),
            flush=True,
        )
    ratios = {
        f"pycocotools_over_mapdet_maxdets_{m}": round(med[f"pycocotools, maxDets {m}"] / med[f"mapdet, maxDets {m}"], 1)
        for m in MAX_DETS
    }
    two = med["mapdet, 2 processes"]
    print(
        json.dumps(
            {
                **case,
                "summary": True,
                **ratios,
                "one_process_s": round(med["mapdet, maxDets 300"], 2),
                "two_processes_minus_launcher_s": round(two - med["launcher"], 2),
                "two_processes_minus_launcher_and_group_s": round(two - med["launcher + group"], 2),
                "load_avg_1min": round(os.getloadavg()[0], 2),
            }
        ),
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
