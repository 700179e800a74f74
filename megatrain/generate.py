"""Batched sampling with the model's KV cache: `megatrain.generate`.

RL rollouts and qTTT's answers both decode through this one function. It needs only the model
contract of models/transformer.py, `model(input_ids, cache=KVCache, positions=...) -> logits`, so
it runs unchanged on a plain Transformer, on a DeepSpeed engine's module (ZeRO-3 gathers each
layer's parameters in that layer's forward hooks) and on a tensor-parallel model (the parallel
layers communicate inside the forward; the vocab-parallel head returns the full logits [B, N, V]).

How a batch of prompts of different lengths is laid out:

- Prompts are left-padded to one width, each row's real tokens at positions 0..len-1, and every pad
  at position `max_seq_len - 1`. Attention is masked by position (a query at p sees keys at <= p)
  and no real query ever reaches `max_seq_len - 1` (a prompt plus its new tokens must fit in
  `max_seq_len`, and the last token is never fed back), so pads are invisible and each row computes
  exactly what it would alone. The pads stay in the cache, invisible, for the whole call.
- With a prefilled `cache` (a context computed once, e.g. by qTTT), row i's prompt starts at the
  position after its cached prefix instead of 0; the cache's own pads sit at `max_seq_len - 1` too.
- Step t feeds each row's last token at position len + t - 1. Rows that finished (EOS, a stop
  sequence) are dropped from the batch and from the cache, so they cost nothing afterwards.
- Under sequence parallelism a forward must carry a multiple of the TP size in tokens; each step is
  then padded with invisible tokens the same way.

Sampling order: logits / temperature -> top-k -> top-p (nucleus over what top-k kept) -> one
draw by inverse CDF from a uniform of the row's own torch.Generator. A row's draws therefore depend
only on its seed and its own logits, not on which other rows share the batch, and all TP ranks
(which see the same logits and get the same seeds) draw the same token.
"""

from __future__ import annotations

import contextlib
import math
import sys
import types
from typing import Optional, Sequence, Union

import torch
import torch.distributed as dist
from torch import Tensor, nn

from megatrain.errors import ConfigError
from megatrain.models.attention import KVCache

__all__ = ["generate", "is_truncated"]

StopItem = Union[str, int, Sequence[int]]


