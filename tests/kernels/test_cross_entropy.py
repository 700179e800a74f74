"""The Triton fused linear cross-entropy against torch's F.cross_entropy and the reference: loss and both
gradients, fp32 and bf16, odd sizes, chunking, ignore_index, the no-grad path, input checks, and
vocab parallelism over 2 gloo processes against one process.

Without a GPU the kernels run through Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1).
Every test draws fresh inputs; the seed is in every failure message so a failure can be replayed.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatrain import kernels
from megatrain.kernels import cross_entropy, reference
from tests.conftest import REPO, child_env, free_port

IGNORE = -100
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
RTOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
# bf16 gradients get twice the loss tolerance: the kernel (like any bf16 matmul) rounds the logits to
# bf16, half an ulp is up to ~0.016 for logits near 8, so softmax entries carry ~1% relative error.
# Measured over 300 seeds: up to 0.87 of a 1e-2 budget, 0.03 for the loss.
GRAD_RTOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
UPSTREAM = 3.7  # a non-1 upstream gradient, so backward's scaling is checked too


@pytest.fixture(autouse=True)
def triton_backend(monkeypatch):
    monkeypatch.setenv("MEGATRAIN_KERNELS", "triton")
    monkeypatch.setenv("MEGATRAIN_KERNELS_POISON", "1")  # unwritten outputs are NaN, not stale memory


from .kernel_testing import fresh_seed  # noqa: E402


def make_inputs(seed: int, tokens: int, hidden: int, vocab: int, dtype=torch.float32, device=DEVICE):
    """h [T, D], weight [V, D] (logits of std ~2), target [T] with ~1/4 ignored, at least one of each."""
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(tokens, hidden, generator=gen)
    weight = torch.randn(vocab, hidden, generator=gen) * (2.0 / hidden**0.5)
    target = torch.randint(0, vocab, (tokens,), generator=gen)
    target[torch.rand(tokens, generator=gen) < 0.25] = IGNORE
    target[0] = int(torch.randint(0, vocab, (1,), generator=gen))
    if tokens > 1:
        target[1] = IGNORE
    return h.to(device, dtype), weight.to(device, dtype), target.to(device)


def loss_and_grads(fn, h, weight, target, upstream=UPSTREAM):
    """fn(h, weight, target) -> (loss, dloss*upstream/dh, dloss*upstream/dweight) on fresh leaves."""
    h, weight = h.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    loss = fn(h, weight, target)
    grad_h, grad_w = torch.autograd.grad(loss * upstream, (h, weight))
    return loss.detach(), grad_h, grad_w


def torch_cross_entropy(h, weight, target):
    """The definition: F.cross_entropy on fp32 logits of the (possibly bf16) inputs."""
    return F.cross_entropy(h.float() @ weight.float().T, target, ignore_index=IGNORE)


def assert_close(actual, expected, rtol, what, seed):
    """Relative comparison, with the absolute slack scaled to the largest expected value (gradients
    have many entries near 0 whose relative error means nothing)."""
    actual, expected = actual.detach().float().cpu(), expected.detach().float().cpu()
    assert actual.shape == expected.shape, f"{what} (seed {seed}): shape {actual.shape} vs {expected.shape}"
    assert torch.isfinite(actual).all(), f"{what} (seed {seed}): non-finite values"
    atol = rtol * float(expected.abs().max()) if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=lambda m: f"{what} (seed {seed}): {m}")


# ---- single process ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(
    "tokens, hidden, vocab, max_block_v, logits_budget_rows",
    [
        (7, 33, 1000, 4096, None),  # one chunk, each row in one 1024-wide tile
        (7, 33, 1000, 256, None),  # 4 column tiles, the last one partial: the online max/sum
        (130, 33, 517, 128, 48),  # 5 tiles per row; the default rule picks 32 rows: 5 chunks, last of 2
    ],
    ids=["T7-V1000", "T7-V1000-tiled", "T130-V517-tiled-chunked"],
)
def test_matches_cross_entropy_and_reference(
    monkeypatch, tokens, hidden, vocab, max_block_v, logits_budget_rows, dtype
):
    # Tests use small vocabularies, so the column-tile width is lowered to make rows span several tiles.
    monkeypatch.setattr(cross_entropy, "MAX_BLOCK_V", max_block_v)
    if logits_budget_rows is not None:
        monkeypatch.setattr(cross_entropy, "LOGITS_BUDGET_BYTES", logits_budget_rows * vocab * dtype.itemsize)
        assert cross_entropy.default_chunk_size(tokens, vocab, dtype.itemsize) == 32
    seed = fresh_seed()
    h, weight, target = make_inputs(seed, tokens, hidden, vocab, dtype)

    loss, grad_h, grad_w = loss_and_grads(
        lambda a, b, t: kernels.fused_linear_cross_entropy(a, b, t, IGNORE), h, weight, target
    )
    assert loss.dim() == 0 and loss.dtype == torch.float32
    assert grad_h.dtype == dtype and grad_w.dtype == dtype

    for name, fn in (
        ("F.cross_entropy", torch_cross_entropy),
        ("reference", lambda a, b, t: reference.fused_linear_cross_entropy(a, b, t, IGNORE)),
    ):
        exp_loss, exp_h, exp_w = loss_and_grads(fn, h, weight, target)
        assert_close(loss, exp_loss, RTOL[dtype], f"loss vs {name}", seed)
        assert_close(grad_h, exp_h, GRAD_RTOL[dtype], f"grad h vs {name}", seed)
        assert_close(grad_w, exp_w, GRAD_RTOL[dtype], f"grad weight vs {name}", seed)


@pytest.mark.parametrize("chunk_size", [1, 5, 13, 1000])
def test_chunk_size_does_not_change_the_result(chunk_size):
    seed = fresh_seed()
    h, weight, target = make_inputs(seed, 13, 24, 77)
    expected = loss_and_grads(torch_cross_entropy, h, weight, target)
    got = loss_and_grads(
        lambda a, b, t: cross_entropy.fused_linear_cross_entropy(a, b, t, chunk_size=chunk_size), h, weight, target
    )
    for what, a, e in zip(("loss", "grad h", "grad weight"), got, expected):
        assert_close(a, e, 1e-5, f"{what}, chunk_size={chunk_size}", seed)


def test_default_chunk_size_rule():
    # A [C, V] block within LOGITS_BUDGET_BYTES, C a power of two, at least 1, at most T.
    budget = cross_entropy.LOGITS_BUDGET_BYTES
    for tokens, vocab, size in ((16384, 128256, 2), (8, 50000, 4), (3, 10, 2), (100000, 32000, 2), (4096, 2**27, 4)):
        rows = cross_entropy.default_chunk_size(tokens, vocab, size)
        assert 1 <= rows <= tokens
        assert rows == tokens or rows & (rows - 1) == 0
        assert rows == 1 or rows * vocab * size <= budget
    assert cross_entropy.default_chunk_size(16384, 128256, 2) == 1024  # 250.5 MiB of bf16 logits
    assert cross_entropy.default_chunk_size(16384, 32000, 2) == 4096
    assert cross_entropy.default_chunk_size(3, 10, 2) == 3


@pytest.mark.parametrize("which", ["h", "weight"])
def test_only_one_input_requires_grad(which):
    seed = fresh_seed()
    h, weight, target = make_inputs(seed, 11, 16, 45)
    _, exp_h, exp_w = loss_and_grads(torch_cross_entropy, h, weight, target)
    leaf = (h if which == "h" else weight).clone().requires_grad_()
    args = (leaf, weight, target) if which == "h" else (h, leaf, target)
    (grad,) = torch.autograd.grad(kernels.fused_linear_cross_entropy(*args) * UPSTREAM, leaf)
    assert_close(grad, exp_h if which == "h" else exp_w, 1e-5, f"grad {which} alone", seed)


def test_no_grad_path_gives_the_same_loss_without_gradient_work(monkeypatch):
    seed = fresh_seed()
    h, weight, target = make_inputs(seed, 19, 16, 300)
    with_grad = kernels.fused_linear_cross_entropy(h.clone().requires_grad_(), weight, target)

    def no_gradient_kernel(*args, **kwargs):
        raise AssertionError("the gradient kernel ran although no gradient was needed")

    row_stats = cross_entropy._row_stats

    def stats_without_gradient(*args):
        assert args[-1] is None, "the forward kernel wrote gradients although none was needed"
        return row_stats(*args)

    monkeypatch.setattr(cross_entropy, "_logits_to_grad_", no_gradient_kernel)
    monkeypatch.setattr(cross_entropy, "_row_stats", stats_without_gradient)
    with torch.no_grad():
        in_no_grad = kernels.fused_linear_cross_entropy(h.clone().requires_grad_(), weight, target)
    plain = kernels.fused_linear_cross_entropy(h, weight, target)  # nothing requires grad
    assert not in_no_grad.requires_grad and not plain.requires_grad
    assert in_no_grad.item() == with_grad.item() == plain.item(), f"seed {seed}"
    assert_close(plain, torch_cross_entropy(h, weight, target), 1e-5, "no-grad loss", seed)


def test_all_ignored_gives_zero_loss_and_zero_gradients():
    seed = fresh_seed()
    h, weight, _ = make_inputs(seed, 9, 16, 40)
    target = torch.full((9,), IGNORE, device=DEVICE)
    h, weight = h.requires_grad_(), weight.requires_grad_()
    loss = kernels.fused_linear_cross_entropy(h, weight, target)
    assert loss.item() == 0.0 and loss.requires_grad
    (loss * UPSTREAM).backward()
    assert torch.count_nonzero(h.grad) == 0 and torch.count_nonzero(weight.grad) == 0  # NaN counts as nonzero


def test_an_outer_autocast_region_runs_the_op_in_its_dtype():
    """Under torch.autocast the op follows the rule of matmul-shaped ops (kernels/autocast.py): h and
    weight are cast to the autocast dtype, the loss stays fp32, the gradients reach the fp32 inputs in
    fp32, exactly as a call on bf16 inputs outside autocast, and within bf16 tolerance of fp32."""
    seed = fresh_seed()
    h, weight, target = make_inputs(seed, 10, 16, 60)
    on_bf16 = loss_and_grads(
        lambda a, b, t: kernels.fused_linear_cross_entropy(a.bfloat16(), b.bfloat16(), t), h, weight, target
    )
    fp32 = loss_and_grads(torch_cross_entropy, h, weight, target)

    def under_autocast(a, b, t):
        with torch.autocast(device_type=a.device.type, dtype=torch.bfloat16):
            return kernels.fused_linear_cross_entropy(a, b, t)

    for what, got, exp, exp32 in zip(
        ("loss", "grad h", "grad weight"), loss_and_grads(under_autocast, h, weight, target), on_bf16, fp32
    ):
        assert got.dtype == torch.float32
        assert_close(got, exp, 0.0, f"{what} under autocast", seed)
        assert_close(got, exp32, GRAD_RTOL[torch.bfloat16], f"{what} under autocast vs fp32", seed)


def test_int32_targets_and_a_custom_ignore_index():
    seed = fresh_seed()
    h, weight, target = make_inputs(seed, 12, 16, 50)
    target[target == IGNORE] = 7  # class 7 is now "ignored"
    got = kernels.fused_linear_cross_entropy(h, weight, target.int(), ignore_index=7)
    expected = F.cross_entropy(h @ weight.T, target, ignore_index=7)
    assert_close(got, expected, 1e-5, "loss with ignore_index=7", seed)


def test_target_outside_the_vocabulary():
    h, weight, target = make_inputs(fresh_seed(), 5, 8, 20)
    target[3] = 20
    if not target.is_cuda:  # free to check on CPU: a clear error
        with pytest.raises(ValueError, match=r"fused_linear_cross_entropy: argument 'target' has 20 at position 3"):
            kernels.fused_linear_cross_entropy(h, weight, target)


def test_target_outside_the_vocabulary_without_the_check_makes_the_loss_nan(monkeypatch):
    # What CUDA tensors get (checking there would cost a sync): the row matches no column, loss NaN.
    monkeypatch.setattr(cross_entropy, "_check_targets_on_cpu", lambda *args: None)
    h, weight, target = make_inputs(fresh_seed(), 5, 8, 20)
    target[3] = -1
    assert torch.isnan(kernels.fused_linear_cross_entropy(h, weight, target))


@pytest.mark.parametrize("grad", [True, False])
def test_reference_path_without_the_host_check_makes_the_loss_nan(monkeypatch, grad):
    """The torch path on a GPU (where reading the targets would stall the step) leaves them unread: valid
    targets give the checked path's loss and gradients bit for bit, an id outside the vocabulary a NaN loss."""
    h, weight, target = make_inputs(fresh_seed(), 9, 8, 20)
    h.requires_grad_(grad)
    weight.requires_grad_(grad)
    checked = reference.fused_linear_cross_entropy(h, weight, target, chunk_size=4)
    if grad:
        checked.backward()
        grads = h.grad.clone(), weight.grad.clone()
        h.grad = weight.grad = None
    monkeypatch.setattr(reference, "_targets_readable", lambda target: False)
    unchecked = reference.fused_linear_cross_entropy(h, weight, target, chunk_size=4)
    assert torch.equal(checked, unchecked)
    if grad:
        unchecked.backward()
        assert torch.equal(h.grad, grads[0]) and torch.equal(weight.grad, grads[1])
    for bad in (-1, 20):
        poisoned = target.clone()
        poisoned[5] = bad
        loss = reference.fused_linear_cross_entropy(h, weight, poisoned, chunk_size=4)
        assert torch.isnan(loss), bad
        if grad:
            loss.backward()  # no out-of-range gather


