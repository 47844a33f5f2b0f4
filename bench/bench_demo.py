"""The demo's promise (issue 7): validation AP50 >= 0.5 within 6 minutes from the start of
training to the summary, on this machine's CPU cores. Runs `mapdet demo` as a user would and
prints one JSON line with the measured figures.

    python bench/bench_demo.py [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="demo folder (default: a temporary one)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out or Path(tmp) / "demo")
        code = subprocess.call([sys.executable, "-m", "mapdet", "demo", "--out", str(out)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if code != 0:
            print(json.dumps({"demo": "failed", "exit_code": code}))
            sys.exit(1)
        s = json.loads((out / "summary.json").read_text())
    print(json.dumps({"demo": {"cores": os.cpu_count(), "AP50": round(s["AP50"], 3), "AP": round(s["AP"], 3),
                               "train_to_summary_s": s["train_to_summary_s"], "stage_seconds": s["stage_seconds"],
                               "top_cause": (s["top_cause"] or {}).get("cause"),
                               "goal": "AP50 >= 0.5 within 360 s of training start",
                               "met": s["AP50"] >= 0.5 and s["train_to_summary_s"] <= 360}}))


if __name__ == "__main__":
    main()
