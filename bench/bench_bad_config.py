"""Benchmark: how soon ``mapdet train`` refuses a bad setting, process start to exit (issue 22 item 1).

Times, round by round and interleaved (other load on the machine hits each alike), with one bad
key on the demo config (``train.ckpt_every=-1``):

- ``checked first``: ``python -m mapdet train --config launch/configs/demo.yaml --set KEY=BAD``, as
  shipped: the CLI loads and checks the config before it imports the command (torch, accelerate,
  torchvision).
- ``checked after the imports``: the same command after ``import mapdet.commands.train``, the
  order before (the config was first read inside the command).
- ``under accelerate launch``: the shipped command through ``accelerate launch`` with 2 CPU
  processes (launch/accelerate/cpu2.yaml): what a user of the launcher waits.

Each must exit 2 with the one line naming the key (the launcher: exit 1 after the children's 2).
Prints one JSON line per variant (median and best seconds) and one with the ratio.

    .venv/bin/python bench/bench_bad_config.py               # 5 rounds, about a minute
    .venv/bin/python bench/bench_bad_config.py --rounds 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench_eval import REPO, free_port

BAD = "train.ckpt_every=-1"
ARGS = ["train", "--config", str(REPO / "launch" / "configs" / "demo.yaml"), "--set", BAD]
AFTER_IMPORTS = "import sys, mapdet.commands.train\nfrom mapdet.cli import main\nmain(sys.argv[1:])\n"


def variants() -> dict[str, tuple[list[str], int]]:
    """name -> (command, expected exit code)."""
    accelerate = str(Path(sys.executable).with_name("accelerate"))
    launch = [accelerate, "launch", "--config_file", str(REPO / "launch/accelerate/cpu2.yaml")]
    return {
        "checked first": ([sys.executable, "-m", "mapdet", *ARGS], 2),
        "checked after the imports": ([sys.executable, "-c", AFTER_IMPORTS, *ARGS], 2),
        "under accelerate launch": ([*launch, "--main_process_port", str(free_port()), "-m", "mapdet", *ARGS], 1),
    }


def timed(cmd: list[str], code: int) -> float:
    start = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    took = time.perf_counter() - start
    if r.returncode != code or f"config key '{BAD.split('=')[0]}'" not in r.stderr:
        raise SystemExit(f"{cmd}: exit {r.returncode}, expected {code}:\n{r.stderr[-2000:]}")
    return took


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    times: dict[str, list[float]] = {name: [] for name in variants()}
    for _ in range(args.rounds):
        for name, (cmd, code) in variants().items():
            times[name].append(timed(cmd, code))
    for name, ts in times.items():
        print(json.dumps({"variant": name, "median_s": round(statistics.median(ts), 2), "best_s": round(min(ts), 2)}))
    first, after = (statistics.median(times[k]) for k in ("checked first", "checked after the imports"))
    print(json.dumps({"summary": "time to exit on a bad key", "after_imports_over_first": round(after / first, 1)}))


if __name__ == "__main__":
    main()
