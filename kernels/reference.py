"""Plain PyTorch versions of every megatrain kernel.

These are the oracles the fused kernels are tested against, and the path used on CPU. Each op
upcasts to fp32 internally and returns the dtype of its (first) input, so a bf16 model gets bf16
activations with fp32-accurate reductions (rms_norm with a residual and swiglu return the promoted
dtype of their two activation inputs, as an add would). Under torch.autocast the dispatcher applies
each op's rule (kernels/autocast.py) first and calls these with autocast disabled.

Shapes use B = batch, H = heads, N = sequence length, d = head dim, D = hidden size, T = tokens
(flattened B*N), V = vocabulary size.
"""

from __future__ import annotations

import weakref
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from megatrain.constants import IGNORE_INDEX

__all__ = [
    "rms_norm",
    "rope",
    "swiglu",
    "fused_linear_cross_entropy",
    "lowrank_linear",
    "sparse_lowrank_linear",
    "LOWRANK_ACTIVATIONS",
    "iha_attention",
    "iha_allowed",
    "iha_check_inputs",
    "IHA_MASKS",
    "projected_adam_update",
]


def _f32(t: Tensor) -> Tensor:
    """t in fp32, without a dispatch when it already is (the torch path runs these per layer and step)."""
    return t if t.dtype == torch.float32 else t.float()


def _as(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def _promoted(a: torch.dtype, b: torch.dtype) -> torch.dtype:
    return a if a == b else torch.promote_types(a, b)


def rms_norm(x: Tensor, weight: Tensor, eps: float = 1e-6, residual: Optional[Tensor] = None):
    """Root-mean-square normalisation over the last dim.

    y = x / sqrt(mean(x^2, dim=-1) + eps) * weight

    Args:
        x: [..., D].
        weight: [D].
        eps: added to the mean square before the square root.
        residual: optional [..., D]. When given, h = x + residual is normalised and the call returns
            (y, h), the fused "add then norm" of a pre-norm residual stream. The sum is taken in fp32
            and normalised before rounding, which is what a fused kernel does too. Its dtype may
            differ from x's (a bf16 branch output added to an fp32 stream under autocast).

    Returns:
        y [..., D] in x.dtype, or (y, h) with both in the promoted dtype of x and residual (as
        x + residual would be) when residual is given. The weight's dtype never changes it.
    """
    if x.shape[-1] != weight.shape[-1]:
        raise ValueError(f"rms_norm: x has last dim {x.shape[-1]} but weight has {weight.shape[-1]}")
    h = _f32(x) if residual is None else _f32(x) + _f32(residual)
    out_dtype = x.dtype if residual is None else _promoted(x.dtype, residual.dtype)
    inv_rms = torch.rsqrt(h.pow(2).mean(dim=-1, keepdim=True) + eps)
    y = _as(h * inv_rms * _f32(weight), out_dtype)
    if residual is None:
        return y
    return y, _as(h, out_dtype)


def _widened_table(table: Tensor, x: Tensor, name: str) -> Tensor:
    """cos/sin [N, d/2] or [B, N, d/2] -> [c, c] in fp32 over the full head dim, broadcastable against
    [B, H, N, d]: [N, d] as it is, [B, 1, N, d] for per-row tables (one cat, at most one view)."""
    n, half = x.shape[-2], x.shape[-1] // 2
    if table.dim() not in (2, 3) or table.shape[-2:] != (n, half):
        raise ValueError(f"rope: {name} must be [N, d/2] or [B, N, d/2] = [..., {n}, {half}], got {tuple(table.shape)}")
    table = _f32(table)
    wide = torch.cat((table, table), dim=-1)
    # A per-row table gets a head axis, so one table serves every head (and both the q and the k head counts).
    return wide if wide.dim() == 2 else wide[:, None]


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x * [cos, cos] + [-x2, x1] * [sin, sin] with cos, sin already widened to the full head dim: the
    same values as (x1 cos - x2 sin, x2 cos + x1 sin) (a - b is a + (-b) exactly), in fewer ops."""
    x = _f32(x)
    half = x.shape[-1] // 2
    turned = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + turned * sin


class _Rotate(torch.autograd.Function):
    """`_rotate` (math in fp32, result in x's dtype) that keeps x's memory layout and saves no
    activation: the forward writes both halves of one new tensor in place, the backward rotates the
    gradient back (the angle negated). cos, sin [N, d/2] are expanded once to x's layout (without
    the batch), which lets the elementwise loops run over long rows on a CPU."""

    @staticmethod
    def forward(ctx, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        half = x.shape[-1] // 2
        like = torch.empty_like(x[:1], dtype=torch.float32)[..., :half]  # [1, H, N, d/2] in x's layout
        cos, sin = like.copy_(cos.expand(like.shape)), torch.empty_like(like).copy_(sin.expand(like.shape))
        ctx.save_for_backward(cos, sin)
        return _rotate_into_new(x, cos, sin, 1.0)

    @staticmethod
    def backward(ctx, grad: Tensor):
        cos, sin = ctx.saved_tensors
        return _rotate_into_new(grad, cos, sin, -1.0), None, None


def _rotate_into_new(x: Tensor, cos: Tensor, sin: Tensor, sign: float) -> Tensor:
    """(x1 cos - sign x2 sin, x2 cos + sign x1 sin) in fp32 -> x.dtype; cos, sin broadcast against x's halves."""
    dtype, x = x.dtype, x.float()
    half = x.shape[-1] // 2
    if torch.compiler.is_compiling():  # no out= into strided halves under dynamo; the compiler fuses this
        x1, x2 = x[..., :half], x[..., half:]
        return torch.cat((x1 * cos - sign * x2 * sin, x2 * cos + sign * x1 * sin), dim=-1).to(dtype)
    out = torch.empty_like(x)  # x's strides
    x1, x2, out1, out2 = x[..., :half], x[..., half:], out[..., :half], out[..., half:]
    torch.mul(x1, cos, out=out1).addcmul_(x2, sin, value=-sign)
    torch.mul(x2, cos, out=out2).addcmul_(x1, sin, value=sign)
    return out.to(dtype)


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
    cos, sin = _widened_table(cos, q, "cos"), _widened_table(sin, q, "sin")  # once for q and k
    return _as(_rotate(q, cos, sin), q.dtype), _as(_rotate(k, cos, sin), k.dtype)


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """SwiGLU gating: silu(gate) * up = gate * sigmoid(gate) * up, elementwise.

    Args:
        gate, up: [..., F], the same shape (their float dtypes may differ).

    Returns:
        [..., F] in the promoted dtype of gate and up (math in fp32).
    """
    if gate.shape != up.shape:
        raise ValueError(f"swiglu: gate {tuple(gate.shape)} and up {tuple(up.shape)} differ in shape")
    return _as(F.silu(_f32(gate)) * _f32(up), _promoted(gate.dtype, up.dtype))


def _targets_readable(target: Tensor) -> bool:
    """Whether reading `target` on the host is free: a CPU tensor in an eager call."""
    return target.device.type == "cpu" and not torch.compiler.is_compiling()


def _check_targets(target: Tensor, ignore_index: int, vocab_total: int) -> None:
    """ValueError for a target outside [0, vocab_total) that is not ignore_index (syncs: fine here)."""
    low, high = torch.where(target == ignore_index, 0, target).aminmax()  # one host sync for both
    if low.item() < 0 or high.item() >= vocab_total:
        bad = (target != ignore_index) & ((target < 0) | (target >= vocab_total))
        pos = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"fused_linear_cross_entropy: argument 'target' has {int(target[pos])} at position "
            f"{pos}, outside [0, {vocab_total}) and not ignore_index={ignore_index}"
        )


