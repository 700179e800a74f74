"""megatrain's model and kernels under torch.autocast (bf16 and fp16), on both kernel backends.

A user's own training or evaluation loop wraps the model in `torch.autocast`; every op in
megatrain.kernels then follows its rule (kernels/autocast.py, applied by the dispatcher): the
matmul-shaped ops run on inputs cast to the autocast dtype, the norms and elementwise ops keep their
inputs and promote. The model test runs each attention kind x projection kind x dtype forward and
backward under CPU autocast and compares the loss and every gradient with the fp32 run of the same
model (the reference backend's); it also checks that the residual stream stays fp32 (fp32 weights)
while the branches run in the autocast dtype. The Triton interpreter is slow, so the Triton backend
runs a subset of models that still reaches every op (rms_norm, rope, swiglu and the loss in all;
lowrank_linear with and without SiLU, sparse_lowrank_linear, iha_attention); the op tests run every
op under autocast on both backends at tiny sizes.
"""

from __future__ import annotations

import pytest
import torch

from megatrain import kernels
from megatrain.kernels import autocast as kernel_autocast
from megatrain.kernels import reference
from megatrain.models.config import ModelConfig
from megatrain.models.transformer import Transformer
from tests.kernels.kernel_testing import autograd_node_names, kernel_node_names

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
ATTENTION = ("mha", "gqa", "iha")
LINEAR = ("dense", "cola", "sltrain", "relora", "lora")
VOCAB = 128

# Against the fp32 run: the loss's relative error, and each parameter gradient's relative error (norm
# of the difference over the norm of the fp32 gradient). Measured worst over every case here, both
# backends: bf16 2.4e-4 (loss) and 4.3e-2 (CoLA's factors through the Triton kernels), fp16 1.4e-5 and
# 5.3e-3 (autocast dtype's unit roundoff: bf16 3.9e-3, fp16 4.9e-4).
LOSS_RTOL = {torch.bfloat16: 2e-3, torch.float16: 5e-4}
GRAD_RTOL = {torch.bfloat16: 8e-2, torch.float16: 1.5e-2}


def build(attention: str, linear: str) -> Transformer:
    """A 2-layer dim-64 model whose every parameter is perturbed from its init (so LoRA's and SLTrain's
    zero factors and IHA's identity mixes carry gradient through every path)."""
    cfg = ModelConfig(
        dim=64,
        layers=2,
        heads=4,
        kv_heads=4 if attention == "mha" else 2,
        ffn_dim=176,
        vocab_size=VOCAB,
        max_seq_len=32,
        linear=linear,
        attention="iha" if attention == "iha" else "mha",
    )
    if linear in ("relora", "lora"):
        cfg.lowrank.dropout = 0.0  # the two runs must see the same function
    model = Transformer(cfg, seed=0)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=gen))
    return model


