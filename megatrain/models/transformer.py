"""Llama-style decoder: token embedding -> pre-norm blocks (attention + SwiGLU MLP) -> norm -> head.

The model takes an optional KV cache and explicit positions, so training, generation, RL rollouts
and test-time training all run through the same forward. It holds pure math: no process groups
(parallel/ swaps layers for tensor parallelism).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from typing import Iterator, Optional

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from megatrain import kernels
from megatrain.constants import IGNORE_INDEX
from megatrain.errors import ConfigError
from megatrain.models.attention import (
    Attention,
    InterleavedHeadAttention,
    KVCache,
    iha_rope_positions,
    position_mask,
)
from megatrain.models.config import ModelConfig
from megatrain.models.layers import init_linear, linear_options, lowrank_options, make_linear

__all__ = [
    "RMSNorm",
    "MLP",
    "Block",
    "LMHead",
    "Transformer",
    "build_model",
    "rope_tables",
    "make_attention",
    "iha_layer_windows",
    "init_seed_for",
    "seeded_init",
]


def init_seed_for(seed: int, name: str) -> int:
    """The 63-bit seed module `name` of a model built from `seed` is initialised with.

    Keyed by the module's name, not by the order modules are built in, so every layout (one process,
    tensor-parallel ranks that materialise one module at a time, ZeRO-3's partitioned construction)
    draws the same values for the same module."""
    digest = hashlib.blake2b(f"megatrain-init/{seed}/{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


@contextlib.contextmanager
def seeded_init(seed: int, name: str) -> Iterator[None]:
    """Inside, the CPU default generator is seeded with `init_seed_for(seed, name)`; restored on exit.

    Initialisation always runs on CPU tensors (materialised on the host, then moved), so the CPU
    generator is the only one that matters for bit-identical weights."""
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(init_seed_for(seed, name))
        yield


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight over the last dim; x [..., dim]."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor, residual: Optional[Tensor] = None):
        """x [..., dim] -> [..., dim]; with residual, returns (norm(x + residual), x + residual)."""
        return kernels.rms_norm(x, self.weight, self.eps, residual)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x)); [..., dim] -> [..., dim] via [..., ffn_dim]."""

    def __init__(self, dim: int, ffn_dim: int, *, linear: str = "dense"):
        super().__init__()
        self.gate_proj = make_linear(dim, ffn_dim, kind=linear, role="mlp.gate")
        self.up_proj = make_linear(dim, ffn_dim, kind=linear, role="mlp.up")
        self.down_proj = make_linear(ffn_dim, dim, kind=linear, role="mlp.down")

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(kernels.swiglu(self.gate_proj(x), self.up_proj(x)))


def iha_layer_windows(cfg: ModelConfig) -> list[Optional[int]]:
    """Each layer's IHA window in virtual tokens (None = full attention).

    schedule uniform: model.iha.window on every layer. flop_matched: layers full_every-1,
    2*full_every-1, ... attend fully and the others use model.iha.window (N/(2P) makes a short
    layer cost what an MHA layer costs at sequence length N).
    """
    iha = cfg.iha
    if iha.schedule == "uniform":
        return [iha.window] * cfg.layers
    window = iha.window if iha.window is not None else flop_matched_window(cfg.max_seq_len, iha.pseudo_heads)
    return [None if (i + 1) % iha.full_every == 0 else window for i in range(cfg.layers)]


