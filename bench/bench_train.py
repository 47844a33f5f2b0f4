"""Training throughput: mapdet's pipeline vs a torchvision-references-style pipeline (issues 3, 11).

Both train the same model on the same synthetic shards with the same batch size, DataLoader workers,
warmup and step counts, in one process, through the same ``mapdet.engine.step.train_step``:

- mapdet:    ``TrainStream`` decodes uint8 images in the workers; ``BatchAugment`` (Kornia) runs
             inside the step on the training device, as ``mapdet train`` does;
- reference: the workers decode (``decode_sample``: torchvision's libjpeg-turbo decoder, at least as
             fast as the references' PIL) AND augment each sample with torchvision.transforms.v2 on
             tv_tensors (flip, RandomResizedCrop, ColorJitter with the config's probabilities and
             strengths, ToDtype, SanitizeBoundingBoxes), map-style dataset with a shuffling sampler,
             as torchvision's detection references do; the step gets float images and augments
             nothing. Its raw samples (the shards' bytes) are read into memory first, so it never
             pays for tar reading: a favour to the reference.

CPU comparison (the demo config's small preset): phases alternate (round 1: mapdet then reference,
round 2 the other way, ...) so a drifting machine load hits both alike, and the headline is the
median of the per-round ratios. Each phase starts from the same initial weights and a fresh loader.
data_wait = time blocked on the next batch / step time; images_per_s = images / step time.
worker_cpu_s_per_image counts the whole phase's worker CPU, prefetched-but-unused batches included.

GPU grid (when CUDA exists; ``--skip-cpu`` for only this): ``--gpu-config`` (vistas_r50.yaml:
R50-FPN v2, min_size 1024, max_size 2048, its augment/optim and data.workers) in bf16, on synthetic
1600x1200 images packed at --max-side 2048 (network input 1024x1365), every variant of
``GPU_VARIANTS`` in ONE child process from the same initial weights: mapdet and reference at batch 4
and 8, main's per-step syncs, each speed lever left out in turn, pinned memory, a fused optimizer,
batch 16. "speedups=train" runs ``mapdet.engine.step.cuda_speedups``, what ``mapdet train`` applies on
CUDA. Each variant: ``--gpu-warmup`` untimed steps, then ``--gpu-steps`` timed between two
``cuda.synchronize()``; images_per_s = images / that wall time, data_wait = time blocked on the next
batch / that wall time, max_mem_gib = peak allocated. The reference's DataLoader uses torch's
default prefetch (2), as the references do. One JSON line per variant, then a ``gpu_summary`` line
with the ratios (mapdet vs reference at the same batch; each lever: with / without).

    .venv/bin/python bench/bench_train.py                                     # about 2 min on 2 idle cores
    .venv/bin/python bench/bench_train.py --images 40 --steps 5 --warmup 2 --rounds 1   # quick
    python3 bench/bench_train.py --skip-cpu                                   # GPU grid: about 2.5 min on one H100
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import inspect
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
from mapdet.config import AugmentConfig, DataConfig, load_config
from mapdet.data.augment import _CROP_ASPECT, BatchAugment
from mapdet.data.loaders import TrainStream
from mapdet.datasets.synthetic.writer import SynthConfig, synthesize
from mapdet.engine.optim import make_optimizer, make_scheduler
from mapdet.engine.step import StepResult, TrainParts, cuda_speedups, to_device, train_step
from mapdet.modeling.detector import build_model
from mapdet.shards.manifest import class_instance_counts, load_manifest, shard_urls
from mapdet.shards.merge import merge
from mapdet.shards.reader import decode_sample, read_shard
from mapdet.shards.writer import PackOptions, pack
from mapdet.structures import Batch

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
        image, out = self._transforms[size](
            tv_tensors.Image(image), {"boxes": boxes, "labels": target["labels"][plain]}
        )
        return image.as_subclass(torch.Tensor), {
            "boxes": out["boxes"].as_subclass(torch.Tensor),
            "labels": out["labels"],
        }


def reference_transform(cfg: AugmentConfig, size: tuple[int, int]) -> T.Compose:
    """transforms.v2 ops of the same strength as ``BatchAugment`` (no vflip/rot90: off by default).
    SanitizeBoundingBoxes drops boxes by size only (BatchAugment also drops mostly cut-away ones)."""
    h, w = size
    ops = [T.RandomHorizontalFlip(cfg.hflip)]
    if cfg.scale_jitter > 0:
        ratio = (w / h * _CROP_ASPECT[0], w / h * _CROP_ASPECT[1])  # the crop aspect range BatchAugment draws
        ops.append(
            T.RandomApply([T.RandomResizedCrop((h, w), scale=(cfg.scale_min, 1.0), ratio=ratio)], p=cfg.scale_jitter)
        )
    if cfg.color_jitter > 0:
        ops.append(
            T.RandomApply([T.ColorJitter(cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue)], p=cfg.color_jitter)
        )
    ops += [T.ToDtype(torch.float32, scale=True), T.SanitizeBoundingBoxes(min_size=cfg.min_box_size)]
    return T.Compose(ops)


def _collate(items) -> Batch:
    images, targets = zip(*items)
    return Batch(list(images), list(targets), [])


def reference_batches(
    samples: list[dict],
    cfg: AugmentConfig,
    num_classes: int,
    batch_size: int,
    workers: int,
    seed: int,
    prefetch: int = 4,
):
    dataset = ReferenceDataset(samples, cfg, num_classes)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=workers,
        collate_fn=_collate,
        persistent_workers=workers > 0,
        prefetch_factor=prefetch if workers else None,
        generator=torch.Generator().manual_seed(seed),
    )  # CPU: prefetch as TrainStream's
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
        res = train_step(TrainParts(accelerator, model, model, optimizer, scheduler, timed), batches, cfg.optim)
        if i < warmup:
            warm_images += res.images
        else:
            wait, step_s, images = wait + res.data_wait_s, step_s + res.step_time_s, images + res.images
    main_cpu = _cpu_s(resource.RUSAGE_SELF) - main0
    batches.close()  # the DataLoader's workers exit and are reaped, so RUSAGE_CHILDREN counts them
    workers_cpu = _cpu_s(resource.RUSAGE_CHILDREN) - children0
    return {
        "pipeline": name,
        "steps": steps,
        "images": images,
        "step_s": step_s / steps,
        "wait_s": wait,
        "time_s": step_s,
        "augment_s": timed.seconds - aug_s,
        "main_cpu_s": main_cpu,
        "worker_cpu_s_per_image": workers_cpu / (images + warm_images),
        "load_avg_1min": [round(load0, 2), round(os.getloadavg()[0], 2)],
    }


def summary(phases: list[dict]) -> dict:
    t = sum(p["time_s"] for p in phases)
    n = sum(p["images"] for p in phases)
    return {
        "pipeline": phases[0]["pipeline"],
        "images_per_s": round(n / t, 3),
        "data_wait": round(sum(p["wait_s"] for p in phases) / t, 4),
        "step_s": round(t / sum(p["steps"] for p in phases), 4),
        "augment_in_step": round(sum(p["augment_s"] for p in phases) / t, 4),
        "main_cpu_s_per_image": round(sum(p["main_cpu_s"] for p in phases) / n, 4),
        "worker_cpu_s_per_image": round(sum(p["worker_cpu_s_per_image"] for p in phases) / len(phases), 4),
    }


def make_shards(root: Path, n: int, size: tuple[int, int], max_side: int | None = None, workers: int = 2) -> dict:
    raw = synthesize(root / "raw", "v2.0", n_train=n, n_val=0, seed=0, cfg=SynthConfig(size=size))
    pack(
        raw,
        root / "shards",
        "training",
        PackOptions(samples_per_shard=max(1, n // 4), workers=workers, max_side=max_side),
    )
    return merge(root / "shards", "training")


def cpu_comparison(args, tmp: Path) -> None:
    cfg = load_config(args.config)
    cfg.data = DataConfig(
        shards=str(tmp / "shards"),
        batch_size=args.batch_size or cfg.data.batch_size,
        workers=cfg.data.workers if args.workers is None else args.workers,
        shuffle_buffer=cfg.data.shuffle_buffer,
    )  # no repeat factors: both see plain data
    manifest = make_shards(tmp, args.images, args.size)
    samples = [s for url in shard_urls(cfg.data.shards, manifest) for s in read_shard(url)]
    k = len(manifest["classes"])
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model0 = build_model(cfg.model, k + 1, class_instance_counts(manifest))
    accelerator = comm.make_accelerator(mixed_precision="no")
    print(
        json.dumps(
            {
                "setup": {
                    "images": len(samples),
                    "size": list(args.size),
                    "shards": len(manifest["shards"]),
                    "arch": cfg.model.arch,
                    "min_size": model0.transform.min_size[0],
                    "max_size": model0.transform.max_size,
                    "batch_size": cfg.data.batch_size,
                    "workers": cfg.data.workers,
                    "torch_threads": args.threads,
                    "warmup": args.warmup,
                    "steps": args.steps,
                    "rounds": args.rounds,
                    "cpus": os.cpu_count(),
                    "load_avg": [round(x, 2) for x in os.getloadavg()],
                    "config": args.config,
                }
            }
        ),
        flush=True,
    )
    pipelines = {
        "mapdet": lambda: (
            iter(TrainStream(cfg.data.shards, manifest, cfg.data, 0, 1, seed=0)),
            BatchAugment(cfg.augment).to(accelerator.device),
        ),
        "reference": lambda: (
            reference_batches(samples, cfg.augment, k, cfg.data.batch_size, cfg.data.workers, seed=0),
            _no_augment,
        ),
    }
    phases: dict[str, list[dict]] = {name: [] for name in pipelines}
    for r in range(args.rounds):
        for name in list(pipelines)[:: 1 if r % 2 == 0 else -1]:
            batches, augment = pipelines[name]()
            p = run_phase(name, batches, augment, model0, cfg, accelerator, args.warmup, args.steps)
            phases[name].append(p)
            print(
                json.dumps(
                    {"phase": {"round": r + 1, **{k: round(v, 4) if isinstance(v, float) else v for k, v in p.items()}}}
                ),
                flush=True,
            )
    ours, ref = summary(phases["mapdet"]), summary(phases["reference"])
    print(json.dumps({"result": ours}))
    print(json.dumps({"result": ref}))
    per_round = [
        round((a["images"] / a["time_s"]) / (b["images"] / b["time_s"]), 3)
        for a, b in zip(phases["mapdet"], phases["reference"])
    ]
    median = statistics.median(per_round)  # robust to a load change that hits one round's phases unevenly
    print(
        json.dumps(
            {
                "ratio": {
                    "median_round_mapdet_vs_reference": round(median, 3),
                    "per_round": per_round,
                    "totals_mapdet_vs_reference": round(ours["images_per_s"] / ref["images_per_s"], 3),
                    "data_wait_mapdet": ours["data_wait"],
                    "data_wait_reference": ref["data_wait"],
                    "goal": "mapdet >= 1.0x reference on CPU (median round), data wait < 0.05",
                    "met": median >= 1.0 and ours["data_wait"] < 0.05,
                    "load_avg_end": [round(x, 2) for x in os.getloadavg()],
                }
            }
        )
    )


def gpu_comparison(args, tmp: Path) -> None:
    """The GPU grid: shards made here, every variant measured in ONE child process (all bf16: accelerate
    fixes the precision per process, and this process may already hold an fp32 Accelerator)."""
    if not torch.cuda.is_available() and not args.grid_on_cpu:
        print(json.dumps({"gpu": "skipped: torch.cuda.is_available() is False on this machine"}), flush=True)
        return
    t0 = time.perf_counter()
    make_shards(
        tmp / "gpu", args.gpu_images, args.gpu_size, max_side=args.gpu_max_side, workers=min(8, os.cpu_count() or 1)
    )
    print(
        json.dumps(
            {
                "gpu_shards": {
                    "images": args.gpu_images,
                    "size": list(args.gpu_size),
                    "max_side": args.gpu_max_side,
                    "seconds": round(time.perf_counter() - t0, 1),
                }
            }
        ),
        flush=True,
    )
    cmd = [
        sys.executable,
        __file__,
        "--gpu-child",
        "grid",
        "--gpu-shards",
        str(tmp / "gpu" / "shards"),
        "--gpu-warmup",
        str(args.gpu_warmup),
        "--gpu-steps",
        str(args.gpu_steps),
        "--gpu-budget-s",
        str(args.gpu_budget_s),
        "--gpu-variants",
        args.gpu_variants,
        "--gpu-config",
        args.gpu_config,
    ]
    if args.grid_on_cpu:
        cmd += ["--gpu-set", *args.gpu_set]
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=REPO) as child:  # stderr passes through
        for line in child.stdout:  # relayed as they come: a run cut short keeps the variants measured so far
            print(line.rstrip("\n"), flush=True)
    if child.returncode != 0:
        print(json.dumps({"gpu_error": f"the GPU child exited {child.returncode} (its stderr is above)"}), flush=True)


# The grid, in priority order (a variant that would start past --gpu-budget-s is reported as skipped).
# pipeline: mapdet = TrainStream (uint8 decode in workers) + BatchAugment on the GPU inside the step;
#           reference = decode + transforms.v2 augmentation in the workers, float images to the GPU.
# step: "mapdet" = mapdet.engine.step.train_step (one host sync per step); "main" = the step and loop syncs of
#       main before this change (any_rank per micro-batch, float() per loss, 3 all-reduces per step).
# speedups: "train" = mapdet.engine.step.cuda_speedups, exactly what `mapdet train` applies on CUDA
#           (channels-last weights + cudnn.benchmark); otherwise the explicit channels_last/benchmark flags.
GPU_VARIANTS = [
    dict(name="mapdet_b8", pipeline="mapdet", batch=8, speedups="train"),
    dict(name="reference_b8", pipeline="reference", batch=8),
    dict(name="mapdet_b4", pipeline="mapdet", batch=4, speedups="train"),
    dict(name="reference_b4", pipeline="reference", batch=4),
    dict(name="main_b4", pipeline="mapdet", batch=4, step="main"),  # main as it was: the 24-31 img/s figure
    dict(name="mapdet_b8_main_syncs", pipeline="mapdet", batch=8, speedups="train", step="main"),
    dict(name="mapdet_b8_nchw", pipeline="mapdet", batch=8, benchmark=True),
    dict(name="mapdet_b8_no_benchmark", pipeline="mapdet", batch=8, channels_last=True),
    dict(name="reference_b8_speedups", pipeline="reference", batch=8, speedups="train"),
    dict(name="mapdet_b8_pinned", pipeline="mapdet", batch=8, speedups="train", pin_memory=True),
    dict(name="mapdet_b8_fused_opt", pipeline="mapdet", batch=8, speedups="train", fused=True),
    dict(name="mapdet_b16", pipeline="mapdet", batch=16, speedups="train"),
]


def main_train_step(parts, batches, optim_cfg):
    """main's train_step before the one-sync change, verbatim, plus the 3 small all-reduces its training
    loop made per step (counts, stop flag, preemption flag): the baseline of the sync lever."""
    accelerator, model, optimizer, scheduler, augment = (
        parts.accelerator,
        parts.model,
        parts.optimizer,
        parts.scheduler,
        parts.augment,
    )
    grad_accum, clip_norm = optim_cfg.grad_accum, optim_cfg.clip_norm
    start, wait, n_images, bad = time.perf_counter(), 0.0, 0, []
    sums: dict[str, float] = {}
    skipped = False
    for micro in range(grad_accum):
        t0 = time.perf_counter()
        batch = next(batches)
        wait += time.perf_counter() - t0
        bad += batch.bad
        images, targets = to_device(batch, accelerator.device)
        with torch.no_grad():
            images, targets = augment(images, targets)
        with contextlib.nullcontext() if micro == grad_accum - 1 else accelerator.no_sync(model):
            with accelerator.autocast():
                loss_dict = model(images, [{"boxes": t["boxes"], "labels": t["labels"]} for t in targets])
            loss = sum(loss_dict.values())
            if comm.any_rank(not bool(torch.isfinite(loss)), accelerator.device):
                skipped = True
                break
            accelerator.backward(loss / grad_accum)
        for k, v in loss_dict.items():
            sums[k] = sums.get(k, 0.0) + float(v.detach()) / grad_accum
        n_images += len(images)
    if skipped:
        optimizer.zero_grad(set_to_none=True)
    else:
        if clip_norm:
            float(accelerator.clip_grad_norm_(model.parameters(), clip_norm))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    sums["loss"] = sum(sums.values())
    totals = comm.all_reduce_sum(torch.tensor([float(len(bad)), float(n_images), 0.0], device=accelerator.device))
    int(totals[1])
    comm.any_rank(False, accelerator.device)
    comm.any_rank(False, accelerator.device)
    return StepResult(sums, None, skipped, wait, time.perf_counter() - start, n_images, bad)


def _fused_optimizer(opt: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The same optimizer and hyperparameters (from mapdet.engine.optim.make_optimizer) with fused=True."""
    accepted = set(inspect.signature(type(opt).__init__).parameters) - {"self", "params", "foreach", "fused"}
    groups = [{k: v for k, v in g.items() if k == "params" or k in accepted} for g in opt.param_groups]
    return type(opt)(groups, **{k: v for k, v in opt.defaults.items() if k in accepted}, fused=True)


