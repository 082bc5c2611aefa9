#!/bin/bash
# Submit a staged plan (configs/experiments/*.yaml) as dependent Slurm jobs: a shard job when the plan's
# shards are missing, one slurm/train.sh job per stage after the stage it starts from
# (--dependency=afterok, so a preempted and requeued stage keeps its dependents waiting), and a last job
# that prints and saves the comparison.
#
#   slurm/experiment.sh configs/experiments/seed.yaml [--set train.epochs=2] [--sbatch --gpus-per-node=8]
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${VENV:-}" ]; then source "$VENV/bin/activate"; elif [ -f .venv/bin/activate ]; then source .venv/bin/activate; fi
[ $# -ge 1 ] || { echo "usage: slurm/experiment.sh PLAN.yaml [distseg experiment options]" >&2; exit 2; }
exec distseg experiment "$@" --submit