def _bad_inputs():
    h, weight, target = make_inputs(0, 4, 8, 10)
    return [
        ("h", (h[0], weight, target)),
        ("h", (h.long(), weight, target)),
        ("weight", (h, weight[:, :5], target)),
        ("weight", (h, weight.long(), target)),
        ("weight", (h, weight.new_empty(0), target)),  # a ZeRO-3 shard read outside its module
        ("target", (h, weight, target[:3])),
        ("target", (h, weight, target.float())),
    ]


@pytest.mark.parametrize("index", range(len(_bad_inputs())))
def test_bad_inputs_name_the_op_and_the_argument(index):
    name, args = _bad_inputs()[index]
    with pytest.raises(ValueError, match=rf"fused_linear_cross_entropy: argument '{name}'"):
        kernels.fused_linear_cross_entropy(*args)


def test_bad_chunk_size_and_process_group():
    h, weight, target = make_inputs(0, 4, 8, 10)
    with pytest.raises(ValueError, match=r"fused_linear_cross_entropy: argument 'chunk_size'.*got 0"):
        cross_entropy.fused_linear_cross_entropy(h, weight, target, chunk_size=0)
    if not dist.is_initialized():
        with pytest.raises(ValueError, match=r"fused_linear_cross_entropy: argument 'process_group'"):
            kernels.fused_linear_cross_entropy(h, weight, target, process_group=object())


