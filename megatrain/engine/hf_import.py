"""`megatrain import`: a local Hugging Face Llama folder as a megatrain run directory.

The reverse of megatrain/engine/export.py, through the same tensor-name table (`megatrain_name`).
Reads config.json and safetensors weights (one `model.safetensors`, or shards listed in
`model.safetensors.index.json`) and the sentencepiece `tokenizer.model`; never a pickle.

What megatrain's Llama lacks is refused with one line naming the config field or tensor: biases
(attention_bias, mlp_bias, any `.bias` tensor), an activation other than silu, a RoPE scaling kind
other than the default, a head_dim other than hidden_size / num_attention_heads, attention dropout,
quantized weights, and a head that does not match `tie_word_embeddings` (a tied config with its own
`lm_head.weight`, or an untied one without it).

An imported run directory is an ordinary one: `config.yaml` (model.* from config.json, data.tokenizer
the imported tokenizer) and `checkpoints/step_0/` holding `model.safetensors`, `tokenizer.model` and
`megatrain.json` marked `weights_only` (no optimizer or DeepSpeed state), named by `checkpoints/latest`.
So `megatrain.load`, `generate`, `rl.init`, `ttt.init` and `megatrain export` read it like any
checkpoint, and `megatrain pretrain --config RUN/config.yaml --resume` continues from its weights
with a fresh optimizer at step 0.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Optional

from megatrain.engine.checkpoint import FORMAT_VERSION, META_FILE, WEIGHTS_FILE, checkpoint_root
from megatrain.engine.export import megatrain_name
from megatrain.errors import CheckpointError

__all__ = ["HFLlama", "is_hf_folder", "hf_model_config", "read_hf_llama", "import_hf_llama", "PICKLE_SUFFIXES"]

INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILE = "tokenizer.model"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")

# config.json fields that describe megatrain's Llama exactly when they hold these values (absent is fine).
_REQUIRED_VALUES = {
    "hidden_act": ("silu", "megatrain's MLP is SwiGLU (silu)"),
    "attention_bias": (False, "megatrain's attention projections have no bias"),
    "mlp_bias": (False, "megatrain's MLP projections have no bias"),
    "attention_dropout": (0.0, "megatrain has no attention dropout"),
    "quantization_config": (None, "megatrain reads unquantized weights only"),
}
# Buffers some older exports saved; derived from the config, so they are dropped.
_DERIVED_SUFFIXES = (".rotary_emb.inv_freq",)


@dataclasses.dataclass
class HFLlama:
    """What a Hugging Face Llama folder holds, in megatrain's terms.

    model: `ModelConfig` fields (dict); state: megatrain tensor name -> tensor, in the folder's dtype
    (a tied head stored once, as `embed.weight`); tokenizer: path of the sentencepiece model or None.
    """

    model: dict
    state: dict
    tokenizer: Optional[str]


def is_hf_folder(path: str) -> bool:
    """A Hugging Face folder (config.json) that is not one of megatrain's own directories."""
    return (
        os.path.isfile(os.path.join(path, "config.json"))
        and not os.path.isfile(os.path.join(path, META_FILE))
        and not os.path.isdir(checkpoint_root(path))
    )


def _read_json(path: str, what: str) -> dict:
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{what} '{path}' is not readable JSON ({type(exc).__name__})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{what} '{path}' must hold a JSON object")
    return data


def _rope(cfg: dict, where: str) -> float:
    """rope_theta, refusing scaling kinds megatrain does not implement (transformers 4.x: rope_theta +
    rope_scaling; 5.x: rope_parameters)."""
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or {}
    for source in (params, scaling):
        if not isinstance(source, dict):
            raise CheckpointError(f"{where}: rope_parameters / rope_scaling must be an object")
        kind = source.get("rope_type", source.get("type", "default"))
        if kind != "default":
            raise CheckpointError(
                f"{where}: RoPE scaling '{kind}' is not supported (megatrain implements plain "
                f"RoPE only: rope_type 'default')"
            )
    theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    if not isinstance(theta, (int, float)) or isinstance(theta, bool) or not theta > 0:
        raise CheckpointError(f"{where}: rope_theta must be a positive number, got {theta!r}")
    return float(theta)


