#!/usr/bin/env bash
# The GPU check, ONE script for a bare GPU machine without network (about 5.5 minutes on one H100):
#   1. installs what the image lacks from the wheels in .whl/ (git-ignored; carry it with the tree)
#      into /tmp/site, PYTHONPATH=/tmp/site:REPO, with the image's python3;
#   2. the training benchmark: python3 bench/bench_train.py --skip-cpu (its GPU grid), alone on the machine
#   3. the GPU tests:          python3 -m pytest -m gpu tests/e2e/test_gpu.py, beside
#   4. the demo on one GPU:    python3 bench/bench_demo.py --processes 1 --seeds 0 1 2 --jobs 3 (mapdet demo x 3)
#   5. ONE summary table (tests passed/failed, demo AP50/AP/val loss/seconds, images/s per variant).
# Raw outputs (logs, JSON lines, summaries) go to $OUT when it is set (the device tool returns it),
# else /tmp/gpu_check. Every stage has a timeout; a failed stage never stops the next one.
#
#   bash bench/gpu_check.sh                  # on the GPU machine
#   bash bench/gpu_check.sh --cpu-dry-run    # on a CPU machine: .venv/bin/python, GPU parts skip, no demo
# Flags: --cpu-dry-run, --skip-tests, --skip-demo, --skip-bench, --budget-s N (whole run, default 360)
# Time: the benchmark <= 120 s (its grid runs the most important variants first and stops starting new
# ones when its budget is spent), then the tests (<= 120 s) beside the 3 demos (the rest, about 200 s).
set -uo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"

dry=0 run_tests=1 run_demo=1 run_bench=1 budget=360
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu-dry-run) dry=1 ;;
    --skip-tests) run_tests=0 ;;
    --skip-demo) run_demo=0 ;;
    --skip-bench) run_bench=0 ;;
    --budget-s) budget="$2"; shift ;;
    *) echo "gpu_check: unknown flag $1 (see the header of $0)" >&2; exit 2 ;;
  esac
  shift
done

res="${OUT:-/tmp/gpu_check}"
mkdir -p "$res"
rm -f "$res"/{env.json,env.log,install.log,nvidia-smi.txt,gpu_tests.jsonl,bench.jsonl,summary.md,summary.json} \
      "$res"/{tests,tests_trained,demo,bench}.{log,rc} "$res"/demo_{summary.json,metrics.json,report.md}
t0=$(date +%s)
deadline=$((t0 + budget))
say() { echo "[gpu_check +$(($(date +%s) - t0))s] $*"; }
left() { echo $((deadline - $(date +%s))); }

# --- python: the image's python3 with CUDA, else (CPU machine) the project's .venv -------------------
py="$(command -v python3 || true)"
mode=gpu
if [ "$dry" = 1 ] || [ -z "$py" ] || ! "$py" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  mode=cpu
  if [ -x "$repo/.venv/bin/python" ]; then py="$repo/.venv/bin/python"; fi
  [ "$run_demo" = 1 ] && say "no CUDA (or --cpu-dry-run): the demo is skipped here (minutes on a CPU)"
  run_demo=0
fi
say "mode $mode, python $py"
export PYTHONUNBUFFERED=1 MPLCONFIGDIR=/tmp/gpu_check_mpl

# --- wheels the image lacks -> /tmp/site --------------------------------------------------------------
# module:wheel-glob; installed only when the module is missing (the image's own packages stay first).
# omegaconf 2.4 vendors its antlr4 runtime; .whl/ also holds antlr4-python3-runtime 4.9.3 for an
# omegaconf 2.3 (pip wheel --no-deps antlr4-python3-runtime==4.9.3), not installed by default.
pairs="webdataset:webdataset-*.whl braceexpand:braceexpand-*.whl kornia:kornia-[0-9]*.whl kornia_rs:kornia_rs-*.whl
pycocotools:pycocotools-*.whl faster_coco_eval:faster_coco_eval-*.whl omegaconf:omegaconf-*.whl
pytest:pytest-[0-9]*.whl pytest_timeout:pytest_timeout-*.whl pluggy:pluggy-*.whl
iniconfig:iniconfig-*.whl pygments:pygments-*.whl packaging:packaging-*.whl orjson:orjson-*.whl"
missing=$("$py" - $pairs <<'EOF'
import importlib.util, sys
print(" ".join(p.split(":", 1)[1] for p in sys.argv[1:] if importlib.util.find_spec(p.split(":", 1)[0]) is None))
EOF
)
if [ -n "$missing" ]; then
  wheels=()
  for glob in $missing; do
    found=(.whl/$glob)
    if [ -e "${found[0]}" ]; then wheels+=("${found[@]}"); else say "WARNING: no wheel .whl/$glob (missing from the carried folder)"; fi
  done
  rm -rf /tmp/site && mkdir -p /tmp/site
  say "installing ${#wheels[@]} wheels into /tmp/site"
  if "$py" -m pip --version >/dev/null 2>&1; then
    "$py" -m pip install --no-index --no-deps --target /tmp/site "${wheels[@]}" > "$res/install.log" 2>&1 || say "WARNING: pip install failed (see install.log)"
  else  # no pip in the image: a wheel is a zip of what goes into site-packages
    for w in "${wheels[@]}"; do "$py" -m zipfile -e "$w" /tmp/site >> "$res/install.log" 2>&1; done
  fi
  export PYTHONPATH="/tmp/site:$repo${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
