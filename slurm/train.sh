#!/bin/bash
# Multi-node training under Slurm: one `accelerate launch` per node (srun), rendezvous on the first node.
#
#   sbatch --nodes=4 --gpus-per-node=8 slurm/train.sh [section.key=value ...]
#
# Settings (environment, all optional):
#   CONFIG          training config                     (configs/cityscapes.yaml)
#   PROCS_PER_NODE  processes per node                  (GPUs on the node, or 1 without GPUs)
#   MASTER_PORT     rendezvous port                     (20000 + job id % 20000: one per job)
#   MIXED_PRECISION accelerate --mixed_precision        (no: the config's train.mixed_precision decides)
#   VENV            virtualenv to activate              (.venv if present)
# Preemption: Slurm sends SIGUSR1 to this shell before the time limit (--signal=B:USR1@300 below); it
# creates a stop file, every rank checkpoints at the next step, training exits 75 and the job requeues
# itself. The requeued run resumes from the newest complete checkpoint (train.resume=auto).
#SBATCH --job-name=distseg
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
set -uo pipefail

cd "${SLURM_SUBMIT_DIR:-.}"
if [ -n "${VENV:-}" ]; then source "$VENV/bin/activate"; elif [ -f .venv/bin/activate ]; then source .venv/bin/activate; fi
CONFIG=${CONFIG:-configs/cityscapes.yaml}
NNODES=${SLURM_JOB_NUM_NODES:-1}
FIRST=$(scontrol show hostnames "${SLURM_JOB_NODELIST:-localhost}" | head -n 1)
# the first node's address as Slurm knows it (NodeAddr), falling back to its name
MASTER_ADDR=${MASTER_ADDR:-$(scontrol show node "$FIRST" -o 2>/dev/null | sed -n 's/.*NodeAddr=\([^ ]*\).*/\1/p')}
MASTER_ADDR=${MASTER_ADDR:-$FIRST}
MASTER_PORT=${MASTER_PORT:-$((20000 + ${SLURM_JOB_ID:-0} % 20000))}
if [ -z "${PROCS_PER_NODE:-}" ]; then
  PROCS_PER_NODE=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
  [ "${PROCS_PER_NODE:-0}" -gt 0 ] || PROCS_PER_NODE=1
fi
export DISTSEG_STOP_FILE="${DISTSEG_STOP_FILE:-$PWD/.distseg-stop-${SLURM_JOB_ID:-local}}"
rm -f "$DISTSEG_STOP_FILE" "$DISTSEG_STOP_FILE.done"
export CONFIG NNODES MASTER_ADDR MASTER_PORT PROCS_PER_NODE
export TOTAL_PROCS=$((NNODES * PROCS_PER_NODE))
echo "distseg: job ${SLURM_JOB_ID:-} restart ${SLURM_RESTART_COUNT:-0}: $NNODES node(s) x $PROCS_PER_NODE process(es)," \
     "rendezvous $MASTER_ADDR:$MASTER_PORT, config $CONFIG"

trap 'echo "distseg: SIGUSR1 (time limit near): asking all ranks to checkpoint"; touch "$DISTSEG_STOP_FILE"' USR1
# one task per node with all of the node's CPUs (data workers); srun does not inherit sbatch's CPU count
srun --ntasks-per-node=1 --cpus-per-task="${SLURM_CPUS_ON_NODE:-1}" --kill-on-bad-exit=1 bash slurm/launch-node.sh "$@" &
SRUN_PID=$!
while :; do
  wait "$SRUN_PID"; rc=$?
  kill -0 "$SRUN_PID" 2>/dev/null || break   # wait returned early for the trap: keep waiting
done
# a completed stop checkpoint is marked by <stop file>.done, which the trainer writes (srun reports a
# step's status its own way; distseg.launch passes the ranks' 75 through, but the marker is what counts)
if [ -f "$DISTSEG_STOP_FILE.done" ]; then
  rm -f "$DISTSEG_STOP_FILE" "$DISTSEG_STOP_FILE.done"
  echo "distseg: checkpoint written; requeueing job $SLURM_JOB_ID"
  scontrol requeue "$SLURM_JOB_ID"
  exit 0
fi
rm -f "$DISTSEG_STOP_FILE"
echo "distseg: training finished with exit status $rc"
exit "$rc"
