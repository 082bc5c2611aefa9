#!/bin/bash
# Shard splits in parallel as a job array: one array task per split.
#
#   sbatch --array=0-1 --cpus-per-task=16 slurm/shard.sh        # train and val
#
# Settings (environment): SPLITS ("train val test"), CITYSCAPES_DATASET (the root), SHARD_OUT (shards),
# SHARD_ARGS (extra `distseg shard` options, e.g. "--scheme labelid --resize 1024x512"), VENV.
# A task that is interrupted resumes its split when rerun (finished shards are kept).
#SBATCH --job-name=distseg-shard
#SBATCH --array=0-1
#SBATCH --ntasks=1
#SBATCH --output=slurm-%x-%A_%a.out
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-.}"
if [ -n "${VENV:-}" ]; then source "$VENV/bin/activate"; elif [ -f .venv/bin/activate ]; then source .venv/bin/activate; fi
read -r -a SPLIT_LIST <<< "${SPLITS:-train val test}"
IDX=${SLURM_ARRAY_TASK_ID:-0}
if [ "$IDX" -ge "${#SPLIT_LIST[@]}" ]; then
  echo "error: array index $IDX has no split (SPLITS=${SPLIT_LIST[*]})" >&2
  exit 2
fi
SPLIT=${SPLIT_LIST[$IDX]}
: "${CITYSCAPES_DATASET:?set CITYSCAPES_DATASET to the Cityscapes root}"
echo "distseg: sharding $SPLIT with ${SLURM_CPUS_PER_TASK:-1} workers"
# shellcheck disable=SC2086
exec distseg shard --split "$SPLIT" --root "$CITYSCAPES_DATASET" --out "${SHARD_OUT:-shards}" \
  --workers "${SLURM_CPUS_PER_TASK:-1}" ${SHARD_ARGS:-}
