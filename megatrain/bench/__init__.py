"""`megatrain bench`: training throughput of one config over a list of settings, against peers.

For each setting (micro-batch, ZeRO stage, TP, activation checkpointing, torch.compile, kernel
backend, or any config key) the trainer's step is timed in alternating blocks against the same model
as transformers' LlamaForCausalLM trained through DeepSpeed with the same settings (the headline
ratio) and against a plain PyTorch loop; the result is a table, JSON and markdown (and a PNG with
`--plot`) under benchmarks/results/. docs/benchmarks.md describes the report and the MFU formula.
"""

from megatrain.bench.run import run_bench
from megatrain.bench.settings import Setting, parse_settings

__all__ = ["run_bench", "Setting", "parse_settings"]
