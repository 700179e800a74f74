"""Entry point of a scaling-law sweep (docs/scaling.md).

    python launch/sweep.py launch/configs/sweep-tiny-cpu.yaml            # run locally, then the report
    python launch/sweep.py launch/configs/sweep-tiny-cpu.yaml --emit slurm
    python launch/sweep.py --report runs/sweep-tiny-cpu                  # report of a sweep directory

Thin on purpose: arguments -> sweep file -> the runners and report of megatrain.scaling.
"""

import sys

from megatrain.cli import main

if __name__ == "__main__":
    sys.exit(main(["sweep", *sys.argv[1:]]))