def flop_matched_window(seq_len: int, pseudo: int) -> int:
    """N/(2P) virtual tokens, rounded down to a positive multiple of P: a windowed IHA layer then attends to
    about as many keys as an MHA layer does at sequence length N (model.iha.schedule=flop_matched)."""
    return max(pseudo, seq_len // (2 * pseudo) // pseudo * pseudo)


def make_attention(cfg: ModelConfig, layer_idx: int = 0) -> nn.Module:
    """The attention module of layer `layer_idx` for a resolved config (model.attention, model.iha.*)."""
    if cfg.attention == "iha":
        iha = cfg.iha
        return InterleavedHeadAttention(
            cfg.dim,
            cfg.heads,
            cfg.kv_heads,
            linear=cfg.linear,
            pseudo_heads=iha.pseudo_heads,
            mask=iha.mask,
            collapse=iha.collapse,
            window=iha_layer_windows(cfg)[layer_idx],
            head_groups=iha.head_groups,
        )
    return Attention(cfg.dim, cfg.heads, cfg.kv_heads, linear=cfg.linear)


class Block(nn.Module):
    """Pre-norm decoder block: h + attn(norm(h)), then h + mlp(norm(h)); [B, N, D] -> [B, N, D]."""

    def __init__(self, cfg: ModelConfig, layer_idx: int = 0):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = make_attention(cfg, layer_idx)
        self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg.dim, cfg.ffn_dim, linear=cfg.linear)

    def forward(
        self,
        h: Tensor,
        cos: Tensor,
        sin: Tensor,
        *,
        mask: Optional[Tensor] = None,
        cache: Optional[KVCache] = None,
        layer_idx: int = 0,
        residual: Optional[Tensor] = None,
        carry_residual: bool = False,
        **attn_kwargs,
    ):
        """h [B, N, D]; cos, sin and mask as in `Attention.forward`; attn_kwargs (IHA's positions,
        key_positions) go to the attention module. Returns the new residual stream [B, N, D].

        Each residual add is fused into the norm that follows it (`rms_norm(x, w, residual=...)`,
        one kernel reading both and writing the sum and its norm): the attention output's add into
        the pre-MLP norm; with `residual` (the stream before the previous block's MLP output h was
        added), that add into the pre-attention norm. carry_residual=True returns (MLP output,
        stream) un-added, for the next block or the final norm to fuse.
        """
        if residual is None:
            stream = h
            x = self.attn_norm(h)
        else:
            x, stream = self.attn_norm(h, residual=residual)
        attn_out = self.attn(x, cos, sin, mask=mask, cache=cache, layer_idx=layer_idx, **attn_kwargs)
        x, stream = self.mlp_norm(attn_out, residual=stream)
        out = self.mlp(x)
        return (out, stream) if carry_residual else stream + out


class LMHead(nn.Module):
    """Output projection to the vocabulary, with the loss computed inside its own forward.

    The loss must run here, not in the caller: ZeRO-3 gathers this module's weight only around
    this module's forward, and the fused cross-entropy reads the weight directly.
    """

    def __init__(self, vocab_size: int, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, dim))

    def forward(self, h: Tensor, labels: Optional[Tensor] = None) -> Tensor:
        """h [..., D] -> logits [..., V]; with labels [...] (same leading shape), the mean loss.

        The loss is the mean cross-entropy over labels != IGNORE_INDEX (-100), a 0-dim fp32 tensor.
        """
        if labels is None:
            return h @ self.weight.T
        return kernels.fused_linear_cross_entropy(
            h.reshape(-1, h.shape[-1]), self.weight, labels.reshape(-1), ignore_index=IGNORE_INDEX
        )


def rope_tables(head_dim: int, max_seq_len: int, theta: float, device=None) -> tuple[Tensor, Tensor]:
    """fp32 cos and sin, each [max_seq_len, head_dim / 2], for the half-split RoPE layout.

    Pair i rotates at frequency theta^(-2i / head_dim); position n by angle n * that frequency.
    """
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim)
    angles = torch.arange(max_seq_len, dtype=torch.float64, device=device)[:, None] * inv_freq[None]
    return angles.cos().float(), angles.sin().float()


