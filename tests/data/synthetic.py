"""Deterministic English-like text and small source files for the data tests."""

import random

WORDS = (
    "the of and to a in was her it that she had not be his with as you he for but at on "
    "said Elizabeth Darcy sister letter house garden morning walked quickly very could would "
    "Mr. Mrs. Bennet Jane ball evening happy family towards answered replied"
).split()


def english_like(seed: int, lines: int) -> str:
    """Deterministic sentences over a small vocabulary, one per line."""
    rng = random.Random(seed)
    out = []
    for _ in range(lines):
        words = [rng.choice(WORDS) for _ in range(rng.randint(5, 14))]
        words[0] = words[0].capitalize()
        out.append(" ".join(words) + rng.choice([".", ".", ",", "!", "?"]))
    return "\n".join(out) + "\n"


def write_sources(root):
    """One small file per format under `root`. Returns (paths sorted by name, {file name: its documents})."""
    import gzip
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = {
        "a.txt": ["Elizabeth walked.\nThe garden was quiet.\n"],
        "b.txt.gz": ["Café – naïve 日本.\nJane answered.\n"],
        "c.jsonl": ["first record", "second record, café"],
        "d.parquet": ["parquet one", "parquet two"],
        "e.json": ["json array one", "json array two"],
    }
    (root / "a.txt").write_text(docs["a.txt"][0], encoding="utf-8")
    with gzip.open(root / "b.txt.gz", "wt", encoding="utf-8") as fh:
        fh.write(docs["b.txt.gz"][0])
    with open(root / "c.jsonl", "w", encoding="utf-8") as fh:
        for i, text in enumerate(docs["c.jsonl"]):
            fh.write(json.dumps({"id": i, "text": text}, ensure_ascii=False) + "\n")
    pq.write_table(pa.table({"text": docs["d.parquet"], "n": [1, 2]}), root / "d.parquet")
    (root / "e.json").write_text(json.dumps([{"text": t} for t in docs["e.json"]]), encoding="utf-8")
    return [str(root / name) for name in sorted(docs)], docs


def all_docs(docs):
    """The documents of `write_sources`' files in the order of the sorted file names."""
    return [d for name in sorted(docs) for d in docs[name]]
