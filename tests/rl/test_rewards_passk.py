"""Reward parsing edge cases, pluggable rewards, task data, and pass@k against brute force."""

import itertools
import json
import math

import pytest

from megatrain.errors import ConfigError, DataError
from megatrain.rl import pass_at_k
from megatrain.rl.rewards import RewardError, extract_answer, load_reward, math_reward, score
from megatrain.rl.tasks import arithmetic_problem, load_jsonl, embedded_problems


@pytest.mark.parametrize(
    "completion, answer, want",
    [
        ("3 + 4 = 7. #### 7", "7", 1.0),
        ("#### 7\n", "7", 1.0),
        ("####7", "7", 1.0),
        ("The answer is \\boxed{42}.", "42", 1.0),
        ("\\boxed{ 42 }", "42", 1.0),
        ("#### 1,234", "1234", 1.0),
        ("#### 3.50", "3.5", 1.0),
        ("#### -5", "-5", 1.0),
        ("#### 8", "7", 0.1),  # well-formed, wrong
        ("#### 72", "7", 0.1),  # a longer number is not the answer
        ("#### 7.5", "7", 0.1),
        ("#### 8 then #### 7", "7", 0.1),  # the first marker counts
        ("\\boxed{7} #### 8", "7", 1.0),
        ("the answer is 7", "7", 0.0),  # no marker
        ("#### seven", "7", 0.0),
        ("\\boxed{}", "7", 0.0),
        ("", "7", 0.0),
    ],
)
def test_math_reward_parsing(completion, answer, want):
    assert math_reward("q", completion, answer) == want


def test_format_score_and_extract():
    assert math_reward("q", "#### 1", "2", format_score=0.25) == 0.25
    assert load_reward("megatrain.rl.rewards.math_reward", format_score=0.3)("q", "#### 1", "2") == 0.3
    assert extract_answer("x #### 12 y") == "12"
    assert extract_answer("nothing") is None


def _raises(prompt, completion, answer):
    raise ValueError("boom")


def _returns_text(prompt, completion, answer):
    return "1.0"


def _returns_nan(prompt, completion, answer):
    return float("nan")


@pytest.mark.parametrize(
    "fn, match",
    [(_raises, "raised ValueError: boom"), (_returns_text, "returned '1.0'"), (_returns_nan, "returned nan")],
)
def test_bad_reward_is_one_line_naming_function_and_sample(fn, match):
    with pytest.raises(RewardError, match=match) as info:
        score(fn, "Question: 2+2?\nAnswer:", " #### 4", "4", name="my.fn")
    assert "my.fn" in str(info.value) and "#### 4" in str(info.value) and "\n" not in str(info.value)


def test_load_reward_errors():
    with pytest.raises(ConfigError, match="cannot import"):
        load_reward("no_such_pkg_xyz.fn")
    with pytest.raises(ConfigError, match="has no function"):
        load_reward("megatrain.rl.rewards.no_such_fn")
    with pytest.raises(ConfigError, match="dotted path"):
        load_reward("fn")


def test_embedded_problems_are_exact_seeded_and_solved():
    problems = embedded_problems(3, 0, 50, [1, 2, 3])
    assert problems == embedded_problems(3, 0, 50, [1, 2, 3])
    assert problems != embedded_problems(4, 0, 50, [1, 2, 3])
    for p in problems:
        # The worked solution's steps are right and it earns the full reward.
        for step in p.solution.split(". ")[:-1] if ". " in p.solution else []:
            lhs, rhs = step.rstrip(".").split(" = ")
            assert eval(lhs) == int(rhs)
        assert math_reward(p.prompt, " " + p.solution, p.answer) == 1.0
        assert p.prompt.startswith("Question: ") and p.prompt.endswith("\nAnswer:")
    assert arithmetic_problem(0, 0, 0, [2]).solution.count("=") == 2


def test_load_jsonl(tmp_path):
    good = tmp_path / "t.jsonl"
    good.write_text(
        json.dumps({"q": "1+1?", "a": 2})
        + "\n\n"
        + json.dumps({"q": "2+2?", "a": "4", "solution": "2+2=4 #### 4"})
        + "\n"
    )
    probs = load_jsonl(str(good), "q", "a")
    assert [p.answer for p in probs] == ["2", "4"] and probs[0].solution == "#### 2"
    empty = tmp_path / "e.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match="holds no records"):
        load_jsonl(str(empty))
    bad = tmp_path / "b.jsonl"
    bad.write_text('{"question": "x", "answer": 1}\n{not json\n')
    with pytest.raises(DataError, match="line 2 is not valid JSON"):
        load_jsonl(str(bad))
    with pytest.raises(DataError, match="no 'question' field"):
        load_jsonl(str(good))
    with pytest.raises(DataError, match="does not exist"):
        load_jsonl(str(tmp_path / "missing.jsonl"))


def _brute_force(n, c, k):
    items = [1] * c + [0] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(items[i] for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", [1, 2, 5, 8])
def test_pass_at_k_against_enumeration(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(_brute_force(n, c, k), abs=1e-12)


def test_pass_at_k_closed_form_and_errors():
    assert pass_at_k(32, 3, 8) == pytest.approx(1 - math.comb(29, 8) / math.comb(32, 8))
    assert pass_at_k(10, 0, 5) == 0.0 and pass_at_k(10, 10, 1) == 1.0
    with pytest.raises(ConfigError, match="k <= n"):
        pass_at_k(8, 1, 9)
    with pytest.raises(ConfigError):
        pass_at_k(8, 9, 1)
