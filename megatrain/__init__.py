"""megatrain: distributed LLM pretraining with DeepSpeed ZeRO, tensor parallelism and fused Triton kernels."""

__version__ = "0.1.0"


def load(path, device="cpu"):
    """Load `(model, tokenizer, config)` from a run directory, a checkpoint directory or an export.

    `model(input_ids)` returns logits [B, N, V]; the tokenizer has encode(str) and decode(list[int]).
    """
    from megatrain.engine.load import load_for_inference  # imported here: `import megatrain` stays light

    return load_for_inference(path, device=device)


def generate(model, prompts, **kwargs):
    """Batched KV-cache sampling; see `megatrain.generate.generate` for the arguments.

    Imported on first use so that `import megatrain` stays light.
    """
    from megatrain.generate import generate as _generate

    return _generate(model, prompts, **kwargs)
