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
- The cache is static (KVCache.static_copy): buffers for prefix + prompt + max_new_tokens slots
  (rounded up to CAPACITY_BUCKET), allocated once, unwritten slots recorded at `max_seq_len - 1`
  (invisible like the pads), each step writing its token into the next slot in place. A decode step
  thus has fixed shapes and no host reads, and on CUDA it runs as a CUDA graph (`cuda_graphs`),
  captured at the first step of each batch size: with graphs, finished rows stay in the batch
  (fed token 0 at the pad position, their outputs ignored) until the running rows fit the next
  power of two, and only then are dropped. Sampling, stop checks and the dropping run eagerly
  between steps.
- Under sequence parallelism a forward must carry a multiple of the TP size in tokens; each step is
  then padded with invisible tokens the same way.

Sampling order: logits / temperature -> top-k -> top-p (nucleus over what top-k kept) -> one
draw by inverse CDF from a uniform of the row's own torch.Generator. A row's draws therefore depend
only on its seed and its own logits, not on which other rows share the batch, and all TP ranks
(which see the same logits and get the same seeds) draw the same token.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
import types
from typing import Callable, Optional, Sequence, Union

import torch
import torch.distributed as dist
from torch import Tensor, nn

from megatrain.errors import ConfigError
from megatrain.models.attention import KVCache

__all__ = ["generate", "is_truncated"]

StopItem = Union[str, int, Sequence[int]]