@contextlib.contextmanager
def _on_host(module: nn.Module) -> Iterator[None]:
    """Inside, `module`'s own tensors that live off the CPU or in a low-precision float dtype are
    stand-in fp32 (or their own integer dtype) CPU tensors; on exit their values are copied back.

    Initialisation then draws from the CPU generator in fp32 whatever the device and dtype (ZeRO-3
    builds its partitions on the accelerator, in bf16 on GPUs), so the values match the host build."""
    swapped = []
    for t in [*module._parameters.values(), *module._buffers.values()]:
        if t is None or (t.device.type == "cpu" and t.dtype in (torch.float32, torch.int64, torch.bool)):
            continue
        host_dtype = torch.float32 if t.is_floating_point() else t.dtype
        original = t.data
        t.data = torch.empty(original.shape, dtype=host_dtype)
        swapped.append((t, original))
    try:
        yield
    finally:
        for t, original in swapped:
            original.copy_(t.data)
            t.data = original


class Transformer(nn.Module):
    """Decoder-only language model.

    forward(input_ids [B, N], labels=None, cache=None, positions=None) returns logits [B, N, V]
    (in the model's dtype) or, with labels, the scalar mean loss.
    """

    def __init__(self, cfg: ModelConfig, *, seed: Optional[int] = None, device=None, initialize: bool = True):
        """Build the model described by `cfg` (resolved here; vocab_size must be set).

        seed: the key of every module's initialisation (`init_seed_for(seed, module name)`); None draws
            one from the torch RNG, so `torch.manual_seed(s); Transformer(cfg)` stays deterministic.
        device: "meta" builds shapes only (no memory); `materialize_module` / `materialize` then
            allocate and initialise one module at a time (tensor-parallel ranks keep only their slices).
        initialize: False skips `reset_parameters` (the caller initialises, e.g. module by module
            under ZeRO-3's partitioned construction).
        """
        super().__init__()
        cfg = cfg.resolved()
        if cfg.vocab_size is None:
            raise ConfigError("model.vocab_size is not set: give model.vocab_size or a tokenizer to take it from")
        cfg.validate()
        self.config = cfg
        # Drawn on the CPU generator whatever the default device is: under `with torch.device("meta")`
        # a draw there has no value to read (benchmarks/kernels.py builds shapes that way).
        self.init_seed = int(torch.randint(0, 2**62, (), device="cpu").item()) if seed is None else int(seed)
        # Full tensors by state-dict name that `init_module` copies instead of drawing (a run started from
        # given weights, megatrain.engine.build); None: the keyed initialisation.
        self.initial_state: Optional[dict] = None
        with torch.device(device) if device is not None else contextlib.nullcontext():
            self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
            with linear_options(lowrank_options(cfg)):  # model.lowrank.* for the low-rank projection kinds
                self.blocks = nn.ModuleList(Block(cfg, idx) for idx in range(cfg.layers))
            self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
            self.head = LMHead(cfg.vocab_size, cfg.dim)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight
        self.gradient_checkpointing = False
        # Context parallelism (megatrain.parallel.context_parallel): None, or (index, count) when a forward
        # without cache or positions gets slice `index` of `count` equal slices of each sequence, whose
        # default positions then start at index * N (its attention modules see the whole sequence).
        self.sequence_shard: Optional[tuple[int, int]] = None
        cos, sin = rope_tables(cfg.head_dim, self._rope_len(), cfg.rope_theta)
        # Non-persistent: derived from the config, so checkpoints and HF exports do not carry them.
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        if initialize and str(device) != "meta":
            self.reset_parameters()

    def _apply(self, fn, *args, **kwargs):
        # .to(bf16) / .half() would round the RoPE angles; rebuild them in fp32 on the new device.
        super()._apply(fn, *args, **kwargs)
        self.refresh_rope_tables()
        return self

    def refresh_rope_tables(self) -> None:
        """Recompute the fp32 RoPE tables on their device (after a conversion, or a construction context
        such as deepspeed.zero.Init that creates tensors in the model's dtype and would round them)."""
        cfg = self.config
        self.rope_cos, self.rope_sin = rope_tables(
            cfg.head_dim, self._rope_len(), cfg.rope_theta, device=self.rope_cos.device
        )

    def _rope_len(self) -> int:
        """Rows of the RoPE tables: max_seq_len, times P for IHA's virtual positions n*P + p."""
        cfg = self.config
        if cfg.attention == "iha" and cfg.iha.rope == "virtual":
            return cfg.max_seq_len * cfg.iha.pseudo_heads
        return cfg.max_seq_len

    def init_module_names(self) -> list[str]:
        """Names of the modules that own parameters or persistent buffers directly, each initialised on
        its own (`init_module`); the head is left out when tied to the embedding."""
        names = []
        for name, module in self.named_modules():
            if not name or (name == "head" and self.config.tie_embeddings):
                continue
            own = [p for p in module._parameters.values() if p is not None]
            own += [
                b for k, b in module._buffers.items() if b is not None and k not in module._non_persistent_buffers_set
            ]
            if own:
                names.append(name)
        return names

    @torch.no_grad()
    def init_module(self, name: str, module: Optional[nn.Module] = None) -> None:
        """Initialise module `name` (or `module`, the full-size module that will stand under that name)
        in place with its keyed generator (`seeded_init(self.init_seed, name)`).

        The documented scheme: weights ~ N(0, init_std) (the input embedding N(0, embed_init_std) when
        that is set); o and down projections N(0, init_std /
        sqrt(2 * layers)) so the residual stream's variance does not grow with depth; low-rank kinds
        their own (docs/lowrank.md); IHA mixing as docs/iha.md; norm weights 1."""
        cfg = self.config
        module = self.get_submodule(name) if module is None else module
        if self.initial_state is not None:
            with _on_host(module):
                for key, tensor in [*module._parameters.items(), *module._buffers.items()]:
                    if tensor is not None and key not in module._non_persistent_buffers_set:
                        tensor.copy_(self.initial_state[f"{name}.{key}"])
            return
        std, out_std = cfg.init_std, cfg.init_std / math.sqrt(2 * cfg.layers)
        leaf = name.rpartition(".")[2]
        with _on_host(module), seeded_init(self.init_seed, name):
            if name == "embed" and cfg.embed_init_std is not None:
                nn.init.normal_(module.weight, mean=0.0, std=cfg.embed_init_std)
            elif name in ("embed", "head"):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif leaf in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"):
                init_linear(module, std)
            elif leaf in ("o_proj", "down_proj"):
                init_linear(module, out_std)
            elif isinstance(module, InterleavedHeadAttention):
                module.reset_mixing()
            elif isinstance(module, RMSNorm) or hasattr(module, "reset_parameters"):
                module.reset_parameters()
            else:
                raise TypeError(
                    f"Transformer.init_module: no initialisation rule for module '{name}' ({type(module).__name__})"
                )

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Initialise every module (`init_module`): deterministic given `self.init_seed`, and the same
        values for a module whatever the layout it is later split or partitioned into."""
        for name in self.init_module_names():
            self.init_module(name)

    @torch.no_grad()
    def materialize_module(self, name: str, device="cpu") -> nn.Module:
        """Allocate module `name`'s own meta-device parameters and buffers on `device` (full size) and
        initialise them (`init_module`). Parameter attributes (e.g. `relora_base`) are kept; a tied
        head follows the embedding. Returns the module. Tensors already materialised are left alone."""
        module = self.get_submodule(name)
        fresh = False
        for key, param in list(module._parameters.items()):
            if param is not None and param.is_meta:
                new = nn.Parameter(
                    torch.empty(param.shape, dtype=param.dtype, device=device), requires_grad=param.requires_grad
                )
                new.__dict__.update(param.__dict__)
                module._parameters[key] = new
                fresh = True
        for key, buf in list(module._buffers.items()):
            if buf is not None and buf.is_meta:
                module._buffers[key] = torch.empty(buf.shape, dtype=buf.dtype, device=device)
                fresh = True
        if self.config.tie_embeddings and name == "embed":
            self.head.weight = self.embed.weight
        if fresh and not (name == "head" and self.config.tie_embeddings):
            self.init_module(name, module)
        return module

    def materialize(self, device="cpu") -> "Transformer":
        """`materialize_module` for every module still on the meta device; returns self."""
        for name in self.init_module_names():
            self.materialize_module(name, device)
        return self

    def _positions(self, batch: int, n: int, cache: Optional[KVCache], positions: Optional[Tensor], device) -> Tensor:
        """Query positions as [1 or B, N] long."""
        if positions is None:
            start = self._default_start(cache, n)
            positions = torch.arange(start, start + n, device=device)
        if positions.dim() == 1:
            positions = positions[None]
        if positions.dim() != 2 or positions.shape[1] != n or positions.shape[0] not in (1, batch):
            raise ValueError(f"positions must be [N] or [B, N] = [{batch}, {n}], got {tuple(positions.shape)}")
        return positions.to(device=device, dtype=torch.long)

    def _default_start(self, cache: Optional[KVCache], n: int) -> int:
        """The position of the first of n new tokens without explicit positions: after the cache, else at the
        start of this rank's slice of the sequence (context parallelism), else 0."""
        if cache is not None:
            return cache.length
        return self.sequence_shard[0] * n if self.sequence_shard is not None else 0

    def forward(
        self,
        input_ids: Tensor,
        labels: Optional[Tensor] = None,
        cache: Optional[KVCache] = None,
        positions: Optional[Tensor] = None,
    ) -> Tensor:
        """Run the decoder on N new tokens.

        Args:
            input_ids: [B, N] token ids.
            labels: optional [B, N] target ids for each position (already shifted: the token that
                should follow), IGNORE_INDEX (-100) where no loss is wanted.
            cache: optional KVCache; the new tokens attend to what it holds and (unless frozen)
                are appended to it.
            positions: optional [N] or [B, N] positions of the new tokens. Default:
                cache.length + arange(N). A query at position p attends to keys at positions <= p.

        Returns:
            logits [B, N, V], or the 0-dim fp32 mean loss when labels are given.
        """
        batch, n = input_ids.shape
        explicit = positions is not None
        iha = self.config.attention == "iha"
        if not explicit and cache is None and not iha:
            # A training forward: the default positions are one contiguous run, so the tables are a slice.
            cos, sin = self._table_slice(n)
            return self._run_blocks(input_ids, labels, cache, cos, sin, None, {})
        positions = self._positions(batch, n, cache, positions, input_ids.device)
        # Default positions end at cache.length + N, known on the host. Given ones are checked by reading
        # them: skipped on CUDA (it would force a sync) and under torch.compile (a graph break), where an
        # out-of-range position then indexes past the rotary tables.
        if not explicit:
            end = self._default_start(cache, n) + n
            out_of_range = isinstance(end, int) and end > self.config.max_seq_len
        else:
            out_of_range = (
                positions.device.type != "cuda"
                and not torch.compiler.is_compiling()
                and n > 0
                and bool(positions.min() < 0 or positions.max() >= self.config.max_seq_len)
            )
        if out_of_range:
            raise ValueError(f"positions must lie in [0, model.max_seq_len={self.config.max_seq_len})")
        rope_positions = positions
        if iha:  # IHA rotates its N*P pseudo-tokens: tables at n*P + p (or n, model.iha.rope=original)
            rope_positions = iha_rope_positions(positions, self.config.iha.pseudo_heads, self.config.iha.rope)
        cos, sin = self.rope_cos[rope_positions], self.rope_sin[rope_positions]  # [1 or B, N (IHA: N*P), d/2]
        if positions.shape[0] == 1:
            cos, sin = cos[0], sin[0]

        mask, key_positions, attn_kwargs = None, None, {}
        if cache is not None:
            key_positions = cache.append_positions(positions)
        elif explicit:
            key_positions = positions
        if key_positions is not None:
            if iha:  # IHA builds its virtual-token mask from token positions
                attn_kwargs = {"positions": positions, "key_positions": key_positions}
            else:
                mask = position_mask(positions, key_positions)
        return self._run_blocks(input_ids, labels, cache, cos, sin, mask, attn_kwargs)

    def _table_slice(self, n: int) -> tuple[Tensor, Tensor]:
        """The rotary tables [N, d/2] of n new tokens at the default positions without a cache: rows
        [start, start + n), start 0 (or this rank's slice of the sequence under context parallelism)."""
        start = self._default_start(None, n)
        if start + n > self.config.max_seq_len:
            raise ValueError(f"positions must lie in [0, model.max_seq_len={self.config.max_seq_len})")
        return self.rope_cos[start : start + n], self.rope_sin[start : start + n]

    def _run_blocks(
        self, input_ids: Tensor, labels: Optional[Tensor], cache: Optional[KVCache], cos, sin, mask, attn_kwargs
    ) -> Tensor:
        """Embedding, the decoder blocks (checkpointed when set), the final norm and the head."""
        # Recomputing a block in backward would append to a live cache a second time.
        checkpointed = (
            self.gradient_checkpointing
            and self.training
            and torch.is_grad_enabled()
            and (cache is None or cache.frozen)
        )
        # Blocks pass (last MLP output, stream before it) on, so each residual add is fused into the
        # next norm (Block.forward), the last one into the final norm.
        h, residual = self.embed(input_ids), None
        for idx, block in enumerate(self.blocks):
            if checkpointed:
                h, residual = checkpoint(
                    block,
                    h,
                    cos,
                    sin,
                    mask=mask,
                    cache=cache,
                    layer_idx=idx,
                    residual=residual,
                    carry_residual=True,
                    use_reentrant=False,
                    **attn_kwargs,
                )
            else:
                h, residual = block(
                    h,
                    cos,
                    sin,
                    mask=mask,
                    cache=cache,
                    layer_idx=idx,
                    residual=residual,
                    carry_residual=True,
                    **attn_kwargs,
                )
        normed = self.norm(h) if residual is None else self.norm(h, residual=residual)[0]
        return self.head(normed, labels)

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count, each shared Parameter once. non_embedding drops the input embedding
        (so a tied head is dropped with it; an untied head is counted)."""
        total = sum(p.numel() for p in self.parameters())
        if non_embedding:
            total -= self.embed.weight.numel()
        return total

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token (forward + backward) at sequence length seq_len.

        6 * N for the matmuls with the N non-embedding parameters (2 forward, 4 backward), plus
        12 * L * H * Q * T for the attention scores and weighted sum (L layers, H heads, head dim Q,
        T = seq_len), as in the PaLM appendix's MFU accounting.
        """
        cfg = self.config
        if cfg.attention != "iha":
            return 6 * self.num_params(non_embedding=True) + 12 * cfg.layers * cfg.heads * cfg.head_dim * seq_len
        return self._iha_flops_per_token(seq_len)

    def _iha_flops_per_token(self, seq_len: int) -> int:
        """flops_per_token for IHA. Per layer and token (forward + backward = 3 x forward):
        mixing 3 x 2*H*H*P*Q, collapse 2*Q per collapse weight, attention 12*H*Q*P*K with K keys per
        virtual query: N*P for a full layer (the PaLM convention: all keys counted for a causal layer,
        twice what it attends on average) and min(2W, N*P) for a window of W virtual tokens (the same
        convention). A full IHA layer thus costs P^2 times MHA's attention FLOPs."""
        cfg = self.config
        heads, head_dim, pseudo = cfg.heads, cfg.head_dim, cfg.iha.pseudo_heads
        total = 6 * self.num_params(non_embedding=True)
        virtual = seq_len * pseudo
        for block in self.blocks:
            attn = block.attn
            iha_params = sum(p.numel() for p in (attn.mix_q, attn.mix_k, attn.mix_v, attn.collapse))
            keys = virtual if attn.window is None else min(2 * attn.window, virtual)
            total += (
                -6 * iha_params
                + 18 * heads * heads * pseudo * head_dim
                + 6 * attn.collapse.numel() * head_dim
                + 12 * heads * head_dim * pseudo * keys
            )
        return total


def build_model(cfg: ModelConfig, *, seed: Optional[int] = None) -> Transformer:
    """The Transformer described by `cfg` (resolved here; vocab_size must be set)."""
    return Transformer(cfg, seed=seed)
