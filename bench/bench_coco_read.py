"""Reading COCO detection JSON for `mapdet pack --coco` (issue 21): the reader's start-up on a file of
COCO train2017's size, as it is ("fast path"), with every annotation checked one by one (its fast
path for plain annotations disabled: "one by one"), and with the garbage collector left running
while it parses ("gc on"), interleaved round by round so other load hits every variant alike.

The file is generated (random boxes, no segmentation polygons, so it is smaller than the real 450
MB one); no image is opened (the reader checks images when each is packed). Prints one JSON line
per variant (median and best seconds) and a summary line with the ratios to "fast path" and the
peak RSS of the process. Checks that every variant reads the same objects.

    python bench/bench_coco_read.py                                  # 118k images, 860k annotations
    python bench/bench_coco_read.py --images 5000 --annotations 40000 --rounds 1   # quick
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import resource
import statistics
import tempfile
import time
from pathlib import Path
from unittest import mock

import numpy as np

from mapdet.datasets import coco

VARIANTS = {  # name -> the reader's functions replaced
    "fast path": {},
    "one by one": {"_plain": lambda *a: None},
    "gc on": {"_no_gc": contextlib.nullcontext},
}


def make_file(path: Path, n_images: int, n_annotations: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    cats = [{"id": c, "name": f"class{c}", "supercategory": "thing"} for c in rng.sample(range(1, 91), 80)]
    images = [{"id": 3 * i + 1, "file_name": f"{i:012d}.jpg", "width": 640, "height": 480} for i in range(n_images)]
    anns = [
        {
            "id": k + 1,
            "image_id": 3 * rng.randrange(n_images) + 1,
            "category_id": rng.choice(cats)["id"],
            "bbox": [rng.uniform(0, 500), rng.uniform(0, 400), rng.uniform(1, 100), rng.uniform(1, 80)],
            "area": rng.uniform(1, 5000),
            "iscrowd": int(rng.random() < 0.01),
        }
        for k in range(n_annotations)
    ]
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))


def read(path: Path, folder: Path, variant: str) -> tuple[float, dict]:
    """Seconds to build the reader in ``variant``, and the objects it read."""
    with contextlib.ExitStack() as stack:
        for name, replacement in VARIANTS[variant].items():
            stack.enter_context(mock.patch.object(coco, name, replacement))
        t = time.perf_counter()
        reader = coco.CocoReader(path, folder)
        return time.perf_counter() - t, reader._objects


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=118_000)
    p.add_argument("--annotations", type=int, default=860_000)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "instances.json"
        make_file(path, args.images, args.annotations)
        times: dict[str, list[float]] = {name: [] for name in VARIANTS}
        first = None
        for _ in range(args.rounds):
            for name in times:
                seconds, objects = read(path, Path(tmp), name)
                times[name].append(seconds)
                first = first or objects
                same = objects.keys() == first.keys() and all(
                    np.array_equal(objects[k], first[k], equal_nan=True) for k in first
                )
                assert same, f"{name} read other objects"
                del objects
        mb = path.stat().st_size / 1e6
    for name, ts in times.items():
        row = {"variant": name, "images": args.images, "annotations": args.annotations, "json_mb": round(mb, 1)}
        row.update(median_s=round(statistics.median(ts), 2), best_s=round(min(ts), 2), rounds=len(ts))
        row["annotations_per_s"] = round(args.annotations / statistics.median(ts))
        print(json.dumps(row))
    base = statistics.median(times["fast path"])
    ratios = {f"{name} / fast path": round(statistics.median(ts) / base, 2) for name, ts in times.items()}
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3
    print(json.dumps({"summary": "reader start-up, median seconds", **ratios, "peak_rss_mb": round(peak)}))


if __name__ == "__main__":
    main()
