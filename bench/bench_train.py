"""Training throughput: mapdet's pipeline vs a torchvision-references-style pipeline (issue 3).

Both train the same model (``--config``'s model section, the small CPU preset in the demo config)
on the same synthetic shards with the same batch size, DataLoader workers, torch threads, warmup and
step counts, in this one process, through the same ``mapdet.engine.train_step``:

- mapdet:    ``TrainStream`` decodes uint8 images in the workers; ``BatchAugment`` (Kornia) runs
             inside the step on the training device, as ``mapdet train`` does;
- reference: the workers decode (``decode_sample``) AND augment each sample with
             torchvision.transforms.v2 on tv_tensors (flip, RandomResizedCrop, ColorJitter with the
             config's probabilities and strengths, ToDtype, SanitizeBoundingBoxes), map-style
             dataset with a shuffling sampler, as torchvision's detection references do; the step
             gets float images and augments nothing. Its raw samples (the shards' bytes) are read
             into memory first, so it never pays for tar reading: a favour to the reference.

Phases alternate (round 1: mapdet then reference, round 2 the other way, ...) so a drifting
machine load hits both alike, and the headline is the median of the per-round ratios (a load
change inside one round skews only that round). Each phase starts from the same initial weights
and a fresh loader. Output is JSON lines: setup, one line per phase, one per pipeline (summed over
rounds), the ratio line, then the GPU line (bf16 vs fp32 images/s for resnet50_fpn_v2; each precision in a child process, since
accelerate fixes the precision once per process) or why it was skipped.
data_wait = time blocked on the next batch / step time; images_per_s = images / step time.
worker_cpu_s_per_image counts the whole phase's worker CPU, prefetched-but-unused batches included.

    .venv/bin/python bench/bench_train.py                                     # about 2 min on 2 idle cores
    .venv/bin/python bench/bench_train.py --images 40 --steps 5 --warmup 2 --rounds 1   # quick
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torchvision.transforms.v2 as T
from torch.utils.data import DataLoader, Dataset
from torchvision import tv_tensors

from mapdet import comm
from mapdet.augment import _CROP_ASPECT, BatchAugment
from mapdet.config import AugmentConfig, DataConfig, load_config
from mapdet.data import Batch, TrainStream, decode_sample, read_shard
from mapdet.engine import train_step
from mapdet.manifest import class_instance_counts, load_manifest, shard_urls
from mapdet.model import build_model
from mapdet.optim import make_optimizer, make_scheduler
from mapdet.packer import PackOptions, merge, pack
from mapdet.synthetic import SynthConfig, synthesize

REPO = Path(__file__).resolve().parents[1]


class ReferenceDataset(Dataset):
    """One raw sample -> (float (3,H,W) in [0,1], {boxes xyxy pixel-edge (N,4), labels (N,)}),
    decoded and augmented per sample in the DataLoader worker (torchvision-references style)."""

    def __init__(self, samples: list[dict], cfg: AugmentConfig, num_classes: int):
        self.samples, self.cfg, self.num_classes = samples, cfg, num_classes
        self._transforms: dict[tuple[int, int], T.Compose] = {}

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        image, target = decode_sample(self.samples[i], self.num_classes)
        size = tuple(image.shape[-2:])
        plain = target["iscrowd"] == 0  # training leaves crowd regions out, as TrainStream does
        boxes = tv_tensors.BoundingBoxes(target["boxes"][plain], format="XYXY", canvas_size=size, clamping_mode="hard")
        if size not in self._transforms:
            self._transforms[size] = reference_transform(self.cfg, size)
        image, out = self._transforms[size](tv_tensors.Image(image), {"boxes": boxes, "labels": target["labels"][plain]})
        return image.as_subclass(torch.Tensor), {"boxes": out["boxes"].as_subclass(torch.Tensor), "labels": out["labels"]}


def reference_transform(cfg: AugmentConfig, size: tuple[int, int]) -> T.Compose:
    """transforms.v2 ops of the same strength as ``BatchAugment`` (no vflip/rot90: off by default).
    SanitizeBoundingBoxes drops boxes by size only (BatchAugment also drops mostly cut-away ones)."""
    h, w = size
    ops = [T.RandomHorizontalFlip(cfg.hflip)]
    if cfg.scale_jitter > 0:
        ratio = (w / h * _CROP_ASPECT[0], w / h * _CROP_ASPECT[1])  # the crop aspect range BatchAugment draws
        ops.append(T.RandomApply([T.RandomResizedCrop((h, w), scale=(cfg.scale_min, 1.0), ratio=ratio)], p=cfg.scale_jitter))
    if cfg.color_jitter > 0:
        ops.append(T.RandomApply([T.ColorJitter(cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue)], p=cfg.color_jitter))
    ops += [T.ToDtype(torch.float32, scale=True), T.SanitizeBoundingBoxes(min_size=cfg.min_box_size)]
    return T.Compose(ops)


def _collate(items) -> Batch:
    images, targets = zip(*items)
    return Batch(list(images), list(targets), [])


def reference_batches(samples: list[dict], cfg: AugmentConfig, num_classes: int, batch_size: int, workers: int, seed: int):
    dataset = ReferenceDataset(samples, cfg, num_classes)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True, num_workers=workers,
                        collate_fn=_collate, persistent_workers=workers > 0, prefetch_factor=4 if workers else None,
                        generator=torch.Generator().manual_seed(seed))  # prefetch as TrainStream's
    while True:
        yield from loader


def _no_augment(images, targets):
    return [im.float() for im in images], targets


class _Timed:
    """Wraps the in-step augmentation to report its share of the step."""

    def __init__(self, fn):
        self.fn, self.seconds = fn, 0.0

    def __call__(self, images, targets):
        t = time.perf_counter()
        out = self.fn(images, targets)
        self.seconds += time.perf_counter() - t
        return out


def _cpu_s(who: int) -> float:
    r = resource.getrusage(who)
    return r.ru_utime + r.ru_stime


def run_phase(name: str, batches, augment, model0, cfg, accelerator, warmup: int, steps: int) -> dict:
    """``warmup`` then ``steps`` timed training steps from a copy of ``model0``; closes ``batches``."""
    model = copy.deepcopy(model0).train()
    optimizer = make_optimizer(model, cfg.optim)
    scheduler = make_scheduler(optimizer, cfg.optim, warmup + steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    timed = _Timed(augment)
    children0, load0 = _cpu_s(resource.RUSAGE_CHILDREN), os.getloadavg()[0]
    wait = step_s = aug_s = 0.0
    images = warm_images = 0
    for i in range(warmup + steps):
        if i == warmup:
            aug_s, main0 = timed.seconds, _cpu_s(resource.RUSAGE_SELF)
        res = train_step(accelerator, model, optimizer, scheduler, batches, timed, cfg.optim.grad_accum, cfg.optim.clip_norm)
        if i < warmup:
            warm_images += res.images
        else:
            wait, step_s, images = wait + res.data_wait_s, step_s + res.step_time_s, images + res.images
    main_cpu = _cpu_s(resource.RUSAGE_SELF) - main0
    batches.close()  # the DataLoader's workers exit and are reaped, so RUSAGE_CHILDREN counts them
    workers_cpu = _cpu_s(resource.RUSAGE_CHILDREN) - children0
    return {"pipeline": name, "steps": steps, "images": images, "step_s": step_s / steps, "wait_s": wait,
            "time_s": step_s, "augment_s": timed.seconds - aug_s, "main_cpu_s": main_cpu,
            "worker_cpu_s_per_image": workers_cpu / (images + warm_images),
            "load_avg_1min": [round(load0, 2), round(os.getloadavg()[0], 2)]}


def summary(phases: list[dict]) -> dict:
    t = sum(p["time_s"] for p in phases)
    n = sum(p["images"] for p in phases)
    return {"pipeline": phases[0]["pipeline"], "images_per_s": round(n / t, 3), "data_wait": round(sum(p["wait_s"] for p in phases) / t, 4),
            "step_s": round(t / sum(p["steps"] for p in phases), 4),
            "augment_in_step": round(sum(p["augment_s"] for p in phases) / t, 4),
            "main_cpu_s_per_image": round(sum(p["main_cpu_s"] for p in phases) / n, 4),
            "worker_cpu_s_per_image": round(sum(p["worker_cpu_s_per_image"] for p in phases) / len(phases), 4)}


def make_shards(root: Path, n: int, size: tuple[int, int]) -> dict:
    raw = synthesize(root / "raw", "v2.0", n_train=n, n_val=0, seed=0, cfg=SynthConfig(size=size))
    pack(raw, root / "shards", "training", PackOptions(samples_per_shard=max(1, n // 4), workers=2))
    return merge(root / "shards", "training")


def cpu_comparison(args, tmp: Path) -> None:
    cfg = load_config(args.config)
    cfg.data = DataConfig(shards=str(tmp / "shards"), batch_size=args.batch_size or cfg.data.batch_size,
                          workers=cfg.data.workers if args.workers is None else args.workers,
                          shuffle_buffer=cfg.data.shuffle_buffer)  # no repeat factors: both see plain data
    manifest = make_shards(tmp, args.images, args.size)
    samples = [s for url in shard_urls(cfg.data.shards, manifest) for s in read_shard(url)]
    k = len(manifest["classes"])
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model0 = build_model(cfg.model, k + 1, class_instance_counts(manifest))
    accelerator = comm.make_accelerator(mixed_precision="no")
    print(json.dumps({"setup": {"images": len(samples), "size": list(args.size), "shards": len(manifest["shards"]),
                                "arch": cfg.model.arch, "min_size": model0.transform.min_size[0], "max_size": model0.transform.max_size,
                                "batch_size": cfg.data.batch_size, "workers": cfg.data.workers, "torch_threads": args.threads,
                                "warmup": args.warmup, "steps": args.steps, "rounds": args.rounds, "cpus": os.cpu_count(),
                                "load_avg": [round(x, 2) for x in os.getloadavg()], "config": args.config}}), flush=True)
    pipelines = {
        "mapdet": lambda: (iter(TrainStream(cfg.data.shards, manifest, cfg.data, 0, 1, seed=0)), BatchAugment(cfg.augment).to(accelerator.device)),
        "reference": lambda: (reference_batches(samples, cfg.augment, k, cfg.data.batch_size, cfg.data.workers, seed=0), _no_augment),
    }
    phases: dict[str, list[dict]] = {name: [] for name in pipelines}
    for r in range(args.rounds):
        for name in list(pipelines)[:: 1 if r % 2 == 0 else -1]:
            batches, augment = pipelines[name]()
            p = run_phase(name, batches, augment, model0, cfg, accelerator, args.warmup, args.steps)
            phases[name].append(p)
            print(json.dumps({"phase": {"round": r + 1, **{k: round(v, 4) if isinstance(v, float) else v for k, v in p.items()}}}), flush=True)
    ours, ref = summary(phases["mapdet"]), summary(phases["reference"])
    print(json.dumps({"result": ours}))
    print(json.dumps({"result": ref}))
    per_round = [round((a["images"] / a["time_s"]) / (b["images"] / b["time_s"]), 3) for a, b in zip(phases["mapdet"], phases["reference"])]
    median = statistics.median(per_round)  # robust to a load change that hits one round's phases unevenly
    print(json.dumps({"ratio": {"median_round_mapdet_vs_reference": round(median, 3), "per_round": per_round,
                                "totals_mapdet_vs_reference": round(ours["images_per_s"] / ref["images_per_s"], 3),
                                "data_wait_mapdet": ours["data_wait"], "data_wait_reference": ref["data_wait"],
                                "goal": "mapdet >= 1.0x reference on CPU (median round), data wait < 0.05",
                                "met": median >= 1.0 and ours["data_wait"] < 0.05,
                                "load_avg_end": [round(x, 2) for x in os.getloadavg()]}}))


def gpu_comparison(args, tmp: Path) -> None:
    if not torch.cuda.is_available():
        print(json.dumps({"gpu": "skipped: torch.cuda.is_available() is False on this machine"}))
        return
    make_shards(tmp / "gpu", args.gpu_images, args.gpu_size)
    rates = {}
    for precision in ("no", "bf16"):
        cmd = [sys.executable, __file__, "--gpu-child", precision, "--gpu-shards", str(tmp / "gpu" / "shards"),
               "--warmup", str(args.warmup), "--steps", str(args.gpu_steps), "--gpu-batch-size", str(args.gpu_batch_size),
               "--gpu-size", "x".join(map(str, args.gpu_size))]
        out = subprocess.run(cmd, check=False, capture_output=True, text=True, cwd=REPO)
        if out.returncode != 0:
            raise RuntimeError(f"GPU run ({precision}) failed:\n{out.stderr[-3000:]}")
        line = json.loads(out.stdout.strip().splitlines()[-1])
        rates[precision] = line["gpu"]["images_per_s"]
        print(json.dumps(line), flush=True)
    print(json.dumps({"gpu_ratio": {"bf16_vs_fp32_images_per_s": round(rates["bf16"] / rates["no"], 3)}}))


def gpu_child(args) -> None:
    """One precision of the GPU measurement: vistas_r50.yaml's model at the synthetic image size."""
    cfg = load_config(REPO / "launch/configs/vistas_r50.yaml", [f"train.mixed_precision={args.gpu_child}"])
    w, h = args.gpu_size
    cfg.model.min_size, cfg.model.max_size = min(w, h), max(w, h)  # the network sees the stored size
    cfg.data = DataConfig(shards=args.gpu_shards, batch_size=args.gpu_batch_size, workers=cfg.data.workers)
    manifest = load_manifest(args.gpu_shards, "training")
    torch.manual_seed(0)
    accelerator = comm.make_accelerator(mixed_precision=cfg.train.mixed_precision)
    model0 = build_model(cfg.model, len(manifest["classes"]) + 1).to(accelerator.device)
    batches = iter(TrainStream(cfg.data.shards, manifest, cfg.data, 0, 1, seed=0))
    p = run_phase(f"resnet50_fpn_v2/{args.gpu_child}", batches, BatchAugment(cfg.augment).to(accelerator.device),
                  model0, cfg, accelerator, args.warmup, args.steps)
    mem = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    print(json.dumps({"gpu": {"precision": "fp32" if args.gpu_child == "no" else args.gpu_child, "device": str(accelerator.device),
                              "name": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                              "input": [w, h], "batch_size": args.gpu_batch_size, "workers": cfg.data.workers,
                              "images_per_s": round(p["images"] / p["time_s"], 3), "data_wait": round(p["wait_s"] / p["time_s"], 4),
                              "step_s": round(p["step_s"], 4), "max_mem_gib": mem and round(mem, 2)}}))


