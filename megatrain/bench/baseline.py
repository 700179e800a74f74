"""The peer baseline: megatrain's model as transformers' LlamaForCausalLM, with the same weights.

The tensor names come from `megatrain.engine.export` (the one map between megatrain and Hugging Face
Llama names), so the baseline is the model `megatrain export` would write, built in memory.
transformers is optional (the `bench` extra): `transformers_version()` is None without it, and
`hf_llama_from` raises ImportError.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from megatrain.engine.export import hf_config, hf_name


def transformers_version() -> Optional[str]:
    """The installed transformers version, or None when it cannot be imported."""
    try:
        import transformers
    except ImportError:
        return None
    return transformers.__version__


def baseline_unsupported(model_cfg) -> Optional[str]:
    """Why a model has no LlamaForCausalLM twin (None when it has one)."""
    if model_cfg.linear != "dense":
        return f"model.linear={model_cfg.linear} has no LlamaForCausalLM equivalent (dense only)"
    if model_cfg.attention != "mha":
        return f"model.attention={model_cfg.attention} has no LlamaForCausalLM equivalent (mha only)"
    return None


def hf_llama_from(model: torch.nn.Module, attn_implementation: str = "sdpa"):
    """A LlamaForCausalLM holding copies of `model`'s weights (a dense MHA/GQA megatrain Transformer).

    Same dtype and device as `model`. Its logits equal the megatrain model's (fp32: to rounding), and
    `hf(input_ids=x, labels=y, shift_labels=y).loss` equals `model(x, labels=y)` for megatrain's
    already-shifted labels. Raises ImportError without transformers.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    reason = baseline_unsupported(model.config)
    if reason is not None:
        raise ValueError(reason)
    weight = next(model.parameters())
    config = LlamaConfig(**hf_config(dataclasses.asdict(model.config), str(weight.dtype).replace("torch.", "")))
    config._attn_implementation = attn_implementation
    with torch.device(weight.device):
        hf = LlamaForCausalLM(config).to(weight.dtype)
    hf.load_state_dict({hf_name(name): tensor for name, tensor in model.state_dict().items()}, strict=True)
    hf.train(model.training)
    return hf
