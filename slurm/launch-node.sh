#!/bin/bash
# One node's share of slurm/train.sh (run by srun, one task per node): its machine rank is SLURM_NODEID.
set -euo pipefail
MULTI=()
[ "$TOTAL_PROCS" -gt 1 ] && MULTI=(--multi_gpu)
# without GPUs train.py asks Accelerate for the CPU (gloo); a --cpu launch would start one process only
# distseg.launch = accelerate launch, passing the ranks' exit status (75: requeue) and error line through
exec python -m distseg.launch "${MULTI[@]}" --num_machines "$NNODES" --machine_rank "$SLURM_NODEID" \
  --main_process_ip "$MASTER_ADDR" --main_process_port "$MASTER_PORT" --num_processes "$TOTAL_PROCS" \
  --mixed_precision "${MIXED_PRECISION:-no}" --dynamo_backend no --rdzv_backend static --same_network \
  distseg/train.py --config "$CONFIG" "$@"
