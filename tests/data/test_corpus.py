"""Tests of the embedded Austen corpus and of the R lazy-load database reader that builds it.

Everything here is offline: the shipped files are checked against PROVENANCE.md, and the
XDR decoder is exercised on serializations assembled byte by byte below.
"""

import bz2
import gzip
import hashlib
import lzma
import math
import re
import struct
import zlib

import pytest

from megatrain.data.corpus import CORPUS_DIR, NOVELS, TRAIN_FILES, VAL_FILES
from megatrain.data.corpus import build
from megatrain.data.corpus.build import (
    R_NAMES,
    RVector,
    decode_record,
    parse_provenance,
    read_lazyload_db,
    unserialize,
)
from megatrain.errors import DataError

# Each novel's title line and the first words of its narrative.
OPENINGS = {
    "sense_and_sensibility": ("SENSE AND SENSIBILITY", "The family of Dashwood had long been settled in Sussex."),
    "pride_and_prejudice": ("PRIDE AND PREJUDICE", "It is a truth universally acknowledged, that a single man"),
    "mansfield_park": ("MANSFIELD PARK", "About thirty years ago Miss Maria Ward, of Huntingdon,"),
    "emma": ("EMMA", "Emma Woodhouse, handsome, clever, and rich, with a comfortable home"),
    "northanger_abbey": ("NORTHANGER ABBEY", "No one who had ever seen Catherine Morland in her infancy"),
    "persuasion": ("Persuasion", "Sir Walter Elliot, of Kellynch Hall, in Somersetshire,"),
}
STEMS = [stem for stem, _, _ in NOVELS]


# ------------------------------------------------------------------------------------
# The shipped files
# ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def texts() -> dict:
    out = {}
    for stem in STEMS:
        raw = gzip.decompress((CORPUS_DIR / f"{stem}.txt.gz").read_bytes())
        out[stem] = (raw, raw.decode("utf-8"))  # strict decode: fails on invalid UTF-8
    return out


def test_novel_list_matches_build_mapping():
    assert STEMS == [
        "sense_and_sensibility",
        "pride_and_prejudice",
        "mansfield_park",
        "emma",
        "northanger_abbey",
        "persuasion",
    ]
    assert sorted(R_NAMES.values()) == sorted(STEMS)


@pytest.mark.parametrize("stem", STEMS)
def test_shipped_text_is_the_expected_novel(texts, stem):
    _, text = texts[stem]
    assert len(text) > 400_000
    assert text.endswith("\n") and "\r" not in text
    title, opening = OPENINGS[stem]
    assert text.splitlines()[0] == title
    # The opening sentence is wrapped across lines in the file; compare with spaces.
    head = " ".join(text[:6000].split())
    assert opening in head


def test_checksums_match_provenance(texts):
    table = parse_provenance(CORPUS_DIR / "PROVENANCE.md")
    assert sorted(table) == sorted(f"{stem}.txt.gz" for stem in STEMS)
    for stem in STEMS:
        raw, text = texts[stem]
        expected = table[f"{stem}.txt.gz"]
        assert hashlib.sha256(raw).hexdigest() == expected.sha256, stem
        assert text.count("\n") == expected.lines, stem
        assert len(text) == expected.chars, stem
    assert table["emma.txt.gz"].lines == 16235
    assert table["persuasion.txt.gz"].lines == 8328


def test_shipped_gzip_headers_are_reproducible():
    for stem in STEMS:
        header = (CORPUS_DIR / f"{stem}.txt.gz").read_bytes()[:10]
        assert header[:3] == b"\x1f\x8b\x08"
        assert header[3] == 0, "no file name or other optional fields"
        assert struct.unpack("<I", header[4:8])[0] == 0, "mtime must be 0"


def test_train_and_val_split():
    assert VAL_FILES == [CORPUS_DIR / "persuasion.txt.gz"]
    assert len(TRAIN_FILES) == 5
    assert not set(TRAIN_FILES) & set(VAL_FILES)
    assert set(TRAIN_FILES) | set(VAL_FILES) == {CORPUS_DIR / f"{s}.txt.gz" for s in STEMS}
    assert all(p.is_absolute() and p.is_file() for p in TRAIN_FILES + VAL_FILES)


