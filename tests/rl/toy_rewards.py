"""Rewards for the RL job's tests (importable as tests.rl.toy_rewards.NAME from the repo root)."""


def letter_e(prompt: str, completion: str, answer: str) -> float:
    """Share of the letter 'e' among the completion's characters: dense, and easy to raise."""
    return completion.count("e") / max(1, len(completion))


def broken(prompt: str, completion: str, answer: str):
    return None