def _linear_cross_entropy_chunks(
    h: Tensor,
    weight: Tensor,
    target: Tensor,
    ignore_index: int,
    chunk_size: int,
    grad_h: bool,
    grad_weight: bool,
    process_group=None,
    compute_dtype: torch.dtype = torch.float32,
    checked: bool = True,
):
    """Loss (and, when asked, its gradients) of mean CE(h @ weight.T, target), chunk by chunk.

    Only one [chunk_size, V] block of logits exists at a time. The gradient of the summed loss with
    respect to the logits is softmax(logits) - onehot(target) on counted rows and 0 on ignored rows;
    it is pushed through the matmul at once, so the backward pass needs no logits at all.

    With a vocab-parallel `process_group`, weight holds rows [rank * V_local, (rank + 1) * V_local):
    the row max (MAX), the sum of exponentials and the target logit (SUM, 0 on ranks that do not own
    the target) are all-reduced per chunk, and the partial gradient for h is all-reduced at the end.

    The three matmuls take their operands in `compute_dtype` (accumulating in fp32 wherever the backend
    does); the softmax, the loss and the gradient sums are fp32 whatever it is.

    `checked` False (targets not read on the host): a counted row whose id is outside [0, V_total) gets a NaN
    loss, so the returned loss is NaN, as on the Triton path; True leaves that mask out.
    """
    num_tokens, vocab_local = h.shape[0], weight.shape[0]
    vocab_start = 0 if process_group is None else dist.get_rank(process_group) * vocab_local
    weight_c = weight.to(compute_dtype)
    counted = target != ignore_index
    invalid = None  # counted rows whose id is outside the whole vocabulary (unchecked targets only): NaN below
    if not checked:
        vocab_total = vocab_local * (1 if process_group is None else dist.get_world_size(process_group))
        invalid = counted & ((target < 0) | (target >= vocab_total))
    # Clamped so an all-ignored batch gives a loss (and gradients) of exactly 0 instead of 0/0.
    scale = 1.0 / counted.sum().clamp(min=1).float()
    loss_sum = torch.zeros((), dtype=torch.float32, device=h.device)
    dh = torch.empty(h.shape, dtype=torch.float32, device=h.device) if grad_h else None
    dw = torch.zeros(weight.shape, dtype=torch.float32, device=h.device) if grad_weight else None
    for start in range(0, num_tokens, chunk_size):
        stop = min(start + chunk_size, num_tokens)
        h_chunk = h[start:stop].to(compute_dtype)
        keep = counted[start:stop]
        if process_group is None:  # every valid counted row's target lives here
            local_target, owned = target[start:stop], keep if invalid is None else keep & ~invalid[start:stop]
        else:  # rows whose target column lives in this rank's shard
            local_target = target[start:stop] - vocab_start
            owned = keep & (local_target >= 0) & (local_target < vocab_local)
        # Ignored and not-owned rows may hold any id: point them at column 0 (masked out below).
        safe_target = torch.where(owned, local_target, 0)[:, None]
        logits = (h_chunk @ weight_c.T).float()  # [C, V_local]
        if process_group is None:
            # log softmax in one fused pass; the row losses are its negated target entries, and exp of it is
            # the softmax the gradient starts from.
            log_probs = torch.log_softmax(logits, dim=-1)
            del logits
            row_loss = log_probs.gather(1, safe_target).squeeze(1).neg()
        else:
            target_logit = logits.gather(1, safe_target).squeeze(1) * owned
            row_max = logits.max(dim=-1).values
            dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=process_group)
            sum_exp = torch.exp(logits - row_max[:, None]).sum(dim=-1)
            dist.all_reduce(sum_exp, op=dist.ReduceOp.SUM, group=process_group)
            dist.all_reduce(target_logit, op=dist.ReduceOp.SUM, group=process_group)
            lse = row_max + torch.log(sum_exp)
            row_loss = lse - target_logit
            log_probs = logits.sub_(lse[:, None])  # reusing the logits' memory
        if invalid is not None:
            row_loss = torch.where(invalid[start:stop], float("nan"), row_loss)
        loss_sum = loss_sum + torch.where(keep, row_loss, 0.0).sum()
        if dh is None and dw is None:
            continue
        grad_logits = log_probs.exp_()  # softmax
        grad_logits.scatter_add_(1, safe_target, -owned.float()[:, None])
        grad_logits.mul_(keep[:, None])
        grad_c = grad_logits.to(compute_dtype)
        if dh is not None:
            dh[start:stop] = grad_c @ weight_c
        if dw is not None:
            if compute_dtype == torch.float32:
                dw.addmm_(grad_c.T, h_chunk)
            else:
                dw.add_((grad_c.T @ h_chunk).float())
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
    def forward(ctx, h, weight, target, ignore_index, chunk_size, process_group, compute_dtype, checked):
        loss, dh, dw = _linear_cross_entropy_chunks(
            h,
            weight,
            target,
            ignore_index,
            chunk_size,
            grad_h=ctx.needs_input_grad[0],
            grad_weight=ctx.needs_input_grad[1],
            process_group=process_group,
            compute_dtype=compute_dtype,
            checked=checked,
        )
        ctx.save_for_backward(dh, dw)
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        dh, dw = ctx.saved_tensors
        grad_h = None if dh is None else dh * grad_loss.to(dh.dtype)
        grad_w = None if dw is None else dw * grad_loss.to(dw.dtype)
        return grad_h, grad_w, None, None, None, None, None, None