def _size(text: str) -> tuple[int, int]:
    w, h = map(int, text.lower().split("x"))
    return w, h


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(REPO / "launch/configs/demo.yaml"), help="model/augment/optim sections come from here")
    ap.add_argument("--images", type=int, default=200, help="synthetic training images")
    ap.add_argument("--size", type=_size, default=(512, 384), help="synthetic image size WxH")
    ap.add_argument("--batch-size", type=int, default=None, help="default: the config's data.batch_size")
    ap.add_argument("--workers", type=int, default=None, help="DataLoader workers; default: the config's data.workers")
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the training process")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps at the start of each phase")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per phase")
    ap.add_argument("--rounds", type=int, default=6, help="each round runs both pipelines, order alternating")
    ap.add_argument("--gpu-images", type=int, default=64)
    ap.add_argument("--gpu-size", type=_size, default=(1024, 768), help="GPU run: image and network input size WxH")
    ap.add_argument("--gpu-batch-size", type=int, default=2)
    ap.add_argument("--gpu-steps", type=int, default=30)
    ap.add_argument("--skip-cpu", action="store_true", help="only the GPU measurement")
    ap.add_argument("--gpu-child", choices=["no", "bf16"], help=argparse.SUPPRESS)
    ap.add_argument("--gpu-shards", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.gpu_child:
        gpu_child(args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_cpu:
            cpu_comparison(args, Path(tmp))
        gpu_comparison(args, Path(tmp))


if __name__ == "__main__":
    main()
