"""The embedded default corpus: Jane Austen's six completed novels (public domain).

Each novel is one gzip-compressed UTF-8 text file in this directory, one source line per
line. `PROVENANCE.md` says where the text comes from and lists the checksums;
`python -m megatrain.data.corpus.build` rebuilds the files from the Debian package.

This module only defines paths and metadata, so importing it is cheap.
"""

from pathlib import Path

#: Absolute path of the directory holding the .txt.gz files and PROVENANCE.md.
CORPUS_DIR: Path = Path(__file__).resolve().parent

#: (file stem, title, year of first publication), in publication order.
NOVELS: list[tuple[str, str, int]] = [
    ("sense_and_sensibility", "Sense and Sensibility", 1811),
    ("pride_and_prejudice", "Pride and Prejudice", 1813),
    ("mansfield_park", "Mansfield Park", 1814),
    ("emma", "Emma", 1815),
    ("northanger_abbey", "Northanger Abbey", 1817),
    ("persuasion", "Persuasion", 1817),
]

# Persuasion is held out: a whole unseen novel measures generalisation better than a
# random slice of lines would, since lines of one novel share names and phrasing.
_VAL_STEMS = ("persuasion",)

#: The five training novels' files, in publication order.
TRAIN_FILES: list[Path] = [CORPUS_DIR / f"{stem}.txt.gz" for stem, _, _ in NOVELS if stem not in _VAL_STEMS]

#: The held-out validation novel's file.
VAL_FILES: list[Path] = [CORPUS_DIR / f"{stem}.txt.gz" for stem, _, _ in NOVELS if stem in _VAL_STEMS]

__all__ = ["CORPUS_DIR", "NOVELS", "TRAIN_FILES", "VAL_FILES"]