@contextlib.contextmanager
def _pinned_loaders(on: bool):
    """TrainStream's DataLoaders with pin_memory=True (a bench-only patch of mapdet.data.loaders.batch_loader)."""
    if not on:
        yield
        return
    import mapdet.data.loaders as data

    original = data.batch_loader
    data.batch_loader = lambda dataset, workers, **kw: original(dataset, workers, pin_memory=True, **kw)
    try:
        yield
    finally:
        data.batch_loader = original


def gpu_phase(v: dict, model0, cfg, manifest, samples, accelerator, warmup: int, steps: int) -> dict:
    """One variant: a copy of ``model0``, a fresh loader, ``warmup`` untimed then ``steps`` timed steps."""
    device = accelerator.device
    data_cfg = dataclasses.replace(cfg.data, batch_size=v["batch"])
    k = len(manifest["classes"])
    model = copy.deepcopy(model0)
    if v.get("speedups") == "train":
        cuda_speedups(model, device)
        channels_last, benchmark = True, torch.backends.cudnn.benchmark
    else:
        channels_last, benchmark = v.get("channels_last", False), v.get("benchmark", False)
        if channels_last:
            model.to(memory_format=torch.channels_last)
        torch.backends.cudnn.benchmark = benchmark
    optimizer = make_optimizer(model, cfg.optim)
    if v.get("fused"):
        optimizer = _fused_optimizer(optimizer)
    scheduler = make_scheduler(optimizer, cfg.optim, cfg.train.max_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    step_fn = main_train_step if v.get("step") == "main" else train_step
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    with _pinned_loaders(v.get("pin_memory", False)):
        if v["pipeline"] == "mapdet":
            batches = iter(TrainStream(data_cfg.shards, manifest, data_cfg, 0, 1, seed=0))
            augment = BatchAugment(cfg.augment).to(device)
        else:  # enough samples that no epoch ends inside the phase (an epoch end drains the prefetch)
            repeated = samples * (1 + (warmup + steps + 8) * v["batch"] // len(samples))
            batches = reference_batches(repeated, cfg.augment, k, v["batch"], data_cfg.workers, seed=0, prefetch=2)
            augment = _no_augment
        wait = 0.0
        images = skipped = 0
        for i in range(warmup + steps):
            if i == warmup:
                _sync()
                t0 = time.perf_counter()
            res = step_fn(TrainParts(accelerator, model, model, optimizer, scheduler, augment), batches, cfg.optim)
            if i >= warmup:
                wait, images, skipped = wait + res.data_wait_s, images + res.images, skipped + res.skipped
        _sync()
        wall = time.perf_counter() - t0
        batches.close()
    out = {
        "name": v["name"],
        "pipeline": v["pipeline"],
        "batch_size": v["batch"],
        "step": v.get("step", "mapdet"),
        "channels_last": channels_last,
        "cudnn_benchmark": benchmark,
        "pin_memory": v.get("pin_memory", False),
        "fused_optimizer": bool(v.get("fused")),
        "workers": data_cfg.workers,
        "steps": steps,
        "images_per_s": round(images / wall, 2),
        "data_wait": round(wait / wall, 4),
        "step_s": round(wall / steps, 4),
        "max_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None,
        "skipped_steps": skipped,
        "loss_last": round(res.losses["loss"], 4),
    }
    del model, optimizer, scheduler, batches
    accelerator.free_memory()  # drops accelerate's references to the prepared model and optimizer
    return out


def gpu_grid(args) -> None:
    """The child: every selected variant of GPU_VARIANTS on the same shards, model and weights."""
    # Start weights do not change the speed, and a bare GPU machine has no cache to read them from.
    cfg = load_config(
        args.gpu_config,
        ["train.mixed_precision=bf16", "model.weights=null", "model.backbone_weights=null", *args.gpu_set],
    )
    manifest = load_manifest(args.gpu_shards, "training")
    # One epoch for the whole phase: TrainStream starts fresh DataLoader workers at every epoch, and a
    # few dozen synthetic images would otherwise end an epoch every few steps (real Vistas: 18k images).
    # A 32-sample shuffle buffer (default 256) only shortens each loader's start: not timed either way.
    cfg.data = dataclasses.replace(
        cfg.data, shards=args.gpu_shards, samples_per_epoch=10**7, shuffle_buffer=32, repeat_threshold=None
    )  # plain data for both pipelines, as on the CPU
    samples = [s for url in shard_urls(cfg.data.shards, manifest) for s in read_shard(url)]
    accelerator = comm.make_accelerator(mixed_precision="bf16")
    torch.manual_seed(0)
    model0 = build_model(cfg.model, len(manifest["classes"]) + 1, class_instance_counts(manifest))
    h, w = decode_sample(samples[0])[0].shape[-2:]
    scale = min(model0.transform.min_size[0] / min(h, w), model0.transform.max_size / max(h, w))
    shm = os.statvfs("/dev/shm") if os.path.exists("/dev/shm") else None
    import kornia
    import torchvision

    print(
        json.dumps(
            {
                "gpu_setup": {
                    "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (code check only)",
                    "torch": torch.__version__,
                    "torchvision": torchvision.__version__,
                    "kornia": kornia.__version__,
                    "cpus": os.cpu_count(),
                    "dev_shm_gib": shm and round(shm.f_blocks * shm.f_frsize / 2**30, 1),
                    "config": args.gpu_config,
                    "arch": cfg.model.arch,
                    "precision": "bf16",
                    "stored_image": [w, h],
                    "network_input": [round(w * scale), round(h * scale)],
                    "min_size": model0.transform.min_size[0],
                    "max_size": model0.transform.max_size,
                    "workers": cfg.data.workers,
                    "warmup": args.gpu_warmup,
                    "steps": args.gpu_steps,
                    "budget_s": args.gpu_budget_s,
                }
            }
        ),
        flush=True,
    )
    wanted = [v for v in GPU_VARIANTS if args.gpu_variants == "all" or v["name"] in args.gpu_variants.split(",")]
    start, results = time.perf_counter(), {}
    for v in wanted:
        if time.perf_counter() - start > args.gpu_budget_s:
            print(
                json.dumps(
                    {"gpu_variant": {"name": v["name"], "skipped": f"time budget of {args.gpu_budget_s} s spent"}}
                ),
                flush=True,
            )
            continue
        t = time.perf_counter()
        try:
            r = gpu_phase(v, model0, cfg, manifest, samples, accelerator, args.gpu_warmup, args.gpu_steps)
        except Exception as e:  # one failing variant (OOM, a worker crash) must not lose the others
            accelerator.free_memory()
            print(
                json.dumps({"gpu_variant": {"name": v["name"], "error": f"{type(e).__name__}: {str(e)[:400]}"}}),
                flush=True,
            )
            continue
        r["phase_s"] = round(time.perf_counter() - t, 1)
        ref = results.get(f"reference_b{v['batch']}")
        if ref and v["pipeline"] == "mapdet":
            r["vs_reference_same_batch"] = round(r["images_per_s"] / ref["images_per_s"], 3)
        results[v["name"]] = r
        print(json.dumps({"gpu_variant": r}), flush=True)
    print(json.dumps({"gpu_summary": gpu_summary(results)}), flush=True)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def gpu_summary(results: dict) -> dict:
    def rate(name):
        return results[name]["images_per_s"] if name in results else None

    def ratio(a, b):
        return round(rate(a) / rate(b), 3) if rate(a) and rate(b) else None

    best = max(
        (r for r in results.values() if r["pipeline"] == "mapdet"), key=lambda r: r["images_per_s"], default=None
    )
    head = results.get("mapdet_b8")
    return {
        "mapdet_b8_images_per_s": rate("mapdet_b8"),
        "mapdet_b8_data_wait": head and head["data_wait"],
        "mapdet_vs_reference_b8": ratio("mapdet_b8", "reference_b8"),
        "mapdet_vs_reference_b4": ratio("mapdet_b4", "reference_b4"),
        "mapdet_vs_reference_with_speedups_b8": ratio("mapdet_b8", "reference_b8_speedups"),
        "mapdet_b4_vs_main_b4": ratio("mapdet_b4", "main_b4"),
        "lever_one_sync_per_step_b8": ratio("mapdet_b8", "mapdet_b8_main_syncs"),
        "lever_channels_last_b8": ratio("mapdet_b8", "mapdet_b8_nchw"),
        "lever_cudnn_benchmark_b8": ratio("mapdet_b8", "mapdet_b8_no_benchmark"),
        "lever_pinned_memory_b8": ratio("mapdet_b8_pinned", "mapdet_b8"),
        "lever_fused_optimizer_b8": ratio("mapdet_b8_fused_opt", "mapdet_b8"),
        "batch_16_vs_8": ratio("mapdet_b16", "mapdet_b8"),
        "fastest_mapdet": best and {k: best[k] for k in ("name", "images_per_s", "data_wait", "max_mem_gib")},
        "goal": "mapdet >= 50 img/s on one H100 with data wait < 0.05, and >= 1.5x the reference at the same batch",
        "met_b8": bool(
            head
            and head["images_per_s"] >= 50
            and head["data_wait"] < 0.05
            and (ratio("mapdet_b8", "reference_b8") or 0) >= 1.5
        ),
    }


def _size(text: str) -> tuple[int, int]:
    w, h = map(int, text.lower().split("x"))
    return w, h


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--config", default=str(REPO / "launch/configs/demo.yaml"), help="model/augment/optim sections come from here"
    )
    ap.add_argument("--images", type=int, default=200, help="synthetic training images")
    ap.add_argument("--size", type=_size, default=(512, 384), help="synthetic image size WxH")
    ap.add_argument("--batch-size", type=int, default=None, help="default: the config's data.batch_size")
    ap.add_argument("--workers", type=int, default=None, help="DataLoader workers; default: the config's data.workers")
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the training process")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps at the start of each phase")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per phase")
    ap.add_argument("--rounds", type=int, default=6, help="each round runs both pipelines, order alternating")
    ap.add_argument(
        "--gpu-config",
        default=str(REPO / "launch/configs/vistas_r50.yaml"),
        help="GPU grid: model/augment/optim/data.workers from here (bf16 always)",
    )
    ap.add_argument("--gpu-images", type=int, default=24, help="GPU grid: synthetic images (the stream repeats them)")
    ap.add_argument("--gpu-size", type=_size, default=(1600, 1200), help="GPU grid: synthetic image size WxH")
    ap.add_argument("--gpu-max-side", type=int, default=2048, help="GPU grid: packed with mapdet pack --max-side")
    ap.add_argument(
        "--gpu-warmup", type=int, default=3, help="GPU grid: untimed steps per variant (the first one times cuDNN)"
    )
    ap.add_argument("--gpu-steps", type=int, default=15, help="GPU grid: timed steps per variant")
    ap.add_argument(
        "--gpu-budget-s",
        type=float,
        default=120,
        help="GPU grid: no variant starts after this many seconds of the grid (the rest are reported skipped)",
    )
    ap.add_argument("--gpu-variants", default="all", help="GPU grid: comma-separated names from GPU_VARIANTS, or all")
    ap.add_argument("--skip-cpu", action="store_true", help="only the GPU grid")
    ap.add_argument("--gpu-child", choices=["grid"], help=argparse.SUPPRESS)
    ap.add_argument("--gpu-shards", help=argparse.SUPPRESS)
    # A check of the grid's own code on a CPU machine (tiny sizes: its figures mean nothing), e.g.
    # --skip-cpu --grid-on-cpu --gpu-config launch/configs/demo.yaml --gpu-size 256x192 --gpu-images 8
    # --gpu-warmup 1 --gpu-steps 1 --gpu-set model.min_size=128 model.max_size=160 data.workers=1
    ap.add_argument("--grid-on-cpu", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--gpu-set", nargs="*", default=[], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.gpu_child:
        gpu_grid(args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_cpu:
            cpu_comparison(args, Path(tmp))
        gpu_comparison(args, Path(tmp))


if __name__ == "__main__":
    main()
