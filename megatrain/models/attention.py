"""Multi-head / grouped-query attention with rotary positions and an optional KV cache.

The cache is the one path that generation (token-by-token decoding), RL rollouts and test-time
training (new query spans against a context computed once) share.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from megatrain import kernels
from megatrain.models.layers import make_linear

__all__ = ["KVCache", "Attention", "position_mask"]


class KVCache:
    """Per-layer keys and values of the positions seen so far.

    Keys and values are stored as [B, Hkv, S, d], before grouped-query expansion, so the cache is
    heads/kv_heads times smaller than the expanded tensors. `positions` [1 or B, S] records each
    cached key's position (the model fills it), so later queries can be masked by position.

    A frozen cache is read-only: `update` still returns cached + new keys, but stores nothing, and
    `freeze()` detaches what is stored. Test-time training uses this to run many new query spans
    against one context, with gradients reaching only the new tokens.
    """

    def __init__(self, num_layers: int):
        self.num_layers = num_layers
        self.keys: list[Optional[Tensor]] = [None] * num_layers
        self.values: list[Optional[Tensor]] = [None] * num_layers
        self.positions: Optional[Tensor] = None
        self.frozen = False

    @property
    def length(self) -> int:
        """Number of cached positions (the sequence length stored for layer 0)."""
        return 0 if self.keys[0] is None else self.keys[0].shape[2]

    def update(self, layer_idx: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Append new keys/values [B, Hkv, N, d] for one layer; return all of them [B, Hkv, S+N, d].

        Nothing is stored while the cache is frozen.
        """
        past_k, past_v = self.keys[layer_idx], self.values[layer_idx]
        if past_k is None:
            k_all, v_all = k, v
        else:
            k_all, v_all = torch.cat((past_k, k), dim=2), torch.cat((past_v, v), dim=2)
        if not self.frozen:
            self.keys[layer_idx], self.values[layer_idx] = k_all, v_all
        return k_all, v_all

    def append_positions(self, positions: Tensor) -> Tensor:
        """Record the positions [1 or B, N] of keys being added; return cached + new [1 or B, S+N].

        Nothing is recorded while the cache is frozen. A cache filled without positions (attention
        called on its own) is taken to hold positions 0..S-1.
        """
        past = self.positions
        if past is None and self.length:
            past = torch.arange(self.length, device=positions.device)[None]
        if past is None:
            all_positions = positions
        else:
            batch = max(past.shape[0], positions.shape[0])
            all_positions = torch.cat((past.expand(batch, -1), positions.expand(batch, -1)), dim=1)
        if not self.frozen:
            self.positions = all_positions
        return all_positions

    def freeze(self) -> None:
        """Detach the stored tensors and stop storing new ones."""
        self.keys = [None if t is None else t.detach() for t in self.keys]
        self.values = [None if t is None else t.detach() for t in self.values]
        self.frozen = True

    def reset(self) -> None:
        """Drop everything and unfreeze."""
        self.keys = [None] * self.num_layers
        self.values = [None] * self.num_layers
        self.positions = None
        self.frozen = False


def position_mask(query_positions: Tensor, key_positions: Tensor) -> Tensor:
    """Boolean attention mask: a query at position p sees the keys at positions <= p.

    Args:
        query_positions: [Bq, N] (Bq is 1 or B).
        key_positions: [Bk, S] (Bk is 1 or B).

    Returns:
        [max(Bq, Bk), 1, N, S], True where attention is allowed (broadcasts over heads).
    """
    return (key_positions[:, None, None, :] <= query_positions[:, None, :, None])


class Attention(nn.Module):
    """Causal self-attention with rotary embeddings and grouped-query heads.

    x [B, N, D] -> q [B, H, N, d], k and v [B, Hkv, N, d] -> RoPE on q, k -> softmax attention ->
    o_proj -> [B, N, D]. Each group of H / Hkv query heads shares one key/value head.
    """

    def __init__(self, dim: int, heads: int, kv_heads: Optional[int] = None, *, linear: str = "dense"):
        super().__init__()
        kv_heads = heads if kv_heads is None else kv_heads
        if dim % heads or heads % kv_heads:
            raise ValueError(f"Attention: heads={heads} must divide dim={dim} and kv_heads={kv_heads} must divide heads")
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.q_proj = make_linear(dim, heads * self.head_dim, kind=linear, role="attn.q")
        self.k_proj = make_linear(dim, kv_heads * self.head_dim, kind=linear, role="attn.k")
        self.v_proj = make_linear(dim, kv_heads * self.head_dim, kind=linear, role="attn.v")
        self.o_proj = make_linear(heads * self.head_dim, dim, kind=linear, role="attn.o")

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, *, mask: Optional[Tensor] = None,
                cache: Optional[KVCache] = None, layer_idx: int = 0) -> Tensor:
        """Attend from the N new tokens to the cached and new keys.

        Args:
            x: [B, N, D] hidden states of the new tokens.
            cos, sin: [N, d/2] or [B, N, d/2] rotary tables at the new tokens' positions.
            mask: boolean [B or 1, 1, N, S_total], True = may attend. None means plain causal order:
                the new tokens follow the cached ones.
            cache: KV cache to read from and (unless frozen) append to.
            layer_idx: this layer's slot in the cache.

        Returns:
            [B, N, D].
        """
        batch, n, _ = x.shape
        q = self.q_proj(x).view(batch, n, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, n, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, n, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = kernels.rope(q, k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer_idx, k, v)
        total = k.shape[2]
        if mask is None and total != n:
            # New tokens sit after the cached ones; is_causal would align the triangle to the top-left.
            key_positions = torch.arange(total, device=x.device)[None]
            mask = position_mask(key_positions[:, total - n:], key_positions)
        gqa = {}
        if self.kv_heads != self.heads:
            if mask is None:
                # SDPA groups heads itself here (flash on CUDA), never materialising repeated K/V.
                gqa = {"enable_gqa": True}
            else:
                # The masked (memory-efficient) CUDA kernel lacks GQA support; expand explicitly.
                repeat = self.heads // self.kv_heads
                k = k.repeat_interleave(repeat, dim=1)
                v = v.repeat_interleave(repeat, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, **gqa)
        return self.o_proj(out.transpose(1, 2).reshape(batch, n, self.heads * self.head_dim))
