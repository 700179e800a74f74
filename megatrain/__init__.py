"""megatrain: distributed LLM pretraining with DeepSpeed ZeRO, tensor parallelism and fused Triton kernels."""

from megatrain.fields import declare_section_module as _declare_section_module

__version__ = "0.1.0"

# The jobs own their config sections (schema and checks together); naming their modules here makes every
# process that imports megatrain know `rl.*` and `ttt.*` (megatrain.config imports them when it first
# builds a Config), while `import megatrain` stays light and the central config never imports the jobs.
_declare_section_module("megatrain.rl.config")
_declare_section_module("megatrain.ttt.config")


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
