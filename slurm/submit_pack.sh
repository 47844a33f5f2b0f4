#!/usr/bin/env bash
# Submit the pack array and its dependent merge+verify job:
#   ROOT=/data/vistas OUT=/data/vistas-shards [SPLIT=training] bash slurm/submit_pack.sh N [SBATCH OPTION...]
#   COCO=/data/train.json IMAGES=/data/images OUT=/data/shards [SPLIT=training] bash slurm/submit_pack.sh N
# N array tasks each pack 1/N of the split; the merge job starts only if all of them succeed
# (afterok) and is cancelled if one fails. SBATCH OPTIONs (e.g. --partition=cpu) go to both jobs;
# the variables of pack.sbatch travel in the environment. Prints "ARRAY_JOB_ID MERGE_JOB_ID".
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
n=${1:?usage: ROOT=... OUT=... bash slurm/submit_pack.sh N [SBATCH OPTION...]}
shift
[[ $n =~ ^[1-9][0-9]*$ ]] || { echo "submit_pack: N must be a positive number of array tasks, got '$n'" >&2; exit 2; }
[[ (-n ${ROOT:-} || -n ${COCO:-}) && -n ${OUT:-} ]] || { echo "submit_pack: set ROOT (raw download) or COCO and IMAGES, and OUT (shard folder)" >&2; exit 2; }
[[ -z ${COCO:-} || -n ${IMAGES:-} ]] || { echo "submit_pack: COCO needs IMAGES (the folder its file_name entries are relative to)" >&2; exit 2; }
export ROOT="${ROOT:-}" COCO="${COCO:-}" IMAGES="${IMAGES:-}" OUT SPLIT="${SPLIT:-training}" MAPDET_REPO="${MAPDET_REPO:-$(dirname "$here")}"
array=$(sbatch --parsable --array="0-$((n - 1))" "$@" "$here/pack.sbatch")
array=${array%%;*}
merge=$(sbatch --parsable --dependency="afterok:$array" --kill-on-invalid-dep=yes "$@" "$here/merge.sbatch")
merge=${merge%%;*}
echo "submitted pack array $array ($n tasks) and merge+verify $merge (after all succeed)" >&2
echo "$array $merge"
