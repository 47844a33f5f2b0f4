#!/usr/bin/env bash
# One Slurm task per node (started by on_every_node in slurm/common.sh): accelerate's launcher for
# this node's processes, then ARGS (e.g. -m mapdet train ...).
# Rank and GPU variables are read HERE, inside the task: the batch shell only sees node 0's values.
# Reads TOPOLOGY, PORT, MAIN_ADDR, ACCELERATE, PROCS_PER_NODE (default: the GPUs Slurm gave this node).
set -euo pipefail
procs=${PROCS_PER_NODE:-${SLURM_GPUS_ON_NODE:-}}
if ! [[ $procs =~ ^[1-9][0-9]*$ ]]; then
  echo "node_launch: no GPUs on node $SLURM_NODEID (SLURM_GPUS_ON_NODE unset): request them with" \
       "--gpus-per-node, or set PROCS_PER_NODE (e.g. 2 with TOPOLOGY=launch/accelerate/cpu2.yaml)" >&2
  exit 2
fi
# Slurm delivers a step's signals to EVERY process of the task. The launcher (torch elastic agent)
# and data-loader workers would die of SIGUSR1, so they inherit "ignore"; mapdet's training
# processes install their own handler (mapdet/engine/preemption.py), checkpoint and exit.
trap '' USR1
exec "$ACCELERATE" launch --config_file "$TOPOLOGY" \
  --num_machines "$SLURM_NNODES" --num_processes $((SLURM_NNODES * procs)) --machine_rank "$SLURM_NODEID" \
  --main_process_ip "$MAIN_ADDR" --main_process_port "$PORT" "$@"
