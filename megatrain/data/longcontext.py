"""Long-context evaluation tasks (qTTT's evaluation; any long-context check can use them).

Retrieval inside a real haystack: the filler is running text of the embedded corpus, by default
its held-out novel (`corpus.VAL_FILES`, never trained on), so the needle sits among real sentences
rather than repeated filler. Each example is built in token space, so its context has exactly
`length` tokens, with the (queried) needle starting at fraction `depth` of the filler:

- passkey: " The pass key is 48213. Remember it. 48213 is the pass key." / question " What is the
  pass key? The pass key is" / answer "48213" (5 random digits).
- needle: " The special magic number for the green door is 731942." / question " What is the special
  magic number for the green door? The special magic number for the green door is" / answer the
  number (the key varies, so the question names which needle to read).
- multikey: `keys` needles of the needle form with distinct keys, the queried one at `depth`,
  the others at random depths; the answer is the queried key's number.

A jsonl loader reads real long-context sets (LongBench, ZeroScrolls, ... exported as jsonl): one
record per line with a context, a question, an answer and optional choices (field names
configurable). With choices the prompt lists them as "A. ...", "B. ...", asks for the letter, and
the answer becomes that letter (multiple-choice accuracy); contexts longer than the requested
length keep their first and last halves (LongBench's middle truncation).

An example is a `LongContextExample`: context and question token ids (the answer is generated
after the question) and the reference answer text; `answer_correct` scores a generated text.
Data only: this module imports no models or engine code.
"""

from __future__ import annotations

import gzip
import re
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

from megatrain.errors import DataError

__all__ = [
    "RETRIEVAL_KINDS",
    "LongContextExample",
    "haystack_tokens",
    "retrieval_examples",
    "retrieval_document",
    "load_jsonl",
    "jsonl_examples",
    "answer_correct",
    "CHOICE_LETTERS",
]

RETRIEVAL_KINDS = ("needle", "passkey", "multikey")
CHOICE_LETTERS = "ABCDEFGHIJ"
# Keys of the needle / multikey tasks: "the <colour> <thing>", 12 x 12 = 144 distinct keys.
_COLOURS = ("red", "green", "blue", "yellow", "black", "white", "silver", "golden", "brown", "purple", "grey", "orange")
_THINGS = ("door", "box", "key", "horse", "ship", "tower", "garden", "lamp", "river", "bridge", "letter", "ring")


@dataclass
class LongContextExample:
    """One question about a long context.

    context: token ids the model reads (and qTTT trains on); question: token ids read after the
    context, after which the answer is generated; answer: the reference text; choices: the option
    texts of a multiple-choice question (answer is then a letter); length / depth: the cell
    (context tokens, needle depth in [0, 1] or None); kind: the task.
    """

    context: list
    question: list
    answer: str
    length: int
    depth: Optional[float] = None
    kind: str = "jsonl"
    choices: Optional[list] = field(default=None)


_HAYSTACKS: dict = {}


def _corpus_text(split: str) -> str:
    from megatrain.data.corpus import TRAIN_FILES, VAL_FILES

    files = VAL_FILES if split == "val" else TRAIN_FILES
    parts = []
    for path in files:
        with gzip.open(path, "rt", encoding="utf-8") as fh:
            parts.append(fh.read())
    # One space-separated stream of lines: needles are inserted between tokens of running prose.
    return re.sub(r"\s+", " ", "\n".join(parts)).strip()


def haystack_tokens(tokenizer, split: str = "val") -> np.ndarray:
    """Token ids (int64) of the embedded corpus' held-out novel (split "val") or of its training
    novels ("train"), tokenized once per tokenizer and kept."""
    if split not in ("val", "train"):
        raise ValueError(f"haystack split must be 'val' or 'train', got {split!r}")
    key = (getattr(tokenizer, "path", None) or id(tokenizer), split)
    if key not in _HAYSTACKS:
        _HAYSTACKS[key] = np.asarray(tokenizer.encode(_corpus_text(split)), dtype=np.int64)
    return _HAYSTACKS[key]