def generate(model: nn.Module, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, temperature: float = 0.0,
             top_p: float = 1.0, top_k: int = 0, stop: Optional[Union[StopItem, Sequence[StopItem]]] = None,
             eos_id: Optional[Union[int, Sequence[int]]] = None, seed: Union[int, Sequence[int]] = 0,
             return_logprobs: bool = False, tokenizer=None, cache: Optional[KVCache] = None):
    """Continue each prompt by up to `max_new_tokens` tokens, in one batch with a KV cache.

    Args:
        model: a megatrain Transformer (or a module with its contract: `config.max_seq_len`,
            `config.layers`, `config.vocab_size`, and `model(ids, cache=, positions=)` -> logits
            [B, N, V]); a wrapper with `.module` (a DeepSpeed engine) is unwrapped. Runs in the
            model's dtype and on its device, under torch.no_grad.
        prompts: token-id lists, any lengths >= 1; `len(prompt) + max_new_tokens` must not exceed
            `model.config.max_seq_len`.
        max_new_tokens: the most tokens generated per prompt (>= 1).
        temperature: 0 is greedy (argmax); > 0 divides the logits before sampling.
        top_p: nucleus sampling, keep the smallest set of most likely tokens whose probability
            reaches top_p (1.0: off).
        top_k: keep only the k most likely tokens (0: off). top-k runs before top-p.
        stop: stop sequences; one item or a list of items, each a list of token ids, a single token
            id, or a string. A row stops once its new tokens end with a token sequence, or once a
            string appears in the decoded text of its new tokens (strings need `tokenizer`).
        eos_id: a token id (or several) that ends a row.
        seed: one int (row i then uses seed + i) or one int per prompt. A row's samples depend only
            on its seed and its prompt, not on the other prompts in the call.
        return_logprobs: also return, for every new token, its log-probability log_softmax(logits /
            T)[token] with T = temperature (T = 1 when greedy): the model's distribution after
            temperature scaling, before top-k / top-p truncation. At temperature 1 this is the
            model's own log-probability, which an RL policy ratio needs.
        tokenizer: an object with `decode(list[int]) -> str`, needed for string stops (optional; the
            README's `megatrain.generate` paragraph shows it with a string stop; docs/architecture.md,
            "Jobs on top", describes this one decoding path).
        cache: a KVCache already holding a prefix for every prompt (row i belongs to prompt i), such
            as the context yielded by `megatrain.ttt.adapt`; each prompt continues its row's prefix
            right after the prefix's last position (positions >= model.max_seq_len - 1 are pads), so
            the prefix is never recomputed. The cache itself is left unchanged (decoding extends
            `cache.copy()`). A prefix of p tokens needs p + len(prompt) + max_new_tokens <=
            model.max_seq_len.

    Returns:
        A list with each prompt's new tokens (prompt excluded). A row's tokens end with the EOS
        token or with the token that completed a stop sequence/string, when that is why it stopped.
        With return_logprobs, a tuple (tokens, logprobs) of two such lists (floats).

    Raises:
        ConfigError: bad arguments (one line naming the argument and what is allowed).
    """
    model = _unwrap(model)
    cfg = model.config
    pad_position = cfg.max_seq_len - 1
    prefix = None
    if cache is not None and isinstance(prompts, Sequence) and not isinstance(prompts, (str, bytes)):
        prefix = _prefix_lengths(cache, len(prompts), pad_position)
    _check_prompts(prompts, cfg.vocab_size, max_new_tokens, cfg.max_seq_len, prefix)
    _check_sampling(temperature, top_p, top_k)
    seeds = _row_seeds(seed, len(prompts))
    eos_ids = _eos_set(eos_id)
    token_stops, text_stops = _split_stops(stop, tokenizer)
    text_window = _text_window(text_stops)

    device = next(model.parameters()).device
    multiple = _tokens_per_forward(model)
    rows = len(prompts)
    lengths = torch.tensor([len(p) for p in prompts])
    starts = torch.zeros(rows, dtype=torch.long) if prefix is None else torch.tensor(prefix, dtype=torch.long)
    width = _round_up(int(lengths.max()), multiple)
    ids = torch.zeros(rows, width, dtype=torch.long)
    positions = torch.full((rows, width), pad_position, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.as_tensor(list(prompt), dtype=torch.long)
        positions[row, width - len(prompt):] = starts[row] + torch.arange(len(prompt))
    generators = [torch.Generator().manual_seed(s) for s in seeds] if temperature > 0 else None

    new_tokens: list[list[int]] = [[] for _ in range(rows)]
    new_logprobs: list[list[float]] = [[] for _ in range(rows)]
    active = list(range(rows))  # the prompt index of each batch row still generating
    next_position = (starts + lengths).to(device)
    decode_positions = width + (max_new_tokens - 1) * multiple
    cache = (KVCache(cfg.layers, capacity=decode_positions) if cache is None
             else cache.copy(capacity=cache.length + decode_positions))
    lockstep = _needs_lockstep(model)
    with torch.no_grad():
        with _last_position_logits(model, multiple == 1):
            logits = model(ids.to(device), cache=cache, positions=positions.to(device))[:, -1]
        step = 0
        while True:
            if active:
                uniforms = None
                if generators is not None:
                    draws = [torch.rand((), generator=generators[row], dtype=torch.float64) for row in active]
                    uniforms = torch.stack(draws).to(device)
                tokens, logprobs = _sample(logits.float(), temperature, top_k, top_p, uniforms, return_logprobs)
                token_list = tokens.tolist()
                logprob_list = logprobs.tolist() if return_logprobs else None
                keep = []
                for b, row in enumerate(active):
                    new_tokens[row].append(token_list[b])
                    if return_logprobs:
                        new_logprobs[row].append(logprob_list[b])
                    if not _stopped(new_tokens[row], eos_ids, token_stops, text_stops, text_window, tokenizer):
                        keep.append(b)
                step += 1
                if step == max_new_tokens:
                    keep = []
                if len(keep) < len(active):
                    index = torch.tensor(keep, dtype=torch.long, device=device)
                    cache.select(index)
                    tokens, next_position = tokens[index], next_position[index]
                    active = [active[b] for b in keep]
            if not (_any_rank(bool(active), device) if lockstep else active):
                break
            if not active:
                # Other ranks still decode, and each of their forwards gathers ZeRO-3 parameters
                # collectively: take part with a one-token forward.
                model(torch.zeros((1, multiple), dtype=torch.long, device=device))
                continue
            step_ids, step_positions = tokens[:, None], next_position[:, None]
            if multiple > 1:
                pad = (len(active), multiple - 1)
                step_ids = torch.cat((step_ids, torch.zeros(pad, dtype=torch.long, device=device)), dim=1)
                step_positions = torch.cat(
                    (step_positions, torch.full(pad, pad_position, dtype=torch.long, device=device)), dim=1)
            logits = model(step_ids, cache=cache, positions=step_positions)[:, 0]
            next_position = next_position + 1
    return (new_tokens, new_logprobs) if return_logprobs else new_tokens


def _sample(logits: Tensor, temperature: float, top_k: int, top_p: float, uniforms: Optional[Tensor],
            with_logprobs: bool) -> tuple[Tensor, Optional[Tensor]]:
    """One token per row from fp32 logits [b, V]; returns (tokens [b], log-probabilities [b] or None).

    Greedy when `uniforms` is None; else inverse-CDF sampling of the truncated distribution with one
    uniform [b] in [0, 1) per row. The log-probability is log_softmax(logits / T) at the token
    (T = temperature, 1 when greedy), before truncation.
    """
    scaled = logits / temperature if temperature > 0 else logits
    if uniforms is None:
        tokens = scaled.argmax(dim=-1)
    else:
        vocab = scaled.shape[-1]
        if top_k > 0 or top_p < 1.0:
            # Most likely first: top-k keeps a prefix, top-p keeps the prefix whose mass before
            # each token is below top_p (so the most likely token always stays).
            sorted_scaled, order = scaled.sort(dim=-1, descending=True)
            probs = torch.softmax(sorted_scaled, dim=-1)
            if 0 < top_k < vocab:
                probs[:, top_k:] = 0.0
            if top_p < 1.0:
                mass_before = probs.cumsum(dim=-1) - probs
                probs = probs.masked_fill(mass_before >= top_p * probs.sum(dim=-1, keepdim=True), 0.0)
        else:
            order, probs = None, torch.softmax(scaled, dim=-1)
        cdf = probs.cumsum(dim=-1)
        # right=True: the first index whose cdf exceeds u * total, never a zero-probability token;
        # the clamp only guards rounding at u * total == total.
        target = (uniforms.to(cdf.dtype) * cdf[:, -1])[:, None]
        picked = torch.searchsorted(cdf, target, right=True).clamp_(max=vocab - 1)
        last_positive = (probs > 0).cumsum(dim=-1).argmax(dim=-1, keepdim=True)
        picked = torch.minimum(picked, last_positive)
        tokens = (picked if order is None else order.gather(-1, picked)).squeeze(-1)
    if not with_logprobs:
        return tokens, None
    return tokens, torch.log_softmax(scaled, dim=-1).gather(-1, tokens[:, None]).squeeze(-1)


def is_truncated(tokens: Sequence[int], max_new_tokens: int, *,
                 stop: Optional[Union[StopItem, Sequence[StopItem]]] = None,
                 eos_id: Optional[Union[int, Sequence[int]]] = None, tokenizer=None) -> bool:
    """Whether `generate` cut this row at `max_new_tokens` instead of the row ending by itself.

    `tokens` is one row of `generate`'s result and `max_new_tokens`, `stop`, `eos_id`, `tokenizer`
    the arguments of that call: a row is truncated when it holds max_new_tokens tokens and its last
    token did not end it (no EOS, no stop sequence or string completed), by the same test that
    `generate` applies after every token.
    """
    if len(tokens) < max_new_tokens:
        return False
    token_stops, text_stops = _split_stops(stop, tokenizer)
    return not _stopped(list(tokens), _eos_set(eos_id), token_stops, text_stops, _text_window(text_stops), tokenizer)


def _text_window(text_stops: list[str]) -> int:
    """Tokens to decode when looking for stop strings at the end of a row."""
    # A stop string of b UTF-8 bytes spans at most b tokens (each token decodes to >= 1 byte); the
    # margin covers tokenizers that drop a leading space when decoding a fragment.
    return max((len(s.encode("utf-8")) for s in text_stops), default=0) + 4


def _stopped(tokens: list[int], eos_ids: frozenset, token_stops: list[list[int]], text_stops: list[str],
             text_window: int, tokenizer) -> bool:
    """Whether a row whose new tokens are `tokens` ends here (EOS, a stop sequence or a stop string)."""
    if tokens[-1] in eos_ids:
        return True
    for seq in token_stops:
        if len(tokens) >= len(seq) and tokens[-len(seq):] == seq:
            return True
    if text_stops:
        text = tokenizer.decode(tokens[-text_window:])
        return any(s in text for s in text_stops)
    return False


# ------------------------------------------------------------------------------------- arguments


def _unwrap(model: nn.Module) -> nn.Module:
    """The Transformer inside a DeepSpeed engine (or another wrapper that keeps it as `.module`)."""
    while not hasattr(model, "config") or not hasattr(getattr(model, "config"), "max_seq_len"):
        inner = getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            raise ConfigError(f"generate: model {type(model).__name__} has no config.max_seq_len; pass a megatrain "
                              f"Transformer (or the DeepSpeed engine's module)")
        model = inner
    return model


@contextlib.contextmanager
def _last_position_logits(model: nn.Module, enabled: bool):
    """Let the prefill project only its last position to the vocabulary (transformers'
    logits_to_keep=1): the [B, N, V] logits of a long prompt are large and all but one row is unused.
    Off under sequence parallelism, where the head's input is this rank's slice of the sequence."""
    head = getattr(model, "head", None)
    if not enabled or not isinstance(head, nn.Module):
        yield
        return
    handle = head.register_forward_pre_hook(lambda module, args: (args[0][:, -1:], *args[1:]))
    try:
        yield
    finally:
        handle.remove()


def _needs_lockstep(model: nn.Module) -> bool:
    """Whether all processes must run the same number of forwards: under ZeRO-3 (its parameters
    carry DeepSpeed's `ds_id`) each forward all-gathers the parameters over the data-parallel ranks,
    which may hold prompts that finish at different steps."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return False
    return any(hasattr(p, "ds_id") for p in model.parameters())


def _any_rank(flag: bool, device) -> bool:
    """`flag` OR-ed over all processes (a MAX all-reduce of 0/1)."""
    value = torch.tensor([int(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def _tokens_per_forward(model: nn.Module) -> int:
    """Tokens per row a forward must carry a multiple of: the TP size under sequence parallelism
    (the sequence is split over TP ranks), else 1."""
    head = getattr(model, "head", None)
    if getattr(head, "sequence_parallel", False):
        return int(model.tensor_parallel[0])
    return 1


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _prefix_lengths(cache: KVCache, rows: int, pad_position: int) -> list[int]:
    """Tokens each row of a prefilled cache holds: 1 + its last real position (pads sit at
    `pad_position`); a cache filled without explicit positions holds 0..S-1 in every row."""
    if not isinstance(cache, KVCache) or cache.length == 0:
        raise ConfigError("generate: cache must be a KVCache holding a prefix (e.g. the one megatrain.ttt.adapt yields)")
    batch = cache.keys[0].shape[0]
    if batch != rows:
        raise ConfigError(f"generate: the cache holds {batch} rows but {rows} prompts were given (one per row)")
    positions = cache.positions
    if positions is None:
        positions = torch.arange(cache.length)[None]
    positions = positions.expand(rows, -1)
    real = positions < pad_position
    return (torch.where(real, positions + 1, torch.zeros_like(positions)).amax(dim=1)).tolist()


def _check_prompts(prompts, vocab_size: int, max_new_tokens, max_seq_len: int,
                   prefix: Optional[list[int]] = None) -> None:
    if not _is_int(max_new_tokens) or max_new_tokens < 1:
        raise ConfigError(f"generate: max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) or len(prompts) == 0:
        raise ConfigError("generate: prompts must be a non-empty list of token-id lists")
    for i, prompt in enumerate(prompts):
        before = prefix[i] if prefix is not None else 0
        longest = max_seq_len - max_new_tokens - before
        if isinstance(prompt, (str, bytes)) or not isinstance(prompt, Sequence) or not all(_is_int(t) for t in prompt):
            raise ConfigError(f"generate: prompt {i} must be a list of token ids (ints); encode text with the tokenizer")
        if len(prompt) == 0:
            raise ConfigError(f"generate: prompt {i} is empty; give at least one token (a BOS token for no context)")
        if len(prompt) > longest:
            after = f" after a cached prefix of {before} tokens" if before else ""
            raise ConfigError(f"generate: prompt {i} has {len(prompt)} tokens{after}; with max_new_tokens="
                              f"{max_new_tokens} it may have at most model.max_seq_len - max_new_tokens"
                              f"{' - prefix' if before else ''} = {longest}")
        if min(prompt) < 0 or max(prompt) >= vocab_size:
            raise ConfigError(f"generate: prompt {i} has a token id outside [0, model.vocab_size={vocab_size})")


def _check_sampling(temperature, top_p, top_k) -> None:
    if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature < 0:
        raise ConfigError(f"generate: temperature must be >= 0 (0 = greedy), got {temperature!r}")
    if not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise ConfigError(f"generate: top_p must lie in (0, 1], got {top_p!r}")
    if not _is_int(top_k) or top_k < 0:
        raise ConfigError(f"generate: top_k must be an integer >= 0 (0 = off), got {top_k!r}")


def _row_seeds(seed, rows: int) -> list[int]:
    if _is_int(seed):
        return [seed + i for i in range(rows)]
    if isinstance(seed, Sequence) and len(seed) == rows and all(_is_int(s) for s in seed):
        return list(seed)
    raise ConfigError(f"generate: seed must be one int or a list of {rows} ints (one per prompt), got {seed!r}")


def _eos_set(eos_id) -> frozenset:
    if eos_id is None:
        return frozenset()
    if _is_int(eos_id):
        return frozenset((eos_id,))
    if isinstance(eos_id, Sequence) and all(_is_int(e) for e in eos_id):
        return frozenset(eos_id)
    raise ConfigError(f"generate: eos_id must be a token id or a list of token ids, got {eos_id!r}")


def _split_stops(stop, tokenizer) -> tuple[list[list[int]], list[str]]:
    """(token-id stop sequences, stop strings) from `stop`: None, one item, or a list of items."""
    if stop is None:
        return [], []
    items = [stop] if isinstance(stop, str) or _is_int(stop) else stop
    if not isinstance(items, Sequence):
        raise ConfigError(f"generate: stop must be a string, a token-id list or a list of them, got {stop!r}")
    token_stops, text_stops = [], []
    for item in items:
        if isinstance(item, str):
            if not item:
                raise ConfigError("generate: stop strings must not be empty")
            text_stops.append(item)
        elif _is_int(item):
            token_stops.append([item])
        elif isinstance(item, Sequence) and len(item) > 0 and all(_is_int(t) for t in item):
            token_stops.append(list(item))
        else:
            raise ConfigError(f"generate: each stop item must be a string, a token id or a non-empty token-id list, "
                              f"got {item!r}")
    if text_stops and not callable(getattr(tokenizer, "decode", None)):
        raise ConfigError("generate: stop strings need tokenizer= (an object with decode(list[int]) -> str); "
                          "or give stop sequences as token-id lists")
    return token_stops, text_stops


class _CallableModule(types.ModuleType):
    """Importing this module makes Python bind the package attribute `megatrain.generate` to the
    module itself, replacing the lazy function in megatrain/__init__.py; calling the module calls
    `generate`, so `megatrain.generate(model, prompts, ...)` works before and after that import."""

    def __call__(self, *args, **kwargs):
        return generate(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
