"""The one summary table of bench/gpu_check.sh, from the files its stages wrote into RES.

    python bench/gpu_check_summary.py RES MODE TOTAL_SECONDS     # prints the table; writes RES/summary.json

Reads RES/env.json, {tests,tests_trained,demo,bench,profile}.rc ("exit-code seconds"), tests*.log
(pytest's closing line and FAILED lines), gpu_tests.jsonl (figures the GPU tests measured),
demo_summary.json (mapdet demo's summary.json), demo_seeds.jsonl (bench/bench_demo.py), bench.jsonl
(bench/bench_train_gpu.py) and profile.jsonl (bench/profile_step.py). Anything missing is shown as
not run.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path


def main(res: Path, mode: str, total: str) -> None:
    def read(name: str) -> str:
        p = res / name
        return p.read_text(errors="replace") if p.exists() else ""

    def rc(name: str) -> tuple[str, str]:
        parts = read(f"{name}.rc").split()
        return (parts[0], parts[1]) if parts else ("not run", "-")

    env = json.loads(read("env.json") or "{}")
    rows = [
        (
            "machine",
            f"{env.get('gpu') or 'no GPU'}; {mode} mode; python {env.get('python')}; torch {env.get('torch')}; "
            f"imports {env.get('imports')}; accelerate beside python: {env.get('accelerate_launcher_exists')}",
        )
    ]

    failed = []
    for name, label in (("tests", "gpu tests"), ("tests_trained", "gpu test, trained demo model")):
        code, secs = rc(name)
        if code == "not run":
            if name == "tests":
                rows.append((label, "not run"))
            continue
        text = read(f"{name}.log").strip()
        counts = re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", text.splitlines()[-1] if text else "")
        rows.append((label, (", ".join(f"{n} {w}" for n, w in counts) or "no result") + f" (exit {code}, {secs} s)"))
        failed += re.findall(r"^(?:FAILED|ERROR) (\S+)", text, re.M)
    if failed:
        rows.append(("gpu tests failed", ", ".join(failed)))
    for line in read("gpu_tests.jsonl").splitlines():
        r = json.loads(line)
        name = r.pop("test")
        rows.append(
            (f"  {name}", ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in r.items()))
        )

    code, secs = rc("demo")
    demo = json.loads(read("demo_summary.json") or "{}")
    if demo:
        rows.append(
            (
                "demo",
                f"AP50 {demo['AP50']:.3f}  AP {demo['AP']:.3f}  val loss {demo['val_loss']:.3f}  "
                f"train->summary {demo.get('train_to_summary_s')} s  whole demo {secs} s (exit {code})",
            )
        )
        rows.append(("  demo stages (s)", json.dumps(demo.get("stage_seconds"))))
    else:
        rows.append(("demo", "not run" if code == "not run" else f"no summary.json (exit {code}, {secs} s)"))

    for line in read("demo_seeds.jsonl").splitlines():  # bench_demo.py: one line per seed, then the verdict
        r = json.loads(line)
        if "demo_run" in r:
            d = r["demo_run"]
            rows.append(
                (
                    f"  demo seed {d['seed']}",
                    f"AP50 {d.get('AP50')}  AP {d.get('AP')}  train->summary "
                    f"{d.get('train_to_summary_s')} s (exit {d['exit_code']}, {r['jobs']} at once)",
                )
            )
        elif "demo" in r:
            rows.append(
                (
                    "demo seeds",
                    f"min AP50 {r['demo']['min_AP50']} over seeds {r['demo']['seeds']}: "
                    f"goal {r['demo']['goal']} {'met' if r['demo']['met'] else 'NOT met'}",
                )
            )

    code, secs = rc("bench")
    rows.append(("benchmark", f"exit {code}, {secs} s"))
    lines = []
    for line in read("bench.jsonl").splitlines():
        try:
            lines.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    rates = {
        r["gpu_variant"]["name"]: r["gpu_variant"]["images_per_s"]
        for r in lines
        if "images_per_s" in r.get("gpu_variant", {})
    }
    summary = None
    for r in lines:
        if "gpu" in r:
            rows.append(("  gpu", r["gpu"]))
        elif "gpu_setup" in r:
            s = r["gpu_setup"]
            rows.append(
                (
                    "  setup",
                    f"{s['device']}, {s['arch']} bf16, stored {s['stored_image']}, network input "
                    f"{s['network_input']}, workers {s['workers']}, {s['warmup']}+{s['steps']} steps, "
                    f"/dev/shm {s['dev_shm_gib']} GiB",
                )
            )
        elif "gpu_variant" in r:
            v = r["gpu_variant"]
            if "images_per_s" in v:
                ref = rates.get(f"reference_b{v['batch_size']}") if v["pipeline"] == "mapdet" else None
                vs = f"  {v['images_per_s'] / ref:.2f}x reference_b{v['batch_size']}" if ref else ""
                rows.append(
                    (
                        f"  {v['name']}",
                        f"{v['images_per_s']:.1f} img/s  wait {100 * v['data_wait']:.1f} %  "
                        f"{v['max_mem_gib']} GiB  {v['step_s'] * 1000:.0f} ms/step{vs}"
                        + (
                            f"  ({v['skipped_steps']} steps skipped: non-finite loss)" if v.get("skipped_steps") else ""
                        ),
                    )
                )
            else:
                rows.append((f"  {v['name']}", v.get("error") or v.get("skipped")))
        elif "gpu_summary" in r:
            summary = r["gpu_summary"]
        elif "gpu_error" in r:
            rows.append(("  error", r["gpu_error"]))
    if summary:
        rows.append(
            (
                "  ratios",
                ", ".join(
                    f"{k} {v}"
                    for k, v in summary.items()
                    if k.startswith(("mapdet_vs", "mapdet_b4_vs", "lever", "batch")) and v is not None
                ),
            )
        )
        rows.append(("  goal met (b8)", f"{summary['met_b8']}: {summary['goal']}"))
    rows += profile_rows(read("profile.jsonl"), rc("profile"))
    rows.append(("total", f"{total} s"))

    width = max(len(k) for k, _ in rows)
    print("\n| what | result |\n| --- | --- |")
    for k, v in rows:
        print(f"| {k.ljust(width)} | {v} |")
    (res / "summary.json").write_text(
        json.dumps({"rows": rows, "bench_summary": summary, "demo": demo, "env": env}, indent=1)
    )


def profile_rows(text: str, code: tuple[str, str]) -> list[tuple[str, str]]:
    """bench/profile_step.py's lines: host ms per phase, GPU busy fraction, top sync sites and kernels."""
    rows = [("profile", f"exit {code[0]}, {code[1]} s")]
    for line in text.splitlines():
        try:
            (key, value), *_ = json.loads(line).items()
        except (json.JSONDecodeError, ValueError, AttributeError):
            continue
        if key == "phases":
            rows.append(("  host ms per step", ", ".join(f"{k} {v}" for k, v in value.items())))
        elif key == "gpu":
            rows.append(("  gpu", ", ".join(f"{k} {v}" for k, v in value.items())))
        elif key == "syncs":
            top = ", ".join(f"{site} {n}" for site, n in list(value["by_site"].items())[:6])
            debug = value.get("cuda_debug_mode_per_step")
            rows.append(("  host syncs per step", f"{value['per_step']} (CUDA debug mode: {debug}); top: {top}"))
        elif key == "top_ops":
            rows.append(("  top ops (self ms)", ", ".join(f"{o['op']} {o['self_ms']}" for o in value[:6])))
        elif key == "profile":
            rows.append(("  profile", value))
    return rows


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], sys.argv[3])
