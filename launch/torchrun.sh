#!/usr/bin/env bash
# Launch the trainer with torchrun, driven by environment variables; arguments are Hydra overrides.
#
#   one node, 8 GPUs:     NPROC_PER_NODE=8 launch/torchrun.sh model=1.3b data.path=/data/shards
#   node i of N (run on every node, same RDZV_ENDPOINT = a host:port on node 0):
#                         NNODES=N NODE_RANK=i NPROC_PER_NODE=8 RDZV_ENDPOINT=node0:29500 \
#                           launch/torchrun.sh model=7b data.path=/shared/shards run_dir=/shared/runs/7b
#
# NNODES (default 1), NPROC_PER_NODE (default: visible GPUs, else 1), RDZV_ENDPOINT (default
# localhost:29500), RDZV_ID (default slimpajama; one per job on a shared endpoint), NODE_RANK (optional
# with c10d: ranks are assigned at rendezvous), LOG_DIR (optional: one log file per rank under it),
# TORCHRUN (default torchrun).
set -euo pipefail
NNODES=${NNODES:-1}
NPROC_PER_NODE=${NPROC_PER_NODE:-$( (command -v nvidia-smi >/dev/null && nvidia-smi -L | wc -l) || echo 1)}
RDZV_ENDPOINT=${RDZV_ENDPOINT:-localhost:29500}
RDZV_ID=${RDZV_ID:-slimpajama}
if [ "$NNODES" -gt 1 ]; then
  launch=(--nnodes "$NNODES" --rdzv-backend c10d --rdzv-endpoint "$RDZV_ENDPOINT" --rdzv-id "$RDZV_ID")
  [ -n "${NODE_RANK:-}" ] && launch+=(--node-rank "$NODE_RANK")
else
  launch=(--standalone)
fi
[ -n "${LOG_DIR:-}" ] && launch+=(--log-dir "$LOG_DIR" --tee 3)
exec ${TORCHRUN:-torchrun} "${launch[@]}" --nproc-per-node "$NPROC_PER_NODE" -m slimpajama_train.train "$@"
