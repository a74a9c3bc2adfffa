#!/usr/bin/env bash
# Launch the trainer with torchrun, driven by environment variables; arguments are Hydra overrides.
#
#   single node, 8 GPUs:  NPROC_PER_NODE=8 launch/torchrun.sh model=1.3b data.path=/data/shards
#   node i of N:          NNODES=N NODE_RANK=i NPROC_PER_NODE=8 RDZV_ENDPOINT=host0:29500 launch/torchrun.sh model=7b ...
set -euo pipefail
NNODES=${NNODES:-1}
NPROC_PER_NODE=${NPROC_PER_NODE:-$( (command -v nvidia-smi >/dev/null && nvidia-smi -L | wc -l) || echo 1)}
RDZV_ENDPOINT=${RDZV_ENDPOINT:-localhost:29500}
RDZV_ID=${RDZV_ID:-slimpajama}
if [ "$NNODES" -gt 1 ]; then
  rdzv=(--nnodes "$NNODES" --rdzv-backend c10d --rdzv-endpoint "$RDZV_ENDPOINT" --rdzv-id "$RDZV_ID")
  [ -n "${NODE_RANK:-}" ] && rdzv+=(--node-rank "$NODE_RANK")
else
  rdzv=(--standalone)
fi
exec torchrun "${rdzv[@]}" --nproc-per-node "$NPROC_PER_NODE" -m slimpajama_train.train "$@"
