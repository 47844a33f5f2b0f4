"""mapdet demo [--out DIR]: the whole system end to end on a synthetic Vistas, on a laptop CPU.

Synthesize a small Vistas-format dataset, pack and verify it, train with 2 processes through
`accelerate launch` (one per GPU on a GPU machine), evaluate with the distributed evaluator,
diagnose, and print where everything is with the final AP/AP50 and the top diagnosed cause.
Each stage is the same `mapdet` command a user would type, printed before it runs.

Run folder layout (DIR defaults to ./demo):
  DIR/raw/                 synthetic Vistas download (config_v2.0.json, training/, validation/)
  DIR/shards/              WebDataset shards, manifests, COCO ground truth
  DIR/run/                 training run: config.yaml, checkpoints/, tensorboard/, export/
  DIR/run/eval/step_N/     metrics.json, detections.json
  DIR/report/              report.md, diagnosis.json, figures
  DIR/summary.json         final AP/AP50, top cause, seconds per stage
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from mapdet.cli import number
from mapdet.config import load_config

REPO = Path(__file__).resolve().parents[2]  # mapdet/commands/demo.py -> the checkout
CONFIG = REPO / "launch" / "configs" / "demo.yaml"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="demo", help="run folder (default: ./demo; reused stages are redone)")
    p.add_argument("--train", type=number(int, 1), default=240, help="synthetic training images (default 240)")
    p.add_argument("--val", type=number(int, 1), default=60, help="synthetic validation images (default 60)")
    p.add_argument("--steps", type=number(int, 1), default=None, help="training steps (default: the demo config's)")
    p.add_argument(
        "--processes",
        type=number(int, 1),
        default=None,
        help="training processes (default: one per GPU, 2 on a CPU machine); the global batch stays 8",
    )
    p.add_argument(
        "--seed", type=number(int, 0), default=0, help="training seed, train.seed (the synthetic data stays the same)"
    )
    p.add_argument("--quick", action="store_true", help="a few images and steps: checks the plumbing, learns little")
    p.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="config overrides after the demo's own, for training, evaluation and diagnosis alike "
        "(e.g. model.nms_thresh=0.6; bench/bench_diagnose_planted.py plants causes with them)",
    )


def run(args: argparse.Namespace) -> int:
    if not CONFIG.exists():
        raise FileNotFoundError(f"{CONFIG} not found: run the demo from a clone of the mapdet repository")
    out = Path(args.out).resolve()
    raw, shards, run_dir, report = out / "raw", out / "shards", out / "run", out / "report"
    n_train, n_val = (24, 8) if args.quick else (args.train, args.val)
    procs, batch = topology(args.processes, torch.cuda.device_count(), load_config(CONFIG).data.global_batch)
    overrides = [
        f"data.shards={shards}",
        f"train.out={run_dir}",
        f"train.seed={args.seed}",
        f"data.global_batch={batch}",
    ]
    # Objects 1.5x the generator's default size: the demo has minutes to learn from scratch.
    synth_size = ["--object-scale", "1.5"] + (["--size", "256x192"] if args.quick else [])
    if args.quick:
        overrides += ["train.max_steps=6", "train.ckpt_every=3", "model.min_size=192", "model.max_size=256"]
    elif args.steps:
        overrides.append(f"train.max_steps={args.steps}")
    overrides += args.set
    mapdet = [sys.executable, "-m", "mapdet"]
    launch = [str(Path(sys.executable).with_name("accelerate")), "launch", *_topology(procs), "-m", "mapdet"]
    steps = load_config(CONFIG, overrides).train.max_steps
    expect = Expected(n_train + n_val, steps, procs, args.quick)
    timings: dict[str, float] = {}

    synth = [*mapdet, "synth", str(raw), "--train", str(n_train), "--val", str(n_val), "--seed", "0"]
    _stage(1, "synthesize", [*synth, "--overwrite", "--workers", "2", *synth_size], timings, expect)
    for split in ("training", "validation"):
        _stage(
            2,
            f"pack {split}",
            [*mapdet, "pack", str(raw), str(shards), "--split", split, "--samples-per-shard", "64", "--workers", "2"],
            timings,
            expect,
            fresh=[shards / f"{split}.manifest.json", shards / ".parts"],
        )
    _stage(3, "verify", [*mapdet, "verify", str(shards)], timings, expect)
    train = [*launch, "train", "--config", str(CONFIG), "--set", *overrides]
    _stage(4, "train", train, timings, expect, fresh=[run_dir])
    final = run_dir / "eval" / "final"
    evaluate = [*launch, "evaluate", "--config", str(CONFIG), "--checkpoint", "latest", "--out", str(final)]
    _stage(5, "evaluate", [*evaluate, "--set", *overrides], timings, expect)
    metrics = json.loads((final / "metrics.json").read_text())
    diagnose = [
        *mapdet,
        "diagnose",
        "--gt",
        str(shards / "validation.coco.json"),
        "--results",
        str(final / "detections.json"),
        "--train-manifest",
        str(shards / "training.manifest.json"),
        "--run",
        str(run_dir),
        "--checkpoint",
        "latest",
        "--config",
        str(CONFIG),
    ]
    _stage(6, "diagnose", [*diagnose, "--set", *overrides, "--out", str(report)], timings, expect)
    _summary(out, shards, run_dir, report, metrics, timings)
    return 0


def topology(requested: int | None, gpus: int, global_batch: int) -> tuple[int, int]:
    """(training processes, global batch): one process per GPU (one on a one-GPU machine), 2 on a
    CPU machine, unless ``requested``. The demo config's global batch is kept (every topology learns
    the same from it), or the nearest one that splits evenly over the processes (e.g. 9 on 3 GPUs)."""
    procs = requested or gpus or 2
    if procs < 1:
        raise ValueError(f"--processes must be at least 1, got {procs}")
    return procs, procs * max(1, round(global_batch / procs))


def _topology(procs: int) -> list[str]:
    if torch.cuda.is_available():
        return (
            ["--config_file", str(REPO / "launch/accelerate/gpu8.yaml"), "--num_processes", str(procs)]
            if procs > 1
            else ["--config_file", str(REPO / "launch/accelerate/gpu1.yaml")]
        )
    return ["--config_file", str(REPO / "launch/accelerate/cpu2.yaml"), "--num_processes", str(procs)]


@dataclass
class Expected:
    """Seconds each stage is expected to take, from the shipped demo measured on 2 idle CPU cores
    (bench/RESULTS.md, "Demo"), scaled by this run's images, steps and processes. A GPU or a loaded
    machine differs; the figure is there so that a long stage is not taken for a hung one."""

    images: int
    steps: int
    processes: int
    quick: bool

    def __call__(self, stage: str) -> str:
        if self.quick:
            return "a few seconds"
        if stage == "train":
            per_step = TRAIN_S_PER_STEP.get(self.processes, TRAIN_S_PER_STEP[1])
            seconds = TRAIN_START_S + per_step * self.steps
        else:
            seconds = STAGE_S[stage.split()[0]] * (self.images / DEMO_IMAGES if stage == "synthesize" else 1)
        if torch.cuda.is_available():
            return f"less than the {seconds:.0f} s it takes on 2 CPU cores"
        return f"about {seconds:.0f} s on 2 CPU cores"


# Measured for the shipped demo (launch/configs/demo.yaml, 240 + 60 images) on 2 idle CPU cores
# (bench/RESULTS.md, "The demo in five minutes": train 158-170 s on 2 processes, 224-242 s on 1).
DEMO_IMAGES = 300
STAGE_S = {"synthesize": 8.0, "pack": 2.5, "verify": 4.0, "evaluate": 9.0, "diagnose": 11.0}
TRAIN_START_S = 20.0  # launcher, imports, model build, and the validation passes
TRAIN_S_PER_STEP = {1: 0.47, 2: 0.32}  # by training processes (1 process uses 2 torch threads)


def _stage(n: int, name: str, cmd: list[str], timings: dict, expect: Expected, fresh: list[Path] = ()) -> None:
    """Run one stage as the command a user would type; stop the demo if it fails."""
    for path in fresh:  # a rerun of the demo starts each stage clean
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    shown = " ".join(shlex.quote(c) for c in cmd).replace(sys.executable, "python")
    print(f"\n[{n}/6] {name} ({expect(name)}): {shown}", flush=True)
    start = time.perf_counter()
    code = subprocess.call(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    timings[name] = time.perf_counter() - start
    if code != 0:
        raise SystemExit(f"mapdet demo: stage '{name}' failed with exit code {code} (command above)")
    print(f"[{n}/6] {name} done in {timings[name]:.0f} s", flush=True)


def _summary(out: Path, shards: Path, run_dir: Path, report: Path, metrics: dict, timings: dict) -> None:
    bbox = metrics["bbox"]
    diagnosis = json.loads((report / "diagnosis.json").read_text())
    causes = diagnosis.get("causes", [])
    top = causes[0] if causes else None
    total = sum(timings.values())
    figures = sorted(p.name for p in report.glob("*.png"))
    print("\n" + "=" * 72)
    print(f"mapdet demo finished in {total:.0f} s: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()))
    print(f"  shards       {shards}")
    print(f"  checkpoints  {run_dir / 'checkpoints'}")
    print(f"  weights      {run_dir / 'export' / 'model.safetensors'}")
    print(f"  metrics      {run_dir / 'eval' / 'final' / 'metrics.json'}")
    print(f"  report       {report / 'report.md'} (and diagnosis.json)")
    print(f"  figures      {len(figures)} beside it: {', '.join(figures) or 'none'}")
    print(
        f"  validation   AP {bbox['AP']:.3f}   AP50 {bbox['AP50']:.3f}   "
        f"val loss {metrics['val_loss'].get('loss', float('nan')):.3f}"
    )
    if top and top["impact"] > 0:
        print(f"  top cause    {top['cause']} (+{top['impact']:.1f} COCO AP if fixed alone): {top['advice']}")
        if top.get("set"):
            from mapdet.diagnosis.report import set_line

            print(f"  try          {set_line(top['set'])}")
    else:  # advice for a cause with no measured impact would only mislead
        print("  top cause    none measurable (every diagnosed impact is 0 AP points)")
    print(f"  TensorBoard  tensorboard --logdir {run_dir}")
    print("=" * 72)
    summary = {
        "AP": bbox["AP"],
        "AP50": bbox["AP50"],
        "val_loss": metrics["val_loss"].get("loss"),
        "top_cause": top,
        "stage_seconds": {k: round(v, 1) for k, v in timings.items()},
        "total_s": round(total, 1),
        "train_to_summary_s": round(sum(timings.get(k, 0) for k in ("train", "evaluate", "diagnose")), 1),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
