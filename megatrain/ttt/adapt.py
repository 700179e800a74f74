"""qTTT: query-only test-time training on a context computed once (`megatrain.ttt.adapt`).

Per example (a batch of examples of any lengths runs at once, each with its own adapted queries):

1. Prefill: one forward over the context fills every layer's K and V into a KVCache (left-padded
   layout of `megatrain.generate`: row b's tokens at positions 0..L_b-1, pads at max_seq_len - 1,
   invisible to every query). The cache is then frozen (detached, read-only).
2. `steps` times: for every row draw a span start s uniformly from [0, L_b - k - 1], feed the k
   span tokens ctx[s:s+k] at their own positions s..s+k-1 and take the mean next-token loss against
   ctx[s+1:s+k+1]. The span's queries attend to the cached K/V of the prefix ctx[:s] (a view of the
   frozen cache whose keys at positions >= s are masked out by position, no copy) and, causally, to
   the span's own keys. Gradients reach only the query parameters; one optimizer step.
3. Inside the `with` block the adapted queries answer over the same cache (`megatrain.generate(...,
   cache=cache)`); on exit the original modules and parameters are put back untouched.

What is recomputed, exactly: the prefill runs every projection once over the L context tokens;
each step runs the whole network forward and backward over the k span tokens only, including their
K/V projections (the span's causal self-attention needs keys from the current weights: with the
queries changed, the hidden states of layers >= 2 and so the span's keys there differ from the
cached ones). The K/V of the prefix ctx[:s] are read from the cache and never recomputed, so a step
costs O(k) projections and O(k * s) attention, not O(L). After adaptation the cached context K/V
stay those of the original weights (qTTT's approximation: only queries move).

Per-example parameters: each query projection q_proj is swapped for `ExampleQuery`, which holds one
copy of W_Q per example ([B, F, D]; target "q") or one rank-r adapter per example on the frozen
W_Q (target "q_lora"); for interleaved head attention the query mixing tensor mix_q becomes one
[H, H, P] per example as well. The loss is the sum over examples of each example's mean span loss,
and AdamW / SGD act elementwise, so adapting a batch equals adapting each example alone. Rows follow
`KVCache.select` (generation drops finished rows) through the cache's `rows`.

Context parallelism (parallel.context = C): only the prefill is split over the context group (each
rank runs 1/C of the context; the cache every rank ends with holds the whole context's K/V), the
span steps and the answers run whole on every rank of the group, which therefore adapt alike.

Tensor parallelism: q_proj is column-parallel, so each rank adapts its slice of W_Q (its heads)
and the cache holds its heads' K/V; q_lora's A and IHA's per-example mix_q are replicated and their
gradients summed over the TP group, as `megatrain.parallel.parallelize` does for the model's mixes.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator, Optional, Sequence

import torch
from torch import Tensor, nn

from megatrain.errors import ConfigError
from megatrain.models.attention import InterleavedHeadAttention, KVCache

__all__ = ["adapt", "AdaptedCache", "ExampleQuery", "TARGETS", "OPTIMIZERS", "check_adapt_args", "span_view", "prefill"]

TARGETS = ("q", "q_lora")
OPTIMIZERS = ("adamw", "sgd")


class AdaptedCache(KVCache):
    """The KVCache of a batch of contexts, as `adapt` yields it.

    Attributes beyond KVCache's:
        rows: [B'] long, the example each current row belongs to (`select` keeps it in step, so
            per-example query weights follow generation dropping finished rows).
        context_lengths: tokens of each example's context.
        losses: mean span loss over the examples at each step (before that step's update).
        span_starts: [steps][B] the sampled span starts.
    """

    def __init__(self, num_layers: int, rows: Tensor):
        super().__init__(num_layers)
        self.rows = rows
        self.context_lengths: list[int] = []
        self.losses: list[float] = []
        self.span_starts: list[list[int]] = []

    def select(self, rows: Tensor) -> None:
        super().select(rows)
        self.rows = self.rows.index_select(0, rows.to(self.rows.device))

    def drop_left(self, count: int) -> None:
        """Forget the first `count` cached positions of every row (padding that every row has)."""
        if count:
            self.keys = [k[:, :, count:] for k in self.keys]
            self.values = [v[:, :, count:] for v in self.values]
            self.positions = self.positions[:, count:]


class ExampleQuery(nn.Module):
    """A query projection with one set of trainable weights per example; replaces q_proj in `adapt`.

    target "q": y[b] = x[b] @ W[e].T (+ bias), W [E, F, D] initialised to copies of the base W_Q.
    target "q_lora": y[b] = base(x[b]) + x[b] @ A[e] @ B[e], A [E, D, r] (Kaiming-uniform, as LoRA),
    B [E, r, F] zeros, so adaptation starts from the base model. e = rows[b] (all rows when `rows` is
    None). x [B, N, D] -> [B, N, F]. The base module is kept frozen and unchanged.
    """

    def __init__(self, base: nn.Module, examples: int, target: str, rank: int, generators: list[torch.Generator]):
        super().__init__()
        self.base, self.target, self.examples = base, target, examples
        self.rows: Optional[Tensor] = None
        weight = base.weight.detach()
        if target == "q":
            self.weight = nn.Parameter(weight.unsqueeze(0).repeat(examples, 1, 1))
        else:
            out_features, in_features = weight.shape
            bound = 1.0 / math.sqrt(in_features)
            a = torch.stack(
                [
                    torch.empty(in_features, rank, dtype=torch.float32).uniform_(-bound, bound, generator=g)
                    for g in generators
                ]
            )
            self.lora_a = nn.Parameter(a.to(device=weight.device, dtype=weight.dtype))
            self.lora_b = nn.Parameter(
                torch.zeros(examples, rank, out_features, dtype=weight.dtype, device=weight.device)
            )

    def _rows(self, batch: int, device) -> Tensor:
        if self.rows is not None:
            if self.rows.numel() != batch:
                raise ValueError(f"adapted queries: {self.rows.numel()} cache rows but a batch of {batch}")
            return self.rows.to(device)
        if batch != self.examples:
            raise ValueError(
                f"inside megatrain.ttt.adapt the model runs on its adapted cache or on a batch of all "
                f"{self.examples} examples, got a batch of {batch}"
            )
        return torch.arange(batch, device=device)

    def forward(self, x: Tensor) -> Tensor:
        rows = self._rows(x.shape[0], x.device)
        if self.target == "q":
            y = torch.bmm(x, self.weight.index_select(0, rows).transpose(1, 2))
            bias = getattr(self.base, "bias", None)
            return y if bias is None else y + bias
        delta = torch.bmm(torch.bmm(x, self.lora_a.index_select(0, rows)), self.lora_b.index_select(0, rows))
        return self.base(x) + delta


def check_adapt_args(
    model: nn.Module, context_lengths: Sequence[int], *, steps, span, lr, target, lora_rank, optimizer
) -> None:
    """ConfigError (one line naming the ttt.* key) for arguments `adapt` cannot run with."""
    cfg = model.config
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
        raise ConfigError(f"ttt.steps must be an integer >= 0, got {steps!r}")
    if not isinstance(span, int) or isinstance(span, bool) or span < 1:
        raise ConfigError(f"ttt.span must be an integer >= 1, got {span!r}")
    if not isinstance(lr, (int, float)) or not lr > 0 or not math.isfinite(lr):
        raise ConfigError(f"ttt.lr must be a number > 0, got {lr!r}")
    if target not in TARGETS:
        raise ConfigError(f"ttt.target={target!r} is not allowed (allowed: {', '.join(TARGETS)})")
    if optimizer not in OPTIMIZERS:
        raise ConfigError(f"ttt.optimizer={optimizer!r} is not allowed (allowed: {', '.join(OPTIMIZERS)})")
    if span + 1 > cfg.max_seq_len - 1:
        raise ConfigError(
            f"ttt.span={span} is longer than the model allows: a span and its next token need "
            f"ttt.span + 1 <= model.max_seq_len - 1 = {cfg.max_seq_len - 1}"
        )
    for i, length in enumerate(context_lengths):
        if length < span + 1:
            raise ConfigError(
                f"context {i} has {length} tokens, shorter than ttt.span + 1 = {span + 1} (a span of "
                f"ttt.span tokens and the token after it); lower ttt.span or give a longer context"
            )
        if length > cfg.max_seq_len - 1:
            raise ConfigError(
                f"context {i} has {length} tokens; model.max_seq_len={cfg.max_seq_len} allows at most "
                f"{cfg.max_seq_len - 1}"
            )
    if getattr(getattr(model, "head", None), "sequence_parallel", False):
        raise ConfigError("megatrain.ttt.adapt does not support sequence parallelism (parallel.sequence=false)")
    for idx, block in enumerate(model.blocks):
        q_proj = block.attn.q_proj
        if (
            not isinstance(getattr(q_proj, "weight", None), nn.Parameter)
            or q_proj.weight.dim() != 2
            or hasattr(q_proj, "lora_a")
            or hasattr(q_proj, "cola_a")
        ):
            raise ConfigError(
                f"ttt.target={target} needs dense query projections (model.linear=dense); layer {idx}'s "
                f"q_proj is {type(q_proj).__name__} (model.linear={cfg.linear}), which has no single "
                f"W_Q to adapt"
            )
    if target == "q_lora":
        width = min(model.blocks[0].attn.q_proj.weight.shape)
        if not isinstance(lora_rank, int) or isinstance(lora_rank, bool) or not 1 <= lora_rank <= width:
            raise ConfigError(f"ttt.lora_rank must be an integer in 1..{width}, got {lora_rank!r}")


def _left_padded(
    contexts: Sequence[Sequence[int]], pad_position: int, device, multiple: int = 1
) -> tuple[Tensor, Tensor]:
    """ids, positions [B, W]: row b's tokens at the right end at positions 0..L_b-1, pads at pad_position;
    W the longest context rounded up to a multiple of `multiple`."""
    width = -(-max(len(c) for c in contexts) // multiple) * multiple
    ids = torch.zeros(len(contexts), width, dtype=torch.long)
    positions = torch.full((len(contexts), width), pad_position, dtype=torch.long)
    for row, context in enumerate(contexts):
        ids[row, width - len(context) :] = torch.as_tensor(list(context), dtype=torch.long)
        positions[row, width - len(context) :] = torch.arange(len(context))
    return ids.to(device), positions.to(device)


@torch.no_grad()
def prefill(model: nn.Module, contexts: Sequence[Sequence[int]]) -> AdaptedCache:
    """Run the contexts through the model once and return their frozen cache (every layer's K, V).

    On a context-parallel model (parallel.context = C) the prefill is split over the context group
    (`megatrain.parallel.context_parallel.context_prefill`: each rank runs 1/C of the left-padded
    contexts, widened to a multiple of C with more padding, dropped again from the cache, and every
    rank's cache ends with all of it)."""
    from megatrain.generate import _last_position_logits
    from megatrain.parallel.context_parallel import context_prefill, context_size

    device = next(model.parameters()).device
    split = context_size(model)
    ids, positions = _left_padded(contexts, model.config.max_seq_len - 1, device, multiple=split)
    cache = AdaptedCache(model.config.layers, torch.arange(len(contexts), device=device))
    with _last_position_logits(model, True):  # the context's logits are not needed
        if split > 1:
            context_prefill(model, ids, positions, cache)
        else:
            model(ids, cache=cache, positions=positions)
    # The pads added for the split (left of every row) go: the cache has one process's width, so what
    # attends to it later runs on the same shapes (the pads' keys are hidden from every query anyway).
    cache.drop_left(ids.shape[1] - max(len(c) for c in contexts))
    cache.freeze()
    cache.context_lengths = [len(c) for c in contexts]
    return cache


def span_view(cache: KVCache, starts: Tensor, hidden_position: int) -> AdaptedCache:
    """A frozen view of `cache` in which row b sees only its keys at positions < starts[b].

    The K/V tensors are shared, not copied: the later keys are recorded at `hidden_position`
    (model.max_seq_len: no query reaches it), so the position mask hides them. starts [B] long.
    """
    view = AdaptedCache(cache.num_layers, torch.arange(starts.numel(), device=starts.device))
    view.keys, view.values = list(cache.keys), list(cache.values)
    positions = cache.positions.expand(starts.numel(), -1)
    view.positions = torch.where(positions < starts[:, None], positions, torch.full_like(positions, hidden_position))
    view.frozen = True
    return view


def _unwrap(model: nn.Module) -> nn.Module:
    from megatrain.generate import _unwrap as unwrap_model

    return unwrap_model(model)


def _tp_group(module: nn.Module):
    """The TP process group of a column-parallel projection (None on one process)."""
    group = getattr(module, "group", None)
    if group is None:
        return None
    import torch.distributed as dist

    return group if dist.get_world_size(group) > 1 else None


class _Swap:
    """Installs per-example query parameters into a model and puts the originals back."""

    def __init__(self, model: nn.Module, examples: int, target: str, rank: int, seed: int):
        self.model, self.examples = model, examples
        self.flags = [(p, p.requires_grad) for p in model.parameters()]
        self.hooks, self.restore_q, self.restore_mix = [], [], []
        generators = [torch.Generator().manual_seed(seed + e) for e in range(examples)]
        for p, _ in self.flags:
            p.requires_grad_(False)
        self.params: list[nn.Parameter] = []
        for block in model.blocks:
            attn = block.attn
            base = attn.q_proj
            query = ExampleQuery(base, examples, target, rank, generators)
            self.restore_q.append((attn, base))
            attn.q_proj = query
            self.params += [p for name, p in query.named_parameters() if not name.startswith("base.")]
            # Replicated over TP ranks but feeding only this rank's heads: their gradients are
            # partial sums (the adapter's A, IHA's mix_q), summed over the group as parallelize does.
            replicated = [query.lora_a] if target == "q_lora" else []
            mix = None
            if isinstance(attn, InterleavedHeadAttention):
                original = attn.mix_q
                order = list(attn._parameters.items())
                mix = nn.Parameter(original.detach().unsqueeze(0).repeat(examples, 1, 1, 1))
                replicated.append(mix)
                self.params.append(mix)
                # mix_q becomes a plain attribute, re-pointed at each forward's rows (see _rows_hook)
                del attn._parameters["mix_q"]
                self.restore_mix.append((attn, order))
            group = _tp_group(base)
            if group is not None:
                from megatrain.parallel.parallelize import _all_reduce_grad

                for param in replicated:
                    param.register_hook(lambda grad, g=group: _all_reduce_grad(grad, g))
            self.hooks.append(attn.register_forward_pre_hook(self._rows_hook(query, mix), with_kwargs=True))

    def _rows_hook(self, query: ExampleQuery, mix: Optional[nn.Parameter]):
        def hook(module, args, kwargs):
            rows = getattr(kwargs.get("cache"), "rows", None)
            if rows is not None and rows.numel() != args[0].shape[0]:
                rows = None  # a cache not made by adapt; ExampleQuery checks the batch
            query.rows = rows
            if mix is not None:
                index = query._rows(args[0].shape[0], mix.device)
                object.__setattr__(module, "mix_q", mix.index_select(0, index))

        return hook

    def restore(self) -> None:
        for handle in self.hooks:
            handle.remove()
        for attn, order in self.restore_mix:
            attn.__dict__.pop("mix_q", None)
            attn._parameters.clear()
            attn._parameters.update(order)
        for attn, base in self.restore_q:
            attn.q_proj = base
        for p, flag in self.flags:
            p.requires_grad_(flag)


def _normalise(context_ids) -> list[list[int]]:
    if isinstance(context_ids, Tensor):
        context_ids = context_ids.tolist()
    if isinstance(context_ids, (str, bytes)) or not isinstance(context_ids, Sequence) or len(context_ids) == 0:
        raise ConfigError("megatrain.ttt.adapt: context_ids must be a token-id list or a non-empty list of them")
    if all(isinstance(t, int) and not isinstance(t, bool) for t in context_ids):
        return [list(context_ids)]
    out = []
    for i, c in enumerate(context_ids):
        if isinstance(c, Tensor):
            c = c.tolist()
        if (
            isinstance(c, (str, bytes))
            or not isinstance(c, Sequence)
            or not all(isinstance(t, int) and not isinstance(t, bool) for t in c)
        ):
            raise ConfigError(f"megatrain.ttt.adapt: context {i} must be a list of token ids (ints)")
        out.append(list(c))
    return out


@contextlib.contextmanager
def adapt(
    model: nn.Module,
    context_ids,
    *,
    steps: int = 32,
    span: int = 128,
    lr: float = 1e-5,
    target: str = "q",
    seed: int = 0,
    lora_rank: int = 8,
    optimizer: str = "adamw",
) -> Iterator[AdaptedCache]:
    """Adapt the model's query projections to a context (qTTT); yields the context's filled cache.

    Args:
        model: a megatrain Transformer (plain or tensor-parallel) or a wrapper with `.module`.
        context_ids: one context (a token-id list) or a batch of contexts of any lengths (each gets
            its own adapted queries; row b of the cache is context b).
        steps: gradient steps N (0: no adaptation, plain in-context answering).
        span: tokens k per sampled span (each context needs >= k + 1 tokens).
        lr: learning rate.
        target: "q" (every layer's full W_Q; with IHA also mix_q) or "q_lora" (a rank-`lora_rank`
            adapter on every W_Q, per example; IHA's mix_q trains as well).
        seed: example b draws its span starts (and its q_lora init) from seed + b, so it adapts as it
            would alone with that seed; the same on every TP rank.
        lora_rank: adapter rank for target "q_lora".
        optimizer: "adamw" (weight decay 0) or "sgd" (plain).

    Yields:
        AdaptedCache [B rows]: frozen; answer with `megatrain.generate(model, prompts, cache=cache)`.
        Its `losses` holds the mean span loss at each step.

    On exit every module and parameter of the model is the original object with its original
    values (the adapted weights lived in separate tensors), and requires_grad flags are restored.
    """
    model = _unwrap(model)
    contexts = _normalise(context_ids)
    check_adapt_args(
        model,
        [len(c) for c in contexts],
        steps=steps,
        span=span,
        lr=lr,
        target=target,
        lora_rank=lora_rank,
        optimizer=optimizer,
    )
    device = next(model.parameters()).device
    cache = prefill(model, contexts)
    swap = _Swap(model, len(contexts), target, lora_rank, seed)
    try:
        if steps:
            _train(
                model,
                contexts,
                cache,
                swap.params,
                steps=steps,
                span=span,
                lr=lr,
                seed=seed,
                optimizer=optimizer,
                device=device,
            )
        yield cache
    finally:
        swap.restore()


def _train(model, contexts, cache: AdaptedCache, params, *, steps, span, lr, seed, optimizer, device) -> None:
    if optimizer == "adamw":
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    else:
        opt = torch.optim.SGD(params, lr=lr)
    generators = [torch.Generator().manual_seed(seed + b) for b in range(len(contexts))]
    tokens = [torch.as_tensor(c, dtype=torch.long) for c in contexts]
    offsets = torch.arange(span + 1)
    with torch.enable_grad():
        for _ in range(steps):
            starts = torch.stack(
                [torch.randint(0, len(c) - span, (), generator=g) for c, g in zip(contexts, generators)]
            )
            windows = torch.stack([t[s + offsets] for t, s in zip(tokens, starts)]).to(device)  # [B, k+1]
            positions = (starts[:, None] + offsets[None, :span]).to(device)
            view = span_view(cache, starts.to(device), model.config.max_seq_len)
            # Sum over examples of each one's mean loss: every example's gradient is what it would be alone.
            loss = model(windows[:, :-1], labels=windows[:, 1:], cache=view, positions=positions) * len(contexts)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            cache.losses.append(loss.item() / len(contexts))
            cache.span_starts.append(starts.tolist())