# ---- vocab parallel: 2 gloo processes against one ------------------------------------------------

PARALLEL_WORLD, PARALLEL_TOKENS, PARALLEL_HIDDEN, PARALLEL_VOCAB = 2, 37, 33, 2 * 517


def _vocab_parallel_worker(rank: int, world: int, port: int, seed: int, out_path: str) -> None:
    """Runs in a child process: this rank's half of the head, every variant, results saved to out_path."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        h, weight, target = make_inputs(seed, PARALLEL_TOKENS, PARALLEL_HIDDEN, PARALLEL_VOCAB, device="cpu")
        rows = PARALLEL_VOCAB // world
        shard = weight[rank * rows : (rank + 1) * rows]
        group = dist.group.WORLD
        cross_entropy.MAX_BLOCK_V = 128  # 5 column tiles per 517-wide shard row
        variants = {
            # Through the dispatch (default chunk size: one chunk) ...
            "triton": ("triton", lambda a, b, t: kernels.fused_linear_cross_entropy(a, b, t, IGNORE, group)),
            "torch": ("torch", lambda a, b, t: kernels.fused_linear_cross_entropy(a, b, t, IGNORE, group)),
            # ... and directly, in chunks of 16 rows (3 chunks, so per-chunk communication is exercised).
            "triton-chunked": (
                "triton",
                lambda a, b, t: cross_entropy.fused_linear_cross_entropy(
                    a, b, t, IGNORE, process_group=group, chunk_size=16
                ),
            ),
            "reference-chunked": (
                "torch",
                lambda a, b, t: reference.fused_linear_cross_entropy(
                    a, b, t, IGNORE, chunk_size=16, process_group=group
                ),
            ),
        }
        results = {}
        for name, (backend, fn) in variants.items():
            os.environ["MEGATRAIN_KERNELS"] = backend
            loss, grad_h, grad_w = loss_and_grads(fn, h, shard, target)
            with torch.no_grad():
                no_grad_loss = fn(h, shard, target)
            results[name] = {"loss": loss, "no_grad_loss": no_grad_loss, "grad_h": grad_h, "grad_w": grad_w}
        torch.save(results, out_path)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_vocab_parallel_two_gloo_processes_match_one_process(tmp_path):
    seed, port, world = fresh_seed(), free_port(), PARALLEL_WORLD
    env = child_env()
    # The children hold CPU tensors (gloo), so Triton runs through the interpreter there even on a GPU box.
    env.update(TRITON_INTERPRET="1", MEGATRAIN_KERNELS="triton", MEGATRAIN_KERNELS_POISON="1")
    code = (
        "import sys; from tests.kernels.test_cross_entropy import _vocab_parallel_worker as run; "
        "run(*map(int, sys.argv[1:5]), sys.argv[5])"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(rank), str(world), str(port), str(seed), str(tmp_path / f"rank{rank}.pt")],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(world)
    ]
    logs = []
    for proc in procs:
        try:
            logs.append(proc.communicate(timeout=240)[0])
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
    for rank, (proc, log) in enumerate(zip(procs, logs)):
        assert proc.returncode == 0, f"rank {rank} exited {proc.returncode} (seed {seed})\n{log[-6000:]}"

    h, weight, target = make_inputs(seed, PARALLEL_TOKENS, PARALLEL_HIDDEN, PARALLEL_VOCAB, device="cpu")
    exp_loss, exp_h, exp_w = loss_and_grads(torch_cross_entropy, h, weight, target)
    rows = PARALLEL_VOCAB // world
    # Both shards must own some targets, or the cross-rank target-logit sum is not exercised.
    assert all(((target >= r * rows) & (target < (r + 1) * rows)).any() for r in range(world)), f"seed {seed}"
    for rank in range(world):
        results = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert set(results) == {"triton", "torch", "triton-chunked", "reference-chunked"}
        for name, got in results.items():
            what = f"rank {rank}, {name}"
            assert_close(got["loss"], exp_loss, 1e-5, f"{what}: loss", seed)
            assert_close(got["no_grad_loss"], exp_loss, 1e-5, f"{what}: no-grad loss", seed)
            assert_close(got["grad_h"], exp_h, 1e-5, f"{what}: grad h", seed)
            assert_close(
                got["grad_w"], exp_w[rank * rows : (rank + 1) * rows], 1e-5, f"{what}: grad weight shard", seed
            )


def test_fp32_weight_with_bf16_activations_is_cast(monkeypatch):
    """fp32 master weights with bf16 activations (autocast): the weight is cast, gradients flow back."""
    monkeypatch.setenv("MEGATRAIN_KERNELS", "triton")
    g = torch.Generator().manual_seed(fresh_seed())
    h = torch.randn(9, 33, generator=g).to(torch.bfloat16).requires_grad_()
    weight = (torch.randn(101, 33, generator=g) * 0.1).requires_grad_()
    target = torch.randint(0, 101, (9,), generator=g)
    loss = kernels.fused_linear_cross_entropy(h, weight, target)
    loss.backward()
    ref = torch.nn.functional.cross_entropy(h.detach().float() @ weight.detach().to(torch.bfloat16).float().T, target)
    torch.testing.assert_close(loss, ref, rtol=1e-2, atol=1e-2)
    assert weight.grad.dtype == torch.float32 and torch.isfinite(weight.grad).all()


def test_a_second_backward_through_one_call_raises():
    """The gradients are computed in the forward and scaled in place by backward (no second [V, D]
    buffer): a second backward through the same call (retain_graph=True) would scale them twice, so
    it raises instead."""
    h, weight, target = make_inputs(fresh_seed(), 6, 8, 30)
    loss = kernels.fused_linear_cross_entropy(h.requires_grad_(), weight.requires_grad_(), target)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match=r"fused_linear_cross_entropy: backward ran twice"):
        loss.backward()
