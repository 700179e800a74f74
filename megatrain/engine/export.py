"""`megatrain export`: a run's dense model as a Hugging Face Llama folder.

Reads the consolidated `model.safetensors` every checkpoint carries (ZeRO-3 shards are gathered when
the checkpoint is written), renames tensors to the Llama layout and writes config.json,
model.safetensors and the sentencepiece tokenizer.model. megatrain's RoPE uses the half-split pairing
of Hugging Face's `rotate_half`, so q/k weights need no permutation.
"""

from __future__ import annotations

import json
import os
import re
import shutil

from megatrain.engine.checkpoint import META_FILE, WEIGHTS_FILE, read_meta, resolve_checkpoint_dir
from megatrain.errors import CheckpointError

# (megatrain name, Hugging Face Llama name): {layer} is a block index, {proj} one of the listed letters.
_NAME_PAIRS = [
    ("embed.weight", "model.embed_tokens.weight"),
    ("blocks.{layer}.attn_norm.weight", "model.layers.{layer}.input_layernorm.weight"),
    ("blocks.{layer}.attn.{qkvo}_proj.weight", "model.layers.{layer}.self_attn.{qkvo}_proj.weight"),
    ("blocks.{layer}.mlp_norm.weight", "model.layers.{layer}.post_attention_layernorm.weight"),
    ("blocks.{layer}.mlp.{mlp}_proj.weight", "model.layers.{layer}.mlp.{mlp}_proj.weight"),
    ("norm.weight", "model.norm.weight"),
    ("head.weight", "lm_head.weight"),
]
_FIELDS = {"layer": r"\d+", "qkvo": "q|k|v|o", "mlp": "gate|up|down"}


def _template_regex(template: str) -> re.Pattern:
    parts = re.split(r"\{(\w+)\}", template)  # literal, field, literal, field, ...
    body = "".join(re.escape(part) if i % 2 == 0 else f"(?P<{part}>{_FIELDS[part]})" for i, part in enumerate(parts))
    return re.compile(f"^{body}$")


def _rename(name: str, forward: bool):
    for ours, theirs in _NAME_PAIRS:
        source, target = (ours, theirs) if forward else (theirs, ours)
        match = _template_regex(source).match(name)
        if match:
            return target.format(**match.groupdict())
    return None


def megatrain_name(name: str) -> str:
    """Inverse of hf_name (for loading an exported folder back)."""
    out = _rename(name, forward=False)
    if out is None:
        raise CheckpointError(f"tensor '{name}' is not part of a megatrain Llama export")
    return out


def hf_name(name: str) -> str:
    out = _rename(name, forward=True)
    if out is None:
        raise CheckpointError(f"tensor '{name}' has no Hugging Face Llama equivalent (only dense models export)")
    return out


def hf_config(model: dict, dtype: str) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": model["dim"],
        "intermediate_size": model["ffn_dim"],
        "num_hidden_layers": model["layers"],
        "num_attention_heads": model["heads"],
        "num_key_value_heads": model["kv_heads"],
        "head_dim": model["dim"] // model["heads"],
        "vocab_size": model["vocab_size"],
        "max_position_embeddings": model["max_seq_len"],
        "rms_norm_eps": model["norm_eps"],
        "rope_theta": model["rope_theta"],
        "hidden_act": "silu",
        "tie_word_embeddings": bool(model["tie_embeddings"]),
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 3,
        "torch_dtype": dtype,
    }


def export_hf_llama(path: str, output: str) -> str:
    """Write `output/` (config.json, model.safetensors, tokenizer.model) from a run or checkpoint dir."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    ckpt = resolve_checkpoint_dir(os.path.normpath(path))
    if not os.path.isfile(os.path.join(ckpt, META_FILE)):
        raise CheckpointError(f"'{path}' is not a megatrain run or checkpoint directory (no {META_FILE})")
    meta = read_meta(ckpt)
    model = meta["model"]
    linear = model.get("linear", "dense")
    if linear == "cola":
        raise CheckpointError(
            f"'{ckpt}' holds a model.linear=cola model: silu(x @ a) @ b has no dense weight, so it "
            f"cannot export to Llama (dense, sltrain, relora and lora models can)"
        )
    if linear not in ("dense", "sltrain", "relora", "lora") or model.get("attention", "mha") != "mha":
        raise CheckpointError(
            f"'{ckpt}' holds a model.linear={linear} / model.attention="
            f"{model.get('attention')} model; only dense MHA/GQA models export to Llama"
        )
    if os.path.exists(output) and os.listdir(output):
        raise CheckpointError(f"--output '{output}' exists and is not empty; choose a new folder")
    state = {}
    with safe_open(os.path.join(ckpt, WEIGHTS_FILE), framework="pt") as fh:
        for name in fh.keys():
            if model["tie_embeddings"] and name == "head.weight":
                name_out = "embed.weight"  # safetensors keeps a shared tensor under one of its names
            else:
                name_out = name
            state[name_out] = fh.get_tensor(name)
    if linear != "dense":
        # sltrain / relora / lora merge exactly into one dense weight per projection.
        from megatrain.models.config import ModelConfig
        from megatrain.models.layers import dense_state_dict, lowrank_options

        options = lowrank_options(ModelConfig.from_dict(model).resolved())
        state = dense_state_dict(state, linear, options)
        model = {**model, "linear": "dense", "lowrank": {}, "exported_from_linear": linear}
    tensors = {hf_name(name): t.contiguous() for name, t in state.items()}
    dtype = str(next(iter(tensors.values())).dtype).replace("torch.", "")
    tmp = output.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save_file(tensors, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(tmp, "config.json"), "w") as fh:
        json.dump(hf_config(model, dtype), fh, indent=2)
    shutil.copyfile(os.path.join(ckpt, "tokenizer.model"), os.path.join(tmp, "tokenizer.model"))
    with open(os.path.join(tmp, "megatrain.json"), "w") as fh:
        json.dump(
            {"export": "hf-llama", "source_checkpoint": os.path.abspath(ckpt), "step": meta["step"], "model": model},
            fh,
            indent=1,
        )
    if os.path.exists(output):
        os.rmdir(output)
    os.replace(tmp, output)
    return output
