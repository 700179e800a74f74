#!/usr/bin/env bash
# Multi-node pretraining with the deepspeed launcher (passwordless ssh to every host in the hostfile):
#   launch/deepspeed_hostfile.sh launch/hostfile launch/configs/1.3b.yaml train.steps=20000
# See launch/hostfile.example for the hostfile format ("host slots=GPUS" per line).
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 HOSTFILE CONFIG.yaml [key=value ...]" >&2
  exit 2
fi
HOSTFILE=$1; CONFIG=$2; shift 2
if [ ! -f "$HOSTFILE" ]; then
  echo "$0: hostfile '$HOSTFILE' does not exist (see launch/hostfile.example)" >&2
  exit 2
fi
HERE=$(cd "$(dirname "$0")" && pwd)
exec deepspeed --hostfile "$HOSTFILE" --master_port "${MASTER_PORT:-29500}" \
  "$HERE/pretrain.py" --config "$CONFIG" "$@"
