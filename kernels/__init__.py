"""megatrain.kernels: the functional ops the models call, dispatched to an implementation.

The backend is chosen by the environment variable MEGATRAIN_KERNELS, read at every call (so tests
and scripts can switch it without re-importing):

- ``auto`` (default): a fused Triton kernel only where it was measured not slower than plain
  PyTorch (``megatrain.kernels.reference``) on that GPU architecture, at that op's shape class and
  mode (the table in ``kernels/measured.py``); the reference everywhere else, CPU tensors included.
- ``torch``: always the reference.
- ``triton``: always the Triton kernels. CPU tensors need ``TRITON_INTERPRET=1`` (Triton's
  interpreter runs the same kernels on CPU; that is how the test suite checks them).

One file per fused op (norm.py, rotary.py, activation.py, cross_entropy.py, lowrank.py,
sparse_lowrank.py, iha.py, projected_adam.py): private ``@triton.jit`` kernels named by phase, host
launchers that check inputs and pick block sizes, the passes as torch custom ops
(``torch.ops.megatrain.*``, kernels/library.py) with fake implementations, autograd and autocast
rules, and the functional entry point this module calls.
NVIDIA apex's fused RMSNorm is offered as ``apex_rms_norm`` (None when apex is not installed) for
benchmarks; it is never required.

Shapes: B = batch, H = heads, N = sequence length, d = head dim, D = hidden size, T = tokens,
V = vocabulary size.
"""

if __name__ == "megatrain.kernels":
    from .dispatch import *  # noqa: F401,F403  (the public API; dispatch.__all__ lists it)
    from .dispatch import __all__  # noqa: F401
else:
    # Imported as a top-level `kernels`: the repository root is on sys.path (`python -c` or `python -m`
    # from a checkout), and this folder shadows Hugging Face's `kernels` package, which transformers
    # imports. This folder is megatrain.kernels only: hand the name to the package it shadows.
    from ._shadow import hand_over

    hand_over(__name__, __file__)
