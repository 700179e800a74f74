"""Fused linear + cross-entropy: the mean cross-entropy of h @ weight.T without the [T, V] logits.

For hidden states h [T, D], an output head weight [V, D] and targets y [T]:

    z_t    = h[t] @ weight.T                       logits of token t, [V]
    lse_t  = log(sum_v exp(z_t[v]))
    loss   = (1 / N) * sum_{t counted} (lse_t - z_t[y_t]),   N = #{t : y_t != ignore_index}

and the gradients, with g_t = (softmax(z_t) - onehot(y_t)) / N on counted rows and g_t = 0 on
ignored rows (G = [g_t] is [T, V]):

    dloss/dh      = G @ weight                     [T, D]
    dloss/dweight = G.T @ h                        [V, D]

How it runs: a host loop over chunks of C tokens. For each chunk

1. logits = h_chunk @ weight.T with torch.mm (cuBLAS on a GPU) in the input dtype, [C, V];
2. `_flce_fwd_kernel`, one program per row, reads the row tile by tile for its online max and sum of
   exp, writes lse and the target logit (two [C] fp32 vectors) and, in the same launch, reads the
   row again and overwrites it IN PLACE with g = (softmax - onehot) / N (so no second [C, V] buffer);
3. dh[chunk] = g @ weight (torch.mm into dh) and dweight += g.T @ h_chunk (torch.addmm_ into dweight,
   beta = 1: cuBLAS adds each chunk's fp32-accumulated product to it).

Only one [C, V] block of logits exists at a time, and the gradients are finished during the forward
pass, so backward only multiplies them by the upstream gradient (in place). Without gradients (eval,
torch.no_grad) the kernel skips its gradient loop and step 3 is skipped.

Chunk size (when not given): the largest power of two C with C * V_local * element size <= 256 MiB,
capped at T (1024 rows of a 128k bf16 vocabulary: T8192 runs in 8 chunks). See default_chunk_size.

Cost per call (T tokens, D hidden, V vocabulary, e bytes per element):

    FLOPs  2*T*D*V (logits) + 2*T*D*V (dh) + 2*T*D*V (dW) = 6*T*D*V with gradients, 2*T*D*V without
    bytes  the kernel reads the logits twice and writes them once: 3*T*V*e (T*V*e without gradients);
           the dW update reads and writes dW once per chunk: 2*V*D*e * T / C
    memory dW [V, D] and dh [T, D] (the outputs) + one [C, V] block (256 MiB) + O(C) vectors

Roofline (T8192 D4096 V128256 bf16 on an H200, C = 1024): 25.8 TFLOP of large cuBLAS GEMMs (~37 ms
at ~700 TFLOP/s, the same three matmuls torch.compile's unfused loss runs) plus 6.3 GB of kernel
traffic (~1.4 ms at 4.5 TB/s). The dW update moves 2.1 GB per chunk inside a 1.07 TFLOP GEMM
(~0.45 ms of memory under ~1.5 ms of compute, overlapped by cuBLAS's tiles). Expected ~39 ms: bound
by the matmuls every implementation does, with no [T, V] buffer (2.1 GB of bf16 logits plus their
gradient in the unfused version).

Vocab parallel (`process_group` given): `weight` holds this rank's rows [r * V_local, (r+1) * V_local)
of the full head, `target` holds global ids and `h` is the same on every rank. `_flce_fwd_kernel`
runs on the local shard without its gradient loop; the shards' lse are all-reduced with MAX, then
the rescaled exp(lse_r - max), the target logits (zero on ranks that do not own the target) and a
"target found" count are all-reduced with one SUM. `_flce_grad_kernel` (phase 2) then writes g with
the global lse, so each rank holds its columns of the true g; dweight is this shard's
gradient and dh, a partial sum over the shard, is all-reduced (SUM, in h's dtype) at the end, so
the returned gradient for h is complete.

Targets that are neither ignore_index nor in [0, V_total): for CPU tensors the launcher raises a
ValueError (the check is free there). For CUDA tensors checking would need a device-to-host sync, so
instead such rows are never matched to a column and their loss is set to NaN, which makes the
returned loss NaN: loud, but without a sync (the vocab-parallel "found" count does the same across
ranks, since only the owning rank can see the target).

Precision: logits and g are stored in the input dtype (as a plain bf16 matmul would), every reduction
inside the kernels is fp32, the loss is fp32; dweight is accumulated in weight's dtype across chunks
(each chunk's product in fp32 inside cuBLAS, then added and rounded: T / C roundings). Offsets inside
the kernels are int64: C * V can exceed 2**31.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import triton
import triton.language as tl
from torch import Tensor
from torch.autograd.function import once_differentiable

from megatrain.constants import IGNORE_INDEX

from ._utils import FLOAT_DTYPES, check_device, check_same, check_tensor, new_output, next_power_of_2
from .aot import KernelLaunch, LaunchConfig, signature
from .library import kernel_op, none_tensor

__all__ = ["fused_linear_cross_entropy", "default_chunk_size"]

OP = "fused_linear_cross_entropy"

# Columns one program handles per loop step. 4096 fp32 values over 8 warps is 16 registers a thread:
# large enough to stream a row at full bandwidth, small enough not to spill. Not tuned per GPU.
MAX_BLOCK_V = 4096
# Bytes of the one [C, V_local] logits block the op holds (see default_chunk_size).
LOGITS_BUDGET_BYTES = 256 << 20


# ---- kernels -------------------------------------------------------------------------------------


@triton.jit
def _flce_fwd_kernel(
    logits_ptr,
    stride_row,
    target_ptr,
    lse_ptr,
    target_logit_ptr,
    scale_ptr,
    n_cols,
    vocab_start,
    ignore_index,
    WRITE_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """One program per row of a [C, n_cols] logits block: the row's log-sum-exp and target logit and,
    with WRITE_GRAD, its gradient written in place.

    Loop 1 keeps an online max m and sum s of exp(z - m) over tiles of BLOCK_V columns (a row of any
    length is read once) and writes lse = m + log(s) and z[target - vocab_start] (0 when that column
    is not in this block or the row is ignored), both fp32. With WRITE_GRAD (no vocab-parallel group:
    this lse is the global one) loop 2 reads the row again (mostly from L2, just read) and overwrites
    it with (exp(z - lse) - onehot(target - vocab_start)) * scale, 0 on ignored rows, so the forward
    pass needs no other kernel. scale (one fp32 value, read from memory so the host never syncs to
    learn the token count) is 1 / N.
    """
    row = tl.program_id(0)
    # int64: row * stride_row overflows int32 once a chunk holds more than 2**31 logits.
    row_ptr = logits_ptr + row.to(tl.int64) * stride_row
    target = tl.load(target_ptr + row).to(tl.int64)
    counted = target != ignore_index
    local_target = target - vocab_start
    has_target = counted & (local_target >= 0) & (local_target < n_cols)

    running_max = float("-inf")
    running_sum = 0.0
    for start in range(0, n_cols, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        z = tl.load(row_ptr + cols, mask=cols < n_cols, other=float("-inf")).to(tl.float32)
        # Every tile has at least one real column, so new_max is finite and the first step's
        # exp(-inf - new_max) is a clean 0 rather than a NaN.
        new_max = tl.maximum(running_max, tl.max(z, axis=0))
        running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(z - new_max), axis=0)
        running_max = new_max
    lse = running_max + tl.log(running_sum)

    # The pointer is clamped to column 0 when there is no target so no wild address is formed.
    target_logit = tl.load(row_ptr + tl.where(has_target, local_target, 0), mask=has_target, other=0.0)
    tl.store(lse_ptr + row, lse)
    tl.store(target_logit_ptr + row, target_logit.to(tl.float32))

    if WRITE_GRAD:
        _write_logit_grad(row_ptr, n_cols, lse, local_target, counted, tl.load(scale_ptr), BLOCK_V)


@triton.jit
def _write_logit_grad(row_ptr, n_cols, lse, local_target, counted, scale, BLOCK_V: tl.constexpr):
    """One row of logits z [n_cols] <- (exp(z - lse) - onehot(local_target)) * scale, in place; 0 where
    the row is not counted (`where`, not a multiply by 0: an ignored row's lse is never checked and could
    be inf). A local_target outside [0, n_cols) matches no column: softmax only, as vocab parallelism needs."""
    for start in range(0, n_cols, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        in_row = cols < n_cols
        z = tl.load(row_ptr + cols, mask=in_row, other=0.0).to(tl.float32)
        grad = (tl.exp(z - lse) - tl.where(cols == local_target, 1.0, 0.0)) * scale
        grad = tl.where(counted, grad, 0.0)
        tl.store(row_ptr + cols, grad.to(row_ptr.dtype.element_ty), mask=in_row)


@triton.jit
def _flce_grad_kernel(
    logits_ptr, stride_row, target_ptr, lse_ptr, scale_ptr, n_cols, vocab_start, ignore_index, BLOCK_V: tl.constexpr
):
    """Vocab-parallel phase 2, one program per row: z <- (exp(z - lse) - onehot(target - vocab_start)) * scale,
    in place.

    lse [C] is the global log-sum-exp (the shards' `_flce_fwd_kernel` results, all-reduced); scale (one
    fp32 value, read from memory so the host never has to sync to learn the token count) is 1 / N.
    Ignored rows are overwritten with 0.
    """
    row = tl.program_id(0)
    row_ptr = logits_ptr + row.to(tl.int64) * stride_row
    target = tl.load(target_ptr + row).to(tl.int64)
    _write_logit_grad(
        row_ptr,
        n_cols,
        tl.load(lse_ptr + row),
        target - vocab_start,
        target != ignore_index,
        tl.load(scale_ptr),
        BLOCK_V,
    )


# ---- launchers -----------------------------------------------------------------------------------


def launch_config(n_cols: int) -> LaunchConfig:
    """BLOCK_V and num_warps of both passes for rows of n_cols logits, on every device."""
    block = min(next_power_of_2(n_cols), MAX_BLOCK_V)
    return LaunchConfig.of(num_warps=8 if block >= 2048 else 4, BLOCK_V=block)


def cuda_launches(vocab_local: int, dtype: torch.dtype) -> list[KernelLaunch]:
    """Both kernels on CUDA for logits of `dtype` with vocab_local columns (V, or V / TP shard): the
    forward kernel with its gradient loop on (its heaviest variant) and the vocab-parallel phase 2."""
    config = launch_config(vocab_local)
    fwd = signature(
        _flce_fwd_kernel,
        {
            "logits_ptr": dtype,
            "target_ptr": torch.int64,
            "lse_ptr": torch.float32,
            "target_logit_ptr": torch.float32,
            "scale_ptr": torch.float32,
        },
    )
    grad = signature(
        _flce_grad_kernel,
        {"logits_ptr": dtype, "target_ptr": torch.int64, "lse_ptr": torch.float32, "scale_ptr": torch.float32},
    )
    note = f"V_local={vocab_local}"
    return [
        KernelLaunch(_flce_fwd_kernel, fwd, config.replace(WRITE_GRAD=True), True, note),
        KernelLaunch(_flce_grad_kernel, grad, config, True, note),
    ]


def _row_stats(logits: Tensor, target: Tensor, vocab_start: int, ignore_index: int, grad_scale: Optional[Tensor]):
    """`_flce_fwd_kernel` on logits [C, V_local]: (lse, target logit), each fp32 [C], of this block's
    columns. With grad_scale (a [1] fp32 tensor, 1 / N) the logits are overwritten with their gradient
    in the same launch: only valid when this block holds the whole vocabulary."""
    rows, n_cols = logits.shape
    lse = new_output((rows,), dtype=torch.float32, device=logits.device)
    target_logit = new_output((rows,), dtype=torch.float32, device=logits.device)
    write_grad = grad_scale is not None
    _flce_fwd_kernel[(rows,)](
        logits,
        logits.stride(0),
        target,
        lse,
        target_logit,
        grad_scale if write_grad else lse,
        n_cols,
        vocab_start,
        ignore_index,
        WRITE_GRAD=write_grad,
        **launch_config(n_cols).kwargs(),
    )
    return lse, target_logit


def _logits_to_grad_(
    logits: Tensor, target: Tensor, lse: Tensor, scale: Tensor, vocab_start: int, ignore_index: int
) -> Tensor:
    """Vocab-parallel phase 2: overwrite logits [C, V_local] with their gradient (see _flce_grad_kernel)."""
    rows, n_cols = logits.shape
    _flce_grad_kernel[(rows,)](
        logits,
        logits.stride(0),
        target,
        lse,
        scale,
        n_cols,
        vocab_start,
        ignore_index,
        **launch_config(n_cols).kwargs(),
    )
    return logits


def _global_lse(lse: Tensor, target_logit: Tensor, found: Tensor, process_group):
    """Combine per-shard row statistics into (lse, target logit, target found), each [C].

    Without a group the local values are already global. With one: M = max_r lse_r, then
    lse = M + log(sum_r exp(lse_r - M)); target logits and found flags are summed (exactly one rank
    owns each valid target). Two all-reduces per chunk, the second one packed.
    """
    if process_group is None:
        return lse, target_logit, found
    global_max = lse.clone()
    dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=process_group)
    packed = torch.stack((torch.exp(lse - global_max), target_logit, found.float()))
    dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=process_group)
    return global_max + torch.log(packed[0]), packed[1], packed[2] > 0.5


def default_chunk_size(num_tokens: int, vocab: int, element_size: int) -> int:
    """Rows of logits per chunk: the largest power of two C whose [C, vocab] block of `element_size`
    bytes fits LOGITS_BUDGET_BYTES, at least 1 and at most num_tokens.

    The budget bounds the op's only large buffer (256 MiB: 1024 rows of a 128k bf16 vocabulary,
    4096 of a 32k one) while keeping every matmul's token dimension in the hundreds to thousands,
    where cuBLAS runs at full speed: the dW += g^T @ h_chunk update reads and writes all of dW per
    chunk, so a chunk of C rows costs 2 * C * V * D FLOPs against 2 * V * D * e bytes, compute-bound
    from C ~ 300 on an H100/H200. Powers of two give matmul-friendly shapes.
    """
    rows = max(1, LOGITS_BUDGET_BYTES // max(vocab * element_size, 1))
    rows = 1 << (rows.bit_length() - 1)  # round down: never over budget
    return max(1, min(rows, num_tokens))


def _forward_chunks(
    h: Tensor,
    weight: Tensor,
    target: Tensor,
    ignore_index: int,
    process_group,
    chunk_size: int,
    need_dh: bool,
    need_dw: bool,
):
    """The chunk loop (see the module docstring). Returns (loss, dh or None, dweight or None)."""
    num_tokens = h.shape[0]
    vocab_local = weight.shape[0]
    vocab_start = 0 if process_group is None else dist.get_rank(process_group) * vocab_local
    target = target.contiguous()
    counted = target != ignore_index
    # A device tensor, never .item(): the kernel reads it, so there is no host sync.
    scale = (1.0 / counted.sum().clamp(min=1).to(torch.float32)).reshape(1)
    local_target = target - vocab_start
    in_shard = counted & (local_target >= 0) & (local_target < vocab_local)
    need_grad = need_dh or need_dw

    loss_sum = torch.zeros((), dtype=torch.float32, device=h.device)
    dh = new_output(h.shape, dtype=h.dtype, device=h.device) if need_dh else None
    dw = None
    if need_dw:
        # In weight's dtype (h's): cuBLAS accumulates each chunk's product in fp32 and adds it to dw
        # (beta = 1), so the sum over chunks is rounded once per chunk, as Liger's is, and no second
        # [V, D] buffer (an fp32 accumulator would be twice dW's size) ever exists.
        dw = new_output(weight.shape, dtype=weight.dtype, device=h.device)
        if num_tokens == 0:
            dw.zero_()  # no chunk will write it

    for start in range(0, num_tokens, chunk_size):
        stop = min(start + chunk_size, num_tokens)
        h_chunk, target_chunk = h[start:stop], target[start:stop]
        logits = torch.mm(h_chunk, weight.t())  # [C, V_local], input dtype
        # Without a group the forward kernel also writes the gradient: one launch per chunk.
        fused = need_grad and process_group is None
        lse, target_logit = _row_stats(logits, target_chunk, vocab_start, ignore_index, scale if fused else None)
        lse, target_logit, found = _global_lse(lse, target_logit, in_shard[start:stop], process_group)
        keep = counted[start:stop]
        row_loss = torch.where(keep, lse - target_logit, torch.zeros_like(lse))
        # A counted row whose target no rank owns (id outside [0, V_total)): NaN, see module docstring.
        row_loss = torch.where(keep & ~found, torch.full_like(lse, float("nan")), row_loss)
        loss_sum = loss_sum + row_loss.sum()
        if need_grad:
            grad_logits = (
                logits if fused else _logits_to_grad_(logits, target_chunk, lse, scale, vocab_start, ignore_index)
            )
            if dh is not None:
                torch.mm(grad_logits, weight, out=dh[start:stop])
            if dw is not None:
                if start == 0:
                    torch.mm(grad_logits.t(), h_chunk, out=dw)
                else:
                    dw.addmm_(grad_logits.t(), h_chunk)
            del grad_logits
        # Freed before the next chunk's matmul allocates, so at most one [C, V] block is alive.
        del logits

    if dh is not None and process_group is not None:
        dist.all_reduce(dh, op=dist.ReduceOp.SUM, group=process_group)
    return loss_sum * scale[0], dh, dw


def _forward(h, weight, target, ignore_index, process_group, chunk_size, need_dh, need_dw):
    # The op fixes its own precision (matmuls in the input dtype, fp32 statistics): under an outer
    # autocast region torch.mm would otherwise return bf16 logits for fp32 inputs, and the out= matmul
    # into dh would see mismatched dtypes.
    with torch.autocast(device_type=h.device.type, enabled=False):
        return _forward_chunks(h, weight, target, ignore_index, process_group, chunk_size, need_dh, need_dw)


def _group(group_name: Optional[str]):
    """The process group a custom op names (ops take the group's name: a ProcessGroup is no schema type)."""
    if group_name is None:
        return None
    from torch.distributed.distributed_c10d import _resolve_process_group

    return _resolve_process_group(group_name)


@kernel_op("fused_linear_cross_entropy", autocast="fused_linear_cross_entropy")
def _flce_op(
    h: Tensor,
    weight: Tensor,
    target: Tensor,
    ignore_index: int,
    group_name: Optional[str],
    chunk_size: int,
    need_dh: bool,
    need_dw: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, dh, dweight): the gradients (of the loss itself, grad_output 1) are computed here, chunk
    by chunk, when asked for (empty otherwise); backward only scales them."""
    loss, dh, dw = _forward(h, weight, target, ignore_index, _group(group_name), chunk_size, need_dh, need_dw)
    return loss, dh if dh is not None else none_tensor(loss), dw if dw is not None else none_tensor(loss)


@_flce_op.register_fake
def _(h, weight, target, ignore_index, group_name, chunk_size, need_dh, need_dw):
    return (
        h.new_empty((), dtype=torch.float32),
        h.new_empty(h.shape if need_dh else (0,)),
        weight.new_empty(weight.shape if need_dw else (0,), dtype=h.dtype),
    )


def _setup_context(ctx, inputs, output) -> None:
    """The gradients are saved (not recomputed) and scaled in place by backward, so backward allocates
    nothing and autograd takes them as the .grad tensors: the op's peak is dW + dh + one logits block.
    The price: they are consumed, so a second backward through the same call (retain_graph=True)
    raises."""
    _, dh, dw = output
    ctx.mark_non_differentiable(dh, dw)
    ctx.set_materialize_grads(False)
    ctx.consumed = False
    ctx.save_for_backward(dh, dw)


@once_differentiable
def _backward(ctx, grad_loss, _ddh, _ddw):
    if ctx.consumed:
        raise RuntimeError(
            f"{OP}: backward ran twice through one call; its gradients are computed in the "
            f"forward and scaled in place by the first backward (retain_graph=True is not "
            f"supported)"
        )
    ctx.consumed = True
    dh, dw = ctx.saved_tensors
    need_dh, need_dw = ctx.needs_input_grad[:2]
    # In place in eager mode. A traced backward (torch.compile's AOT autograd: fake or functional
    # tensor subclasses, never a plain Tensor) scales out of place: a traced graph may not write into
    # the activations it saved, and the compiler plans the buffer itself.
    eager = type(dh) is Tensor and not torch.compiler.is_compiling()
    grad_h = _scaled(dh, grad_loss, eager) if need_dh else None
    grad_w = _scaled(dw, grad_loss, eager) if need_dw else None
    return grad_h, grad_w, None, None, None, None, None, None


def _scaled(grad: Tensor, grad_loss: Tensor, in_place: bool) -> Tensor:
    factor = grad_loss.to(grad.dtype)
    return grad.mul_(factor) if in_place else grad * factor


_flce_op.register_autograd(_backward, setup_context=_setup_context)


# ---- validation and the public entry point -------------------------------------------------------


def _check_inputs(h, weight, target, ignore_index, process_group, chunk_size) -> None:
    check_tensor(OP, "h", h, dtypes=FLOAT_DTYPES, ndim=2)
    if isinstance(weight, Tensor) and weight.numel() == 0:
        # The usual cause: a ZeRO-3 partitioned head read outside its module's forward
        # (docs/architecture.md, "ZeRO-3").
        raise ValueError(
            f"{OP}: argument 'weight' is empty (shape {tuple(weight.shape)}); a ZeRO-3 "
            f"partitioned weight must be read inside its owning module's forward"
        )
    check_tensor(OP, "weight", weight, dtypes=FLOAT_DTYPES, ndim=2, shape=(None, h.shape[1]))
    check_same(OP, [("h", h), ("weight", weight)], dtype=True)
    check_tensor(OP, "target", target, dtypes=(torch.int64, torch.int32), shape=(h.shape[0],))
    check_same(OP, [("h", h), ("weight", weight), ("target", target)])
    check_device(OP, h)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise ValueError(f"{OP}: argument 'ignore_index' must be an int, got {ignore_index!r}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"{OP}: argument 'chunk_size' must be None or an int >= 1, got {chunk_size!r}")
    if process_group is not None and not (dist.is_available() and dist.is_initialized()):
        raise ValueError(f"{OP}: argument 'process_group' was given but torch.distributed is not initialised")


def _check_targets_on_cpu(target: Tensor, ignore_index: int, vocab_total: int) -> None:
    """Reject ids outside [0, vocab_total) that are not ignore_index. Only for CPU tensors, where it
    costs no sync; on CUDA such rows make the loss NaN instead (see the module docstring)."""
    bad = (target != ignore_index) & ((target < 0) | (target >= vocab_total))
    if bool(bad.any()):
        pos = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"{OP}: argument 'target' has {int(target[pos])} at position {pos}, outside "
            f"[0, {vocab_total}) and not ignore_index={ignore_index}"
        )


def fused_linear_cross_entropy(
    h: Tensor,
    weight: Tensor,
    target: Tensor,
    ignore_index: int = IGNORE_INDEX,
    process_group=None,
    chunk_size: Optional[int] = None,
) -> Tensor:
    """Mean cross-entropy of h @ weight.T over the targets that are not ignore_index (Triton).

        loss = (1 / N) * sum_{t : target[t] != ignore_index} logsumexp(z_t) - z_t[target[t]],
        z_t = h[t] @ weight.T,   N = max(1, #counted tokens)

    Args:
        h: [T, D] hidden states, fp32 / bf16 / fp16.
        weight: [V, D] output head; with process_group, this rank's [V_local, D] shard
            (rows [rank * V_local, (rank + 1) * V_local) of the full head). A weight of another float
            dtype than h (fp32 master weights with bf16 activations) is cast to h's dtype first,
            with the gradient flowing back through the cast, as the reference does.
        target: [T] int64 or int32 global class ids in [0, V) (or [0, V_local * world)), or ignore_index.
        ignore_index: targets with this value add no loss, no gradient and are not counted in N.
        process_group: vocab-parallel group, or None. h and target must be the same on every rank;
            the returned loss and gradient for h are complete on every rank.
        chunk_size: rows of logits materialised at once; None picks `default_chunk_size(T, V_local,
            h.element_size())` (a 256 MiB block).

    Returns:
        0-dim fp32 loss; exactly 0 (with zero gradients), not NaN, when every target is ignored.
        Gradients are computed during this call only when h or weight requires grad.
    """
    if (
        isinstance(weight, Tensor)
        and isinstance(h, Tensor)
        and weight.dtype != h.dtype
        and weight.is_floating_point()
        and h.is_floating_point()
    ):
        weight = weight.to(h.dtype)
    _check_inputs(h, weight, target, ignore_index, process_group, chunk_size)
    world = 1 if process_group is None else dist.get_world_size(process_group)
    if not target.is_cuda and not torch.compiler.is_compiling():  # reads the data: eager CPU calls only
        _check_targets_on_cpu(target, ignore_index, weight.shape[0] * world)
    if chunk_size is None:
        chunk_size = default_chunk_size(h.shape[0], weight.shape[0], h.element_size())
    # Gradients are computed in the forward only when h or weight will need one; evaluation runs the
    # statistics alone, no gradient kernel and no gradient matmuls.
    grad = torch.is_grad_enabled()
    group_name = None if process_group is None else process_group.group_name
    return _flce_op(
        h, weight, target, ignore_index, group_name, chunk_size, grad and h.requires_grad, grad and weight.requires_grad
    )[0]
