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
# with c10d: ranks are assigned at rendezvous), LOG_DIR (optional: one log file per rank under it,
# attempt_<N>/ per restart), MAX_RESTARTS (default 0: torchrun's --max-restarts), TORCHRUN (default torchrun).
#
# MAX_RESTARTS=N: when a rank dies (crash, kill -9, OOM kill), torchrun stops the others and starts the
# whole worker group again, in place, up to N times; the new ranks resume from run_dir's latest
# checkpoint (checkpoint.resume=auto), so only the steps since it are redone. torchrun cannot tell a
# crash from a rank that stopped to be requeued (exit 75 after SIGTERM/SIGUSR1, saved): that one is
# restarted too, and trains on until it is signalled again or finishes. On several nodes, give every
# node the same MAX_RESTARTS: each torchrun counts the failures of its own ranks, and one that has none
# left ends its node, which then fails the others.
set -euo pipefail
NNODES=${NNODES:-1}
NPROC_PER_NODE=${NPROC_PER_NODE:-$( (command -v nvidia-smi >/dev/null && nvidia-smi -L | wc -l) || echo 1)}
RDZV_ENDPOINT=${RDZV_ENDPOINT:-localhost:29500}
RDZV_ID=${RDZV_ID:-slimpajama}
MAX_RESTARTS=${MAX_RESTARTS:-0}
# torchrun (torch >= 2.5) hands its ranks the rendezvous' TCPStore, which outlives a restart with the
# keys of the previous attempt's process group in it: restarted ranks can read a dead rank's address
# and hang in init_process_group or fail to connect (pytorch/pytorch#135712, #167288). Off, rank 0 of
# every attempt hosts a fresh store on a new port.
if [ "$MAX_RESTARTS" -gt 0 ]; then
  export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}
fi
if [ "$NNODES" -gt 1 ]; then
  launch=(--nnodes "$NNODES" --rdzv-backend c10d --rdzv-endpoint "$RDZV_ENDPOINT" --rdzv-id "$RDZV_ID")
  [ -n "${NODE_RANK:-}" ] && launch+=(--node-rank "$NODE_RANK")
else
  launch=(--standalone)
fi
[ -n "${LOG_DIR:-}" ] && launch+=(--log-dir "$LOG_DIR" --tee 3)
exec ${TORCHRUN:-torchrun} "${launch[@]}" --nproc-per-node "$NPROC_PER_NODE" --max-restarts "$MAX_RESTARTS" \
  -m slimpajama_train.train "$@"