def batch(rows: int = 2, n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(2)
    return torch.randint(0, VOCAB, (rows, n), generator=gen), torch.randint(0, VOCAB, (rows, n), generator=gen)


def loss_and_grads(model: Transformer, ids, labels, dtype=None):
    """(loss, {name: grad} of the trainable parameters, streams, autograd node names) of one forward
    + backward, under CPU autocast to `dtype` (None: none). streams lists (branch, stream) dtypes: each
    block's un-added MLP output and residual stream, then the final norm's (y, h)."""
    model.zero_grad(set_to_none=True)
    streams = []
    hooks = [
        m.register_forward_hook(lambda mod, args, out: streams.append((out[0].dtype, out[1].dtype)))
        for m in (*model.blocks, model.norm)
    ]
    try:
        with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            loss = model(ids, labels=labels)
    finally:
        for h in hooks:
            h.remove()
    nodes = autograd_node_names(loss.grad_fn)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads, streams, nodes


def check_model(monkeypatch, backend: str, attention: str, linear: str, dtype, rows: int = 2):
    ids, labels = batch(rows)
    model = build(attention, linear)
    monkeypatch.setenv("MEGATRAIN_KERNELS", "torch")  # the fp32 run, on the oracle
    loss32, grads32, streams32, _ = loss_and_grads(model, ids, labels)
    monkeypatch.setenv("MEGATRAIN_KERNELS", backend)
    loss, grads, streams, nodes = loss_and_grads(model, ids, labels, dtype)

    assert loss.dtype == torch.float32
    assert abs(loss.item() - loss32.item()) <= LOSS_RTOL[dtype] * abs(loss32.item()), (loss.item(), loss32.item())
    assert grads.keys() == grads32.keys()
    for name, g32 in grads32.items():
        g = grads[name]
        assert g.dtype == torch.float32 and torch.isfinite(g).all(), name
        err = ((g - g32).norm() / g32.norm()).item()
        assert g32.norm() > 0 and err <= GRAD_RTOL[dtype], f"{name}: relative error {err:.3g}"
    # fp32 weights: every block's MLP branch ran in the autocast dtype, the stream it is added to (and
    # the final norm's output) stayed fp32 -- a Hugging Face Llama under autocast does the same.
    layers = len(model.blocks)
    assert streams32 == [(torch.float32, torch.float32)] * (layers + 1)
    assert streams == [(dtype, torch.float32)] * layers + [(torch.float32, torch.float32)], streams
    if backend == "triton":  # each kernel's custom op is in the autograd graph
        ops = [
            "rms_norm",
            "swiglu",
            "fused_linear_cross_entropy",
            "iha_flash_attention" if attention == "iha" else "rope",
        ]
        projection = {
            "cola": "lowrank_linear",
            "relora": "lowrank_linear",
            "lora": "lowrank_linear",
            "sltrain": "sparse_lowrank_linear",
        }.get(linear)
        ops += [projection] if projection is not None else []
        for op in ops:
            assert kernel_node_names(op) & nodes, f"{op} did not run the Triton kernel"


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("linear", LINEAR)
@pytest.mark.parametrize("attention", ATTENTION)
def test_model_under_autocast_matches_fp32(monkeypatch, attention, linear, dtype):
    check_model(monkeypatch, "torch", attention, linear, dtype)


# Every Triton op under autocast, in the fewest interpreted models (one batch row: ~15 s in all).
TRITON_CASES = [("mha", "cola", torch.bfloat16), ("gqa", "sltrain", torch.float16), ("iha", "lora", torch.bfloat16)]


@pytest.mark.parametrize(
    "attention,linear,dtype", TRITON_CASES, ids=["mha-cola-bf16", "gqa-sltrain-fp16", "iha-lora-bf16"]
)
def test_model_under_autocast_matches_fp32_triton(monkeypatch, attention, linear, dtype):
    check_model(monkeypatch, "triton", attention, linear, dtype, rows=1)


# ---- the ops, one by one ----------------------------------------------------------------------------


def _randn(gen, *shape, scale=1.0):
    return scale * torch.randn(shape, generator=gen)


def lower_case(op: str, gen):
    """(fp32 / int arguments, names of the arguments the rule casts) for a matmul-shaped op."""
    if op == "fused_linear_cross_entropy":
        return dict(
            h=_randn(gen, 9, 16),
            weight=_randn(gen, 24, 16, scale=0.3),
            target=torch.randint(0, 24, (9,), generator=gen),
        ), {"h", "weight"}
    if op == "lowrank_linear":
        return dict(
            x=_randn(gen, 2, 5, 16),
            a=_randn(gen, 16, 4, scale=0.3),
            b=_randn(gen, 4, 12, scale=0.3),
            bias=_randn(gen, 12),
        ), {"x", "a", "b", "bias"}
    if op == "sparse_lowrank_linear":
        index = torch.sort(torch.randperm(16 * 12, generator=gen)[:20]).values
        return dict(
            x=_randn(gen, 2, 5, 16),
            a=_randn(gen, 16, 4, scale=0.3),
            b=_randn(gen, 4, 12, scale=0.3),
            values=_randn(gen, 20),
            index=index,
            scale=0.5,
        ), {"x", "a", "b", "values"}
    if op == "iha_attention":
        heads, pseudo, n, d = 3, 2, 5, 8
        angles = torch.arange(n * pseudo)[:, None] * 0.3 ** torch.arange(d // 2)[None]
        q, k, v = (_randn(gen, 1, heads, n, d) for _ in range(3))
        mix_q, mix_k, mix_v = (_randn(gen, heads, heads, pseudo, scale=0.5) for _ in range(3))
        args = dict(
            q=q,
            k=k,
            v=v,
            mix_q=mix_q,
            mix_k=mix_k,
            mix_v=mix_v,
            collapse=_randn(gen, heads, pseudo, scale=0.5),
            cos=angles.cos(),
            sin=angles.sin(),
        )
        return args, {"q", "k", "v", "mix_q", "mix_k", "mix_v", "collapse"}  # cos, sin stay fp32
    raise KeyError(op)


LOWER_OPS = ("fused_linear_cross_entropy", "lowrank_linear", "sparse_lowrank_linear", "iha_attention")


def _leaves(args: dict, cast=(), dtype=None) -> dict:
    """Fresh copies: floating tensors named in `cast` converted to `dtype`, floating tensors that get a
    gradient (not the rotary tables) requiring grad."""
    out = {}
    for name, v in args.items():
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            v = v.detach().to(dtype if name in cast else v.dtype).clone()
            v.requires_grad_(name not in ("cos", "sin"))
        out[name] = v
    return out


def _grads(out, leaves: dict, upstream):
    names = [n for n, v in leaves.items() if isinstance(v, torch.Tensor) and v.requires_grad]
    return dict(zip(names, torch.autograd.grad(out, [leaves[n] for n in names], upstream)))


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("op", LOWER_OPS)
def test_matmul_shaped_op_runs_on_inputs_cast_to_the_autocast_dtype(monkeypatch, op, dtype, backend):
    """Under autocast the op equals itself called without autocast on its floating inputs cast to the
    autocast dtype (the rotary tables excepted): the same result, bit for bit, and the same gradients,
    which reach the fp32 leaves in fp32. A reference that ran its fp32 matmuls under the outer
    autocast, or a rule that cast cos/sin, would differ."""
    monkeypatch.setenv("MEGATRAIN_KERNELS", backend)
    gen = torch.Generator().manual_seed(3)
    args, cast = lower_case(op, gen)
    fn = getattr(kernels, op)
    leaves = _leaves(args)
    with torch.autocast("cpu", dtype=dtype):
        got = fn(**leaves)
    expected_leaves = _leaves(args, cast, dtype)
    expected = fn(**expected_leaves)
    assert got.dtype == expected.dtype == (torch.float32 if op == "fused_linear_cross_entropy" else dtype)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    upstream = _randn(gen, *got.shape).to(got.dtype)
    grads, expected_grads = _grads(got, leaves, upstream), _grads(expected, expected_leaves, upstream)
    assert grads.keys() == expected_grads.keys() and grads
    for name, g in grads.items():
        assert g.dtype == leaves[name].dtype, name
        torch.testing.assert_close(g, expected_grads[name].to(g.dtype), rtol=0, atol=0, msg=name)


def promote_cases(gen, dtype):
    """(op, arguments, expected result dtypes): a low-precision branch beside fp32 tensors."""
    x, w, res = _randn(gen, 2, 5, 16).to(dtype), 1 + 0.1 * _randn(gen, 16), _randn(gen, 2, 5, 16)
    q, k = _randn(gen, 2, 4, 5, 8).to(dtype), _randn(gen, 2, 2, 5, 8).to(dtype)
    angles = torch.arange(5)[:, None] * 0.3 ** torch.arange(4)[None]
    return [
        ("rms_norm", dict(x=res, weight=w), [torch.float32]),  # the embedding output (fp32)
        ("rms_norm", dict(x=x, weight=w, residual=res), [torch.float32, torch.float32]),  # branch + stream
        ("rms_norm", dict(x=x, weight=w, residual=x.detach().clone()), [dtype, dtype]),  # fp32 weight: no widening
        ("rope", dict(q=q, k=k, cos=angles.cos(), sin=angles.sin()), [dtype, dtype]),
        ("swiglu", dict(gate=x, up=x.detach().clone()), [dtype]),
        ("swiglu", dict(gate=x, up=res), [torch.float32]),
    ]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_norm_and_elementwise_ops_keep_their_inputs_and_promote(monkeypatch, dtype, backend):
    """rms_norm, rope and swiglu under autocast: nothing is cast, the result has the widest dtype of
    the activation inputs (x + an fp32 residual: fp32), equal to the same call outside autocast and,
    to fp32 accuracy, to the fp32 math on the same values; every gradient in its input's dtype."""
    monkeypatch.setenv("MEGATRAIN_KERNELS", backend)
    gen = torch.Generator().manual_seed(4)
    for op, args, dtypes in promote_cases(gen, dtype):
        fn = getattr(kernels, op)
        leaves, plain = _leaves(args), _leaves(args)
        with torch.autocast("cpu", dtype=dtype):
            got = fn(**leaves)
        got, outside = (got if isinstance(got, tuple) else (got,)), fn(**plain)
        outside = outside if isinstance(outside, tuple) else (outside,)
        ref = getattr(reference, op)(**{n: v.float() if isinstance(v, torch.Tensor) else v for n, v in args.items()})
        ref = ref if isinstance(ref, tuple) else (ref,)
        assert [t.dtype for t in got] == dtypes, (op, [t.dtype for t in got])
        for o, e, r in zip(got, outside, ref):
            torch.testing.assert_close(o, e, rtol=0, atol=0, msg=op)
            torch.testing.assert_close(
                o.float(),
                r,
                rtol=1e-5 if o.dtype == torch.float32 else 1e-2,
                atol=1e-5 if o.dtype == torch.float32 else 1e-2,
                msg=op,
            )
        upstream = [_randn(gen, *o.shape).to(o.dtype) for o in got]
        for name, g in _grads(got, leaves, upstream).items():
            assert g.dtype == leaves[name].dtype, (op, name, g.dtype)


def test_every_dispatched_op_has_one_autocast_rule():
    ops = {
        "rms_norm",
        "rope",
        "swiglu",
        "fused_linear_cross_entropy",
        "lowrank_linear",
        "sparse_lowrank_linear",
        "iha_attention",
        "projected_adam_update",
    }
    assert set(kernel_autocast.RULES) == ops
    assert {op for op, rule in kernel_autocast.RULES.items() if rule.policy == kernel_autocast.LOWER} == set(LOWER_OPS)
    for op in ops:
        assert getattr(kernels, op).__wrapped__.__name__ == op  # applied by the dispatcher, for both backends