def generate(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    stop: Optional[Union[StopItem, Sequence[StopItem]]] = None,
    eos_id: Optional[Union[int, Sequence[int]]] = None,
    seed: Union[int, Sequence[int]] = 0,
    return_logprobs: bool = False,
    tokenizer=None,
    cache: Optional[KVCache] = None,
    cuda_graphs: Optional[bool] = None,
):
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
            the prefix is never recomputed. The cache itself is left unchanged (decoding extends a
            static copy, `cache.static_copy(...)`, of the same class). A prefix of p tokens needs
            p + len(prompt) + max_new_tokens <= model.max_seq_len.
        cuda_graphs: run each decode step as a CUDA graph replay, captured once per batch-size
            bucket (None: on when the model is on a CUDA device and its parameters are not ZeRO-3
            partitioned; False: eager steps; True: require them). The same math either way (a
            graph step attends over all static slots, the masked ones weighing exactly 0); on CPU
            the steps always run eagerly.

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
    graphs = _use_graphs(cuda_graphs, model, device)
    rows = len(prompts)
    lengths = torch.tensor([len(p) for p in prompts])
    starts = torch.zeros(rows, dtype=torch.long) if prefix is None else torch.tensor(prefix, dtype=torch.long)
    width = _round_up(int(lengths.max()), multiple)
    ids = torch.zeros(rows, width, dtype=torch.long)
    positions = torch.full((rows, width), pad_position, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.as_tensor(list(prompt), dtype=torch.long)
        positions[row, width - len(prompt) :] = starts[row] + torch.arange(len(prompt))
    generators = [torch.Generator().manual_seed(s) for s in seeds] if temperature > 0 else None

    new_tokens: list[list[int]] = [[] for _ in range(rows)]
    new_logprobs: list[list[float]] = [[] for _ in range(rows)]
    # The prompt index of each batch row; None: a finished row kept in its batch-size bucket (graphs only).
    batch_rows: list[Optional[int]] = list(range(rows))
    next_position = (starts + lengths).to(device)
    slots = (0 if cache is None else cache.length) + width + (max_new_tokens - 1) * multiple
    cache = (KVCache(cfg.layers) if cache is None else cache).static_copy(
        rows, _round_up(slots, CAPACITY_BUCKET), pad_position, attend_all=graphs, device=device
    )
    decode = _DecodeStep(model, cache, graphs)
    lockstep = _needs_lockstep(model)
    alive = None  # [bucket, 1] bool on the device while some batch rows are finished, else None
    with torch.no_grad():
        cache.begin_write(width)
        with _last_position_logits(model, multiple == 1):
            logits = model(ids.to(device), cache=cache, positions=positions.to(device))[:, -1]
        step = 0
        while True:
            live = running = [b for b, row in enumerate(batch_rows) if row is not None]
            if live:
                uniforms = None
                if generators is not None:
                    draws = [torch.rand((), generator=generators[batch_rows[b]], dtype=torch.float64) for b in live]
                    uniforms = torch.stack(draws).to(device)
                live_index = None if alive is None else torch.tensor(live, dtype=torch.long, device=device)
                live_logits = logits if live_index is None else logits.index_select(0, live_index)
                tokens, logprobs = _sample(live_logits.float(), temperature, top_k, top_p, uniforms, return_logprobs)
                token_list = tokens.tolist()
                logprob_list = logprobs.tolist() if return_logprobs else None
                if live_index is not None:  # finished rows feed token 0 (at pad_position: invisible)
                    tokens = torch.zeros(len(batch_rows), dtype=torch.long, device=device).index_copy_(
                        0, live_index, tokens
                    )
                step += 1
                for i, b in enumerate(live):
                    row = batch_rows[b]
                    new_tokens[row].append(token_list[i])
                    if return_logprobs:
                        new_logprobs[row].append(logprob_list[i])
                    if step == max_new_tokens or _stopped(
                        new_tokens[row], eos_ids, token_stops, text_stops, text_window, tokenizer
                    ):
                        batch_rows[b] = None
                running = [b for b, row in enumerate(batch_rows) if row is not None]
                bucket = _bucket(len(running), len(batch_rows), graphs)
                if bucket < len(batch_rows):
                    # Drop finished rows from the batch and the cache (with graphs: down to the next
                    # bucket, filled up with copies of a running row whose outputs are ignored).
                    keep = running + running[:1] * (bucket - len(running))
                    index = torch.tensor(keep, dtype=torch.long, device=device)
                    cache.select(index)
                    tokens, next_position = tokens.index_select(0, index), next_position.index_select(0, index)
                    batch_rows = [batch_rows[b] for b in running] + [None] * (bucket - len(running))
                    decode.reset()
                if len(running) != len(live):
                    alive = None
                    if len(running) < len(batch_rows):
                        alive = torch.tensor([row is not None for row in batch_rows], device=device)[:, None]
            if not (_any_rank(bool(running), device) if lockstep else running):
                break
            if not running:
                # Other ranks still decode, and each of their forwards gathers ZeRO-3 parameters
                # collectively: take part with a one-token forward.
                model(torch.zeros((1, multiple), dtype=torch.long, device=device))
                continue
            step_ids, step_positions = tokens[:, None], next_position[:, None]
            if alive is not None:
                step_positions = torch.where(alive, step_positions, pad_position)
            if multiple > 1:
                pad = (len(batch_rows), multiple - 1)
                step_ids = torch.cat((step_ids, torch.zeros(pad, dtype=torch.long, device=device)), dim=1)
                step_positions = torch.cat(
                    (step_positions, torch.full(pad, pad_position, dtype=torch.long, device=device)), dim=1
                )
            cache.begin_write(multiple)
            logits = decode(step_ids, step_positions)
            next_position = next_position + 1
    return (new_tokens, new_logprobs) if return_logprobs else new_tokens


CAPACITY_BUCKET = 64  # the static cache's slots are rounded up to a multiple of this


def _bucket(running: int, batch: int, graphs: bool) -> int:
    """Batch rows to decode `running` rows with: exactly them in eager mode; with CUDA graphs the next
    power of two (at most the current batch), so a call captures at most log2(rows) + 1 graphs."""
    if not graphs or running == 0:
        return running
    return min(batch, 1 << (running - 1).bit_length())


def _use_graphs(setting: Optional[bool], model: nn.Module, device: torch.device) -> bool:
    """Whether decode steps run as CUDA graphs: `cuda_graphs` None means on CUDA unless ZeRO-3 gathers
    parameters in forward hooks (host-side work a graph cannot replay); True requires them."""
    if setting is not None and not isinstance(setting, bool):
        raise ConfigError(f"generate: cuda_graphs must be None, True or False, got {setting!r}")
    if setting is False:
        return False
    partitioned = any(hasattr(p, "ds_id") for p in model.parameters())
    if setting is True and (device.type != "cuda" or partitioned):
        where = "a ZeRO-3 partitioned model" if partitioned else f"a model on {device.type}"
        raise ConfigError(f"generate: cuda_graphs=True needs a model on a CUDA device, not {where}")
    return device.type == "cuda" and not partitioned


class _DecodeStep:
    """One decode forward over the static cache: `step(ids [b, m], positions [b, m]) -> logits [b, V]`.

    Eager, or (graphs) a CUDA graph per batch size, captured at its first step and replayed after:
    the step's inputs are copied into the graph's own input tensors, and the cache's buffers and slot
    index (KVCache.begin_write advances it in place) are the tensors the graph was captured with.
    `reset()` drops the graphs (KVCache.select gives the cache new buffers).
    """

    def __init__(self, model: nn.Module, cache: KVCache, graphs: bool):
        self.model, self.cache, self.graphs = model, cache, graphs
        self.captured: dict[int, _Graph] = {}
        self.pool = None

    def forward(self, ids: Tensor, positions: Tensor) -> Tensor:
        return self.model(ids, cache=self.cache, positions=positions)[:, 0]

    def __call__(self, ids: Tensor, positions: Tensor) -> Tensor:
        if not self.graphs:
            return self.forward(ids, positions)
        graph = self.captured.get(ids.shape[0])
        if graph is None:
            graph = self.captured[ids.shape[0]] = _capture(self, ids, positions)
        graph.ids.copy_(ids)
        graph.positions.copy_(positions)
        graph.replay()
        return graph.logits

    def reset(self) -> None:
        self.captured.clear()


@dataclasses.dataclass
class _Graph:
    replay: Callable[[], None]
    ids: Tensor
    positions: Tensor
    logits: Tensor


def _capture(step: _DecodeStep, ids: Tensor, positions: Tensor) -> _Graph:
    """Capture `step.forward` on copies of ids and positions as a CUDA graph (after one warm-up run on a
    side stream, as torch.cuda.graphs asks; it writes the current slots, which every replay rewrites)."""
    static_ids, static_positions = ids.clone(), positions.clone()
    if step.pool is None:
        step.pool = torch.cuda.graph_pool_handle()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step.forward(static_ids, static_positions)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=step.pool):
        logits = step.forward(static_ids, static_positions)
    return _Graph(graph.replay, static_ids, static_positions, logits)


