"""One process of a multi-process benchmark setting (started by megatrain.bench.run under torchrun).

    python -m torch.distributed.run --nproc-per-node P -m megatrain.bench.worker SPEC.json RECORD.json

SPEC holds the config path, overrides, the setting and the timing options; rank 0 writes the
setting's record to RECORD. A user error ends as one `megatrain: error:` line and exit code 2.
"""

from __future__ import annotations

import json
import os
import sys

from megatrain.errors import MegatrainError


def worker_config(spec: dict):
    """The Config every process of the setting runs: the parent's config path and overrides (exactly the
    user's, in their order), the setting's, the scratch run directory."""
    from megatrain.bench.run import setting_config
    from megatrain.bench.settings import Setting

    return setting_config(
        spec["config"], spec["overrides"], Setting(**spec["setting"]), spec["run_dir"], spec["deepspeed"]
    )


def main(argv: list[str]) -> int:
    from megatrain.bench.measure import measure_setting
    from megatrain.distributed import close_process_group
    from megatrain.engine.deepspeed import init_distributed
    from megatrain.engine.trainer import resolve_config
    from megatrain.env import rank as env_rank
    from megatrain.env import world_size

    spec_path, out_path = argv
    with open(spec_path) as fh:
        spec = json.load(fh)
    try:
        cfg = worker_config(spec)
        resolve_config(cfg, world_size())
        env = init_distributed(cfg)
        record = measure_setting(cfg, env, **spec["options"])
        if env.is_main:
            with open(out_path + ".tmp", "w") as fh:
                json.dump(record, fh)
            os.replace(out_path + ".tmp", out_path)
    except MegatrainError as exc:
        rank = env_rank()
        print(
            "megatrain: error: " + str(exc) if rank == 0 else f"megatrain: error (rank {rank}): {exc}",
            file=sys.stderr,
            flush=True,
        )
        return 2
    finally:
        close_process_group()  # a gloo group left to the exit handlers can abort a rank after a clean run
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
