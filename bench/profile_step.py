"""Where one training step's time goes (issue 11): ``mapdet train``'s own step under torch.profiler.

Set-up as the GPU grid's variant ``--variant`` (``gpu_variants.py``) (default mapdet_b8: vistas_r50.yaml in bf16,
synthetic 1600x1200 images packed at 2048, TrainStream + Kornia in the step, channels-last and
cudnn.benchmark): ``--warmup`` untimed steps, ``--steps`` steps under torch.profiler, then
``--steps`` more with CUDA's sync debug mode. One JSON line each:

- ``profile_setup``: device, config, batch, image size, steps.
- ``phases``: per step, host milliseconds inside each range of ``mapdet.engine.step.PHASES``
  (``step/data`` = blocked on the loader + the copy to the device, ``step/augment``, ``step/forward``
  and ``step/backward`` = launching their kernels, ``step/sync`` = the step's one all-reduce and
  read-back, where the host waits for the GPU to finish what was launched, ``step/optimizer``), and
  the profiled step's wall time. The profiler adds its own overhead to every host range.
- ``gpu`` (CUDA only): kernels launched and kernel milliseconds per step, and the busy fraction =
  the union of kernel intervals over the profiled wall time. Near 1: the GPU is the limit (faster
  kernels: channels-last, compile, larger batch). Well below 1 with a long ``step/forward`` /
  ``step/backward`` and a short ``step/sync``: the host is the limit (Python and launch overhead,
  host syncs: fewer, larger ops). A long ``step/data``: the loader.
- ``syncs``: host syncs per step, by the source line that made them (``mapdet.host_syncs``;
  on the CPU the ops that would sync on CUDA, Kornia's CPU-side parameter reads included), and on
  CUDA the count of CUDA's own sync debug mode beside it. What is left: torchvision's RPN and RoI
  samplers, the RoI pooler's levels, NMS once per image, the step's one read-back.
- ``top_ops``: the 15 ops with the most self device time (CUDA) or self CPU time (no CUDA).

    python3 bench/profile_step.py                                   # one H100: about 40 s (bench/gpu_check.sh)
    .venv/bin/python bench/profile_step.py --on-cpu --config launch/configs/demo.yaml --size 256x192 \\
        --images 8 --warmup 1 --steps 2 --set model.min_size=128 model.max_size=160 data.workers=1
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from gpu_variants import GPU_VARIANTS, load_grid, prepared
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile
from train_pipelines import shards_in

from mapdet.cli import image_size
from mapdet.engine.step import PHASES
from mapdet.host_syncs import count_host_syncs

REPO = Path(__file__).resolve().parents[1]


def emit(key: str, value) -> None:
    print(json.dumps({key: value}), flush=True)


def run_steps(run, optim_cfg, steps: int) -> None:
    for _ in range(steps):
        run.step(run.parts, run.batches, optim_cfg)


def phase_ms(events, steps: int) -> dict[str, float]:
    """Host milliseconds per step inside each of the step's profiler ranges."""
    total: collections.Counter = collections.Counter()
    for e in events:
        if e.name in PHASES and e.device_type == DeviceType.CPU:
            total[e.name] += e.time_range.elapsed_us() / 1000
    return {name: round(total[name] / steps, 2) for name in PHASES}


def kernel_spans(events) -> list[tuple[int, int]]:
    """(start, end) in us of every GPU kernel, memcpy and memset, sorted; not the GPU mirrors of
    record_function ranges (the step's phases, the optimizer's, the DataLoader's), which span gaps."""
    return sorted(
        (e.time_range.start, e.time_range.end)
        for e in events
        if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False) and e.name not in PHASES
    )


def busy_ms(spans: list[tuple[int, int]]) -> tuple[float, float]:
    """(summed kernel milliseconds, milliseconds covered by at least one kernel)."""
    summed = sum(end - start for start, end in spans)
    covered, reach = 0, None
    for start, end in spans:
        if reach is None or start > reach:
            covered, reach = covered + end - start, end
        elif end > reach:
            covered, reach = covered + end - reach, end
    return summed / 1000, covered / 1000


def top_ops(prof, cuda: bool, n: int = 15) -> list[dict]:
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    ops = [a for a in prof.key_averages() if a.key not in PHASES]  # the ranges hold ops; they are none
    rows = sorted(ops, key=lambda a: getattr(a, key), reverse=True)[:n]
    return [{"op": a.key, "calls": a.count, "self_ms": round(getattr(a, key) / 1000, 2)} for a in rows]


