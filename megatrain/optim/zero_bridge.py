"""GaLore / Fira next to DeepSpeed: the projected weights stay out of the optimizer DeepSpeed wraps.

DeepSpeed's ZeRO 1/2 optimizer (and its bf16 stage-0 wrapper) flattens every parameter it is
given into one buffer per group and hands the client optimizer 1-D partitions of it, so a
shape-aware step (an SVD of each weight's gradient) cannot run there; this is where the
reference GaLore code fails under ZeRO. megatrain therefore splits the optimizer in two
(`megatrain.optim.build_optimizer`):

- the client optimizer DeepSpeed sees (GaLoreAdamW / FiraAdamW without `rank`, i.e. the
  reference AdamW rule, elementwise) holds embeddings, norms, the head and everything else, and
  is partitioned by ZeRO as usual;
- `client.projected`, a GaLoreAdamW / FiraAdamW over the attention and MLP weights, keeps whole
  matrices on every data-parallel rank. Its state is already small (moments of r x n instead of
  m x n, plus the projection), so replicating it costs little.

`attach_projected(engine, client, mpu)` wires the second one into the engine's step:

- ZeRO 1/2: the projected weights' gradients (which DeepSpeed does not reduce) are averaged over
  the data-parallel group in fp32 buckets at the start of the ZeRO step; their squared norm
  (tensor-parallel shards summed over the TP group, replicated weights counted once) is added to
  the norm DeepSpeed computes, so the clip coefficient, the overflow check and
  `engine.get_global_grad_norm()` cover every parameter; after DeepSpeed's own step the same
  clip coefficient is applied and the projected optimizer steps (unless the step was skipped).
- stage 0 fp32: DeepSpeed already all-reduces and clips every module parameter; the projected
  optimizer steps right after the client.

Tensor parallelism needs nothing extra: each rank projects its local shard. The hooks into ZeRO's
step are DeepSpeed internals, confined to megatrain.optim.deepspeed_adapter (`extend_zero_step`).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatrain.errors import ConfigError
from megatrain.optim.deepspeed_adapter import extend_zero_step, is_zero_1_2_optimizer

__all__ = ["attach_projected", "PROJECTED_MODULES", "projection_targets"]

# The modules whose weights GaLore / Fira project (models/attention.py and models/transformer.py).
PROJECTED_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

_BUCKET_ELEMENTS = 1 << 25  # 128 MiB of fp32 per all-reduce


def projection_targets(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """(name, parameter) of every trainable 2-D weight of an attention or MLP projection."""
    out = []
    for name, p in model.named_parameters():
        if p.requires_grad and p.dim() == 2 and any(part in PROJECTED_MODULES for part in name.split(".")):
            out.append((name, p))
    return out


def _sync_lr(client, projected) -> None:
    # The trainer sets one learning rate for every group of the optimizer DeepSpeed wraps.
    lr = client.param_groups[0]["lr"]
    for group in projected.param_groups:
        group["lr"] = lr


class _ZeroBridge:
    """The projected half of the step under ZeRO 1/2, run around ZeRO's own step
    (megatrain.optim.deepspeed_adapter.extend_zero_step)."""

    def __init__(self, client, projected, dp_group, tp_group):
        self.client, self.projected = client, projected
        self.dp_group, self.tp_group = dp_group, tp_group
        self.params = [p for g in projected.param_groups for p in g["params"]]

    def before_step(self) -> torch.Tensor:
        """Average the projected weights' gradients over the DP group (fp32 buckets); returns their
        squared norm (TP shards summed over the TP group, replicated weights counted once)."""
        with_grad = [p for p in self.params if p.grad is not None]
        world = dist.get_world_size(group=self.dp_group) if dist.is_initialized() else 1
        if world > 1:
            bucket: list = []
            size = 0
            for i, p in enumerate(with_grad):
                bucket.append(p)
                size += p.numel()
                if size >= _BUCKET_ELEMENTS or i == len(with_grad) - 1:
                    flat = torch.cat([q.grad.reshape(-1).float() for q in bucket])
                    dist.all_reduce(flat, group=self.dp_group)
                    flat.div_(world)
                    offset = 0
                    for q in bucket:
                        q.grad.copy_(flat[offset : offset + q.numel()].view_as(q.grad))
                        offset += q.numel()
                    bucket, size = [], 0
        device = self.params[0].device if self.params else torch.device("cpu")
        split = torch.zeros((), dtype=torch.float32, device=device)
        replicated = torch.zeros((), dtype=torch.float32, device=device)
        for p in with_grad:
            sq = p.grad.float().pow(2).sum()
            if getattr(p, "tensor_model_parallel", False):
                split += sq
            else:
                replicated += sq
        if self.tp_group is not None and dist.get_world_size(group=self.tp_group) > 1:
            dist.all_reduce(split, group=self.tp_group)
        return split + replicated

    def after_step(self, applied: bool, norm, clip_grad: float) -> None:
        """Clip with ZeRO's coefficient and step the projected optimizer, unless the step was dropped."""
        if applied and not self.client.skip_next_step:
            if clip_grad > 0 and norm is not None:
                # DeepSpeed's formula (unscale_and_clip_grads), so both halves get the same factor.
                clip = torch.clamp((norm.float() + 1e-6) / clip_grad, min=1.0)
                for p in self.params:
                    if p.grad is not None:
                        p.grad.div_(clip.to(p.grad.device).to(p.grad.dtype))
            _sync_lr(self.client, self.projected)
            self.projected.step()
        for p in self.params:
            p.grad = None


def attach_projected(engine, client, mpu=None) -> None:
    """Make `engine.step()` also step `client.projected` (no-op when the client has none)."""
    projected = getattr(client, "projected", None)
    if projected is None:
        return
    ds_opt = engine.optimizer
    if ds_opt is client:
        # Stage 0 fp32: DeepSpeed all-reduced and clipped every module parameter before the client's
        # step; the projected optimizer steps right after it (not after a skipped step).
        def step_projected() -> None:
            _sync_lr(client, projected)
            projected.step()

        client.after_step = step_projected
        return
    if not is_zero_1_2_optimizer(ds_opt):
        raise ConfigError(
            f"optim.name=galore/fira cannot run under DeepSpeed's {type(ds_opt).__name__} "
            f"(allowed: parallel.zero_stage 1 or 2, or 0 with train.dtype=fp32)"
        )
    # The groups DeepSpeed's ZeRO partitions over: the mpu's data-parallel group, else the world.
    dp_group = mpu.get_data_parallel_group() if mpu is not None else None
    tp_group = mpu.get_model_parallel_group() if mpu is not None else None
    bridge = _ZeroBridge(client, projected, dp_group, tp_group)
    extend_zero_step(ds_opt, bridge.before_step, bridge.after_step)
