"""Run under torchrun (2 processes): the model built for ZeRO-3 (`build_model`, partitioned at
construction) gathers to exactly the one-process model from the same seed. With `--initial-state`
the model is built from given full weights (an imported run, train.init_from: those of another seed)
and must gather to exactly them. Exits non-zero otherwise."""

from __future__ import annotations

import sys

import deepspeed
import torch

from megatrain.config import load_config
from megatrain.engine.build import build_model
from megatrain.engine.deepspeed import init_distributed
from megatrain.models.transformer import Transformer
from megatrain.parallel.groups import build_groups


def main(overrides: list[str]) -> None:
    given = "--initial-state" in overrides
    cfg = load_config(None, [o for o in overrides if o != "--initial-state"])
    env = init_distributed(cfg)
    model_cfg = cfg.model.resolved()
    reference_model = Transformer(model_cfg, seed=cfg.train.seed + 1000 if given else cfg.train.seed)
    initial_state = {k: v.clone() for k, v in reference_model.state_dict().items()} if given else None
    model = build_model(cfg, model_cfg, build_groups(1), initial_state=initial_state)
    reference = dict(reference_model.named_parameters())
    local = sum(p.ds_tensor.numel() for p in model.parameters())
    total = sum(p.ds_numel for p in model.parameters())
    assert local < total, (local, total)  # really partitioned
    mismatched = []
    for name, param in model.named_parameters():
        with deepspeed.zero.GatheredParameters([param]):
            if not torch.equal(param.detach().cpu(), reference[name].detach().to(param.dtype)):
                mismatched.append(name)
    buffers = dict(reference_model.named_buffers())  # RoPE tables, SLTrain's support
    mismatched += [name for name, buf in model.named_buffers() if not torch.equal(buf.cpu(), buffers[name])]
    if mismatched:
        sys.exit(f"rank {env.rank}: ZeRO-3 build differs from the one-process model in {mismatched[:5]}")
    print(f"rank {env.rank}: {local} of {total} parameters held, all equal", flush=True)
    # A process leaving with gloo's threads still up can abort at exit ("terminate called ...").
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
