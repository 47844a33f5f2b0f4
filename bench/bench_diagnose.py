"""Benchmark: mapdet.diagnosis.tide vs the tidecv package, and a whole `diagnose` on a Vistas-sized set.

Prints one JSON line per measurement. On the same inputs (a subset small enough for tidecv) it
times both TIDE implementations side by side and checks that every dAP agrees within 0.5 AP
points; then it times mapdet.diagnosis.tide and mapdet.diagnosis.measures.diagnose alone on the
full set.

    .venv/bin/python bench/bench_diagnose.py                       # 2000 images, 90 GT, 300 dets
    .venv/bin/python bench/bench_diagnose.py --images 300 --tidecv-images 50   # quick

Data: random, Vistas-like: --gt objects per image (Poisson) over 37 classes with Zipf-like
frequencies, sizes 4-600 px in 2048x1536 images; detections are jittered copies of the GT (0-3
per object, 15% with a wrong class) plus false positives, exactly --dets per image.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from mapdet.diagnosis import tide
from mapdet.diagnosis.measures import diagnose
from mapdet.structures import Detections


def make_set(num_images: int, gt_per_image: int, dets_per_image: int, num_classes: int = 37, seed: int = 0):
    rng = np.random.default_rng(seed)
    W, H = 2048.0, 1536.0
    freq = 1.0 / np.arange(1, num_classes + 1) ** 1.2
    freq /= freq.sum()
    images, anns, parts = [], [], []
    for img_id in range(1, num_images + 1):
        images.append({"id": img_id, "width": int(W), "height": int(H)})
        n = rng.poisson(gt_per_image)
        cls = rng.choice(num_classes, n, p=freq) + 1
        size = np.exp(rng.uniform(np.log(4), np.log(600), n))
        w, h = np.minimum(size * np.exp(rng.normal(0, 0.4, n)), W - 1), size
        x, y = rng.uniform(0, W - w), rng.uniform(0, H - h)
        for i in range(n):
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": img_id,
                    "category_id": int(cls[i]),
                    "iscrowd": 0,
                    "bbox": [float(x[i]), float(y[i]), float(w[i]), float(h[i])],
                    "area": float(w[i] * h[i]),
                }
            )
        src = np.repeat(np.arange(n), rng.integers(0, 4, n))
        jit = rng.normal(0, 0.1, (len(src), 4))
        box = np.stack(
            [
                x[src] + jit[:, 0] * w[src],
                y[src] + jit[:, 1] * h[src],
                x[src] + w[src] * (1 + jit[:, 2]),
                y[src] + h[src] * (1 + jit[:, 3]),
            ],
            1,
        )
        label = np.where(rng.random(len(src)) < 0.15, rng.integers(1, num_classes + 1, len(src)), cls[src])
        score = np.clip(rng.beta(4, 2, len(src)) - np.abs(jit).sum(1), 0.01, 1)
        nfp = max(dets_per_image - len(src), 0)
        fx, fy, fs = rng.uniform(0, W - 100, nfp), rng.uniform(0, H - 100, nfp), rng.uniform(4, 100, nfp)
        box = np.concatenate([box, np.stack([fx, fy, fx + fs, fy + fs], 1)])
        label = np.concatenate([label, rng.choice(num_classes, nfp, p=freq) + 1])
        score = np.concatenate([score, rng.beta(1, 6, nfp)])
        top = np.argsort(-score, kind="stable")[:dets_per_image]
        parts.append(Detections(np.full(len(top), img_id), box[top], score[top], label[top]))
    cats = [{"id": c, "name": f"class{c}"} for c in range(1, num_classes + 1)]
    return {"images": images, "annotations": anns, "categories": cats}, Detections.concat(parts)


def subset(gt: dict, dets: Detections, n: int):
    keep = {im["id"] for im in gt["images"][:n]}
    sub = {**gt, "images": gt["images"][:n], "annotations": [a for a in gt["annotations"] if a["image_id"] in keep]}
    m = np.isin(dets.image_id, list(keep))
    return sub, Detections(dets.image_id[m], dets.boxes[m], dets.scores[m], dets.labels[m])


def run_tidecv(gt: dict, dets: Detections):
    import tidecv

    gd, pd = tidecv.Data("gt"), tidecv.Data("dt")
    for a in gt["annotations"]:
        gd.add_ground_truth(a["image_id"], a["category_id"], a["bbox"])
    for r in dets.to_coco_results():
        pd.add_detection(r["image_id"], r["category_id"], r["score"], r["bbox"])
    t = tidecv.TIDE()
    t.evaluate(gd, pd, mode=tidecv.TIDE.BOX, name="dt")
    names = dict(zip(("Cls", "Loc", "Both", "Dupe", "Bkg", "Miss", "FalsePos", "FalseNeg"), tide.ALL_TYPES))
    return {names[k]: v for k, v in {**t.get_main_errors()["dt"], **t.get_special_errors()["dt"]}.items()}


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--gt", type=int, default=90)
    p.add_argument("--dets", type=int, default=300)
    p.add_argument("--tidecv-images", type=int, default=200)
    args = p.parse_args()
    gt, dets = make_set(args.images, args.gt, args.dets)
    info = {"gt_boxes": len(gt["annotations"]), "detections": len(dets)}
    try:
        import tidecv  # noqa: F401
    except ImportError:
        print(json.dumps({"tidecv": "not installed: side-by-side comparison skipped"}))
    else:
        sgt, sdets = subset(gt, dets, args.tidecv_images)
        theirs, t_theirs = timed(lambda: run_tidecv(sgt, sdets))
        mine, t_mine = timed(lambda: tide.decompose(sgt, sdets))
        worst = max(abs(mine.errors[k] - theirs[k]) for k in tide.ALL_TYPES)
        print(
            json.dumps(
                {
                    "images": args.tidecv_images,
                    "tidecv_s": round(t_theirs, 2),
                    "mapdet_tide_s": round(t_mine, 3),
                    "speedup": round(t_theirs / t_mine, 1),
                    "max_abs_dAP_diff": round(worst, 4),
                }
            )
        )
        assert worst < 0.5, f"mapdet.diagnosis.tide and tidecv differ by {worst:.3f} AP points"
    result, t_tide = timed(lambda: tide.decompose(gt, dets))
    print(json.dumps({"images": args.images, **info, "mapdet_tide_s": round(t_tide, 2), "ap50": round(result.ap, 2)}))
    d, t_all = timed(lambda: diagnose(gt, dets))
    print(
        json.dumps(
            {
                "images": args.images,
                "diagnose_s": round(t_all, 2),
                "top_cause": d.causes[0].cause,
                "top_impact": d.causes[0].impact,
            }
        )
    )


if __name__ == "__main__":
    main()
