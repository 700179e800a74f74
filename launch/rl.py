"""Entry point that torchrun / the deepspeed launcher execute on every process for the RL job.

    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
        launch/rl.py --config launch/configs/rl-tiny-cpu.yaml rl.init=runs/1.3b
    deepspeed --hostfile launch/hostfile launch/rl.py --config launch/configs/rl-tiny-cpu.yaml

Thin on purpose: arguments -> config -> the RL recipe (megatrain.rl.job.rl).
"""

import sys

from megatrain.cli import entry

if __name__ == "__main__":
    entry(["rl", *sys.argv[1:]])
