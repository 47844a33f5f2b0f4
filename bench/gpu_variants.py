"""The GPU grid's variants and how each is prepared (bench_train_gpu.py times them, profile_step.py
profiles one): the same shards, config and initial weights, each variant's settings applied to a
copy of the model, its optimizer and a fresh loader.

Config: the given file (vistas_r50.yaml: R50-FPN v2, min_size 1024, max_size 2048) in bf16, no start
weights (they do not change the speed, and a bare GPU machine has no cache to read them from).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import inspect
from pathlib import Path

import torch
from train_pipelines import main_train_step, no_augment, reference_batches

from mapdet import comm
from mapdet.config import load_config
from mapdet.data.augment import BatchAugment
from mapdet.data.loaders import TrainStream
from mapdet.engine.optim import make_optimizer, make_scheduler
from mapdet.engine.step import TrainParts, cuda_speedups, train_step
from mapdet.modeling.build import build_model
from mapdet.modeling.detector import torchvision_twin
from mapdet.shards.manifest import class_instance_counts, load_manifest
from mapdet.shards.reader import read_shard

# The grid, in priority order (a variant that would start past --budget-s is reported as skipped):
# the head-to-head first, then the levers not yet measured on any GPU, then those measured on an H200.
# pipeline: mapdet = TrainStream (uint8 decode in workers) + BatchAugment on the GPU inside the step;
#           reference = decode + transforms.v2 augmentation in the workers, float images to the GPU.
# step: "mapdet" = mapdet.engine.step.train_step (one host sync per step); "main" = the step and loop syncs of
#       main before issue 11 (any_rank per micro-batch, float() per loss, 3 all-reduces per step).
# speedups: "train" = mapdet.engine.step.cuda_speedups, exactly what `mapdet train` applies on CUDA
#           (channels-last weights + cudnn.benchmark); otherwise the explicit channels_last/benchmark flags.
# detector: "torchvision" = torchvision's own detector with the same weights (modeling.detector.torchvision_twin:
#      same proposals, samples and losses, about 19 more host syncs per image);
# workers: DataLoader workers instead of the config's; compile: torch.compile of the backbone + FPN (its
#          compilation falls in the untimed warm-up steps; the synthetic images share one shape).
GPU_VARIANTS = [
    dict(name="mapdet_b8", pipeline="mapdet", batch=8, speedups="train"),
    dict(name="reference_b8", pipeline="reference", batch=8),
    dict(name="mapdet_b8_torchvision_detector", pipeline="mapdet", batch=8, speedups="train", detector="torchvision"),
    dict(name="mapdet_b16", pipeline="mapdet", batch=16, speedups="train"),  # vistas_r50.yaml on one GPU
    dict(name="mapdet_b8_pinned", pipeline="mapdet", batch=8, speedups="train", pin_memory=True),
    dict(name="mapdet_b8_fused_opt", pipeline="mapdet", batch=8, speedups="train", fused=True),
    dict(name="mapdet_b8_workers12", pipeline="mapdet", batch=8, speedups="train", workers=12),
    dict(name="mapdet_b8_compiled", pipeline="mapdet", batch=8, speedups="train", compile=True),
    dict(name="mapdet_b8_no_benchmark", pipeline="mapdet", batch=8, channels_last=True),
    dict(name="reference_b8_speedups", pipeline="reference", batch=8, speedups="train"),
    dict(name="mapdet_b4", pipeline="mapdet", batch=4, speedups="train"),
    dict(name="reference_b4", pipeline="reference", batch=4),
    # main before issue 11 (24-31 img/s then): its step and torchvision's detector; not its augmentation,
    # which read back 4 times per image more
    dict(name="main_b4", pipeline="mapdet", batch=4, step="main", detector="torchvision"),
    dict(name="mapdet_b8_main_syncs", pipeline="mapdet", batch=8, speedups="train", step="main"),
    dict(name="mapdet_b8_nchw", pipeline="mapdet", batch=8, benchmark=True),
]


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


@dataclasses.dataclass
class Grid:
    """What every variant starts from: the config, the packed shards and one set of initial weights."""

    cfg: object  # mapdet.config.Config, data.shards pointing at the packed shards
    manifest: dict
    samples: list[dict]  # the raw shard samples (the reference pipeline holds them in memory)
    accelerator: object  # one bf16 Accelerator for every variant
    model0: torch.nn.Module


def load_grid(config: str, shards: str, overrides: list[str]) -> Grid:
    # Start weights do not change the speed, and a bare GPU machine has no cache to read them from.
    cfg = load_config(
        config, ["train.mixed_precision=bf16", "model.weights=null", "model.backbone_weights=null", *overrides]
    )
    manifest = load_manifest(shards, "training")
    # One epoch for the whole phase: TrainStream starts fresh DataLoader workers at every epoch, and a
    # few dozen synthetic images would otherwise end an epoch every few steps (real Vistas: 18k images).
    # A 32-sample shuffle buffer (default 256) only shortens each loader's start: not timed either way.
    cfg.data = dataclasses.replace(
        cfg.data, shards=shards, samples_per_epoch=10**7, shuffle_buffer=32, repeat_threshold=None
    )  # plain data for both pipelines, as on the CPU
    samples = [s for sh in manifest["shards"] for s in read_shard(Path(cfg.data.shards) / sh["name"])]
    accelerator = comm.make_accelerator(mixed_precision="bf16")
    torch.manual_seed(0)
    model0 = build_model(cfg.model, len(manifest["classes"]) + 1, class_instance_counts(manifest))
    return Grid(cfg, manifest, samples, accelerator, model0)


@dataclasses.dataclass
class Variant:
    """One variant ready to step: ``step(parts, batches, cfg.optim)`` -> StepResult."""

    parts: TrainParts
    batches: object  # iterator of mapdet.structures.Batch
    step: object  # train_step or train_pipelines.main_train_step
    settings: dict  # what the JSON line reports about the variant


@contextlib.contextmanager
def prepared(v: dict, grid: Grid, steps: int):
    """A copy of ``grid.model0`` with ``v``'s settings, its optimizer and a fresh loader; closes the
    loader and drops accelerate's references on exit. ``steps``: how many the loader must serve."""
    cfg, device = grid.cfg, grid.accelerator.device
    data_cfg = dataclasses.replace(cfg.data, batch_size=v["batch"], workers=v.get("workers", cfg.data.workers))
    model = copy.deepcopy(grid.model0)
    if v.get("speedups") == "train":
        cuda_speedups(model, device)
        channels_last, benchmark = True, torch.backends.cudnn.benchmark
    else:
        channels_last, benchmark = v.get("channels_last", False), v.get("benchmark", False)
        if channels_last:
            model.to(memory_format=torch.channels_last)
        torch.backends.cudnn.benchmark = benchmark
    if v.get("detector") == "torchvision":
        model = torchvision_twin(model)
    if v.get("compile"):
        model.backbone = torch.compile(model.backbone)
    optimizer = make_optimizer(model, cfg.optim)
    if v.get("fused"):
        optimizer = _fused_optimizer(optimizer)
    scheduler = make_scheduler(optimizer, cfg.optim, cfg.train.max_steps)
    model, optimizer = grid.accelerator.prepare(model, optimizer)
    with _pinned_loaders(v.get("pin_memory", False)):
        if v["pipeline"] == "mapdet":
            batches = iter(TrainStream(data_cfg.shards, grid.manifest, data_cfg, 0, 1, seed=0))
            augment = BatchAugment(cfg.augment).to(device)
        else:  # enough samples that no epoch ends inside the phase (an epoch end drains the prefetch)
            repeated = grid.samples * (1 + (steps + 8) * v["batch"] // len(grid.samples))
            k = len(grid.manifest["classes"])
            batches = reference_batches(repeated, cfg.augment, k, v["batch"], data_cfg.workers, seed=0, prefetch=2)
            augment = no_augment
    settings = {
        "name": v["name"],
        "pipeline": v["pipeline"],
        "batch_size": v["batch"],
        "step": v.get("step", "mapdet"),
        "channels_last": channels_last,
        "cudnn_benchmark": benchmark,
        "pin_memory": v.get("pin_memory", False),
        "fused_optimizer": bool(v.get("fused")),
        "compiled_backbone": bool(v.get("compile")),
        "detector": v.get("detector", "mapdet"),
        "workers": data_cfg.workers,
    }
    step = main_train_step if v.get("step") == "main" else train_step
    try:
        yield Variant(
            TrainParts(grid.accelerator, model, model, optimizer, scheduler, augment), batches, step, settings
        )
    finally:
        batches.close()
        del model, optimizer, scheduler, batches
        grid.accelerator.free_memory()  # drops accelerate's references to the prepared model and optimizer