def _needle(kind: str, rng: np.random.Generator, key: Optional[str] = None) -> tuple[str, str, str]:
    """(needle sentence, question, answer) texts."""
    if kind == "passkey":
        value = "".join(str(d) for d in rng.integers(0, 10, size=5))
        return (
            f" The pass key is {value}. Remember it. {value} is the pass key.",
            " What is the pass key? The pass key is",
            value,
        )
    value = "".join(str(d) for d in rng.integers(0, 10, size=6))
    return (
        f" The special magic number for the {key} is {value}.",
        f" What is the special magic number for the {key}? The special magic number for the {key} is",
        value,
    )


def _keys(rng: np.random.Generator, count: int) -> list[str]:
    picks = rng.choice(len(_COLOURS) * len(_THINGS), size=count, replace=False)
    return [f"{_COLOURS[i // len(_THINGS)]} {_THINGS[i % len(_THINGS)]}" for i in picks]


def _compose(
    tokenizer,
    kind: str,
    rng: np.random.Generator,
    hay: np.ndarray,
    length: int,
    depth: float,
    keys: int,
    min_filler: int = 0,
) -> tuple[list, list, str]:
    """(context ids of exactly `length` tokens, question ids, answer) for one retrieval example
    (longer when the needles leave fewer than `min_filler` filler tokens)."""
    names = _keys(rng, keys if kind == "multikey" else 1) if kind != "passkey" else [None]
    needles = [_needle(kind, rng, name) for name in names]
    needle_ids = [tokenizer.encode(text) for text, _, _ in needles]
    filler = max(length - sum(len(ids) for ids in needle_ids), min_filler)
    if filler < 1:
        raise DataError(
            f"ttt.task.context_lengths: {length} tokens cannot hold the {kind} needle(s) "
            f"({length - filler} tokens); use longer contexts"
        )
    if filler >= len(hay):
        raise DataError(f"ttt.task.context_lengths: {length} tokens exceed the haystack ({len(hay)} tokens)")
    start = int(rng.integers(0, len(hay) - filler))
    text = hay[start : start + filler].tolist()
    # The queried needle (index 0) at `depth`; multikey distractors at random depths.
    depths = [depth] + [float(rng.random()) for _ in needle_ids[1:]]
    cuts = [int(round(d * filler)) for d in depths]
    order = sorted(range(len(needle_ids)), key=lambda i: (cuts[i], i))
    context, previous = [], 0
    for i in order:
        context += text[previous : cuts[i]] + needle_ids[i]
        previous = cuts[i]
    context += text[previous:]
    _, question, answer = needles[0]
    return context, tokenizer.encode(question), answer


def retrieval_examples(
    kind: str, tokenizer, *, length: int, depth: float, count: int, seed: int = 0, keys: int = 4, split: str = "val"
) -> list[LongContextExample]:
    """`count` retrieval examples of `kind` (needle | passkey | multikey) with contexts of exactly
    `length` tokens, the queried needle at `depth` in [0, 1], from the held-out novel (split "val").

    Example i of a cell is drawn from numpy's generator seeded with (seed, length, round(depth * 1000),
    i), so it does not depend on the other cells or on how many examples are asked for.
    """
    if kind not in RETRIEVAL_KINDS:
        raise DataError(
            f"ttt.task.kind={kind!r} is not a retrieval task (allowed: {', '.join(RETRIEVAL_KINDS)}, jsonl)"
        )
    if not 0.0 <= depth <= 1.0:
        raise DataError(f"ttt.task.depths: {depth} is not in [0, 1]")
    hay = haystack_tokens(tokenizer, split)
    out = []
    for i in range(count):
        rng = np.random.default_rng([int(seed), int(length), int(round(depth * 1000)), i])
        context, question, answer = _compose(tokenizer, kind, rng, hay, length, depth, keys)
        out.append(LongContextExample(context, question, answer, length, depth, kind))
    return out


