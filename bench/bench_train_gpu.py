"""Training throughput on one GPU: mapdet's step vs a torchvision-references-style loop, and every
speed lever measured side by side (issue 11).

``--config`` (vistas_r50.yaml: R50-FPN v2, min_size 1024, max_size 2048, its augment/optim and
data.workers) in bf16, on synthetic 1600x1200 images packed at --max-side 2048 (network input
1024x1365), every variant of ``GPU_VARIANTS`` in ONE child process from the same initial weights
(accelerate fixes the precision per process). The reference pipeline is
``train_pipelines.reference_batches``: decode + transforms.v2 augmentation in the workers, autocast
bf16, NCHW, no cudnn.benchmark, torch's default prefetch (2), as torchvision's references do.

Each variant: ``--warmup`` untimed steps (the first times cuDNN's algorithms, a compiled variant
compiles there), then ``--steps`` timed between two ``cuda.synchronize()``; images_per_s = images /
that wall time, data_wait = time blocked on the next batch / that wall time, max_mem_gib = peak
allocated. One JSON line per variant as it finishes (a run cut short keeps those), then a
``gpu_summary`` line with the ratios (mapdet vs reference at the same batch; each lever: with /
without). Where the time of one step goes: ``bench/profile_step.py``.

    python3 bench/bench_train_gpu.py                     # about 2.5 min on one H100 (bench/gpu_check.sh runs it)
    .venv/bin/python bench/bench_train_gpu.py --on-cpu --config launch/configs/demo.yaml --size 256x192 \\
        --images 8 --warmup 1 --steps 1 --variants mapdet_b8,reference_b8 \\
        --set model.min_size=128 model.max_size=160 data.workers=1     # a check of this script on a CPU
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from gpu_variants import GPU_VARIANTS, Grid, load_grid, prepared
from train_pipelines import shards_in

from mapdet.cli import image_size
from mapdet.shards.reader import decode_sample

REPO = Path(__file__).resolve().parents[1]


def gpu_comparison(args, data: Path) -> None:
    """The GPU grid: shards made (or found) under ``data``, every variant measured in ONE child process
    (all bf16: accelerate fixes the precision per process, and this process may hold an fp32 one)."""
    if not torch.cuda.is_available() and not args.on_cpu:
        print(json.dumps({"gpu": "skipped: torch.cuda.is_available() is False on this machine"}), flush=True)
        return
    t0 = time.perf_counter()
    shards = shards_in(data, args.images, args.size, args.max_side, workers=min(8, os.cpu_count() or 1))
    print(
        json.dumps(
            {
                "gpu_shards": {
                    "images": args.images,
                    "size": list(args.size),
                    "max_side": args.max_side,
                    "seconds": round(time.perf_counter() - t0, 1),
                }
            }
        ),
        flush=True,
    )
    cmd = [
        sys.executable,
        __file__,
        "--child",
        "--shards",
        str(shards),
        "--warmup",
        str(args.warmup),
        "--steps",
        str(args.steps),
        "--budget-s",
        str(args.budget_s),
        "--variants",
        args.variants,
        "--config",
        args.config,
    ]
    if args.set:
        cmd += ["--set", *args.set]
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=REPO) as child:  # stderr passes through
        for line in child.stdout:  # relayed as they come: a run cut short keeps the variants measured so far
            print(line.rstrip("\n"), flush=True)
    if child.returncode != 0:
        print(json.dumps({"gpu_error": f"the GPU child exited {child.returncode} (its stderr is above)"}), flush=True)


def gpu_phase(v: dict, grid: Grid, warmup: int, steps: int) -> dict:
    """One variant: ``warmup`` untimed then ``steps`` timed steps."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    with prepared(v, grid, warmup + steps) as run:
        wait = 0.0
        images = skipped = 0
        for i in range(warmup + steps):
            if i == warmup:
                _sync()
                t0 = time.perf_counter()
            res = run.step(run.parts, run.batches, grid.cfg.optim)
            if i >= warmup:
                wait, images, skipped = wait + res.data_wait_s, images + res.images, skipped + res.skipped
        _sync()
        wall = time.perf_counter() - t0
        return {
            **run.settings,
            "steps": steps,
            "images_per_s": round(images / wall, 2),
            "data_wait": round(wait / wall, 4),
            "step_s": round(wall / steps, 4),
            "max_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None,
            "skipped_steps": skipped,
            "loss_last": round(res.losses["loss"], 4),
        }


def gpu_grid(args) -> None:
    """The child: every selected variant of GPU_VARIANTS on the same shards, model and weights."""
    grid = load_grid(args.config, args.shards, args.set)
    cfg, model0 = grid.cfg, grid.model0
    h, w = decode_sample(grid.samples[0])[0].shape[-2:]
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
                    "config": args.config,
                    "arch": cfg.model.arch,
                    "precision": "bf16",
                    "stored_image": [w, h],
                    "network_input": [round(w * scale), round(h * scale)],
                    "min_size": model0.transform.min_size[0],
                    "max_size": model0.transform.max_size,
                    "workers": cfg.data.workers,
                    "warmup": args.warmup,
                    "steps": args.steps,
                    "budget_s": args.budget_s,
                }
            }
        ),
        flush=True,
    )
    wanted = [v for v in GPU_VARIANTS if args.variants == "all" or v["name"] in args.variants.split(",")]
    start, results = time.perf_counter(), {}
    for v in wanted:
        if time.perf_counter() - start > args.budget_s:
            print(
                json.dumps({"gpu_variant": {"name": v["name"], "skipped": f"time budget of {args.budget_s} s spent"}}),
                flush=True,
            )
            continue
        t = time.perf_counter()
        try:
            r = gpu_phase(v, grid, args.warmup, args.steps)
        except Exception as e:  # one failing variant (OOM, a worker crash) must not lose the others
            grid.accelerator.free_memory()
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
        "lever_workers12_b8": ratio("mapdet_b8_workers12", "mapdet_b8"),
        "lever_fewer_syncs_b8": ratio("mapdet_b8", "mapdet_b8_torchvision_detector"),
        "lever_compiled_backbone_b8": ratio("mapdet_b8_compiled", "mapdet_b8"),
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--config",
        default=str(REPO / "launch/configs/vistas_r50.yaml"),
        help="model/augment/optim/data.workers from here (bf16 always)",
    )
    ap.add_argument("--images", type=int, default=24, help="synthetic images (the stream repeats them)")
    ap.add_argument("--size", type=image_size, default=(1600, 1200), help="synthetic image size WxH")
    ap.add_argument("--max-side", type=int, default=2048, help="packed with mapdet pack --max-side")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps per variant (the first one times cuDNN)")
    ap.add_argument("--steps", type=int, default=15, help="timed steps per variant")
    ap.add_argument(
        "--budget-s",
        type=float,
        default=120,
        help="no variant starts after this many seconds of the grid (the rest are reported skipped)",
    )
    ap.add_argument("--variants", default="all", help="comma-separated names from GPU_VARIANTS, or all")
    ap.add_argument("--set", nargs="*", default=[], help="config overrides (key=value), after the config file")
    ap.add_argument(
        "--on-cpu", action="store_true", help="run without CUDA: a check of the script, figures meaningless"
    )
    ap.add_argument("--data-dir", help="keep the synthetic shards here and reuse them (default: a temporary folder)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--shards", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        gpu_grid(args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        gpu_comparison(args, Path(args.data_dir or tmp))


if __name__ == "__main__":
    main()