def fused_linear_cross_entropy(
    h: Tensor,
    weight: Tensor,
    target: Tensor,
    ignore_index: int = IGNORE_INDEX,
    chunk_size: int = 4096,
    process_group=None,
    compute_dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Mean cross-entropy of the logits h @ weight.T, without holding all [T, V] logits.

        loss = mean over {t : target[t] != ignore_index} of  logsumexp(z_t) - z_t[target[t]],
        z_t = h[t] @ weight.T

    Tokens are processed `chunk_size` rows at a time; the result is exact (no approximation), only
    the peak memory changes. When gradients are needed they are computed during the forward pass,
    chunk by chunk, so backward stores [T, D] + [V, D] instead of [T, V].

    Args:
        h: [T, D] hidden states (any float dtype).
        weight: [V, D] output projection.
        target: [T] class indices in [0, V), or ignore_index. Another id raises ValueError for a CPU
            tensor; elsewhere (no host read, see below) it makes the loss NaN.
        ignore_index: targets with this value add no loss and are not counted in the mean.
        chunk_size: rows of logits materialised at once.
        process_group: vocab-parallel group, or None. With a group, weight is this rank's [V_local, D]
            shard (rows [rank * V_local, (rank + 1) * V_local) of the full head), target holds global
            ids and h is the same on every rank; the returned loss and gradient for h are complete
            (all-reduced), the gradient for weight is this shard's.
        compute_dtype: dtype of the matmul operands (fp32: the oracle; the input dtype: the unfused torch
            path megatrain.kernels runs, which cuBLAS accumulates in fp32). Softmax and loss are fp32.

    Returns:
        0-dim fp32 loss. If every target is ignored the loss is 0 (still attached to the graph,
        with zero gradients) rather than NaN.
    """
    if h.dim() != 2 or weight.dim() != 2 or h.shape[1] != weight.shape[1]:
        raise ValueError(
            f"fused_linear_cross_entropy: need h [T, D] and weight [V, D], got "
            f"{tuple(h.shape)} and {tuple(weight.shape)}"
        )
    if target.shape != (h.shape[0],):
        raise ValueError(f"fused_linear_cross_entropy: target must be [T] = [{h.shape[0]}], got {tuple(target.shape)}")
    if chunk_size < 1:
        raise ValueError(f"fused_linear_cross_entropy: chunk_size must be >= 1, got {chunk_size}")
    world = 1
    if process_group is not None:
        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError(
                "fused_linear_cross_entropy: argument 'process_group' was given but "
                "torch.distributed is not initialised"
            )
        world = dist.get_world_size(process_group)
    # Reading the targets is free for a CPU tensor; on an accelerator it would be a device-to-host sync in
    # the middle of every training step, and under torch.compile a graph break. There (as in the Triton
    # path) a target outside [0, V_total) makes its row's loss, and so the returned loss, NaN instead.
    checked = _targets_readable(target)
    if checked:
        _check_targets(target, ignore_index, weight.shape[0] * world)
    if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(
            h, weight, target, ignore_index, chunk_size, process_group, compute_dtype, checked
        )
    # Evaluation: skip the gradient work entirely.
    return _linear_cross_entropy_chunks(
        h, weight, target, ignore_index, chunk_size, False, False, process_group, compute_dtype, checked
    )[0]


LOWRANK_ACTIVATIONS = ("silu", None)


def _check_lowrank(op: str, x: Tensor, a: Tensor, b: Tensor) -> None:
    if x.dim() < 1 or a.dim() != 2 or b.dim() != 2 or x.shape[-1] != a.shape[0] or a.shape[1] != b.shape[0]:
        raise ValueError(
            f"{op}: need x [..., D_in], a [D_in, r], b [r, D_out], got {tuple(x.shape)}, "
            f"{tuple(a.shape)}, {tuple(b.shape)}"
        )


def _lowrank_linear_math(
    x: Tensor,
    a: Tensor,
    b: Tensor,
    bias: Optional[Tensor],
    activation: Optional[str],
    compute_dtype: torch.dtype = torch.float32,
) -> Tensor:
    z = x.to(compute_dtype) @ a.to(compute_dtype)
    if activation == "silu":
        z = F.silu(z)
    y = z @ b.to(compute_dtype)
    if bias is not None:
        y = y + bias.to(compute_dtype)
    return y.to(x.dtype)


def lowrank_linear(
    x: Tensor,
    a: Tensor,
    b: Tensor,
    bias: Optional[Tensor] = None,
    activation: Optional[str] = "silu",
    recompute: bool = False,
    compute_dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Low-rank projection with an activation between the factors (CoLA): act(x @ a) @ b + bias.

    Args:
        x: [..., D_in].
        a: [D_in, r] down-projection.
        b: [r, D_out] up-projection.
        bias: [D_out] or None.
        activation: "silu" (CoLA) or None (plain low-rank x @ a @ b, as LoRA/ReLoRA use).
        recompute: CoLA-M: keep only the inputs for backward and recompute the [..., r]
            intermediate there (activation checkpointing of this op) instead of storing it.
        compute_dtype: dtype of the math (fp32: the oracle; the input dtype: the unfused torch path,
            two matmuls and a SiLU, which megatrain.kernels runs).

    Returns:
        [..., D_out] in x.dtype.
    """
    _check_lowrank("lowrank_linear", x, a, b)
    if activation not in LOWRANK_ACTIVATIONS:
        raise ValueError(
            f"lowrank_linear: argument 'activation' must be one of {LOWRANK_ACTIVATIONS}, got {activation!r}"
        )
    if bias is not None and bias.shape != (b.shape[1],):
        raise ValueError(f"lowrank_linear: argument 'bias' must have shape [{b.shape[1]}], got {tuple(bias.shape)}")
    if recompute and torch.is_grad_enabled():
        from torch.utils.checkpoint import checkpoint

        return checkpoint(_lowrank_linear_math, x, a, b, bias, activation, compute_dtype, use_reentrant=False)
    return _lowrank_linear_math(x, a, b, bias, activation, compute_dtype)


def check_sparse_support(
    op: str, values: Tensor, index: Tensor, d_in: int, d_out: int, check_order: bool = True
) -> None:
    """ValueError unless values [nnz] and index [nnz] (int64, sorted, unique, in [0, d_in*d_out))
    describe a sparse [d_in, d_out] matrix. `check_order` reads the index on the host (a sync)."""
    if values.dim() != 1 or index.dim() != 1 or values.shape != index.shape:
        raise ValueError(
            f"{op}: arguments 'values' and 'index' must be 1-D of one length [nnz], got "
            f"{tuple(values.shape)} and {tuple(index.shape)}"
        )
    if index.dtype != torch.int64:
        raise ValueError(f"{op}: argument 'index' must be int64, got {str(index.dtype).replace('torch.', '')}")
    if check_order and index.numel():
        if int(index[0]) < 0 or int(index[-1]) >= d_in * d_out:
            raise ValueError(
                f"{op}: argument 'index' must lie in [0, D_in*D_out) = [0, {d_in * d_out}), got "
                f"[{int(index.min())}, {int(index.max())}]"
            )
        if index.numel() > 1 and not bool((index[1:] > index[:-1]).all()):
            raise ValueError(f"{op}: argument 'index' must be sorted ascending without repeats")


# id(index) -> (weak reference to index, its version, d_in, d_out) of the supports already read and found valid.
_VALID_SUPPORTS: dict[int, tuple] = {}


def check_sparse_support_once(op: str, values: Tensor, index: Tensor, d_in: int, d_out: int) -> None:
    """`check_sparse_support` with its host read of the index (a sync on a GPU) made once per index tensor: a
    support never changes during training, so an index already found valid (same tensor, same in-place
    version, same shape) is not read again; shapes and dtypes are still checked on every call."""
    key = id(index)
    hit = _VALID_SUPPORTS.get(key)
    known = hit is not None and hit[0]() is index and hit[1:] == (index._version, d_in, d_out)
    check_sparse_support(op, values, index, d_in, d_out, check_order=not known)
    if not known:
        _VALID_SUPPORTS[key] = (
            weakref.ref(index, lambda _ref, key=key: _VALID_SUPPORTS.pop(key, None)),
            index._version,
            d_in,
            d_out,
        )


def sparse_lowrank_linear(
    x: Tensor,
    a: Tensor,
    b: Tensor,
    values: Tensor,
    index: Tensor,
    scale: float,
    compute_dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Sparse plus low-rank projection (SLTrain): y = x @ (scale * a @ b + S).

    S is [D_in, D_out], zero except S.view(-1)[index] = values. This oracle builds the dense W (the
    Triton path builds it per call too, and never keeps it); gradients for x, a, b and values (the
    last only at the support, i.e. one number per entry of `values`) come from autograd.

    Args:
        x: [..., D_in].
        a: [D_in, r], b: [r, D_out].
        values: [nnz] the trainable entries of S.
        index: [nnz] int64 flat row-major positions (i * D_out + j), sorted ascending, unique.
        scale: the low-rank factor's scale (alpha / r in SLTrain).
        compute_dtype: dtype of W and of the matmul (fp32: the oracle; the input dtype: the unfused
            torch path, W materialised and one matmul, which megatrain.kernels runs).

    Returns:
        [..., D_out] in x.dtype.
    """
    _check_lowrank("sparse_lowrank_linear", x, a, b)
    d_in, d_out = a.shape[0], b.shape[1]
    # The order and range check reads the index (a graph break under torch.compile): eager calls only, and
    # once per index tensor.
    if torch.compiler.is_compiling():
        check_sparse_support("sparse_lowrank_linear", values, index, d_in, d_out, check_order=False)
    else:
        check_sparse_support_once("sparse_lowrank_linear", values, index, d_in, d_out)
    sparse = torch.zeros(d_in * d_out, dtype=compute_dtype, device=x.device)
    sparse = sparse.index_put((index,), values.to(compute_dtype)).view(d_in, d_out)
    weight = float(scale) * (a.to(compute_dtype) @ b.to(compute_dtype)) + sparse
    return (x.to(compute_dtype) @ weight).to(x.dtype)


IHA_MASKS = ("causal", "token_causal")


def iha_check_inputs(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mix_q: Tensor,
    mix_k: Tensor,
    mix_v: Tensor,
    collapse: Tensor,
    cos: Optional[Tensor],
    sin: Optional[Tensor],
    mask: str,
    window: Optional[int],
) -> tuple[int, int, int, int, int, int, bool]:
    """Validate `iha_attention`'s arguments; returns (B, H_in, N, d, H_out, P, global_collapse).

    Raises one ValueError("iha_attention: argument '<name>' ...") naming what is wrong.
    """
    op = "iha_attention"
    floats = (torch.float32, torch.bfloat16, torch.float16)
    for name, t in (
        ("q", q),
        ("k", k),
        ("v", v),
        ("mix_q", mix_q),
        ("mix_k", mix_k),
        ("mix_v", mix_v),
        ("collapse", collapse),
    ):
        if not isinstance(t, Tensor) or t.dtype not in floats:
            got = type(t).__name__ if not isinstance(t, Tensor) else str(t.dtype)
            raise ValueError(f"{op}: argument '{name}' must be a float32/bfloat16/float16 tensor, got {got}")
    if q.dim() != 4:
        raise ValueError(f"{op}: argument 'q' must be [B, H_in, N, d], got shape {tuple(q.shape)}")
    batch, heads_in, seq_len, head_dim = q.shape
    for name, t in (("k", k), ("v", v)):
        if tuple(t.shape) != tuple(q.shape):
            raise ValueError(f"{op}: argument '{name}' must have q's shape {tuple(q.shape)}, got {tuple(t.shape)}")
        if t.dtype != q.dtype:
            raise ValueError(f"{op}: argument '{name}' has dtype {t.dtype} but 'q' has {q.dtype}")
    if mix_q.dim() != 3 or mix_q.shape[0] != heads_in or mix_q.shape[2] < 1:
        raise ValueError(
            f"{op}: argument 'mix_q' must be [H_in, H_out, P] with H_in = {heads_in} and P >= 1, "
            f"got shape {tuple(mix_q.shape)}"
        )
    heads_out, pseudo = mix_q.shape[1], mix_q.shape[2]
    if heads_out < 1:
        raise ValueError(f"{op}: argument 'mix_q' must have H_out >= 1, got shape {tuple(mix_q.shape)}")
    for name, t in (("mix_k", mix_k), ("mix_v", mix_v)):
        if tuple(t.shape) != tuple(mix_q.shape):
            raise ValueError(
                f"{op}: argument '{name}' must have mix_q's shape [H_in, H_out, P] = "
                f"{list(mix_q.shape)}, got {tuple(t.shape)}"
            )
    if tuple(collapse.shape) == (heads_out, pseudo):
        global_collapse = False
    elif tuple(collapse.shape) == (heads_out, heads_out * pseudo):
        global_collapse = True
    else:
        raise ValueError(
            f"{op}: argument 'collapse' must be [H_out, P] = [{heads_out}, {pseudo}] (per head) or "
            f"[H_out, H_out*P] = [{heads_out}, {heads_out * pseudo}] (global), got {tuple(collapse.shape)}"
        )
    if (cos is None) != (sin is None):
        raise ValueError(f"{op}: arguments 'cos' and 'sin' must be given together or both be None")
    if cos is not None:
        half = head_dim // 2
        for name, t in (("cos", cos), ("sin", sin)):
            if not isinstance(t, Tensor) or t.dtype not in floats:
                raise ValueError(f"{op}: argument '{name}' must be a float tensor, got {type(t).__name__}")
            if head_dim % 2 or tuple(t.shape) != (seq_len * pseudo, half):
                raise ValueError(
                    f"{op}: argument '{name}' must be [N*P, d/2] = [{seq_len * pseudo}, {half}] "
                    f"(even d) for q {tuple(q.shape)} and P = {pseudo}, got {tuple(t.shape)}"
                )
    if mask not in IHA_MASKS:
        raise ValueError(f"{op}: argument 'mask' is {mask!r} (allowed: {', '.join(IHA_MASKS)})")
    if window is not None and (
        isinstance(window, bool) or not isinstance(window, int) or window < 1 or window % pseudo
    ):
        raise ValueError(
            f"{op}: argument 'window' must be None or a positive multiple of P = {pseudo} "
            f"(virtual tokens), got {window!r}"
        )
    devices = {t.device for t in (q, k, v, mix_q, mix_k, mix_v, collapse) + ((cos, sin) if cos is not None else ())}
    if len(devices) > 1:
        raise ValueError(f"{op}: all tensor arguments must be on one device, got {sorted(map(str, devices))}")
    return batch, heads_in, seq_len, head_dim, heads_out, pseudo, global_collapse


def iha_allowed(seq_len: int, pseudo: int, mask: str = "causal", window: Optional[int] = None, device=None) -> Tensor:
    """[N*P, N*P] bool: which virtual key j each virtual query i attends to (True = attends).

    i = n*P + p, j = n'*P + p'. causal: j <= i. token_causal: n' <= n. With a window W (a multiple
    of P): causal also needs j > i - W; token_causal also needs n' > n - W/P. Either way a query far
    from the start sees exactly W keys, and every query sees at least itself.
    """
    pos = torch.arange(seq_len * pseudo, device=device)
    i, j = pos[:, None], pos[None, :]
    if mask == "causal":
        allowed = j <= i
        if window is not None:
            allowed &= j > i - window
    else:
        ti, tj = i // pseudo, j // pseudo
        allowed = tj <= ti
        if window is not None:
            allowed &= tj > ti - window // pseudo
    return allowed


def iha_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mix_q: Tensor,
    mix_k: Tensor,
    mix_v: Tensor,
    collapse: Tensor,
    cos: Optional[Tensor] = None,
    sin: Optional[Tensor] = None,
    mask: str = "causal",
    window: Optional[int] = None,
    *,
    compute_dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Interleaved head attention, unfused: batched-GEMM mixing straight into the interleaved layout,
    rotary, SDPA (is_causal for the plain causal mask), collapse; no copies between the steps.

    With P pseudo-tokens per token and mixing tensors mix_* [H_in, H_out, P]:

        q~[b, h, n*P + p] = sum_m mix_q[m, h, p] * q[b, m, n]        (same for k~ with mix_k, v~ with mix_v)
        q~, k~ rotated by cos/sin [N*P, d/2] at their virtual positions (when given)
        o~[b, h, i] = softmax_j(q~[b, h, i] . k~[b, h, j] / sqrt(d), over allowed j) @ v~[b, h, j]
        o[b, h, n]  = sum_p collapse[h, p] * o~[b, h, n*P + p]                 collapse [H_out, P]
                    = sum_{m, p} collapse[h, m*P + p] * o~[b, m, n*P + p]      collapse [H_out, H_out*P]

    Which keys a query sees: see `iha_allowed` (mask "causal" over the flattened virtual order or
    "token_causal"; `window` in virtual tokens, a positive multiple of P, or None).

    Args:
        q, k, v: [B, H_in, N, d].
        mix_q, mix_k, mix_v: [H_in, H_out, P] (H_out may differ from H_in: a tensor-parallel rank
            holds all H_in gathered heads and the mix columns of its own output heads).
        collapse: [H_out, P] (per head) or [H_out, H_out*P] (global).
        cos, sin: [N*P, d/2] rotary tables (half-split layout, as `rope`), or None.
        compute_dtype: dtype of the intermediate tensors (fp32: the oracle; the input dtype: the
            unfused torch path megatrain.kernels runs, which the benchmarks time as torch-eager).

    Returns:
        o [B, H_out, N, d] in q.dtype. Differentiable with respect to every tensor argument
        except cos and sin.
    """
    batch, _, seq_len, head_dim, heads_out, pseudo, global_collapse = iha_check_inputs(
        q, k, v, mix_q, mix_k, mix_v, collapse, cos, sin, mask, window
    )
    ct = compute_dtype
    tokens = batch * seq_len

    # Layout: every pseudo tensor is [B, N, P, H_out, d] in memory, whose transpose(1, 2) of the
    # [B, N*P, H_out, d] view is the interleaved [B, H_out, N*P, d] sequence (virtual row n*P + p) that
    # SDPA takes as it is; the model's q, k, v ([B, N, H, d] in memory, projected) mix without a copy,
    # and the collapsed output comes back [B, N, H_out, d] in memory, what o_proj reads.
    def pseudo_heads(x: Tensor, mix: Tensor) -> Tensor:  # [B, H_in, N, d] -> [B, H_out, N*P, d]
        weight = mix.to(ct).permute(2, 1, 0).reshape(pseudo * heads_out, -1)  # [(p, h), m]
        rows = x.to(ct).transpose(1, 2).reshape(tokens, -1, head_dim)  # [B*N, H_in, d]
        mixed = torch.bmm(weight.expand(tokens, *weight.shape), rows)  # one batched GEMM: [B*N, (p, h), d]
        return mixed.view(batch, seq_len * pseudo, heads_out, head_dim).transpose(1, 2)

    pq, pk, pv = pseudo_heads(q, mix_q), pseudo_heads(k, mix_k), pseudo_heads(v, mix_v)
    if cos is not None:
        c, s = cos.float(), sin.float()
        pq, pk = _Rotate.apply(pq, c, s), _Rotate.apply(pk, c, s)
    if mask == "causal" and window is None:
        o = F.scaled_dot_product_attention(pq, pk, pv, is_causal=True)
    else:
        allowed = iha_allowed(seq_len, pseudo, mask, window, device=q.device)
        o = F.scaled_dot_product_attention(pq, pk, pv, attn_mask=allowed)
    # o [B, H_out, N*P, d] -> [B, N, P, H_out, d] (a view: SDPA on CPU writes [B, N*P, H_out, d]).
    o = o.transpose(1, 2).reshape(batch, seq_len, pseudo, heads_out, head_dim)
    if global_collapse:  # out[b, n, h] = sum_{p, m} R[h, (p, m)] o[b, n, p, m]: one batched GEMM
        weight = collapse.to(ct).reshape(heads_out, heads_out, pseudo).transpose(1, 2).reshape(heads_out, -1)
        out = torch.bmm(weight.expand(tokens, *weight.shape), o.reshape(tokens, pseudo * heads_out, head_dim))
        out = out.view(batch, seq_len, heads_out, head_dim)
    else:
        out = (o * collapse.to(ct).t()[:, :, None]).sum(2)  # [B, N, H_out, d]
    return out.transpose(1, 2).to(q.dtype)


def projected_adam_update(
    weight: Tensor,
    proj: Tensor,
    low_rank_grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    *,
    side: str,
    beta1: float,
    beta2: float,
    eps: float,
    step_size: float,
    scale: float,
    decay: float,
    update_moments: bool = True,
    grad: Optional[Tensor] = None,
    residual_scale: Optional[Tensor] = None,
    residual_coef: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """One GaLore / Fira weight update from a projected gradient (the optimizer's inner step).

    side "right": weight [M, N], proj P [r, N], low_rank_grad R and moments [M, r], back(X) = X @ P.
    side "left":  weight [M, N], proj P [M, r], low_rank_grad R and moments [r, N], back(X) = P @ X.

        m, v <- b1 m + (1 - b1) R,  b2 v + (1 - b2) R^2       (when update_moments)
        psi   = m / (sqrt(v) + eps)
        U     = scale * back(psi) [+ residual_scale (.) (grad - residual_coef * back(R))]
        W    <- (W - step_size * U) * (1 - decay)

    residual_scale ([M] for "right", [N] for "left") multiplies each index of the dimension the
    projection keeps; with grad [M, N] it adds Fira's scaled residual. Moments are fp32; weight
    and grad fp32 or bf16 (math in fp32). `weight` is updated in place (and the moments too, here);
    returns the moments after the step, which the caller keeps (the fused kernel returns new ones).
    """
    if side not in ("right", "left"):
        raise ValueError(f"projected_adam_update: side must be 'right' or 'left', got {side!r}")
    if (grad is None) != (residual_scale is None):
        raise ValueError("projected_adam_update: grad and residual_scale go together (Fira's residual)")
    r = low_rank_grad.float()
    if update_moments:
        exp_avg.mul_(beta1).add_(r, alpha=1.0 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(r, r, value=1.0 - beta2)
    psi = exp_avg / (exp_avg_sq.sqrt() + eps)
    p = proj.float()

    def back(x: Tensor) -> Tensor:
        return x @ p if side == "right" else p @ x

    update = back(psi) * scale
    if grad is not None:
        s = residual_scale.float()[:, None] if side == "right" else residual_scale.float()[None, :]
        update = update + s * (grad.float() - residual_coef * back(r))
    w = weight.float()
    w = (w - step_size * update) * (1.0 - decay)
    weight.copy_(w.to(weight.dtype))
    return exp_avg, exp_avg_sq