# ------------------------------------------------------------------------------------
# Hand-built R serializations
# ------------------------------------------------------------------------------------


def ints(*values: int) -> bytes:
    return struct.pack(f">{len(values)}i", *values)


def header(version: int = 2) -> bytes:
    out = b"X\n" + ints(version, 0x040201, 0x020300)
    if version == 3:
        out += ints(5) + b"UTF-8"
    return out


UTF8, ASCII = 1 << 3, 1 << 6  # CHARSXP encoding bits (in the flag word's "levels")


def charsxp(s, levels: int = 0) -> bytes:
    if s is None:
        return ints(9, -1)
    b = s.encode("utf-8")
    return ints(9 | (levels << 12), len(b)) + b


def strsxp(items, attrs: bytes = b"") -> bytes:
    levels = lambda s: UTF8 if s is not None and not s.isascii() else ASCII
    flags = 16 | (0x200 if attrs else 0)
    return ints(flags, len(items)) + b"".join(charsxp(s, levels(s)) for s in items) + attrs


def symbol(name: str) -> bytes:
    return ints(1) + charsxp(name, ASCII)


NIL = ints(254)


def names_attr(names, sym: bytes) -> bytes:
    """An attribute pairlist holding only `names`; `sym` is the symbol or a reference to it."""
    return ints(0x402) + sym + strsxp(names) + NIL


def record(serialized: bytes) -> bytes:
    """An .rdb record as R writes it with compression TRUE: length + zlib stream."""
    return struct.pack(">I", len(serialized)) + zlib.compress(serialized)


def test_unserialize_character_vector_from_record():
    lines = ["It is a truth", "", None, "caf\u00e9 \u2014 na\u00efve"]
    blob = record(header(2) + strsxp(lines))
    value = unserialize(decode_record(blob, 1))
    assert isinstance(value, RVector) and value.sexptype == 16
    assert value == ["It is a truth", "", None, "café — naïve"]
    assert value.attributes == {}


def test_unserialize_numeric_logical_and_attributes():
    na = -(2**31)
    ser = (
        header(3)
        + ints(0x213, 3)  # named list of three
        + ints(13, 3, 7, na, -2)  # integer c(7, NA, -2)
        + ints(14, 2)
        + struct.pack(">2d", 1.5, float("nan"))  # double c(1.5, NaN)
        + ints(10, 3, 1, 0, na)  # logical c(TRUE, FALSE, NA)
        + names_attr(["i", "d", "l"], symbol("names"))
    )
    value = unserialize(ser)
    assert value.sexptype == 19
    assert value.names == ["i", "d", "l"]
    assert value[0] == [7, None, -2]
    assert value[1][0] == 1.5 and math.isnan(value[1][1])
    assert value[2] == [True, False, None]


def test_unserialize_latin1_string_and_reference():
    latin1 = ints(9 | ((1 << 2) << 12), 4) + "café".encode("latin-1")
    # list(a = "café", b = list()): the "names" symbol is defined inside b's attributes
    # and the outer list's attributes refer back to it (reference #1, index in the next int).
    ser = (
        header(2)
        + ints(0x213, 2)
        + ints(16, 1)
        + latin1
        + ints(0x213, 0)
        + names_attr([], symbol("names"))
        + names_attr(["a", "b"], ints(0xFF) + ints(1))
    )
    value = unserialize(ser)
    assert value == [["café"], []]
    assert value.names == ["a", "b"]
    assert value[1].names == []


@pytest.mark.parametrize(
    "bad, message",
    [
        (b"not R at all", "no 'X"),
        (b"A\n" + ints(2), "ASCII"),
        (b"X\n" + ints(4, 0, 0), "version 4"),
        (header(2) + ints(16, 5) + charsxp("only one"), "truncated"),
        (header(2) + ints(21, 0), "unsupported"),
    ],
)
def test_unserialize_rejects_bad_input(bad, message):
    with pytest.raises(DataError, match=message):
        unserialize(bad)


