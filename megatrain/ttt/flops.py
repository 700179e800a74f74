"""FLOP accounting for qTTT and its FLOP-matched baselines (per example).

Conventions (one multiply-add = 2 FLOPs; norms, activations, softmax and the optimizer are not
counted; the answer itself costs the same for every method and is left out):

- forward over n new tokens after `prefix` cached ones, per layer: 2 * n * (D*Hd + 2*D*Hkv*d +
  Hd*D + 3*D*F) for the projections, plus 4 * Hd * pairs for the scores and the weighted sum, where
  pairs counts the (query, key) pairs the mask allows (causal: query i sees prefix + i + 1 keys;
  IHA: counted over the N*P virtual tokens of each layer, windows applied, plus the mixing 3 * 2 *
  H*H*P*d and the collapse 2 * H*P*d (global: 2 * H*H*P*d) per token). The head: 2 * D * V per
  token whose logits are computed (the prefill computes only the last one's).
- backward of a qTTT step: the input-gradient pass costs what the forward costs (one matmul per
  forward matmul), the span's own keys and values add their gradients (4 * Hd * the span's
  pairs among themselves), and only the trained query weights add a weight-gradient matmul
  (target q: 2 * k * D * Hd per layer; q_lora: 2 * k * r * (D + Hd), whose forward also adds
  2 * k * r * (D + Hd) to both passes). So a step is ~2 forwards over k tokens, and N steps match
  T_think = 2 * N * k decoded tokens (8192 for 32 x 128), each one forward of one token.
"""

from __future__ import annotations

import numpy as np

__all__ = ["think_tokens", "forward_flops", "qttt_step_flops", "qttt_flops", "attention_pairs"]


def think_tokens(steps: int, span: int) -> int:
    """The FLOP-matched thinking budget T_think = 2 * N * k."""
    return 2 * steps * span


def _windows(cfg) -> list:
    if cfg.attention != "iha":
        return [None] * cfg.layers
    from megatrain.models.transformer import iha_layer_windows

    return iha_layer_windows(cfg)


def attention_pairs(cfg, window, prefix: int, new: int) -> int:
    """(query, key) pairs one layer attends for `new` tokens after `prefix` cached ones (causal);
    for IHA in virtual tokens with the layer's `window` (virtual tokens, None = full)."""
    if cfg.attention != "iha":
        return new * prefix + new * (new + 1) // 2
    pseudo = cfg.iha.pseudo_heads
    token = np.arange(prefix, prefix + new, dtype=np.int64)
    if cfg.iha.mask == "causal":
        virtual = (token[:, None] * pseudo + np.arange(pseudo)[None, :]).reshape(-1)
        keys = virtual + 1
    else:
        keys = np.repeat((token + 1) * pseudo, pseudo)
    if window is not None:
        keys = np.minimum(keys, window if cfg.iha.mask == "causal" else (window // pseudo) * pseudo)
    return int(keys.sum())


def _projection_flops(cfg, tokens: int) -> int:
    d = cfg.head_dim
    q, kv = cfg.heads * d, cfg.kv_heads * d
    per_token = 2 * (cfg.dim * q + 2 * cfg.dim * kv + q * cfg.dim + 3 * cfg.dim * cfg.ffn_dim)
    if cfg.attention == "iha":
        heads, pseudo = cfg.heads, cfg.iha.pseudo_heads
        collapse = heads * pseudo if cfg.iha.collapse == "per_head" else heads * heads * pseudo
        per_token += 3 * 2 * heads * heads * pseudo * d + 2 * collapse * d
    return per_token * tokens


def forward_flops(cfg, new: int, prefix: int = 0, logits: int | None = None) -> int:
    """Forward FLOPs of `new` tokens after `prefix` cached ones; `logits` tokens go through the head
    (default all `new`). cfg: a resolved ModelConfig (vocab_size set)."""
    hd = cfg.heads * cfg.head_dim
    total = 0
    for window in _windows(cfg):
        total += _projection_flops(cfg, new) + 4 * hd * attention_pairs(cfg, window, prefix, new)
    return total + 2 * cfg.dim * cfg.vocab_size * (new if logits is None else logits)


def _query_extra(cfg, span: int, target: str, lora_rank: int) -> tuple[int, int]:
    """(forward FLOPs the adapter adds, weight-gradient FLOPs) of the trained query parameters."""
    hd = cfg.heads * cfg.head_dim
    if target == "q":
        grad = 2 * span * cfg.dim * hd
        adapter = 0
    else:
        adapter = 2 * span * lora_rank * (cfg.dim + hd)
        grad = 2 * span * lora_rank * (cfg.dim + hd)
    if cfg.attention == "iha":
        grad += 2 * span * cfg.heads * cfg.heads * cfg.iha.pseudo_heads * cfg.head_dim  # mix_q
    return cfg.layers * adapter, cfg.layers * grad


def qttt_step_flops(cfg, span: int, prefix: int, target: str = "q", lora_rank: int = 8) -> int:
    """One qTTT step: forward + backward over a span of `span` tokens after `prefix` cached ones."""
    hd = cfg.heads * cfg.head_dim
    forward = forward_flops(cfg, span, prefix)
    span_keys = sum(4 * hd * attention_pairs(cfg, w, 0, span) for w in _windows(cfg))
    adapter, weight_grad = _query_extra(cfg, span, target, lora_rank)
    return 2 * (forward + adapter) + span_keys + weight_grad


def qttt_flops(
    cfg, context: int, *, steps: int, span: int, target: str = "q", lora_rank: int = 8, question: int = 0
) -> dict:
    """Per-example FLOPs of qTTT and of the FLOP-matched baselines for a context of `context` tokens.

    Span starts are uniform over [0, context - span - 1]: the step cost is averaged over them.
    `question`: prompt tokens read after the context (the same for every method).

    Returns a dict: prefill (the context once, as plain in-context answering pays), qttt_step
    (mean), qttt (prefill + steps * step), think_tokens (2 N k), think (prefill + decoding
    think_tokens after context and question), ratio (qttt / think).
    """
    starts = range(0, context - span)
    step = sum(qttt_step_flops(cfg, span, s, target, lora_rank) for s in starts) / len(starts)
    prefill = forward_flops(cfg, context, 0, logits=1)
    tokens = think_tokens(steps, span)
    base = context + question
    hd = cfg.heads * cfg.head_dim
    # Decoding T tokens one at a time: projections and head per token, attention to all earlier keys.
    decode = _projection_flops(cfg, 1) * cfg.layers * tokens + 2 * cfg.dim * cfg.vocab_size * tokens
    decode += (
        sum(4 * hd * sum(attention_pairs(cfg, w, base + t, 1) for t in range(tokens)) for w in _windows(cfg))
        if cfg.attention == "iha"
        else 4 * hd * cfg.layers * (tokens * base + tokens * (tokens + 1) // 2)
    )
    qttt = prefill + steps * step
    think = prefill + decode
    return {
        "context": context,
        "steps": steps,
        "span": span,
        "prefill": prefill,
        "qttt_step": step,
        "qttt": qttt,
        "think_tokens": tokens,
        "think": think,
        "ratio": qttt / think,
    }
