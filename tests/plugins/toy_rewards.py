"""Rewards for the RL job's tests, imported by name (rl.reward=toy_rewards.NAME) in the jobs that tests start:
conftest.child_env puts tests/plugins/ on their PYTHONPATH, as a user puts the folder of their own reward module."""


def letter_e(prompt: str, completion: str, answer: str) -> float:
    """Share of the letter 'e' among the completion's characters: dense, and easy to raise."""
    return completion.count("e") / max(1, len(completion))


def broken(prompt: str, completion: str, answer: str):
    return None