@pytest.mark.parametrize(
    "kind, compress",
    [
        (b"Z", zlib.compress),
        (b"2", bz2.compress),
        (b"X", lzma.compress),
        (b"0", bytes),
    ],
)
def test_decode_record_typed_compression(kind, compress):
    ser = header(2) + strsxp(["x"])
    blob = struct.pack(">I", len(ser)) + kind + compress(ser)
    assert unserialize(decode_record(blob, 3)) == ["x"]


def test_decode_record_rejects_unknown_compression_and_bad_length():
    ser = header(2) + strsxp(["x"])
    with pytest.raises(DataError, match="unknown compression"):
        decode_record(struct.pack(">I", len(ser)) + b"Q" + ser, 2)
    with pytest.raises(DataError, match="header says"):
        decode_record(struct.pack(">I", len(ser) + 1) + zlib.compress(ser), 1)


# ------------------------------------------------------------------------------------
# A tiny lazy-load database
# ------------------------------------------------------------------------------------


def write_db(directory, objects: dict) -> None:
    """Write Rdata.rdb/.rdx holding `objects` (name -> serialized bytes), like R does."""
    rdb, positions = b"", []
    for ser in objects.values():
        rec = record(ser)
        positions.append((len(rdb), len(rec)))
        rdb += rec
    variables = ints(0x213, len(objects)) + b"".join(ints(13, 2, o, n) for o, n in positions)
    variables += names_attr(list(objects), symbol("names"))
    index = (
        header(3)
        + ints(0x213, 3)
        + variables
        + ints(0x213, 0)
        + names_attr([], ints(0x1FF))  # references: empty named list
        + ints(10, 1, 1)  # compressed = TRUE
        + names_attr(["variables", "references", "compressed"], ints(0x1FF))
    )
    (directory / "Rdata.rdb").write_bytes(rdb)
    (directory / "Rdata.rdx").write_bytes(gzip.compress(index))


def test_read_lazyload_db_round_trip(tmp_path):
    write_db(
        tmp_path,
        {
            "first": header(2) + strsxp(["One line", "", "Zwei \u00fc"]),
            "second": header(3) + ints(13, 2, 41, 42),
        },
    )
    db = read_lazyload_db(tmp_path / "Rdata.rdb", tmp_path / "Rdata.rdx")
    assert list(db) == ["first", "second"]
    assert db["first"] == ["One line", "", "Zwei ü"]
    assert db["second"] == [41, 42]


def test_read_lazyload_db_errors(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        read_lazyload_db(tmp_path / "Rdata.rdb", tmp_path / "Rdata.rdx")
    (tmp_path / "Rdata.rdb").write_bytes(b"junk")
    (tmp_path / "Rdata.rdx").write_bytes(b"junk")
    with pytest.raises(DataError, match="not a lazy-load index"):
        read_lazyload_db(tmp_path / "Rdata.rdb", tmp_path / "Rdata.rdx")


def test_build_writes_reproducible_files(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    write_db(src, {name: header(2) + strsxp([f"Title {name}", "", "last line"]) for name in R_NAMES})
    stats = build.build(src, tmp_path / "a")
    build.build(src, tmp_path / "b")
    assert list(stats) == [f"{stem}.txt.gz" for stem in STEMS]
    for name in stats:
        first = (tmp_path / "a" / name).read_bytes()
        assert first == (tmp_path / "b" / name).read_bytes()
    text = gzip.decompress((tmp_path / "a" / "emma.txt.gz").read_bytes()).decode()
    assert text == "Title emma\n\nlast line\n"
    assert stats["emma.txt.gz"].lines == 3
    assert stats["emma.txt.gz"].chars == len(text)
    assert stats["emma.txt.gz"].sha256 == hashlib.sha256(text.encode()).hexdigest()

    # The command line rejects a database that lacks the novels with exit status 2.
    partial = tmp_path / "partial"
    partial.mkdir()
    write_db(partial, {"emma": header(2) + strsxp(["x"])})
    assert build.main(["--rdb-dir", str(partial), "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert re.fullmatch(r"error: .*lacks mansfieldpark, northangerabbey, .*\n", err)
