"""Multi-head / grouped-query attention with rotary positions and an optional KV cache.

The cache is the one path that generation (token-by-token decoding), RL rollouts and test-time
training (new query spans against a context computed once) share.
"""

from __future__ import annotations

import copy as _copy
import dataclasses
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from megatrain import kernels
from megatrain.models.config import check_head_layout
from megatrain.models.layers import make_linear

__all__ = [
    "KVCache",
    "AttentionProjections",
    "Attention",
    "position_mask",
    "InterleavedHeadAttention",
    "iha_position_mask",
    "iha_rope_positions",
]


class KVCache:
    """Per-layer keys and values of the positions seen so far.

    Keys and values are stored as [B, Hkv, S, d], before grouped-query expansion, so the cache is
    heads/kv_heads times smaller than the expanded tensors. `positions` [1 or B, S] records each
    cached key's position (the model fills it), so later queries can be masked by position.

    A frozen cache is read-only: `update` still returns cached + new keys, but stores nothing, and
    `freeze()` detaches what is stored. Test-time training uses this to run many new query spans
    against one context, with gradients reaching only the new tokens.

    With a `capacity` (generation), each layer's keys and values live in buffers [B, Hkv, capacity,
    d] allocated once, new ones are written in place and `keys[i]` / `values[i]` are views of the
    first S positions: a decoding step then copies only its new token instead of the whole cache.
    The buffers grow (doubling) if a step would overflow them. In-place writes do not mix with
    autograd through the cached tensors: use a capacity under torch.no_grad only.

    A static cache (`static_copy`, what `megatrain.generate` decodes with) never changes shape or
    storage while it is written: each layer holds [B, Hkv, capacity, d] buffers and `positions` a
    [B, capacity] buffer whose unwritten slots hold `pad_position` (a position no query reaches, so
    the position mask hides them). `begin_write(n)` picks the next n slots, a device index tensor
    advanced in place, and the forward writes there with `index_copy_`. A decode step therefore
    runs the same kernels on the same tensors every time, which a CUDA graph can capture. With
    `attend_all` False, `update` returns only the written slots (less attention work when nothing
    is captured); with True, all `capacity` slots (fixed shapes).
    """

    def __init__(self, num_layers: int, capacity: Optional[int] = None):
        self.num_layers = num_layers
        self.keys: list[Optional[Tensor]] = [None] * num_layers
        self.values: list[Optional[Tensor]] = [None] * num_layers
        self.positions: Optional[Tensor] = None
        self.frozen = False
        self.capacity = capacity
        self._buffers: list[Optional[tuple[Tensor, Tensor]]] = [None] * num_layers
        self.static: Optional[_StaticLayout] = None

    @property
    def length(self) -> int:
        """Number of cached positions (the sequence length stored for layer 0; static: slots written)."""
        if self.static is not None:
            return self.static.filled
        return 0 if self.keys[0] is None else self.keys[0].shape[2]

    def update(self, layer_idx: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Append new keys/values [B, Hkv, N, d] for one layer; return all of them [B, Hkv, S+N, d].

        Nothing is stored while the cache is frozen.
        """
        if self.static is not None:
            return self._write_static(layer_idx, k, v)
        past_k, past_v = self.keys[layer_idx], self.values[layer_idx]
        if self.capacity is not None and not self.frozen:
            return self._write(layer_idx, k, v)
        if past_k is None:
            k_all, v_all = k, v
        else:
            k_all, v_all = torch.cat((past_k, k), dim=2), torch.cat((past_v, v), dim=2)
        if not self.frozen:
            self.keys[layer_idx], self.values[layer_idx] = k_all, v_all
        return k_all, v_all

    def _write(self, layer_idx: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """`update` into the preallocated buffers of one layer."""
        past_k, past_v = self.keys[layer_idx], self.values[layer_idx]
        start = 0 if past_k is None else past_k.shape[2]
        end = start + k.shape[2]
        buffers = self._buffers[layer_idx]
        if buffers is None or end > buffers[0].shape[2]:
            size = max(self.capacity, end) if buffers is None else max(2 * buffers[0].shape[2], end)
            buffers = tuple(t.new_empty(t.shape[0], t.shape[1], size, t.shape[3]) for t in (k, v))
            if past_k is not None:
                buffers[0][:, :, :start], buffers[1][:, :, :start] = past_k, past_v
            self._buffers[layer_idx] = buffers
        buffers[0][:, :, start:end], buffers[1][:, :, start:end] = k, v
        self.keys[layer_idx], self.values[layer_idx] = buffers[0][:, :, :end], buffers[1][:, :, :end]
        return self.keys[layer_idx], self.values[layer_idx]

    def append_positions(self, positions: Tensor) -> Tensor:
        """Record the positions [1 or B, N] of keys being added; return cached + new [1 or B, S+N].

        Nothing is recorded while the cache is frozen. A cache filled without positions (attention
        called on its own) is taken to hold positions 0..S-1. A static cache writes them into the
        slots of `begin_write` and returns its [B, capacity] buffer (or its written slots).
        """
        if self.static is not None:
            layout = self.static
            if positions.shape[1] != layout.index.numel():
                raise ValueError(
                    f"KVCache: a static cache got {positions.shape[1]} new positions but begin_write "
                    f"chose {layout.index.numel()} slots"
                )
            self.positions.index_copy_(1, layout.index, positions.expand(self.positions.shape[0], -1))
            return self.positions if layout.attend_all else self.positions[:, : layout.filled]
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

    def select(self, rows: Tensor) -> None:
        """Keep only the batch rows `rows` [B'] (long indices) of every stored tensor, in that order.

        Generation drops finished rows this way, so they are no longer computed.
        """
        if self.static is not None:
            self.keys = [None if t is None else t.index_select(0, rows) for t in self.keys]
            self.values = [None if t is None else t.index_select(0, rows) for t in self.values]
            self.positions = self.positions.index_select(0, rows)
            return
        for i, buffers in enumerate(self._buffers):
            if buffers is not None:
                length = self.keys[i].shape[2]
                self._buffers[i] = buffers = tuple(b.index_select(0, rows) for b in buffers)
                self.keys[i], self.values[i] = buffers[0][:, :, :length], buffers[1][:, :, :length]
            elif self.keys[i] is not None:
                self.keys[i], self.values[i] = self.keys[i].index_select(0, rows), self.values[i].index_select(0, rows)
        if self.positions is not None and self.positions.shape[0] > 1:
            self.positions = self.positions.index_select(0, rows)

    def copy(self, capacity: Optional[int] = None) -> "KVCache":
        """A new, unfrozen cache (same class and attributes) holding the same keys and values.

        The copy never writes into this cache's storage: stored tensors are only ever replaced
        (`update` concatenates or, with a capacity, writes into buffers of its own that the copy
        allocates afresh), so appending to or selecting rows of the copy leaves this cache as it was.
        Generation continues a prefilled context this way and the context can be reused.
        `capacity`: preallocate the copy's buffers for that many positions (default: this cache's).
        """
        out = _copy.copy(self)
        out.keys, out.values = list(self.keys), list(self.values)
        out._buffers = [None] * self.num_layers
        out.capacity = self.capacity if capacity is None else capacity
        out.frozen = False
        if self.static is not None:  # its buffers are written in place: the copy gets its own
            out.keys = [None if t is None else t.clone() for t in self.keys]
            out.values = [None if t is None else t.clone() for t in self.values]
            out.positions = self.positions.clone()
            out.static = _copy.copy(self.static)
            out.static.index = None if self.static.index is None else self.static.index.clone()
        return out

    def static_copy(
        self, batch: int, capacity: int, pad_position: int, *, attend_all: bool = False, device=None
    ) -> "KVCache":
        """A static copy (same class and attributes) of this cache with room for `capacity` slots.

        batch: rows (a cache that holds a prefix must hold that many). The prefix, if any, fills
        slots 0..length-1 (its positions as recorded, 0..S-1 when none were); the other slots are
        recorded at `pad_position`. device: where to allocate when the cache is empty (default:
        the prefix's device). Key and value buffers are allocated at the first write, when the
        head layout is known. This cache is left unchanged. Every forward on the copy needs
        explicit positions and a `begin_write` for its tokens first.
        """
        if self.static is not None:
            raise ValueError("KVCache.static_copy: the cache is static already")
        length = self.length
        if length > capacity:
            raise ValueError(f"KVCache.static_copy: the cache holds {length} positions, more than capacity={capacity}")
        out = self.copy()
        if length:
            device = self.keys[0].device
        out.positions = torch.full((batch, capacity), pad_position, dtype=torch.long, device=device)
        if length:
            if self.keys[0].shape[0] != batch:
                raise ValueError(f"KVCache.static_copy: the cache holds {self.keys[0].shape[0]} rows, not {batch}")
            past = self.positions if self.positions is not None else torch.arange(length, device=device)[None]
            out.positions[:, :length] = past.expand(batch, -1)
            for i in range(self.num_layers):
                k, v = self.keys[i], self.values[i]
                out.keys[i], out.values[i] = (t.new_zeros(batch, t.shape[1], capacity, t.shape[3]) for t in (k, v))
                out.keys[i][:, :, :length], out.values[i][:, :, :length] = k, v
        out.static = _StaticLayout(capacity=capacity, filled=length, attend_all=attend_all)
        return out

    def begin_write(self, n: int) -> None:
        """Static cache: the next forward writes its n new tokens into slots length..length+n-1.

        The slot index is a device tensor; a run of equal n advances it in place (no new tensor, no
        host-to-device copy), so a captured decode step reads the current slots at every replay.
        """
        layout = self.static
        if layout is None:
            raise ValueError("KVCache.begin_write needs a static cache (KVCache.static_copy)")
        start, end = layout.filled, layout.filled + n
        if end > layout.capacity:
            raise ValueError(
                f"KVCache: {n} more positions do not fit a static cache of capacity {layout.capacity} holding {start}"
            )
        if layout.index is not None and layout.index.numel() == n and layout.index_start == start - n:
            layout.index.add_(n)
        else:
            layout.index = torch.arange(start, end, device=self.positions.device)
        layout.index_start, layout.filled = start, end

    def _write_static(self, layer_idx: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """`update` of a static cache: k, v into the slots of `begin_write`."""
        layout = self.static
        if layout.index is None or k.shape[2] != layout.index.numel():
            raise ValueError(
                f"KVCache: a static cache got {k.shape[2]} new keys but begin_write chose "
                f"{0 if layout.index is None else layout.index.numel()} slots"
            )
        if self.keys[layer_idx] is None:
            batch = self.positions.shape[0]
            self.keys[layer_idx], self.values[layer_idx] = (
                t.new_zeros(batch, t.shape[1], layout.capacity, t.shape[3]) for t in (k, v)
            )
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        keys.index_copy_(2, layout.index, k)
        values.index_copy_(2, layout.index, v)
        if layout.attend_all:
            return keys, values
        return keys[:, :, : layout.filled], values[:, :, : layout.filled]

    def freeze(self) -> None:
        """Detach the stored tensors and stop storing new ones."""
        self.keys = [None if t is None else t.detach() for t in self.keys]
        self.values = [None if t is None else t.detach() for t in self.values]
        self.frozen = True

    def reset(self) -> None:
        """Drop everything and unfreeze."""
        self.keys = [None] * self.num_layers
        self.values = [None] * self.num_layers
        self._buffers = [None] * self.num_layers
        self.positions = None
        self.frozen = False
        self.static = None


@dataclasses.dataclass
class _StaticLayout:
    """The bookkeeping of a static KVCache: `filled` slots written (host), `index` [n] the slots of the
    current write (device), `index_start` its first slot, and whether `update` returns all slots."""

    capacity: int
    filled: int = 0
    attend_all: bool = False
    index: Optional[Tensor] = None
    index_start: int = -1


def position_mask(query_positions: Tensor, key_positions: Tensor) -> Tensor:
    """Boolean attention mask: a query at position p sees the keys at positions <= p.

    Args:
        query_positions: [Bq, N] (Bq is 1 or B).
        key_positions: [Bk, S] (Bk is 1 or B).

    Returns:
        [max(Bq, Bk), 1, N, S], True where attention is allowed (broadcasts over heads).
    """
    return key_positions[:, None, None, :] <= query_positions[:, None, :, None]


class AttentionProjections(nn.Module):
    """The q, k, v and o projections every attention kind shares, and the split into heads.

    q_proj [D -> H d], k_proj and v_proj [D -> Hkv d], o_proj [H d -> D], built by `make_linear`
    (model.linear). `heads` / `kv_heads` are the heads this module computes: megatrain.parallel
    lowers them to one rank's share when it splits the projections.

    ``context_attention`` (set by megatrain.parallel.context_parallel; models never communicate): None,
    or Ulysses context parallelism's exchange, a callable ``(q, k, v, *, attend) -> out`` with a ``size``
    (C). It takes this rank's slice of the sequence, [B, N/C, h, d] per tensor (h divisible by C), gives
    ``attend`` the whole sequence for h/C heads ([B, N, h/C, d]) and returns attend's [B, N, h/C, e] output
    as [B, N/C, h, e]. The attention of a full-sequence forward (no cache, no mask, default positions) then
    runs through it.
    """

    def __init__(self, dim: int, heads: int, kv_heads: Optional[int] = None, *, linear: str = "dense"):
        super().__init__()
        kv_heads = heads if kv_heads is None else kv_heads
        check_head_layout(dim, heads, kv_heads)
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.q_proj = make_linear(dim, heads * self.head_dim, kind=linear, role="attn.q")
        self.k_proj = make_linear(dim, kv_heads * self.head_dim, kind=linear, role="attn.k")
        self.v_proj = make_linear(dim, kv_heads * self.head_dim, kind=linear, role="attn.v")
        self.o_proj = make_linear(heads * self.head_dim, dim, kind=linear, role="attn.o")
        self.context_attention: Optional[Callable[..., Tensor]] = None

    def project_qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x [B, N, D] -> q [B, H, N, d], k and v [B, Hkv, N, d]."""
        batch, n, _ = x.shape
        q = self.q_proj(x).view(batch, n, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, n, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, n, self.kv_heads, self.head_dim).transpose(1, 2)
        return q, k, v

    def project_out(self, out: Tensor) -> Tensor:
        """Per-head outputs [B, H, N, d] -> o_proj -> [B, N, D]."""
        batch, _, n, _ = out.shape
        return self.o_proj(out.transpose(1, 2).reshape(batch, n, self.heads * self.head_dim))


class Attention(AttentionProjections):
    """Causal self-attention with rotary embeddings and grouped-query heads.

    x [B, N, D] -> q [B, H, N, d], k and v [B, Hkv, N, d] -> RoPE on q, k -> softmax attention ->
    o_proj -> [B, N, D]. Each group of H / Hkv query heads shares one key/value head.
    """

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        *,
        mask: Optional[Tensor] = None,
        cache: Optional[KVCache] = None,
        layer_idx: int = 0,
    ) -> Tensor:
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
        n = x.shape[1]
        q, k, v = self.project_qkv(x)
        q, k = kernels.rope(q, k, cos, sin)
        if self.context_attention is not None and cache is None and mask is None:
            return self.project_out(self._context_parallel(q, k, v))
        if cache is not None:
            k, v = cache.update(layer_idx, k, v)
        total = k.shape[2]
        if mask is None and total != n:
            # New tokens sit after the cached ones; is_causal would align the triangle to the top-left.
            key_positions = torch.arange(total, device=x.device)[None]
            mask = position_mask(key_positions[:, total - n :], key_positions)
        gqa = {}
        if self.kv_heads != self.heads:
            if mask is None or not q.is_cuda:
                # SDPA groups heads itself here (flash on CUDA; on CPU also with a mask, where it is
                # several times faster than attending over repeated K/V), never materialising them.
                gqa = {"enable_gqa": True}
            else:
                # The masked (memory-efficient) CUDA kernel lacks GQA support; expand explicitly.
                repeat = self.heads // self.kv_heads
                k = k.repeat_interleave(repeat, dim=1)
                v = v.repeat_interleave(repeat, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, **gqa)
        return self.project_out(out)

    def _context_parallel(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Causal attention under Ulysses context parallelism: q [B, H, N/C, d], k and v [B, Hkv, N/C, d] (this
        rank's slice, rotated at its global positions) -> [B, H, N/C, d]. With fewer KV heads than context
        ranks each is repeated (C / Hkv copies) so every rank receives the KV head of its query heads."""
        size = self.context_attention.size
        if k.shape[1] % size:
            repeat = size // k.shape[1]
            k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        out = self.context_attention(*(t.transpose(1, 2) for t in (q, k, v)), attend=_causal_attention)
        return out.transpose(1, 2)


def _causal_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Causal softmax attention over a whole sequence in the [B, N, h, d] layout (k, v: [B, N, hkv, d],
    grouped-query when hkv < h) -> [B, N, h, d]."""
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    gqa = {"enable_gqa": True} if k.shape[1] != q.shape[1] else {}
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, **gqa).transpose(1, 2)


# ----------------------------------------------------------------------------------------------
# Interleaved head attention (docs/iha.md)


def iha_rope_positions(positions: Tensor, pseudo: int, mode: str = "virtual") -> Tensor:
    """Rotary positions of the pseudo-tokens of tokens at `positions` [Bp, N] -> [Bp, N*P].

    mode "virtual": pseudo-token (n, p) sits at n*P + p; "original": at n (all P share it).
    """
    if mode == "virtual":
        offsets = torch.arange(pseudo, device=positions.device)
        return (positions[..., None] * pseudo + offsets).flatten(-2)
    return positions.repeat_interleave(pseudo, dim=-1)


def iha_position_mask(
    query_positions: Tensor, key_positions: Tensor, pseudo: int, mask: str = "causal", window: Optional[int] = None
) -> Tensor:
    """Boolean mask over virtual tokens from token positions; the rule of `kernels.reference.iha_allowed`.

    Query pseudo-token (a, p) sees key pseudo-token (b, p') when, with i = a*P + p and j = b*P + p':
    causal: j <= i (and j > i - window); token_causal: b <= a (and b > a - window/P).
    At positions 0..N-1 this is exactly `iha_allowed(N, P, mask, window)`.

    Args:
        query_positions: [Bq, N]; key_positions: [Bk, S] (Bq, Bk are 1 or B).

    Returns:
        [max(Bq, Bk), 1, N*P, S*P], True where attention is allowed.
    """
    if mask == "causal":
        q = iha_rope_positions(query_positions, pseudo)[:, None, :, None]
        k = iha_rope_positions(key_positions, pseudo)[:, None, None, :]
        span = window
    else:
        q = query_positions.repeat_interleave(pseudo, dim=-1)[:, None, :, None]
        k = key_positions.repeat_interleave(pseudo, dim=-1)[:, None, None, :]
        span = None if window is None else window // pseudo
    allowed = k <= q
    if span is not None:
        allowed = allowed & (k > q - span)
    return allowed


class InterleavedHeadAttention(AttentionProjections):
    """Interleaved head attention (IHA): each token becomes P pseudo-tokens per head, each a learned
    mix of all heads, attended over the N*P interleaved virtual tokens, then collapsed back.

    x [B, N, D] -> q [B, H, N, d], k and v [B, Hkv, N, d] (grouped-query k/v are repeated to H heads
    before mixing, so mixing acts on H heads and the projections cost what GQA's do) ->
    q~[b, h, n*P + p] = sum_m mix_q[m, h, p] q[b, m, n] (k~, v~ alike) -> RoPE at the virtual
    positions (the Transformer passes tables for n*P + p, or n with model.iha.rope=original) ->
    softmax attention over the virtual tokens (mask "causal" over the flattened order or
    "token_causal"; optional sliding `window` in virtual tokens) -> o[b, h, n] = sum_p
    collapse[h, p] o~[b, h, n*P + p] (or the global R [H, H*P] over all heads) -> o_proj.

    Parameters beyond MHA's: mix_q, mix_k, mix_v [H, H, P] and collapse [H, P] (global: [H, H*P]),
    initialised so the layer starts as MHA (mix = identity on its own head for every p, collapse 1/P).
    With `head_groups` = G > 1 heads mix only inside G contiguous groups (the mixes and a global
    collapse are masked block-diagonal; off-block entries stay zero and get no gradient).
    Test-time training (megatrain.ttt) may replace a mix by a per-example [B, H, H, P] tensor for the
    duration of an adaptation; each batch row is then mixed with its own (unfused path).

    Full sequences (no cache, default positions) run the fused `kernels.iha_attention`. With a KV
    cache or explicit positions the same math runs unfused with a position-based virtual mask; the
    cache then holds this layer's rotated pseudo keys/values as [B, H, S, P*d] (pseudo-token (n, p)
    at [..., n, p*d:(p+1)*d]), so `KVCache.length` still counts tokens.

    Tensor parallelism (set by megatrain.parallel.parallelize; models never communicate):

    - ``heads`` / ``kv_heads``: the rank's local query / key-value heads (H_local = H / T).
    - ``head_offset``: index of the rank's first query head in the full model (rank * H_local).
      The rank computes output heads ``head_offset .. head_offset + heads - 1``.
    - ``gather_heads``: None, or a callable ``(q, k, v) -> (q, k, v)`` that takes the local
      [B, H_local, N, d] tensors (after GQA expansion) and returns all H heads [B, H, N, d] in
      global head order (tp_mode=exact: an all-gather over the TP group whose backward
      reduce-scatters). When set, `mix_and_attend` uses mix[:, local heads, :]; when None it uses
      mix[local heads, local heads, :], which is exact when head_groups is a multiple of T
      (tp_mode=local) and is plain single-process IHA when head_offset = 0 and heads = H.

    The parameters always keep their full [H, H, P] / [H, P] shapes (replicated over TP ranks).
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        kv_heads: Optional[int] = None,
        *,
        linear: str = "dense",
        pseudo_heads: int = 2,
        mask: str = "causal",
        collapse: str = "per_head",
        window: Optional[int] = None,
        head_groups: int = 1,
    ):
        super().__init__(dim, heads, kv_heads, linear=linear)
        if pseudo_heads < 1:
            raise ValueError(f"InterleavedHeadAttention: pseudo_heads must be >= 1, got {pseudo_heads}")
        if mask not in ("causal", "token_causal") or collapse not in ("per_head", "global"):
            raise ValueError(f"InterleavedHeadAttention: mask={mask!r} / collapse={collapse!r} not supported")
        if window is not None and (window < 1 or window % pseudo_heads):
            raise ValueError(
                f"InterleavedHeadAttention: window={window} must be a positive multiple of pseudo_heads={pseudo_heads}"
            )
        if head_groups < 1 or heads % head_groups:
            raise ValueError(f"InterleavedHeadAttention: head_groups={head_groups} must divide heads={heads}")
        self.pseudo_heads, self.mask, self.window = pseudo_heads, mask, window
        self.collapse_kind, self.head_groups = collapse, head_groups
        self.mix_q = nn.Parameter(torch.empty(heads, heads, pseudo_heads))
        self.mix_k = nn.Parameter(torch.empty(heads, heads, pseudo_heads))
        self.mix_v = nn.Parameter(torch.empty(heads, heads, pseudo_heads))
        width = pseudo_heads if collapse == "per_head" else heads * pseudo_heads
        self.collapse = nn.Parameter(torch.empty(heads, width))
        # Tensor-parallel hooks (see the class docstring); single process: all heads, no gather.
        self.head_offset = 0
        self.gather_heads: Optional[Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor, Tensor]]] = None
        self.reset_mixing()

    @torch.no_grad()
    def reset_mixing(self) -> None:
        """IHA's init (docs/iha.md): each pseudo-head copies its own head (mix = identity for every p) and the
        collapse averages the P copies (1/P; global: 1/P on the head's own outputs, 0 elsewhere)."""
        heads, pseudo = self.mix_q.shape[0], self.pseudo_heads
        eye = torch.eye(heads, dtype=self.mix_q.dtype, device=self.mix_q.device)
        for mix in (self.mix_q, self.mix_k, self.mix_v):
            mix.copy_(eye[:, :, None].expand(heads, heads, pseudo))
        if self.collapse_kind == "per_head":
            self.collapse.fill_(1.0 / pseudo)
        else:
            self.collapse.copy_((eye[:, :, None] / pseudo).expand(heads, heads, pseudo).reshape(heads, -1))

    def extra_repr(self) -> str:
        return (
            f"pseudo_heads={self.pseudo_heads}, mask={self.mask}, collapse={self.collapse_kind}, "
            f"window={self.window}, head_groups={self.head_groups}"
        )

    def _group_mask(self, mix: Tensor) -> Tensor:
        """Zero the cross-group entries of a [..., H, H, P] tensor (head_groups > 1)."""
        if self.head_groups == 1:
            return mix
        heads = mix.shape[-2]
        group = torch.arange(heads, device=mix.device) // (heads // self.head_groups)
        same = (group[:, None] == group[None, :]).to(mix.dtype)
        return mix * same.view(heads, heads, 1)

    def _local_weights(self, gathered: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(mix_q, mix_k, mix_v [H_in, H_out, P], collapse [H_out, P] or [H_out, H_out*P]) for this
        rank's output heads; H_in is H when q/k/v were gathered, else the local heads. A mix with a
        leading batch dim [B, H, H, P] (one per example: test-time training) keeps it."""
        out = slice(self.head_offset, self.head_offset + self.heads)
        rows = slice(None) if gathered else out
        mixes = tuple(self._group_mask(m)[..., rows, out, :] for m in (self.mix_q, self.mix_k, self.mix_v))
        pseudo = self.pseudo_heads
        if self.collapse_kind == "per_head":
            collapse = self.collapse[out]
        else:
            full = self.collapse.shape[0]
            blocks = self._group_mask(self.collapse.view(full, full, pseudo))  # [h, m, p]
            collapse = blocks[out, out].reshape(self.heads, self.heads * pseudo)
        return (*mixes, collapse)

    def mix_and_attend(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        cos: Optional[Tensor],
        sin: Optional[Tensor],
        *,
        mask: Optional[Tensor] = None,
        cache: Optional[KVCache] = None,
        layer_idx: int = 0,
        positions: Optional[Tensor] = None,
        key_positions: Optional[Tensor] = None,
    ) -> Tensor:
        """The head mixing, attention and collapse: q, k, v [B, H_local, N, d] -> o [B, H_local, N, d].

        Runs `gather_heads` first when it is set (tensor parallelism, tp_mode=exact). cos, sin:
        [N*P, d/2] or [B, N*P, d/2] tables at the pseudo-tokens' rotary positions, or None.
        positions [1 or B, N] / key_positions [1 or B, S_total]: token positions of the queries and
        of every key (cached + new); None = the new tokens follow the cached ones.
        """
        gathered = self.gather_heads is not None
        if gathered:
            q, k, v = self.gather_heads(q, k, v)
        mix_q, mix_k, mix_v, collapse = self._local_weights(gathered)
        batch, _, n, d = q.shape
        pseudo, heads = self.pseudo_heads, self.heads
        full_sequence = cache is None and mask is None and positions is None and key_positions is None
        shared_mixes = all(m.dim() == 3 for m in (mix_q, mix_k, mix_v))
        if full_sequence and self.context_attention is not None:
            if not shared_mixes or gathered:
                raise ValueError(
                    "InterleavedHeadAttention: context parallelism needs shared mixes and no "
                    "tensor-parallel head gather"
                )
            return self._context_parallel(q, k, v, mix_q, mix_k, mix_v, collapse, cos, sin)
        if full_sequence and shared_mixes and (cos is None or cos.dim() == 2):
            return kernels.iha_attention(
                q, k, v, mix_q, mix_k, mix_v, collapse, cos, sin, mask=self.mask, window=self.window
            )

        # Unfused path (decoding, explicit positions): the math of kernels.reference.iha_attention with
        # queries and keys of different lengths and a mask built from token positions.
        def pseudo_tokens(x: Tensor, mix: Tensor) -> Tensor:  # [B, H_in, N, d] -> [B, H_out, N*P, d]
            pattern = "bmnd,mhp->bhnpd" if mix.dim() == 3 else "bmnd,bmhp->bhnpd"  # shared or per-row mix
            return torch.einsum(pattern, x, mix.to(x.dtype)).reshape(batch, heads, n * pseudo, d)

        pq, pk, pv = pseudo_tokens(q, mix_q), pseudo_tokens(k, mix_k), pseudo_tokens(v, mix_v)
        if cos is not None:
            pq, pk = kernels.rope(pq, pk, cos, sin)
        if cache is not None:
            pk, pv = cache.update(
                layer_idx, pk.reshape(batch, heads, n, pseudo * d), pv.reshape(batch, heads, n, pseudo * d)
            )
            pk, pv = (t.reshape(batch, heads, t.shape[2] * pseudo, d) for t in (pk, pv))
        total = pk.shape[2] // pseudo
        if key_positions is None:
            key_positions = torch.arange(total, device=q.device)[None]
        if positions is None:
            positions = key_positions[:, total - n :]
        allowed = iha_position_mask(positions, key_positions, pseudo, self.mask, self.window)
        if mask is not None:  # a caller's token-level mask [B or 1, 1, N, S] restricts further
            allowed = allowed & mask.repeat_interleave(pseudo, dim=-2).repeat_interleave(pseudo, dim=-1)
        o = F.scaled_dot_product_attention(pq, pk, pv, attn_mask=allowed)
        o = o.reshape(batch, heads, n, pseudo, d)
        if self.collapse_kind == "per_head":
            return torch.einsum("bhnpd,hp->bhnd", o, collapse.to(o.dtype))
        return torch.einsum("bmnpd,hmp->bhnd", o, collapse.to(o.dtype).reshape(heads, heads, pseudo))

    def _context_parallel(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        mix_q: Tensor,
        mix_k: Tensor,
        mix_v: Tensor,
        collapse: Tensor,
        cos: Optional[Tensor],
        sin: Optional[Tensor],
    ) -> Tensor:
        """IHA under Ulysses context parallelism: q, k, v [B, H, N/C, d] (this rank's slice, every head) ->
        [B, H, N/C, d].

        The mixing is per token, so it runs here on the sequence slice, where all H heads are local; the
        pseudo-tokens are rotated at their global virtual positions (cos, sin [N/C*P, d/2]), then the exchange
        gives each rank all N*P virtual tokens of H/C pseudo-heads, which attend (`_attend_virtual`); their P
        outputs per token come back on the sequence layout and are collapsed there (per_head or global)."""
        batch, heads, n, d = q.shape
        pseudo = self.pseudo_heads

        def pseudo_tokens(x: Tensor, mix: Tensor) -> Tensor:  # [B, H, n, d] -> [B, H, n*P, d], virtual order
            return torch.einsum("bmnd,mhp->bhnpd", x, mix.to(x.dtype)).reshape(batch, heads, n * pseudo, d)

        pq, pk, pv = pseudo_tokens(q, mix_q), pseudo_tokens(k, mix_k), pseudo_tokens(v, mix_v)
        if cos is not None:
            pq, pk = kernels.rope(pq, pk, cos, sin)
        o = self.context_attention(*(t.transpose(1, 2) for t in (pq, pk, pv)), attend=self._attend_virtual)
        o = o.reshape(batch, n, heads, pseudo, d)  # [B, N/C, H, P*d] -> the P outputs of each head
        if self.collapse_kind == "per_head":
            return torch.einsum("bnhpd,hp->bhnd", o, collapse.to(o.dtype))
        return torch.einsum("bnmpd,hmp->bhnd", o, collapse.to(o.dtype).reshape(heads, heads, pseudo))

    def _attend_virtual(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Softmax attention over the N*P virtual tokens of a whole sequence, [B, N*P, h, d] each (mask
        model.iha.mask, this layer's window) -> the P outputs of each token side by side, [B, N, h, P*d]."""
        batch, virtual, heads, d = q.shape
        pseudo = self.pseudo_heads
        n = virtual // pseudo
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        if self.mask == "causal" and self.window is None:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            positions = torch.arange(n, device=q.device)[None]
            allowed = iha_position_mask(positions, positions, pseudo, self.mask, self.window)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        return (
            o.transpose(1, 2).reshape(batch, n, pseudo, heads, d).transpose(2, 3).reshape(batch, n, heads, pseudo * d)
        )

    def forward(
        self,
        x: Tensor,
        cos: Optional[Tensor],
        sin: Optional[Tensor],
        *,
        mask: Optional[Tensor] = None,
        cache: Optional[KVCache] = None,
        layer_idx: int = 0,
        positions: Optional[Tensor] = None,
        key_positions: Optional[Tensor] = None,
    ) -> Tensor:
        """Attend from the N new tokens to the cached and new pseudo-tokens; x [B, N, D] -> [B, N, D].

        Same contract as `Attention.forward`, except that cos and sin are the tables at the
        pseudo-tokens' rotary positions ([N*P, d/2] or [B, N*P, d/2]) and that the causal structure
        comes from token positions (`positions`, `key_positions`, see `mix_and_attend`); `mask`, when
        given, is a token-level mask [B or 1, 1, N, S_total] that restricts attention further.
        """
        q, k, v = self.project_qkv(x)
        if self.kv_heads != self.heads:
            repeat = self.heads // self.kv_heads
            k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        out = self.mix_and_attend(
            q,
            k,
            v,
            cos,
            sin,
            mask=mask,
            cache=cache,
            layer_idx=layer_idx,
            positions=positions,
            key_positions=key_positions,
        )
        return self.project_out(out)
