"""RL task data: problems with exact answers, as (question, answer, solution) records.

Two sources (`rl.task.source`):
- `embedded`: arithmetic word problems generated from a seed, with difficulty levels (level L
  chains L operations), exact integer answers and a reference solution written out step by step
  (the SFT target). Problem i of a split depends only on (seed, split, i).
- a `.jsonl` file: one object per line with a question and an answer field (names configurable,
  `rl.task.question_field` / `rl.task.answer_field`), and optionally a solution field; without a
  solution the SFT target is `#### ANSWER`.

Prompts and completions are plain text: `Question: ...\nAnswer:` and ` <solution>` ending in
`#### N`, which `megatrain.rl.rewards.math_reward` scores.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from typing import Optional

from megatrain.errors import DataError
from megatrain.files import write_atomic

TRAIN, HELD_OUT = 0, 1

_NAMES = ["Anne", "Emma", "Elinor", "Marianne", "Fanny", "Catherine", "Jane", "Harriet", "Edmund", "Henry"]
_ITEMS = ["apples", "letters", "ribbons", "books", "coins", "cakes", "flowers", "shells"]


@dataclass(frozen=True)
class Problem:
    question: str
    answer: str  # the exact answer as text ("42")
    solution: str  # step-by-step reference, ending "#### 42"

    @property
    def prompt(self) -> str:
        return format_prompt(self.question)


def format_prompt(question: str) -> str:
    return f"Question: {question}\nAnswer:"


def arithmetic_problem(seed: int, split: int, index: int, levels: list[int]) -> Problem:
    """Problem `index` of `split` (TRAIN / HELD_OUT): level L = L operations (+, -, x) on small
    numbers; every intermediate result stays a non-negative integer."""
    rng = random.Random(f"megatrain-arith/{seed}/{split}/{index}")
    level = levels[index % len(levels)]
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    total = rng.randint(2, 20)
    sentences = [f"{name} has {total} {item}."]
    steps = []
    for _ in range(level):
        op = rng.choice(["add", "sub", "mul"] if total <= 30 else ["add", "sub"])
        if op == "add":
            x = rng.randint(1, 20)
            sentences.append(f"{name} gets {x} more.")
            steps.append(f"{total} + {x} = {total + x}.")
            total += x
        elif op == "sub" and total > 1:
            x = rng.randint(1, total - 1)
            sentences.append(f"{name} gives away {x}.")
            steps.append(f"{total} - {x} = {total - x}.")
            total -= x
        else:
            x = rng.randint(2, 3)
            sentences.append(f"Then the {item} are {'doubled' if x == 2 else 'tripled'}.")
            steps.append(f"{total} * {x} = {total * x}.")
            total *= x
    sentences.append(f"How many {item} does {name} have?")
    solution = " ".join(steps + [f"#### {total}"])
    return Problem(" ".join(sentences), str(total), solution)


def embedded_problems(seed: int, split: int, count: int, levels: list[int]) -> list[Problem]:
    return [arithmetic_problem(seed, split, i, levels) for i in range(count)]


def load_jsonl(
    path: str,
    question_field: str = "question",
    answer_field: str = "answer",
    solution_field: Optional[str] = "solution",
    key: str = "rl.task.source",
) -> list[Problem]:
    """Problems from a jsonl file; DataError (one line naming the file and line) when it is missing,
    empty, not JSON, or a record lacks a field."""
    from megatrain.data.sources import read_jsonl_records

    problems = []
    for line_no, record in read_jsonl_records(path, key):
        for field in (question_field, answer_field):
            if field not in record or not isinstance(record[field], (str, int, float)):
                raise DataError(
                    f"{key}: '{path}' line {line_no} has no '{field}' field (set "
                    f"rl.task.question_field / rl.task.answer_field to the names it uses)"
                )
        answer = str(record[answer_field]).strip()
        solution = record.get(solution_field) if solution_field else None
        if not isinstance(solution, str) or not solution.strip():
            solution = f"#### {answer}"
        problems.append(Problem(str(record[question_field]), answer, solution.strip()))
    return problems


def task_splits(task_cfg) -> tuple[list[Problem], list[Problem]]:
    """(training problems, held-out problems) of `rl.task`; a jsonl file's last `held_out` records
    are held out."""
    t = task_cfg
    if t.source == "embedded":
        return (
            embedded_problems(t.seed, TRAIN, t.train_size, list(t.levels)),
            embedded_problems(t.seed, HELD_OUT, t.held_out, list(t.levels)),
        )
    problems = load_jsonl(t.source, t.question_field, t.answer_field, t.solution_field)
    if len(problems) <= t.held_out:
        raise DataError(
            f"rl.task.source: '{t.source}' has {len(problems)} records, not more than "
            f"rl.task.held_out={t.held_out}; lower rl.task.held_out or add records"
        )
    return problems[: -t.held_out], problems[-t.held_out :]


def write_pretraining_mix(path: str, seed: int, count: int, levels: list[int]) -> str:
    """A jsonl file of `count` solved problems as pretraining documents (the study mixes them into
    the corpus so early checkpoints have something to sharpen). Uses a split the RL job never
    samples, so held-out problems stay unseen."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    problems = (arithmetic_problem(seed, 2, i, levels) for i in range(count))
    write_atomic(path, "".join(json.dumps({"text": f"{p.prompt} {p.solution}\n"}) + "\n" for p in problems))
    return path
