"""`megatrain.load`: a trained model, its tokenizer and its model config, ready for inference.

Reads what every checkpoint (layout: megatrain/engine/checkpoint.py) and export carries for this
purpose: the consolidated `model.safetensors`, `megatrain.json` (the model config) and
`tokenizer.model`; or a Hugging Face Llama folder (megatrain/engine/hf_import.py). No DeepSpeed
state and nothing unpickled: a pickle (.bin, .pt, ...) is refused.
"""

from __future__ import annotations

import json
import os

from megatrain.engine.checkpoint import META_FILE, WEIGHTS_FILE, read_meta, resolve_checkpoint_dir
from megatrain.engine.export import megatrain_name
from megatrain.engine.hf_import import PICKLE_SUFFIXES, is_hf_folder, read_hf_llama
from megatrain.errors import CheckpointError

__all__ = ["load_for_inference", "read_weights", "source_model"]


def source_model(path: str):
    """(model_config, tokenizer_path or None) of what `read_weights(path)` would read, without reading any
    tensor: for preflights. Raises CheckpointError (one line) for anything read_weights refuses up front."""
    from megatrain.engine.hf_import import TOKENIZER_FILE, hf_model_config
    from megatrain.models.config import ModelConfig

    path = os.path.normpath(path)
    if path.endswith(PICKLE_SUFFIXES) and os.path.isfile(path):
        raise CheckpointError(f"'{path}' is a pickle; megatrain loads safetensors only (never unpickling)")
    path = resolve_checkpoint_dir(path)
    if is_hf_folder(path):
        tokenizer = os.path.join(path, TOKENIZER_FILE)
        return ModelConfig.from_dict(hf_model_config(path)), tokenizer if os.path.isfile(tokenizer) else None
    if not os.path.isfile(os.path.join(path, META_FILE)):
        raise CheckpointError(
            f"'{path}' is not a megatrain run, checkpoint or export directory nor a Hugging "
            f"Face Llama folder (no {META_FILE}, no config.json)"
        )
    with open(os.path.join(path, META_FILE), encoding="utf-8") as fh:
        meta = json.load(fh)
    if meta.get("export") != "hf-llama":
        meta = read_meta(path)
    tokenizer = os.path.join(path, "tokenizer.model")
    return ModelConfig.from_dict(meta["model"]), tokenizer if os.path.isfile(tokenizer) else None


def read_weights(path: str):
    """(model_config, state, tokenizer_path) of a run dir (its latest checkpoint), a checkpoint dir, an
    export dir or a Hugging Face Llama folder. `state` maps megatrain names to tensors (a tied head under
    both names); tokenizer_path may be None only for a Hugging Face folder without tokenizer.model."""
    from safetensors.torch import load_file

    from megatrain.models.config import ModelConfig

    path = os.path.normpath(path)
    if path.endswith(PICKLE_SUFFIXES) and os.path.isfile(path):
        raise CheckpointError(f"'{path}' is a pickle; megatrain loads safetensors only (never unpickling)")
    path = resolve_checkpoint_dir(path)
    if is_hf_folder(path):
        hf = read_hf_llama(path)
        model_cfg, state, tok_path = ModelConfig.from_dict(hf.model), hf.state, hf.tokenizer
    else:
        meta_path = os.path.join(path, META_FILE)
        if not os.path.isfile(meta_path):
            raise CheckpointError(
                f"'{path}' is not a megatrain run, checkpoint or export directory nor a Hugging "
                f"Face Llama folder (no {META_FILE}, no config.json)"
            )
        with open(meta_path, encoding="utf-8") as fh:
            meta = json.load(fh)
        exported = meta.get("export") == "hf-llama"
        if not exported:
            meta = read_meta(path)  # a checkpoint: its manifest is checked against the files on disk
        weights = os.path.join(path, WEIGHTS_FILE)
        if not os.path.isfile(weights):
            raise CheckpointError(f"'{path}' has no {WEIGHTS_FILE}")
        model_cfg = ModelConfig.from_dict(meta["model"])
        state = load_file(weights)
        if exported:
            state = {megatrain_name(k): v for k, v in state.items()}
        tok_path = os.path.join(path, "tokenizer.model")
        if not os.path.isfile(tok_path):
            raise CheckpointError(f"'{path}' has no tokenizer.model next to its weights")
    if model_cfg.tie_embeddings:
        # safetensors stores a shared tensor once, under either name
        shared = state.get("embed.weight", state.get("head.weight"))
        if shared is not None:
            state["embed.weight"] = state["head.weight"] = shared
    return model_cfg, state, tok_path


def load_into(model, state: dict, where: str) -> None:
    """`model.load_state_dict(state, strict=True)`, a mismatch reported as one line naming `where`."""
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"'{where}' does not match the model config ({str(exc).splitlines()[0][:200]})") from None


def load_for_inference(path: str, device="cpu"):
    """(model, tokenizer, model_config) from a run dir (its latest checkpoint), a checkpoint dir, an
    export dir or a Hugging Face Llama folder with a sentencepiece tokenizer.model. The model is in eval
    mode on `device`; `model(input_ids [B, N])` returns logits [B, N, V]."""
    from megatrain.data.tokenizer import Tokenizer
    from megatrain.models.transformer import Transformer

    model_cfg, state, tok_path = read_weights(path)
    if tok_path is None:
        raise CheckpointError(
            f"'{path}' has no sentencepiece tokenizer.model (megatrain reads sentencepiece tokenizers only)"
        )
    model = Transformer(model_cfg)
    load_into(model, state, path)
    model.to(device).eval()
    return model, Tokenizer(tok_path), model_cfg
