"""Turn bench/results/*.jsonl (one JSON object per line) into markdown tables (bench/run: bench/results/REPORT.md)."""

from __future__ import annotations

import json
import platform
import sys
from datetime import date
from pathlib import Path

ORDER = [
    "data",
    "coco_read",
    "train",
    "train_gpu",
    "profile",
    "eval",
    "command",
    "bad_config",
    "eval_scale",
    "diagnose",
    "demo",
    "planted",
]


def flatten(obj, prefix=""):
    """("a.b", value) pairs for every leaf of nested dicts."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from flatten(v, f"{prefix}.{k}" if prefix else str(k))
    else:
        yield prefix, obj


def main(folder: str) -> None:
    root = Path(folder)
    print(
        f"# Benchmark results\n\nWritten by `bench/run` on {date.today()} ({platform.machine()}, "
        f"{platform.python_version()}). Every ratio compares pipelines measured side by side in one run.\n"
    )
    names = [n for n in ORDER if (root / f"{n}.jsonl").exists()]
    for name in names:
        cmd = (root / f"{name}.cmd").read_text().strip() if (root / f"{name}.cmd").exists() else ""
        print(f"## {name}\n\n`{cmd}`\n\n| figure | value |\n| --- | --- |")
        for line in (root / f"{name}.jsonl").read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            for key, value in flatten(row):
                print(f"| {key} | {json.dumps(value) if not isinstance(value, str) else value} |")
        print()


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "bench/results")
