"""The model through the Triton kernels (interpreted on CPU) trains exactly like the reference path."""

from __future__ import annotations

import os

import torch

from megatrain.models.config import ModelConfig
from megatrain.models.transformer import Transformer
from tests.kernels.kernel_testing import autograd_node_names, kernel_node_names


def train_losses(monkeypatch, backend: str, steps: int = 20) -> list[float]:
    monkeypatch.setenv("MEGATRAIN_KERNELS", backend)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(preset="tiny", vocab_size=97, max_seq_len=64))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    data = torch.randint(0, 97, (4, 2, 17), generator=torch.Generator().manual_seed(1))
    out = []
    for step in range(steps):
        batch = data[step % 4]
        loss = model(batch[:, :-1], labels=batch[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        out.append(loss.item())
    return out


def test_tiny_model_20_steps_triton_equals_torch(monkeypatch):
    assert os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available()
    reference = train_losses(monkeypatch, "torch")
    fused = train_losses(monkeypatch, "triton")
    assert reference[-1] < reference[0] - 0.3  # it learns (4 batches seen 5 times)
    for step, (a, b) in enumerate(zip(reference, fused)):
        assert abs(a - b) <= 1e-4 * abs(a), f"step {step}: torch {a} vs triton {b}\n{reference}\n{fused}"


def test_triton_path_is_really_taken(monkeypatch):
    monkeypatch.setenv("MEGATRAIN_KERNELS", "triton")
    model = Transformer(ModelConfig(preset="tiny", vocab_size=97, max_seq_len=64))
    ids = torch.randint(0, 97, (1, 5))
    loss = model(ids, labels=ids)
    names = autograd_node_names(loss.grad_fn)
    for op in ("rms_norm", "rope", "swiglu", "fused_linear_cross_entropy"):
        assert kernel_node_names(op) & names, (op, sorted(names))


def _autograd_nodes(root) -> list:
    nodes, seen, stack = [], set(), [root]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        nodes.append(node)
        stack.extend(n for n, _ in node.next_functions)
    return nodes


def test_block_norms_take_the_fused_residual_variant(monkeypatch):
    """Every residual add is fused into the next RMSNorm: of the 2L + 1 norms only the first (block 0's
    pre-attention norm, which has no add before it) runs without a residual."""
    monkeypatch.setenv("MEGATRAIN_KERNELS", "triton")
    model = Transformer(ModelConfig(preset="tiny", vocab_size=97, max_seq_len=64))
    ids = torch.randint(0, 97, (1, 5))
    loss = model(ids, labels=ids)
    norms = [node for node in _autograd_nodes(loss.grad_fn) if type(node).__name__ in kernel_node_names("rms_norm")]
    layers = len(model.blocks)
    assert sum(bool(node.has_residual) for node in norms) == 2 * layers
    assert sum(not node.has_residual for node in norms) == 1


def _unfused_logits(model: Transformer, ids: torch.Tensor) -> torch.Tensor:
    """The pre-norm decoder written out with plain adds: h += attn(norm(h)); h += mlp(norm(h))."""
    cos, sin = model.rope_cos[: ids.shape[1]], model.rope_sin[: ids.shape[1]]
    h = model.embed(ids)
    for idx, block in enumerate(model.blocks):
        h = h + block.attn(block.attn_norm(h), cos, sin, layer_idx=idx)
        h = h + block.mlp(block.mlp_norm(h))
    return model.head(model.norm(h))


def test_fused_residual_blocks_match_plain_adds(monkeypatch):
    for backend in ("torch", "triton"):
        monkeypatch.setenv("MEGATRAIN_KERNELS", backend)
        torch.manual_seed(0)
        model = Transformer(ModelConfig(preset="tiny", vocab_size=97, max_seq_len=64))
        ids = torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(3))
        fused = model(ids)
        plain = _unfused_logits(model, ids)
        torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5, msg=backend)
        # A single block still returns the summed stream when asked for nothing else.
        h = torch.randn(2, 7, 64, generator=torch.Generator().manual_seed(4))
        cos, sin = model.rope_cos[:7], model.rope_sin[:7]
        block = model.blocks[0]
        out, stream = block(h, cos, sin, carry_residual=True)
        torch.testing.assert_close(block(h, cos, sin), out + stream, msg=backend)
