"""Host syncs of a training forward: torchvision's Faster R-CNN against mapdet's (issue 11).

On CUDA every read-back (``nonzero``, ``.item()``, a boolean-mask index, torchvision's ``nms``)
stops the host until the GPU has drained its queue. This counts them with
``mapdet.host_syncs`` on ANY machine (a CPU is enough: the ops are the same), for one
training forward of ``--config``'s detector (vistas_r50.yaml: R50-FPN v2 at min_size 1024 /
max_size 2048) on ``--images`` synthetic 1600x1200 images, with mapdet's RPN forced onto its CUDA
NMS path. Both detectors have the same weights; torchvision's is mapdet's parts in torchvision's own
``GeneralizedRCNN`` with its own RPN and RoI heads. Then ``BatchAugment`` on the same batch.

Counted as device syncs: ``nonzero``, ``nms``, boolean-mask indexing, and ``.item()`` of tensors
that live on the GPU under CUDA (the degenerate-box check). ``.item()`` of tensors that stay on the
CPU under CUDA too (the pooler's scales, the transform's size choice, Kornia's parameters) is
listed apart: no sync there. Not seen by the counter: copies (``.tolist()``), one per batch in
mapdet's samplers, proposal filter, augmentation and step (stated, not counted).

    .venv/bin/python bench/bench_syncs.py                 # about 1 minute on 2 cores
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
from train_pipelines import make_shards

from mapdet.cli import image_size
from mapdet.config import load_config
from mapdet.data.augment import BatchAugment
from mapdet.host_syncs import count_host_syncs
from mapdet.modeling.build import build_model
from mapdet.modeling.detector import torchvision_twin
from mapdet.shards.manifest import class_instance_counts, load_manifest
from mapdet.shards.reader import decode_sample, read_shard

REPO = Path(__file__).resolve().parents[1]
# .item() of CPU tensors under CUDA as well: no sync on a GPU
CPU_SIDE = ("ops/poolers.py:10", "ops/poolers.py:12", "detection/transform.py:176", "kornia/")


def split(syncs) -> dict:
    device, cpu_side = {}, {}
    for site, n in syncs.by_site().items():
        (cpu_side if any(s in site for s in CPU_SIDE) else device)[site] = n
    return {"device_syncs": sum(device.values()), "by_site": device, "cpu_side_reads": sum(cpu_side.values())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(REPO / "launch/configs/vistas_r50.yaml"))
    ap.add_argument("--images", type=int, default=2, help="images in the batch")
    ap.add_argument("--size", type=image_size, default=(1600, 1200), help="synthetic image size WxH")
    args = ap.parse_args()
    torch.set_num_threads(2)
    cfg = load_config(args.config, ["model.weights=null", "model.backbone_weights=null"])
    with tempfile.TemporaryDirectory() as tmp:
        make_shards(Path(tmp), args.images, args.size, max_side=2048, workers=1)
        shards = Path(tmp) / "shards"
        manifest = load_manifest(shards, "training")
        samples = [decode_sample(s) for sh in manifest["shards"] for s in read_shard(shards / sh["name"])]
    images = [im for im, _ in samples]
    targets = [{"boxes": t["boxes"], "labels": t["labels"]} for _, t in samples]
    torch.manual_seed(0)
    ours = build_model(cfg.model, len(manifest["classes"]) + 1, class_instance_counts(manifest)).train()
    ours.rpn.one_nms_per_image = True  # the path it takes on CUDA
    rows = {}
    for name, model in (("torchvision", torchvision_twin(ours)), ("mapdet", ours)):
        float_images = [im.float() / 255 for im in images]
        with torch.no_grad(), count_host_syncs() as syncs:
            torch.manual_seed(1)
            model(float_images, targets)
        rows[name] = split(syncs)
        print(json.dumps({"forward": name, "images": len(images), **rows[name]}), flush=True)
    with count_host_syncs() as syncs:
        BatchAugment(cfg.augment)(images, [dict(t, iscrowd=torch.zeros(len(t["labels"]))) for t in targets])
    print(json.dumps({"augment": "mapdet", "images": len(images), **split(syncs)}), flush=True)
    per_image = {k: round(v["device_syncs"] / len(images), 1) for k, v in rows.items()}
    print(json.dumps({"syncs_per_image": per_image, "not_counted_copies_per_batch_mapdet": 5}), flush=True)


if __name__ == "__main__":
    sys.exit(main())