fi

# --- environment ---------------------------------------------------------------------------------------
{
  "$py" - <<'EOF'
import json, os, pathlib, sys
info = {"python": sys.version.split()[0], "executable": sys.executable, "cpus": os.cpu_count()}
launcher = pathlib.Path(sys.executable).with_name("accelerate")  # what mapdet demo launches with
info["accelerate_launcher"] = str(launcher)
info["accelerate_launcher_exists"] = launcher.exists()
try:
    import torch, torchvision
    info.update(torch=torch.__version__, torchvision=torchvision.__version__, cuda=torch.version.cuda,
                gpus=torch.cuda.device_count(), gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else None)
    import accelerate, kornia, webdataset, pycocotools, faster_coco_eval, omegaconf, pytest
    info.update(accelerate=accelerate.__version__, kornia=kornia.__version__, omegaconf=omegaconf.__version__,
                faster_coco_eval=faster_coco_eval.__version__, pytest=pytest.__version__)
    import mapdet.commands.train, mapdet.commands.demo  # noqa: F401  every import the stages need
    info["imports"] = "ok"
except Exception as e:
    info["imports"] = f"FAILED: {type(e).__name__}: {e}"
if os.path.exists("/dev/shm"):
    s = os.statvfs("/dev/shm")
    info["dev_shm_gib"] = round(s.f_blocks * s.f_frsize / 2**30, 1)
print(json.dumps(info))
EOF
} > "$res/env.json" 2> "$res/env.log"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$res/nvidia-smi.txt" 2>&1 || true
say "environment: $(cat "$res/env.json")"
if ! grep -q '"imports": "ok"' "$res/env.json"; then  # every stage would fail: do not spend GPU time on them
  say "imports failed (see env.json / env.log; was .whl/ carried with the tree?): skipping every stage"
  run_tests=0 run_demo=0 run_bench=0
fi

# --- stages --------------------------------------------------------------------------------------------
stage() {  # name timeout_s command...: output to $res/name.log, exit code and seconds to $res/name.rc
  local name=$1 secs=$2; shift 2
  if [ "$secs" -lt 20 ]; then say "$name: skipped (the ${budget}s budget is spent)"; echo "skipped 0" > "$res/$name.rc"; return; fi
  say "$name (timeout ${secs}s): $*"
  local t=$(date +%s)
  timeout -k 10 "$secs" "$@" > "$res/$name.log" 2>&1
  local rc=$?
  echo "$rc $(($(date +%s) - t))" > "$res/$name.rc"
  say "$name: exit $rc after $(($(date +%s) - t))s; last lines:"
  tail -n 5 "$res/$name.log" | tr '\r' '\n' | tail -n 5 | cut -c1-240
}
min() { [ "$1" -lt "$2" ] && echo "$1" || echo "$2"; }

# Order: the throughput grid alone first (nothing else may load the GPU or the CPUs while it is timed),
# then the GPU tests beside the demo, 3 training seeds at once (bench/bench_demo.py --jobs 3: the small
# model leaves most of the card idle, so the seeds share it; their AP does not depend on that).
if [ "$run_bench" = 1 ]; then
  secs=$(min 120 $(($(left) - 230)))
  grid=$((secs - 40))  # shards + child start-up + the last variant that starts in time
  [ "$grid" -lt 20 ] && grid=20
  stage bench "$secs" bash -c "'$py' bench/bench_train.py --skip-cpu --gpu-budget-s $grid > '$res/bench.jsonl'"
fi

if [ "$run_tests" = 1 ]; then
  MAPDET_GPU_REPORT="$res/gpu_tests.jsonl" stage tests "$(min 120 "$(left)")" \
    "$py" -m pytest -m gpu -q -rs -p no:cacheprovider tests/e2e/test_gpu.py &
  tests_pid=$!
fi

if [ "$run_demo" = 1 ]; then
  rm -rf /tmp/demos
  stage demo "$(($(left) - 15))" bash -c "'$py' bench/bench_demo.py --processes 1 --seeds 0 1 2 --jobs 3 --out /tmp/demos > '$res/demo_seeds.jsonl'"
  for f in summary.json run/eval/final/metrics.json report/report.md; do
    [ -f "/tmp/demos/demo_p1_s0/$f" ] && cp "/tmp/demos/demo_p1_s0/$f" "$res/demo_$(basename "$f")"
  done
  cp /tmp/demos/*.log "$res/" 2>/dev/null
fi
[ -n "${tests_pid:-}" ] && wait "$tests_pid"

# --- the summary table (also summary.md and summary.json in $res) ----------------------------------------
"$py" bench/gpu_check_summary.py "$res" "$mode" "$(($(date +%s) - t0))" | tee "$res/summary.md"
