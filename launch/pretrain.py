"""Entry point that torchrun / the deepspeed launcher execute on every process.

    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
        launch/pretrain.py --config launch/configs/1.3b.yaml train.steps=20000
    deepspeed --hostfile launch/hostfile launch/pretrain.py --config launch/configs/1.3b.yaml

Thin on purpose: arguments -> config -> the pretraining recipe (megatrain.engine.trainer.pretrain).
"""

import sys

from megatrain.cli import entry

if __name__ == "__main__":
    entry(["pretrain", *sys.argv[1:]])
