"""Deterministic English-like text for the data tests."""

import random

WORDS = ("the of and to a in was her it that she had not be his with as you he for but at on "
         "said Elizabeth Darcy sister letter house garden morning walked quickly very could would "
         "Mr. Mrs. Bennet Jane ball evening happy family towards answered replied").split()


def english_like(seed: int, lines: int) -> str:
    """Deterministic sentences over a small vocabulary, one per line."""
    rng = random.Random(seed)
    out = []
    for _ in range(lines):
        words = [rng.choice(WORDS) for _ in range(rng.randint(5, 14))]
        words[0] = words[0].capitalize()
        out.append(" ".join(words) + rng.choice([".", ".", ",", "!", "?"]))
    return "\n".join(out) + "\n"