def _model_config(cfg: dict, where: str) -> dict:
    """ModelConfig fields from a Llama config.json; refuses what megatrain's model cannot express."""
    if cfg.get("model_type") != "llama":
        raise CheckpointError(
            f"{where}: model_type {cfg.get('model_type')!r} is not supported (megatrain imports "
            f"model_type 'llama' only)"
        )
    for key, (allowed, why) in _REQUIRED_VALUES.items():
        value = cfg.get(key, allowed)
        if value != allowed and not (allowed is None and value == {}):
            raise CheckpointError(f"{where}: {key}={value!r} is not supported ({why})")
    sizes = {}
    for ours, theirs in (
        ("dim", "hidden_size"),
        ("layers", "num_hidden_layers"),
        ("heads", "num_attention_heads"),
        ("ffn_dim", "intermediate_size"),
        ("vocab_size", "vocab_size"),
        ("max_seq_len", "max_position_embeddings"),
    ):
        value = cfg.get(theirs)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise CheckpointError(f"{where}: {theirs} must be a positive integer, got {value!r}")
        sizes[ours] = value
    kv_heads = cfg.get("num_key_value_heads") or sizes["heads"]
    head_dim = cfg.get("head_dim") or sizes["dim"] // sizes["heads"]
    if sizes["dim"] % sizes["heads"] or head_dim != sizes["dim"] // sizes["heads"]:
        raise CheckpointError(
            f"{where}: head_dim={head_dim} is not supported (megatrain's head dim is hidden_size / "
            f"num_attention_heads = {sizes['dim']}/{sizes['heads']})"
        )
    eps = cfg.get("rms_norm_eps", 1e-6)
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps > 0:
        raise CheckpointError(f"{where}: rms_norm_eps must be a positive number, got {eps!r}")
    from megatrain.models.config import ModelConfig

    model = ModelConfig(
        preset=None,
        kv_heads=int(kv_heads),
        norm_eps=float(eps),
        rope_theta=_rope(cfg, where),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        **sizes,
    )
    from megatrain.errors import ConfigError

    try:
        model.validate()
    except ConfigError as exc:
        raise CheckpointError(f"{where}: {exc}") from None
    return dataclasses.asdict(model.resolved())


def _weight_files(path: str) -> list[str]:
    """The safetensors files of folder `path` (the shards its index lists, or model.safetensors)."""
    index = os.path.join(path, INDEX_FILE)
    if os.path.isfile(index):
        weight_map = _read_json(index, "index").get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"index '{index}' has no weight_map")
        files = sorted(set(weight_map.values()))
        for name in files:
            full = os.path.normpath(os.path.join(path, str(name)))
            if os.path.dirname(full) != os.path.normpath(path) or not os.path.isfile(full):
                raise CheckpointError(f"index '{index}' names shard '{name}', which is not a file in that folder")
        return [os.path.join(path, name) for name in files]
    single = os.path.join(path, WEIGHTS_FILE)
    if os.path.isfile(single):
        return [single]
    pickles = sorted(n for n in os.listdir(path) if n.endswith(PICKLE_SUFFIXES))
    if pickles:
        raise CheckpointError(
            f"'{path}' holds pickled weights ({pickles[0]}); megatrain reads safetensors only, "
            f"never unpickling: save the model with safe_serialization (model.safetensors)"
        )
    raise CheckpointError(f"'{path}' has no {WEIGHTS_FILE} or {INDEX_FILE}")


def _read_state(path: str, tied: bool, where: str) -> dict:
    from safetensors import safe_open

    state = {}
    for file in _weight_files(path):
        try:
            with safe_open(file, framework="pt") as fh:
                for name in fh.keys():
                    if name.endswith(_DERIVED_SUFFIXES):
                        continue
                    if name.endswith(".bias"):
                        raise CheckpointError(f"{where}: tensor '{name}' is a bias; megatrain's Llama has no biases")
                    try:
                        ours = megatrain_name(name)
                    except CheckpointError:
                        raise CheckpointError(
                            f"{where}: tensor '{name}' has no counterpart in megatrain's Llama "
                            f"(embed, q/k/v/o, gate/up/down, norms, lm_head)"
                        ) from None
                    state[ours] = fh.get_tensor(name)
        except CheckpointError:
            raise
        except Exception as exc:  # safetensors raises its own error types for damaged files
            raise CheckpointError(f"'{file}' is not a readable safetensors file ({type(exc).__name__})") from None
    if "head.weight" in state and tied:
        import torch

        if "embed.weight" in state and not torch.equal(state["head.weight"], state["embed.weight"]):
            raise CheckpointError(
                f"{where}: tie_word_embeddings=true but lm_head.weight differs from "
                f"embed_tokens.weight (a tied head must be the embedding)"
            )
        state.setdefault("embed.weight", state["head.weight"])
        del state["head.weight"]
    if "head.weight" not in state and not tied:
        raise CheckpointError(
            f"{where}: tie_word_embeddings=false but there is no lm_head.weight (an untied model needs its own head)"
        )
    return state


def hf_model_config(path: str) -> dict:
    """ModelConfig fields (dict) of Hugging Face folder `path` from its config.json alone (no tensors read)."""
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise CheckpointError(f"'{path}' is not a Hugging Face model folder (no config.json)")
    return _model_config(_read_json(config_path, "config"), f"Hugging Face model '{path}'")


