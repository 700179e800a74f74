"""Whether a model splits over tensor-parallel ranks: the config's validation and `parallelize` both ask here."""

from __future__ import annotations

from megatrain.errors import ConfigError

__all__ = ["check_tensor_split", "check_vocab_split", "check_context_split"]


def check_vocab_split(vocab_size: int, tp: int, what: str) -> None:
    """Raise ConfigError unless `tp` ranks split a vocabulary of `vocab_size` rows evenly.

    `what` names where the size comes from in the message, e.g. "model.vocab_size=50" or
    "the tokenizer's vocabulary 4097"; the fix is always a model.vocab_size that `tp` divides.
    """
    if vocab_size % tp:
        raise ConfigError(
            f"parallel.tensor={tp} does not divide {what}; set model.vocab_size to a multiple of {tp} "
            f"(e.g. {-(-vocab_size // tp) * tp})"
        )


def check_tensor_split(m, tp: int) -> None:
    """Raise ConfigError unless the resolved ModelConfig `m` splits over `tp` tensor-parallel ranks.

    Heads and the SwiGLU width split evenly; key/value heads split, or are replicated when there are
    fewer than ranks; the vocabulary (when known) splits; IHA mixes heads across ranks only in
    model.iha.tp_mode=exact (docs/tensor-parallel.md, docs/iha.md). The low-rank kinds split their
    factors along D_in or D_out, never along the rank r, so r needs not divide by `tp`.
    """
    if tp == 1:
        return
    if m.heads % tp:
        raise ConfigError(f"parallel.tensor={tp} does not divide model.heads={m.heads}")
    if m.kv_heads % tp and tp % m.kv_heads:
        raise ConfigError(
            f"parallel.tensor={tp} and model.kv_heads={m.kv_heads}: one must divide the other "
            f"(fewer KV heads than TP ranks are replicated)"
        )
    if m.ffn_dim % tp:
        raise ConfigError(f"parallel.tensor={tp} does not divide model.ffn_dim={m.ffn_dim}")
    if m.vocab_size is not None:
        check_vocab_split(m.vocab_size, tp, f"model.vocab_size={m.vocab_size}")
    if m.attention == "iha":
        iha = m.iha
        if iha.tp_mode == "local" and iha.head_groups % tp:
            raise ConfigError(
                f"model.iha.tp_mode=local mixes heads only inside each tensor-parallel rank: set "
                f"model.iha.head_groups to a multiple of parallel.tensor={tp} (got "
                f"{iha.head_groups}), or use model.iha.tp_mode=exact"
            )
        if iha.collapse == "global" and iha.head_groups % tp:
            raise ConfigError(
                f"model.iha.collapse=global with parallel.tensor={tp} needs model.iha.head_groups a "
                f"multiple of {tp} (the collapse must not cross ranks), got {iha.head_groups}; or use "
                f"model.iha.collapse=per_head"
            )


def check_context_split(m, context: int, tensor: int = 1, seq_len: int | None = None) -> None:
    """Raise ConfigError unless the resolved ModelConfig `m` splits over `context` Ulysses context-parallel
    ranks (docs/parallelism.md): each rank attends over the whole sequence for heads / (tensor x context)
    query heads, so that must divide; the key/value heads split the same way or are replicated when there
    are fewer (kv_heads and tensor x context divide one another); the sequence splits evenly."""
    if context == 1:
        return
    split = tensor * context
    what = f"parallel.context={context}" if tensor == 1 else f"parallel.tensor x parallel.context = {split}"
    if m.heads % split:
        raise ConfigError(
            f"{what} does not divide model.heads={m.heads} (each context rank attends with "
            f"heads / (tensor x context) heads)"
        )
    if m.kv_heads % split and split % m.kv_heads:
        raise ConfigError(
            f"{what} and model.kv_heads={m.kv_heads}: one must divide the other (fewer KV heads "
            f"than ranks are replicated)"
        )
    if seq_len is not None and seq_len % context:
        raise ConfigError(f"parallel.context={context} does not divide data.seq_len={seq_len}")


# The jobs other than pretraining that run a layout: the qTTT job splits its context prefill over
# parallel.context ranks (megatrain.parallel.context_parallel.context_prefill).
_JOB_LAYOUTS = {"ttt": ("context",), "rl": ()}


def check_pretraining_only_layouts(cfg, job: str) -> None:
    """ConfigError (one line) when `job` (rl, ttt), which builds its own groups and loops, is given a layout
    it does not run: pipeline stages (parallel.pipeline) anywhere, context parallelism (parallel.context)
    outside the ttt job."""
    for key, what in (("context", "context parallelism"), ("pipeline", "pipeline parallelism")):
        value = getattr(cfg.parallel, key, 1)
        if value != 1 and key not in _JOB_LAYOUTS.get(job, ()):
            where = "pretraining and the ttt job" if key == "context" else "pretraining"
            raise ConfigError(
                f"parallel.{key}={value}: {what} runs in {where} only; the {job} job needs parallel.{key}=1"
            )