def retrieval_document(
    kind: str, tokenizer, rng: np.random.Generator, length: int, keys: int = 4, split: str = "train"
) -> str:
    """One training document for a retrieval task: a context of `length` tokens of the training
    novels (split "train": the held-out novel stays unseen) with the needle(s) at a random depth,
    then the question and its answer, as text (for pretraining through a jsonl source). The context
    grows past `length` when the needles leave fewer than 16 tokens of filler."""
    hay = haystack_tokens(tokenizer, split)
    context, question, answer = _compose(tokenizer, kind, rng, hay, length, float(rng.random()), keys, min_filler=16)
    return tokenizer.decode(context + question) + " " + answer + "."


def load_jsonl(
    path: str,
    *,
    context_field: str = "context",
    question_field: str = "question",
    answer_field: str = "answer",
    choices_field: Optional[str] = "choices",
) -> list[dict]:
    """Records {context, question, answer, choices (list or None)} of a jsonl file, one per line.

    Raises DataError naming the file, the line and the missing field (ttt.task.*_field keys).
    """
    from megatrain.data.sources import read_jsonl_records

    out = []
    for number, record in read_jsonl_records(path, "ttt.task.path"):
        for key, name in (
            ("context_field", context_field),
            ("question_field", question_field),
            ("answer_field", answer_field),
        ):
            if name not in record:
                raise DataError(
                    f"ttt.task.{key}: '{path}' line {number} has no field '{name}' (fields: {', '.join(record)})"
                )
        choices = record.get(choices_field) if choices_field else None
        if choices is not None and (not isinstance(choices, list) or not 2 <= len(choices) <= len(CHOICE_LETTERS)):
            raise DataError(
                f"ttt.task.choices_field: '{path}' line {number}: '{choices_field}' must be a list of "
                f"2..{len(CHOICE_LETTERS)} options"
            )
        out.append(
            {
                "context": str(record[context_field]),
                "question": str(record[question_field]),
                "answer": record[answer_field],
                "choices": [str(c) for c in choices] if choices else None,
            }
        )
    return out


def _choice_letter(answer, choices: list, where: str) -> str:
    if isinstance(answer, int) and not isinstance(answer, bool) and 0 <= answer < len(choices):
        return CHOICE_LETTERS[answer]
    text = str(answer).strip()
    letters = CHOICE_LETTERS[: len(choices)]
    if len(text) == 1 and text.upper() in letters:
        return text.upper()
    if text in choices:
        return letters[choices.index(text)]
    raise DataError(
        f"ttt.task.answer_field: {where}: answer {answer!r} is neither a letter {letters[0]}-{letters[-1]}, "
        f"an option index nor one of the options"
    )


def jsonl_examples(records: Sequence[dict], tokenizer, length: int) -> list[LongContextExample]:
    """Examples of `load_jsonl` records with contexts cut to at most `length` tokens (first and
    last halves kept)."""
    out = []
    for i, record in enumerate(records):
        ids = tokenizer.encode(record["context"])
        if len(ids) > length:
            head = length // 2
            ids = ids[:head] + ids[len(ids) - (length - head) :]
        question = "\n\nQuestion: " + record["question"].strip()
        choices, answer = record["choices"], str(record["answer"]).strip()
        if choices:
            answer = _choice_letter(record["answer"], choices, f"record {i}")
            question += "".join(f"\n{CHOICE_LETTERS[j]}. {c}" for j, c in enumerate(choices))
            question += "\nAnswer with the letter of the correct option.\nAnswer:"
        else:
            question += "\nAnswer:"
        out.append(LongContextExample(ids, tokenizer.encode(question), answer, length, None, "jsonl", choices))
    return out


def _normalise(text: str) -> str:
    return re.sub(r"[^0-9a-z ]", "", text.lower()).strip()


def answer_correct(generated: str, example: LongContextExample) -> bool:
    """Whether a generated continuation answers `example`: multiple choice, its first letter is the
    answer's; otherwise the normalised text starts with the normalised answer."""
    if example.choices:
        letter = re.search(r"[A-Za-z]", generated)
        return letter is not None and letter.group(0).upper() == example.answer
    want = _normalise(example.answer)
    return bool(want) and (_normalise(generated) + " ").startswith(want + " ")
