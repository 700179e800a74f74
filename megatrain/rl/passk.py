"""Unbiased pass@k (Chen et al. 2021): the chance that at least one of k samples drawn without
replacement from n generated samples, c of them correct, is correct."""

from __future__ import annotations

from megatrain.errors import ConfigError


def pass_at_k(n: int, c: int, k: int) -> float:
    """1 - C(n-c, k) / C(n, k), computed as a stable product 1 - prod_{i=n-c+1}^{n} (1 - k/i).

    Raises ConfigError unless 1 <= k <= n and 0 <= c <= n.
    """
    if not 1 <= k <= n:
        raise ConfigError(f"pass@k needs 1 <= k <= n samples, got k={k}, n={n}")
    if not 0 <= c <= n:
        raise ConfigError(f"pass@k needs 0 <= correct <= n, got c={c}, n={n}")
    if n - c < k:
        return 1.0
    miss = 1.0
    for i in range(n - c + 1, n + 1):
        miss *= 1.0 - k / i
    return 1.0 - miss


def mean_pass_at_k(correct_counts, n: int, k: int) -> float:
    """pass@k averaged over problems, each with `n` samples and correct_counts[i] correct."""
    counts = list(correct_counts)
    return sum(pass_at_k(n, c, k) for c in counts) / max(1, len(counts))
