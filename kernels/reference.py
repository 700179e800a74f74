"""Plain PyTorch versions of every megatrain kernel.

These are the oracles the fused kernels are tested against, and the path used on CPU. Each op
upcasts to fp32 internally and returns the dtype of its (first) input, so a bf16 model gets bf16
activations with fp32-accurate reductions.

Shapes use B = batch, H = heads, N = sequence length, d = head dim, D = hidden size, T = tokens
(flattened B*N), V = vocabulary size.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = ["rms_norm", "rope", "swiglu", "fused_linear_cross_entropy"]


def rms_norm(x: Tensor, weight: Tensor, eps: float = 1e-6, residual: Optional[Tensor] = None):
    """Root-mean-square normalisation over the last dim.

    y = x / sqrt(mean(x^2, dim=-1) + eps) * weight

    Args:
        x: [..., D].
        weight: [D].
        eps: added to the mean square before the square root.
        residual: optional [..., D]. When given, h = x + residual is normalised and the call returns
            (y, h), the fused "add then norm" of a pre-norm residual stream. The sum is taken in fp32
            and normalised before rounding, which is what a fused kernel does too.

    Returns:
        y [..., D] in x.dtype, or (y, h) with both in x.dtype when residual is given.
    """
    if x.shape[-1] != weight.shape[-1]:
        raise ValueError(f"rms_norm: x has last dim {x.shape[-1]} but weight has {weight.shape[-1]}")
    h = x.float() if residual is None else x.float() + residual.float()
    inv_rms = torch.rsqrt(h.pow(2).mean(dim=-1, keepdim=True) + eps)
    y = (h * inv_rms * weight.float()).to(x.dtype)
    if residual is None:
        return y
    return y, h.to(x.dtype)


def _broadcast_table(table: Tensor, x: Tensor, name: str) -> Tensor:
    """cos/sin [N, d/2] or [B, N, d/2] -> fp32, broadcastable against [B, H, N, d/2]."""
    n, half = x.shape[-2], x.shape[-1] // 2
    if table.dim() not in (2, 3) or table.shape[-2:] != (n, half):
        raise ValueError(f"rope: {name} must be [N, d/2] or [B, N, d/2] = [..., {n}, {half}], got {tuple(table.shape)}")
    table = table.float()
    # A head axis is inserted so one table serves every head (and both the q and the k head counts).
    return table[None, None] if table.dim() == 2 else table[:, None]


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


def rope(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """Rotary position embedding on queries and keys.

    The head dim is split in halves (x1 = x[..., :d/2], x2 = x[..., d/2:]); pair i is (x1[i], x2[i])
    and is rotated by the angle theta_{n,i} whose cos/sin the tables hold:

        out1 = x1 * cos - x2 * sin
        out2 = x2 * cos + x1 * sin

    This is the Hugging Face Llama `rotate_half` layout, so trained q/k weights export unchanged.

    Args:
        q: [B, Hq, N, d] queries.
        k: [B, Hk, N, d] keys (Hk may be smaller than Hq: grouped-query attention).
        cos, sin: [N, d/2] (the same positions for every row) or [B, N, d/2] (per-row positions).

    Returns:
        (q_rot, k_rot) with the shapes and dtypes of q and k.
    """
    if q.shape[-1] % 2 or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"rope: q and k need the same even head dim, got {q.shape[-1]} and {k.shape[-1]}")
    if q.shape[-2] != k.shape[-2]:
        raise ValueError(f"rope: q has {q.shape[-2]} positions but k has {k.shape[-2]}")
    cos, sin = _broadcast_table(cos, q, "cos"), _broadcast_table(sin, q, "sin")
    return _rotate(q, cos, sin), _rotate(k, cos, sin)


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """SwiGLU gating: silu(gate) * up = gate * sigmoid(gate) * up, elementwise.

    Args:
        gate, up: [..., F], the same shape.

    Returns:
        [..., F] in gate.dtype.
    """
    if gate.shape != up.shape:
        raise ValueError(f"swiglu: gate {tuple(gate.shape)} and up {tuple(up.shape)} differ in shape")
    return (F.silu(gate.float()) * up.float()).to(gate.dtype)


def _check_targets(target: Tensor, ignore_index: int, vocab_total: int) -> None:
    """ValueError for a target outside [0, vocab_total) that is not ignore_index (syncs: fine here)."""
    bad = (target != ignore_index) & ((target < 0) | (target >= vocab_total))
    if bool(bad.any()):
        pos = int(bad.nonzero()[0, 0])
        raise ValueError(f"fused_linear_cross_entropy: argument 'target' has {int(target[pos])} at position "
                         f"{pos}, outside [0, {vocab_total}) and not ignore_index={ignore_index}")


def _linear_cross_entropy_chunks(h: Tensor, weight: Tensor, target: Tensor, ignore_index: int,
                                 chunk_size: int, grad_h: bool, grad_weight: bool, process_group=None):
    """Loss (and, when asked, its gradients) of mean CE(h @ weight.T, target), chunk by chunk.

    Only one [chunk_size, V] block of logits exists at a time. The gradient of the summed loss with
    respect to the logits is softmax(logits) - onehot(target) on counted rows and 0 on ignored rows;
    it is pushed through the matmul at once, so the backward pass needs no logits at all.

    With a vocab-parallel `process_group`, weight holds rows [rank * V_local, (rank + 1) * V_local):
    the row max (MAX), the sum of exponentials and the target logit (SUM, 0 on ranks that do not own
    the target) are all-reduced per chunk, and the partial gradient for h is all-reduced at the end.
    """
    num_tokens, vocab_local = h.shape[0], weight.shape[0]
    vocab_start = 0 if process_group is None else dist.get_rank(process_group) * vocab_local
    weight32 = weight.float()
    counted = target != ignore_index
    # Clamped so an all-ignored batch gives a loss (and gradients) of exactly 0 instead of 0/0.
    scale = 1.0 / counted.sum().clamp(min=1).float()
    loss_sum = torch.zeros((), dtype=torch.float32, device=h.device)
    dh = torch.empty(h.shape, dtype=torch.float32, device=h.device) if grad_h else None
    dw = torch.zeros(weight.shape, dtype=torch.float32, device=h.device) if grad_weight else None
    for start in range(0, num_tokens, chunk_size):
        stop = min(start + chunk_size, num_tokens)
        h_chunk = h[start:stop].float()
        keep = counted[start:stop]
        local_target = target[start:stop] - vocab_start
        # Rows whose target column lives here. Without a group that is every counted row (targets
        # are checked to be in range), so the non-parallel maths is unchanged.
        owned = keep & (local_target >= 0) & (local_target < vocab_local)
        # Ignored and not-owned rows may hold any id: point them at column 0 (masked out below).
        safe_target = torch.where(owned, local_target, torch.zeros_like(local_target))[:, None]
        logits = h_chunk @ weight32.T  # [C, V_local]
        target_logit = logits.gather(1, safe_target).squeeze(1) * owned
        if process_group is None:
            lse = torch.logsumexp(logits, dim=-1)
        else:
            row_max = logits.max(dim=-1).values
            dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=process_group)
            sum_exp = torch.exp(logits - row_max[:, None]).sum(dim=-1)
            dist.all_reduce(sum_exp, op=dist.ReduceOp.SUM, group=process_group)
            dist.all_reduce(target_logit, op=dist.ReduceOp.SUM, group=process_group)
            lse = row_max + torch.log(sum_exp)
        loss_sum = loss_sum + torch.where(keep, lse - target_logit, torch.zeros_like(lse)).sum()
        if dh is None and dw is None:
            continue
        grad_logits = logits.sub_(lse[:, None]).exp_()  # softmax, reusing the logits' memory
        grad_logits.scatter_add_(1, safe_target, -owned.float()[:, None])
        grad_logits.mul_(keep[:, None])
        if dh is not None:
            dh[start:stop] = grad_logits @ weight32
        if dw is not None:
            dw.addmm_(grad_logits.T, h_chunk)
    loss = loss_sum * scale
    if dh is not None:
        if process_group is not None:
            # Each rank pushed only its vocab columns through the matmul: the full gradient is the sum.
            dist.all_reduce(dh, op=dist.ReduceOp.SUM, group=process_group)
        dh = (dh * scale).to(h.dtype)
    if dw is not None:
        dw = (dw * scale).to(weight.dtype)
    return loss, dh, dw


class _LinearCrossEntropy(torch.autograd.Function):
    """Autograd wrapper: gradients are computed in forward (chunked), scaled in backward."""

    @staticmethod
    def forward(ctx, h, weight, target, ignore_index, chunk_size, process_group):
        loss, dh, dw = _linear_cross_entropy_chunks(
            h, weight, target, ignore_index, chunk_size,
            grad_h=ctx.needs_input_grad[0], grad_weight=ctx.needs_input_grad[1], process_group=process_group)
        ctx.save_for_backward(dh, dw)
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        dh, dw = ctx.saved_tensors
        grad_h = None if dh is None else dh * grad_loss.to(dh.dtype)
        grad_w = None if dw is None else dw * grad_loss.to(dw.dtype)
        return grad_h, grad_w, None, None, None, None


def fused_linear_cross_entropy(h: Tensor, weight: Tensor, target: Tensor, ignore_index: int = -100,
                               chunk_size: int = 4096, process_group=None) -> Tensor:
    """Mean cross-entropy of the logits h @ weight.T, without holding all [T, V] logits.

        loss = mean over {t : target[t] != ignore_index} of  logsumexp(z_t) - z_t[target[t]],
        z_t = h[t] @ weight.T

    Tokens are processed `chunk_size` rows at a time; the result is exact (no approximation), only
    the peak memory changes. When gradients are needed they are computed during the forward pass,
    chunk by chunk, so backward stores [T, D] + [V, D] instead of [T, V].

    Args:
        h: [T, D] hidden states (any float dtype).
        weight: [V, D] output projection.
        target: [T] class indices in [0, V), or ignore_index.
        ignore_index: targets with this value add no loss and are not counted in the mean.
        chunk_size: rows of logits materialised at once.
        process_group: vocab-parallel group, or None. With a group, weight is this rank's [V_local, D]
            shard (rows [rank * V_local, (rank + 1) * V_local) of the full head), target holds global
            ids and h is the same on every rank; the returned loss and gradient for h are complete
            (all-reduced), the gradient for weight is this shard's.

    Returns:
        0-dim fp32 loss. If every target is ignored the loss is 0 (still attached to the graph,
        with zero gradients) rather than NaN.
    """
    if h.dim() != 2 or weight.dim() != 2 or h.shape[1] != weight.shape[1]:
        raise ValueError(f"fused_linear_cross_entropy: need h [T, D] and weight [V, D], got "
                         f"{tuple(h.shape)} and {tuple(weight.shape)}")
    if target.shape != (h.shape[0],):
        raise ValueError(f"fused_linear_cross_entropy: target must be [T] = [{h.shape[0]}], got {tuple(target.shape)}")
    if chunk_size < 1:
        raise ValueError(f"fused_linear_cross_entropy: chunk_size must be >= 1, got {chunk_size}")
    world = 1
    if process_group is not None:
        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError("fused_linear_cross_entropy: argument 'process_group' was given but "
                             "torch.distributed is not initialised")
        world = dist.get_world_size(process_group)
    _check_targets(target, ignore_index, weight.shape[0] * world)
    if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(h, weight, target, ignore_index, chunk_size, process_group)
    # Evaluation: skip the gradient work entirely.
    return _linear_cross_entropy_chunks(h, weight, target, ignore_index, chunk_size, False, False,
                                        process_group)[0]
