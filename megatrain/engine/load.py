"""`megatrain.load`: a trained model, its tokenizer and its model config, ready for inference.

Reads what every checkpoint (layout: megatrain/engine/checkpoint.py) and export carries for this
purpose: the consolidated `model.safetensors`, `megatrain.json` (the model config) and
`tokenizer.model`; no DeepSpeed state and nothing unpickled.
"""

from __future__ import annotations

import json
import os

from megatrain.engine.checkpoint import META_FILE, WEIGHTS_FILE, read_meta, resolve_checkpoint_dir
from megatrain.engine.export import megatrain_name
from megatrain.errors import CheckpointError

__all__ = ["load_for_inference"]


def load_for_inference(path: str, device="cpu"):
    """(model, tokenizer, model_config) from a run dir (its latest checkpoint), a checkpoint dir or an
    export dir. The model is in eval mode on `device`; `model(input_ids [B, N])` returns logits [B, N, V]."""
    from safetensors.torch import load_file

    from megatrain.data.tokenizer import Tokenizer
    from megatrain.models.config import ModelConfig
    from megatrain.models.transformer import Transformer

    path = resolve_checkpoint_dir(os.path.normpath(path))
    meta_path = os.path.join(path, META_FILE)
    if not os.path.isfile(meta_path):
        raise CheckpointError(f"'{path}' is not a megatrain run, checkpoint or export directory (no {META_FILE})")
    with open(meta_path, encoding="utf-8") as fh:
        meta = json.load(fh)
    exported = meta.get("export") == "hf-llama"
    if not exported:
        meta = read_meta(path)  # a checkpoint: its manifest is checked against the files on disk
    weights = os.path.join(path, WEIGHTS_FILE)
    if not os.path.isfile(weights):
        raise CheckpointError(f"'{path}' has no {WEIGHTS_FILE}")
    model_cfg = ModelConfig.from_dict(meta["model"])
    model = Transformer(model_cfg)
    state = load_file(weights)
    if exported:
        state = {megatrain_name(k): v for k, v in state.items()}
    if model_cfg.tie_embeddings:
        # safetensors stores a shared tensor once, under either name
        shared = state.get("embed.weight", state.get("head.weight"))
        if shared is not None:
            state["embed.weight"] = state["head.weight"] = shared
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"'{weights}' does not match the model config ({str(exc).splitlines()[0][:200]})") from None
    model.to(device).eval()
    tok_path = os.path.join(path, "tokenizer.model")
    if not os.path.isfile(tok_path):
        raise CheckpointError(f"'{path}' has no tokenizer.model next to its weights")
    return model, Tokenizer(tok_path), model_cfg
