# Sourced by every slurm/*.sbatch file: the Python environment and the per-node launch.
# Reads (all optional):
#   MAPDET_ENV   a virtual environment with mapdet installed; its bin/ goes first on PATH
#   PYTHON       interpreter that runs `-m mapdet` for single-process steps (default: python)
#   ACCELERATE   accelerate's command-line tool (default: accelerate)
# Batch scripts run from Slurm's spool folder, so they find this file (and node_launch.sh) through
# MAPDET_REPO, which defaults to the folder sbatch was run from.

if [[ -n ${MAPDET_ENV:-} ]]; then
  [[ -x $MAPDET_ENV/bin/python ]] || { echo "MAPDET_ENV=$MAPDET_ENV has no bin/python" >&2; exit 2; }
  export PATH="$MAPDET_ENV/bin:$PATH"
fi
export PYTHON=${PYTHON:-python}
export ACCELERATE=${ACCELERATE:-accelerate}

log() { echo "[$(date '+%F %T')] job ${SLURM_JOB_ID:-?}: $*"; }

# The mapdet arguments that select an experiment, into the array EXPERIMENT:
# --config CONFIG (if set) --set WORD... (SETS split on spaces, then train.out=RUN_DIR if RUN_DIR is set).
experiment_args() {
  local -a sets=()
  read -r -a sets <<<"${SETS:-}"
  if [[ -n ${RUN_DIR:-} ]]; then sets+=("train.out=$RUN_DIR"); fi
  EXPERIMENT=()
  if [[ -n ${CONFIG:-} ]]; then EXPERIMENT+=(--config "$CONFIG"); fi
  EXPERIMENT+=(--set "${sets[@]}")
}

# The run folder (train.out) that CONFIG and SETS select, as mapdet itself resolves it.
run_folder() {
  "$PYTHON" - "${EXPERIMENT[@]}" <<'EOF'
import argparse, sys
from mapdet.config import load_config
p = argparse.ArgumentParser()
p.add_argument("--config")
p.add_argument("--set", nargs="*", default=[])
a = p.parse_args()
print(load_config(a.config, a.set).train.out)
EOF
}

# Exported for node_launch.sh: rank 0's address, the same on every node. It is the job's first node
# as Slurm reaches it (its NodeAddr, which is the host name unless slurm.conf says otherwise; a
# node name need not resolve). Set MAIN_ADDR yourself to pick another network (e.g. InfiniBand).
launch_settings() {
  local first
  first=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
  if [[ -z ${MAIN_ADDR:-} ]]; then
    MAIN_ADDR=$(scontrol show node -o "$first" | grep -o 'NodeAddr=[^ ]*' | cut -d= -f2 || true)
    MAIN_ADDR=${MAIN_ADDR:-$first}
  fi
  export TOPOLOGY PORT MAIN_ADDR PROCS_PER_NODE
}

# One task per node, each running node_launch.sh ARGS (accelerate launch ... ARGS). Meant to be
# started in the background: `exec` makes $! the pid of srun itself, which forwards the signals
# it gets (USR1 included) to every process of the step on every node.
on_every_node() {
  exec srun --nodes="$SLURM_NNODES" --ntasks="$SLURM_NNODES" --ntasks-per-node=1 \
    ${SLURM_CPUS_PER_TASK:+--cpus-per-task="$SLURM_CPUS_PER_TASK"} --kill-on-bad-exit=0 \
    bash "$MAPDET_REPO/slurm/node_launch.sh" "$@"
}