def sync_sites(run, optim_cfg, steps: int, cuda: bool) -> dict:
    """Host syncs per step by source line (``mapdet.host_syncs``: on CUDA only ops on device
    tensors; on the CPU every op that would sync there) and, on CUDA, the total that CUDA's sync
    debug mode reports (it also sees copies such as ``.tolist()``)."""
    warned = 0
    if cuda:
        torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught, count_host_syncs(device_only=cuda) as syncs:
            warnings.simplefilter("always")
            run_steps(run, optim_cfg, steps)
        warned = sum("synchronizing" in str(w.message) for w in caught)
    finally:
        if cuda:
            torch.cuda.set_sync_debug_mode("default")
    out = {"per_step": round(syncs.total / steps, 1)}
    if cuda:
        out["cuda_debug_mode_per_step"] = round(warned / steps, 1)
    out["by_site"] = {site: round(n / steps, 1) for site, n in syncs.by_site().items()}
    return out


def _short(path: str) -> str:
    for marker in ("site-packages/", "dist-packages/", str(REPO) + "/"):
        if marker in path:
            return path.split(marker, 1)[1]
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(REPO / "launch/configs/vistas_r50.yaml"), help="bf16 always")
    ap.add_argument("--variant", default="mapdet_b8", help="a name from gpu_variants.GPU_VARIANTS")
    ap.add_argument("--images", type=int, default=24, help="synthetic images (the stream repeats them)")
    ap.add_argument("--size", type=image_size, default=(1600, 1200), help="synthetic image size WxH")
    ap.add_argument("--max-side", type=int, default=2048, help="packed with mapdet pack --max-side")
    ap.add_argument("--warmup", type=int, default=4, help="untimed steps (the first times cuDNN's algorithms)")
    ap.add_argument("--steps", type=int, default=6, help="profiled steps (and as many with the sync check)")
    ap.add_argument("--set", nargs="*", default=[], help="config overrides (key=value), after the config file")
    ap.add_argument("--on-cpu", action="store_true", help="run without CUDA: a check of the script")
    ap.add_argument("--data-dir", help="keep the synthetic shards here and reuse them (default: a temporary folder)")
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    if not cuda and not args.on_cpu:
        emit("profile", "skipped: torch.cuda.is_available() is False on this machine (--on-cpu to check the script)")
        return
    variant = {v["name"]: v for v in GPU_VARIANTS}.get(args.variant)
    if variant is None:
        sys.exit(
            f"profile_step: unknown --variant {args.variant}; choose from {', '.join(v['name'] for v in GPU_VARIANTS)}"
        )
    with tempfile.TemporaryDirectory() as tmp:
        workers = min(8, os.cpu_count() or 1)
        shards = shards_in(Path(args.data_dir or tmp), args.images, args.size, args.max_side, workers)
        grid = load_grid(args.config, str(shards), args.set)
        optim_cfg = grid.cfg.optim
        with prepared(variant, grid, args.warmup + 2 * args.steps) as run:
            emit(
                "profile_setup",
                {
                    "device": torch.cuda.get_device_name() if cuda else "cpu (code check only)",
                    "torch": torch.__version__,
                    "config": args.config,
                    "arch": grid.cfg.model.arch,
                    **run.settings,
                    "stored_image": list(args.size),
                    "warmup": args.warmup,
                    "steps": args.steps,
                },
            )
            run_steps(run, optim_cfg, args.warmup)
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            with profile(activities=activities) as prof:
                run_steps(run, optim_cfg, args.steps)
                if cuda:
                    torch.cuda.synchronize()
            wall_ms = (time.perf_counter() - start) * 1000 / args.steps
            events = prof.events()
            emit("phases", {"step_wall_ms": round(wall_ms, 1), **phase_ms(events, args.steps)})
            if cuda:
                spans = kernel_spans(events)
                summed, covered = busy_ms(spans)
                emit(
                    "gpu",
                    {
                        "kernels_per_step": round(len(spans) / args.steps),  # each one a launch by the host
                        "kernel_ms_per_step": round(summed / args.steps, 1),
                        "busy_ms_per_step": round(covered / args.steps, 1),
                        "busy_fraction": round(covered / args.steps / wall_ms, 3),
                    },
                )
            emit("syncs", sync_sites(run, optim_cfg, args.steps, cuda))
            emit("top_ops", top_ops(prof, cuda))


if __name__ == "__main__":
    main()
