#!/usr/bin/env bash
# Multi-node pretraining with torchrun. Run the same command on every node:
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 launch/torchrun_multinode.sh launch/configs/1.3b.yaml train.steps=20000
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=node0 launch/torchrun_multinode.sh launch/configs/1.3b.yaml train.steps=20000
# NPROC_PER_NODE defaults to the number of GPUs on the node (1 on a CPU-only node).
# The rendezvous is c10d on MASTER_ADDR:MASTER_PORT; run.dir must be on a filesystem every node sees.
# Trying two "nodes" on one machine: give node 0 RDZV_CONF=is_host=true and node 1 RDZV_CONF=is_host=false,
# since both would otherwise match MASTER_ADDR and race to host the rendezvous store.
set -euo pipefail
if [ $# -lt 1 ]; then
  echo "usage: NNODES=N NODE_RANK=R MASTER_ADDR=HOST $0 CONFIG.yaml [key=value ...]" >&2
  exit 2
fi
CONFIG=$1; shift
NNODES=${NNODES:-1}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
if [ -z "${NPROC_PER_NODE:-}" ]; then
  NPROC_PER_NODE=$(nvidia-smi -L 2>/dev/null | wc -l)
  [ "$NPROC_PER_NODE" -gt 0 ] || NPROC_PER_NODE=1
fi
RDZV_ID=${RDZV_ID:-megatrain-$(basename "$CONFIG" .yaml)}
HERE=$(cd "$(dirname "$0")" && pwd)
exec torchrun --nnodes "$NNODES" --nproc-per-node "$NPROC_PER_NODE" \
  --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv-id "$RDZV_ID" \
  ${NODE_RANK:+--node-rank "$NODE_RANK"} ${RDZV_CONF:+--rdzv-conf "$RDZV_CONF"} \
  "$HERE/pretrain.py" --config "$CONFIG" "$@"