def read_hf_llama(path: str, tokenizer: Optional[str] = None) -> HFLlama:
    """The model config, weights and tokenizer of Hugging Face Llama folder `path` (CheckpointError:
    one line naming what megatrain cannot take). `tokenizer` overrides the folder's tokenizer.model."""
    path = os.path.normpath(path)
    if os.path.isfile(path) and path.endswith(PICKLE_SUFFIXES):
        raise CheckpointError(f"'{path}' is a pickle; megatrain reads safetensors only, never unpickling")
    where = f"Hugging Face model '{path}'"
    model = hf_model_config(path)
    state = _read_state(path, model["tie_embeddings"], where)
    from megatrain.models.transformer import Transformer
    from megatrain.models.config import ModelConfig

    expected = Transformer(ModelConfig.from_dict(model), seed=0, device="meta").state_dict()
    if model["tie_embeddings"]:
        expected.pop("head.weight")
    missing = sorted(set(expected) - set(state))
    if missing:
        raise CheckpointError(f"{where}: tensor {missing[0]} is missing from its weights")
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise CheckpointError(
                f"{where}: tensor {name} has shape {tuple(tensor.shape)}, config.json implies "
                f"{tuple(expected[name].shape)}"
            )
        if not tensor.is_floating_point():
            raise CheckpointError(f"{where}: tensor {name} has dtype {tensor.dtype}; megatrain needs floating weights")
    if tokenizer is None:
        tokenizer = os.path.join(path, TOKENIZER_FILE)
        if not os.path.isfile(tokenizer):
            tokenizer = None
    if tokenizer is not None:
        from megatrain.data.tokenizer import Tokenizer

        vocab = Tokenizer(tokenizer).vocab_size  # DataError (one line) unless it is a sentencepiece model
        if vocab > model["vocab_size"]:
            raise CheckpointError(
                f"tokenizer '{tokenizer}' has {vocab} pieces, more than the model's vocab_size {model['vocab_size']}"
            )
    return HFLlama(model=model, state=state, tokenizer=tokenizer)


def import_hf_llama(path: str, output: str, tokenizer: Optional[str] = None) -> str:
    """Write run directory `output` (config.yaml, checkpoints/step_0 weights-only, latest) from Hugging Face
    Llama folder `path`. Refuses an existing non-empty `output`; writes into `output.tmp` and renames."""
    from safetensors.torch import save_file

    from megatrain.config import Config, save_config
    from megatrain.models.config import ModelConfig

    output = os.path.normpath(output)
    if os.path.exists(output) and (not os.path.isdir(output) or os.listdir(output)):
        raise CheckpointError(f"--output '{output}' exists and is not empty; choose a new folder")
    hf = read_hf_llama(path, tokenizer)
    if hf.tokenizer is None:
        raise CheckpointError(
            f"'{path}' has no sentencepiece {TOKENIZER_FILE} (megatrain reads sentencepiece "
            f"tokenizers only); pass --tokenizer FILE.model"
        )
    tmp = output + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    ckpt = os.path.join(checkpoint_root(tmp), "step_0")
    os.makedirs(ckpt)
    save_file(
        {name: t.contiguous() for name, t in hf.state.items()},
        os.path.join(ckpt, WEIGHTS_FILE),
        metadata={"format": "pt"},
    )
    shutil.copyfile(hf.tokenizer, os.path.join(ckpt, TOKENIZER_FILE))
    shutil.copyfile(hf.tokenizer, os.path.join(tmp, TOKENIZER_FILE))
    files = {name: os.path.getsize(os.path.join(ckpt, name)) for name in (WEIGHTS_FILE, TOKENIZER_FILE)}
    meta = {
        "format": FORMAT_VERSION,
        "step": 0,
        "weights_only": True,
        "model": hf.model,
        "imported_from": os.path.abspath(path),
        "files": files,
    }
    # Plain writes: the whole folder is built under `tmp` and only renamed to `output` when complete.
    with open(os.path.join(ckpt, META_FILE), "w", encoding="utf-8") as fh:
        json.dump(meta, fh, indent=1)
    with open(os.path.join(checkpoint_root(tmp), "latest"), "w", encoding="utf-8") as fh:
        fh.write("step_0")
    cfg = Config()
    cfg.run.dir = output
    cfg.model = ModelConfig.from_dict(hf.model)
    cfg.data.tokenizer = os.path.abspath(os.path.join(output, TOKENIZER_FILE))
    cfg.data.seq_len = min(cfg.data.seq_len, hf.model["max_seq_len"])
    save_config(cfg, os.path.join(tmp, "config.yaml"))
    if os.path.isdir(output):
        os.rmdir(output)
    os.replace(tmp, output)
    return output
