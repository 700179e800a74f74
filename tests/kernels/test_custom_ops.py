"""Every Triton kernel is a torch custom op (kernels/library.py): torch.library's own checks (schema,
fake implementation, autograd registration, AOT dispatch), meta tensors, the op-level autocast rule,
and torch.compile over whole models with zero graph breaks, on both backends."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo

from megatrain.kernels import activation, cross_entropy, iha, lowrank, norm, projected_adam, rotary, sparse_lowrank
from megatrain.models.config import ModelConfig
from megatrain.models.transformer import Transformer

from .kernel_testing import fresh_generator, randn
from .kernel_testing import triton_backend  # noqa: F401  (the fixture)

pytestmark = pytest.mark.cpu_tensors  # meta tensors, CPU autocast and the interpreter's compile path

# Every custom op, with the kernel file that defines it.
OPS = {
    "rms_norm": norm,
    "rms_norm_backward": norm,
    "rope": rotary,
    "swiglu": activation,
    "swiglu_backward": activation,
    "fused_linear_cross_entropy": cross_entropy,
    "lowrank_linear": lowrank,
    "lowrank_linear_backward": lowrank,
    "sparse_lowrank_linear": sparse_lowrank,
    "sparse_lowrank_linear_backward": sparse_lowrank,
    "iha_flash_attention": iha,
    "iha_flash_attention_backward": iha,
    "projected_adam_update": projected_adam,
}


def _samples(gen) -> dict[str, tuple]:
    """Small arguments for each forward op, by op name (inputs that take gradients require them)."""

    def leaf(shape, dtype=torch.float32, scale=1.0):
        return randn(gen, shape, dtype, scale).requires_grad_()

    x = leaf((2, 5, 16))
    q, k = leaf((1, 4, 6, 16)), leaf((1, 2, 6, 16))
    angles = randn(gen, (6, 8))
    index = torch.randperm(16 * 12, generator=gen)[:20].sort().values
    pseudo = [leaf((1, 2, 2, 5, 16), scale=0.5) for _ in range(3)]  # [B, H, P, N, d]
    weight = randn(gen, (12, 16))
    return {
        "rms_norm": (x, leaf((16,)), leaf((2, 5, 16)), 1e-6, True),
        "rope": (q, k, angles.cos(), angles.sin(), False),
        "swiglu": (leaf((3, 7)), leaf((3, 7))),
        "fused_linear_cross_entropy": (
            leaf((9, 16)),
            leaf((40, 16), scale=0.3),
            torch.randint(0, 40, (9,), generator=gen),
            -100,
            None,
            4,
            True,
            True,
        ),
        "lowrank_linear": (x, leaf((16, 4), scale=0.5), leaf((4, 12), scale=0.5), leaf((12,)), True, True),
        "sparse_lowrank_linear": (x, leaf((16, 4), scale=0.5), leaf((4, 12), scale=0.5), leaf((20,)), index, 0.5),
        "iha_flash_attention": (*pseudo, "causal", None),
        "projected_adam_update": (
            weight,
            randn(gen, (4, 16)),
            randn(gen, (12, 4)),
            randn(gen, (12, 4)),
            randn(gen, (12, 4)).abs(),
            "right",
            0.9,
            0.999,
            1e-8,
            1e-3,
            0.25,
            0.0,
            True,
            None,
            None,
            1.0,
        ),
    }


def test_every_kernel_file_registers_its_ops():
    for name in OPS:
        assert hasattr(torch.ops.megatrain, name), f"torch.ops.megatrain.{name} is not registered"


@pytest.mark.parametrize("op", sorted(_samples(torch.Generator().manual_seed(0))))
def test_opcheck(op, triton_backend):  # noqa: F811
    """torch.library.opcheck: the schema matches what the op does (no undeclared mutation or
    aliasing), the fake implementation gives the real outputs' shapes, dtypes and strides, autograd is
    registered, and AOT dispatch (what torch.compile traces) runs it, with static and dynamic shapes."""
    _, gen = fresh_generator()
    args = _samples(gen)[op]
    torch.library.opcheck(getattr(torch.ops.megatrain, op).default, args)


def test_ops_take_meta_tensors():
    """On the meta device an op returns its outputs' shapes and dtypes without running a kernel (the
    fake implementation), so a model built on `meta` traces through the Triton path."""
    meta = {
        name: tuple(a.detach().to("meta") if isinstance(a, torch.Tensor) else a for a in args)
        for name, args in _samples(torch.Generator().manual_seed(1)).items()
    }
    y, h, rstd = torch.ops.megatrain.rms_norm(*meta["rms_norm"])
    assert (y.device.type, y.shape, h.shape, rstd.shape) == ("meta", (2, 5, 16), (2, 5, 16), (10,))
    q_rot, k_rot = torch.ops.megatrain.rope(*meta["rope"])
    assert (q_rot.shape, k_rot.shape) == ((1, 4, 6, 16), (1, 2, 6, 16))
    loss, dh, dw = torch.ops.megatrain.fused_linear_cross_entropy(*meta["fused_linear_cross_entropy"])
    assert (loss.shape, loss.dtype, dh.shape, dw.shape) == ((), torch.float32, (9, 16), (40, 16))
    assert torch.ops.megatrain.lowrank_linear(*meta["lowrank_linear"])[0].shape == (2, 5, 12)
    assert torch.ops.megatrain.sparse_lowrank_linear(*meta["sparse_lowrank_linear"]).shape == (2, 5, 12)
    out, lse = torch.ops.megatrain.iha_flash_attention(*meta["iha_flash_attention"])
    assert (out.shape, lse.shape) == ((1, 2, 2, 5, 16), (1, 2, 10))


def test_op_autocast_rules(triton_backend):  # noqa: F811
    """Called directly under CPU autocast, each op applies its kernels/autocast.py rule: the
    matmul-shaped ones run in the autocast dtype, the norms and elementwise ones keep their inputs."""
    _, gen = fresh_generator()
    samples = _samples(gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.ops.megatrain.lowrank_linear(*samples["lowrank_linear"])[0].dtype == torch.bfloat16
        assert torch.ops.megatrain.sparse_lowrank_linear(*samples["sparse_lowrank_linear"]).dtype == torch.bfloat16
        loss, dh, _ = torch.ops.megatrain.fused_linear_cross_entropy(*samples["fused_linear_cross_entropy"])
        assert loss.dtype == torch.float32 and dh.dtype == torch.bfloat16
        assert torch.ops.megatrain.iha_flash_attention(*samples["iha_flash_attention"])[0].dtype == torch.bfloat16
        assert torch.ops.megatrain.rms_norm(*samples["rms_norm"])[0].dtype == torch.float32
        assert torch.ops.megatrain.swiglu(*samples["swiglu"]).dtype == torch.float32
        assert torch.ops.megatrain.rope(*samples["rope"])[0].dtype == torch.float32


# Models covering every kernel: the four projection kinds with kernels, MHA with GQA, IHA.
MODELS = {
    "dense-gqa": dict(kv_heads=2),
    "cola": dict(linear="cola"),
    "sltrain": dict(linear="sltrain"),
    "lora": dict(linear="lora"),
    "iha": dict(attention="iha"),
}


def _model(name: str) -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig(preset="tiny", vocab_size=97, max_seq_len=64, **MODELS[name]))


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("name", MODELS)
def test_compiled_model_has_no_graph_breaks(name, backend, monkeypatch):
    """torch._dynamo.explain over a training forward (the loss through the fused cross-entropy): one
    graph, zero breaks, and with the Triton backend each kernel appears as one megatrain op."""
    monkeypatch.setenv("MEGATRAIN_KERNELS", backend)
    torch._dynamo.reset()
    model = _model(name)
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(2))
    explained = torch._dynamo.explain(lambda ids: model(ids, labels=ids))(ids)
    reasons = [str(b.reason).splitlines()[0] for b in explained.break_reasons]
    assert explained.graph_break_count == 0 and explained.graph_count == 1, reasons
    targets = {str(node.target) for graph in explained.graphs for node in graph.graph.nodes}
    ours = {t for t in targets if t.startswith("megatrain.")}
    if backend == "triton":
        attention = "megatrain.iha_flash_attention.default" if name == "iha" else "megatrain.rope.default"
        assert {
            "megatrain.rms_norm.default",
            "megatrain.swiglu.default",
            attention,
            "megatrain.fused_linear_cross_entropy.default",
        } <= ours, sorted(targets)
    else:
        assert not ours, ours


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("name", ["dense-gqa", "iha"])
def test_compiled_training_step_matches_eager(name, backend, monkeypatch):
    """torch.compile (AOT autograd, eager kernels: backend aot_eager) of forward + backward through the
    Triton ops, or through the reference, gives the eager loss and gradients."""
    monkeypatch.setenv("MEGATRAIN_KERNELS", backend)
    torch._dynamo.reset()
    model = _model(name)
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(3))
    eager_loss = model(ids, labels=ids)
    eager_loss.backward()
    eager = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    loss = compiled(ids, labels=ids)
    loss.backward()
    torch.testing.assert_close(loss, eager_loss, rtol=1e-6, atol=1e-6)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, eager[n], rtol=1e-5, atol=1e-6, msg=n)


# The KernelOp of each forward op with an autograd formula (the object the public functions call).
EAGER_OPS = {
    "rms_norm": lambda: norm._rms_norm_op,
    "rope": lambda: rotary._rope_op,
    "swiglu": lambda: activation._swiglu_op,
    "fused_linear_cross_entropy": lambda: cross_entropy._flce_op,
    "lowrank_linear": lambda: lowrank._lowrank_op,
    "sparse_lowrank_linear": lambda: sparse_lowrank._sparse_lowrank_op,
    "iha_flash_attention": lambda: iha._attention_op,
}


def _run_and_differentiate(fn, args: tuple) -> tuple[list, list, list]:
    """Call fn on fresh leaf copies of args; backward of a fixed random weighting of every floating output;
    returns (outputs, input gradients, grad_fn names)."""
    leaves = tuple(
        a.detach().clone().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a for a in args
    )
    out = fn(*leaves)
    outs = list(out) if isinstance(out, (tuple, list)) else [out]
    weights = torch.Generator().manual_seed(7)
    total = 0.0
    for o in outs:
        if o.requires_grad and o.is_floating_point() and o.numel():
            total = total + (o.float() * torch.randn(o.shape, generator=weights)).sum()
    total.backward()
    grads = [a.grad for a in leaves if isinstance(a, torch.Tensor) and a.requires_grad]
    names = [o.grad_fn.name() for o in outs if o.grad_fn is not None]
    return [o.detach() for o in outs], grads, names


@pytest.mark.parametrize("op", sorted(EAGER_OPS))
def test_eager_fast_path_equals_the_op(op, triton_backend):  # noqa: F811
    """In eager mode a KernelOp runs its implementation under an autograd.Function (kernels/library.py),
    not through torch's dispatcher: the same outputs and every input gradient as the op, bit for bit;
    torch.ops.megatrain.* and autocast still go through the op."""
    _, gen = fresh_generator()
    args = _samples(gen)[op]
    kernel = EAGER_OPS[op]()
    fast_out, fast_grads, fast_names = _run_and_differentiate(kernel, args)
    op_out, op_grads, op_names = _run_and_differentiate(getattr(torch.ops.megatrain, op), args)
    assert len(fast_out) == len(op_out) and len(fast_grads) == len(op_grads) > 0
    for a, b in zip(fast_out + fast_grads, op_out + op_grads):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    assert fast_names and all(name.endswith("_eagerBackward") for name in fast_names), fast_names
    assert not any(name.endswith("_eagerBackward") for name in op_names), op_names
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the op's autocast rule applies: the op path
        _, _, names = _run_and_differentiate(kernel, args)
    assert not any(name.endswith("_eagerBackward") for name in names), names
    with torch.no_grad():  # nothing to differentiate: the implementation, no graph
        out = kernel(*args)
    assert all(o.grad_fn is None for o in (out if isinstance(out, (tuple, list)) else [out]))