def _sample(
    logits: Tensor, temperature: float, top_k: int, top_p: float, uniforms: Optional[Tensor], with_logprobs: bool
) -> tuple[Tensor, Optional[Tensor]]:
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


def is_truncated(
    tokens: Sequence[int],
    max_new_tokens: int,
    *,
    stop: Optional[Union[StopItem, Sequence[StopItem]]] = None,
    eos_id: Optional[Union[int, Sequence[int]]] = None,
    tokenizer=None,
) -> bool:
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


def _stopped(
    tokens: list[int],
    eos_ids: frozenset,
    token_stops: list[list[int]],
    text_stops: list[str],
    text_window: int,
    tokenizer,
) -> bool:
    """Whether a row whose new tokens are `tokens` ends here (EOS, a stop sequence or a stop string)."""
    if tokens[-1] in eos_ids:
        return True
    for seq in token_stops:
        if len(tokens) >= len(seq) and tokens[-len(seq) :] == seq:
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
            raise ConfigError(
                f"generate: model {type(model).__name__} has no config.max_seq_len; pass a megatrain "
                f"Transformer (or the DeepSpeed engine's module)"
            )
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
        raise ConfigError(
            "generate: cache must be a KVCache holding a prefix (e.g. the one megatrain.ttt.adapt yields)"
        )
    batch = cache.keys[0].shape[0]
    if batch != rows:
        raise ConfigError(f"generate: the cache holds {batch} rows but {rows} prompts were given (one per row)")
    positions = cache.positions
    if positions is None:
        positions = torch.arange(cache.length)[None]
    positions = positions.expand(rows, -1)
    real = positions < pad_position
    return (torch.where(real, positions + 1, torch.zeros_like(positions)).amax(dim=1)).tolist()


def _check_prompts(
    prompts, vocab_size: int, max_new_tokens, max_seq_len: int, prefix: Optional[list[int]] = None
) -> None:
    if not _is_int(max_new_tokens) or max_new_tokens < 1:
        raise ConfigError(f"generate: max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) or len(prompts) == 0:
        raise ConfigError("generate: prompts must be a non-empty list of token-id lists")
    for i, prompt in enumerate(prompts):
        before = prefix[i] if prefix is not None else 0
        longest = max_seq_len - max_new_tokens - before
        if isinstance(prompt, (str, bytes)) or not isinstance(prompt, Sequence) or not all(_is_int(t) for t in prompt):
            raise ConfigError(
                f"generate: prompt {i} must be a list of token ids (ints); encode text with the tokenizer"
            )
        if len(prompt) == 0:
            raise ConfigError(f"generate: prompt {i} is empty; give at least one token (a BOS token for no context)")
        if len(prompt) > longest:
            after = f" after a cached prefix of {before} tokens" if before else ""
            raise ConfigError(
                f"generate: prompt {i} has {len(prompt)} tokens{after}; with max_new_tokens="
                f"{max_new_tokens} it may have at most model.max_seq_len - max_new_tokens"
                f"{' - prefix' if before else ''} = {longest}"
            )
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
            raise ConfigError(
                f"generate: each stop item must be a string, a token id or a non-empty token-id list, got {item!r}"
            )
    if text_stops and not callable(getattr(tokenizer, "decode", None)):
        raise ConfigError(
            "generate: stop strings need tokenizer= (an object with decode(list[int]) -> str); "
            "or give stop sequences as token-id lists"
        )
    return token_stops, text_stops


class _CallableModule(types.ModuleType):
    """Importing this module makes Python bind the package attribute `megatrain.generate` to the
    module itself, replacing the lazy function in megatrain/__init__.py; calling the module calls
    `generate`, so `megatrain.generate(model, prompts, ...)` works before and after that import."""

    def __call__(self, *args, **kwargs):
        return generate(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
