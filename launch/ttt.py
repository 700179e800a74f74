"""Entry point of the qTTT job (test-time context training; one process).

    python launch/ttt.py --config launch/configs/ttt-tiny-cpu.yaml ttt.steps=16

Thin on purpose: arguments -> config -> the qTTT recipe (megatrain.ttt.job.run_ttt).
"""

import sys

from megatrain.cli import entry

if __name__ == "__main__":
    entry(["ttt", *sys.argv[1:]])
