"""Rebuild the embedded Austen corpus from the Debian package r-cran-janeaustenr.

Usage::

    python -m megatrain.data.corpus.build [--deb PATH | --rdb-dir DIR] [--out DIR]

With neither --deb nor --rdb-dir the package is fetched with ``apt-get download``. The R
package keeps its data in a lazy-load database (``data/Rdata.rdb`` + ``Rdata.rdx``); this
module reads it with a small pure-Python decoder of R's XDR serialization format, so no R
installation is needed. Each novel is written as ``<out>/<stem>.txt.gz`` (gzip mtime 0, so
rebuilding gives identical bytes) and checked against the table in PROVENANCE.md.

Only what a data package needs is decoded: vectors, strings, symbols, pairlists,
attributes, back-references and environments. Anything else fails with a clear error
rather than being guessed at.
"""

from __future__ import annotations

import argparse
import bz2
import gzip
import hashlib
import io
import lzma
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Optional

from megatrain.data.corpus import CORPUS_DIR, NOVELS
from megatrain.errors import DataError, MegatrainError

DEB_PACKAGE = "r-cran-janeaustenr"

#: Object name inside the R package -> file stem we ship.
R_NAMES: dict[str, str] = {
    "sensesensibility": "sense_and_sensibility",
    "prideprejudice": "pride_and_prejudice",
    "mansfieldpark": "mansfield_park",
    "emma": "emma",
    "northangerabbey": "northanger_abbey",
    "persuasion": "persuasion",
}


# --------------------------------------------------------------------------------------
# R objects as Python values
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RSymbol:
    """An R symbol (a name such as an attribute tag)."""

    name: str


@dataclass(frozen=True)
class RSpecial:
    """One of R's singleton objects that has no data, e.g. the global environment."""

    name: str


class RVector(list):
    """An R vector or list: a plain Python list that also carries R's type and attributes.

    Being a list subclass, it compares equal to a list with the same elements. NA values
    are None (NaN for doubles, since R's NA_real_ is a NaN).
    """

    def __init__(self, values=(), sexptype: int = 0, attributes: Optional[dict[str, Any]] = None):
        super().__init__(values)
        self.sexptype = sexptype
        self.attributes: dict[str, Any] = attributes if attributes is not None else {}

    @property
    def names(self) -> Optional[list]:
        """The "names" attribute, or None when absent."""
        return self.attributes.get("names")


class RPairList(list):
    """An R pairlist (or language object): a list of (tag name or None, value) pairs."""

    def __init__(self, items=(), sexptype: int = 0, attributes: Optional[dict[str, Any]] = None):
        super().__init__(items)
        self.sexptype = sexptype
        self.attributes: dict[str, Any] = attributes if attributes is not None else {}


@dataclass(eq=False)
class REnvironment:
    """An R environment; identity matters (references point at the same object)."""

    locked: bool = False
    enclosure: Any = None
    frame: Any = None
    hashtab: Any = None
    attributes: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RPersistent:
    """A reference R resolves through a caller-supplied hook (kept as its name strings)."""

    kind: str
    names: tuple


# --------------------------------------------------------------------------------------
# XDR unserialization
# --------------------------------------------------------------------------------------

# SEXP type codes (R internals), limited to those we decode or want to name in errors.
NILSXP, SYMSXP, LISTSXP, CLOSXP, ENVSXP, PROMSXP, LANGSXP = 0, 1, 2, 3, 4, 5, 6
SPECIALSXP, BUILTINSXP, CHARSXP, LGLSXP, INTSXP, REALSXP, CPLXSXP = 7, 8, 9, 10, 13, 14, 15
STRSXP, DOTSXP, VECSXP, EXPRSXP, RAWSXP, S4SXP = 16, 17, 19, 20, 24, 25
# Pseudo-types that exist only in serialized streams.
REFSXP, NILVALUE_SXP, GLOBALENV_SXP, UNBOUNDVALUE_SXP = 255, 254, 253, 252
MISSINGARG_SXP, BASENAMESPACE_SXP, NAMESPACESXP, PACKAGESXP = 251, 250, 249, 248
PERSISTSXP, EMPTYENV_SXP, BASEENV_SXP, ALTREP_SXP = 247, 242, 241, 238

_SINGLETONS = {
    GLOBALENV_SXP: "globalenv",
    UNBOUNDVALUE_SXP: "unbound",
    MISSINGARG_SXP: "missing_arg",
    BASENAMESPACE_SXP: "base_namespace",
    EMPTYENV_SXP: "emptyenv",
    BASEENV_SXP: "baseenv",
}
_PAIRLIST_TYPES = (LISTSXP, LANGSXP, CLOSXP, PROMSXP, DOTSXP)
_TYPE_NAMES = {
    3: "closure",
    4: "environment",
    5: "promise",
    6: "language",
    17: "dots",
    18: "any",
    21: "bytecode",
    22: "external pointer",
    23: "weak reference",
    238: "ALTREP",
    246: "class reference",
    245: "generic reference",
    244: "bytecode reference",
}

# Flag word layout: low byte = type; bit 8 = is-object; bit 9 = has attributes;
# bit 10 = has tag; bits 12+ = "levels" (for CHARSXP: the encoding bits below).
_IS_OBJECT, _HAS_ATTR, _HAS_TAG = 1 << 8, 1 << 9, 1 << 10
_BYTES_MASK, _LATIN1_MASK, _UTF8_MASK, _ASCII_MASK = 1 << 1, 1 << 2, 1 << 3, 1 << 6

_NA_INTEGER = -(2**31)


class _Stream:
    """Big-endian reader over a byte buffer with bounds checks that name the problem."""

    def __init__(self, data: bytes):
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        end = self.pos + n
        if n < 0 or end > len(self.data):
            raise DataError(f"R serialization is truncated (wanted {n} bytes at offset {self.pos})")
        chunk = self.data[self.pos : end]
        self.pos = end
        return chunk

    def int(self) -> int:
        return struct.unpack(">i", self.take(4))[0]

    def ints(self, n: int) -> tuple:
        return struct.unpack(f">{n}i", self.take(4 * n))

    def doubles(self, n: int) -> tuple:
        return struct.unpack(f">{n}d", self.take(8 * n))


class _Unserializer:
    def __init__(self, stream: _Stream, native_encoding: str):
        self.s = stream
        self.native_encoding = native_encoding
        # Objects R may point back to later (symbols, environments, ...), in order of
        # first appearance; REFSXP indices are 1-based into this list.
        self.refs: list = []

    # -- entry point ---------------------------------------------------------------

    def read_item(self, flags: Optional[int] = None) -> Any:
        if flags is None:
            flags = self.s.int()
        t = flags & 0xFF

        if t == NILVALUE_SXP:
            return None
        if t in _SINGLETONS:
            return RSpecial(_SINGLETONS[t])
        if t == REFSXP:
            # Small indices are packed into the flag word; 0 means "read it next".
            index = (flags >> 8) or self.s.int()
            if not 1 <= index <= len(self.refs):
                raise DataError(f"R serialization has a reference to unknown object #{index}")
            return self.refs[index - 1]
        if t == SYMSXP:
            sym = RSymbol(self._expect_string(self.read_item(), "symbol name"))
            self.refs.append(sym)
            return sym
        if t in (PERSISTSXP, NAMESPACESXP, PACKAGESXP):
            kind = {PERSISTSXP: "persistent", NAMESPACESXP: "namespace", PACKAGESXP: "package"}[t]
            obj = RPersistent(kind, tuple(self._read_string_list()))
            self.refs.append(obj)
            return obj
        if t == ENVSXP:
            return self._read_environment()
        if t in _PAIRLIST_TYPES:
            return self._read_pairlist(flags)
        if t in (SPECIALSXP, BUILTINSXP):
            # A primitive function is stored by name only.
            n = self.s.int()
            return RSpecial(self.s.take(n).decode("ascii"))
        if t == CHARSXP:
            value = self._read_charsxp(flags)
            if flags & _HAS_ATTR:
                self.read_item()  # old writers could attach attributes to strings; R drops them
            return value
        return self._read_vector(flags)

    # -- the various bodies ----------------------------------------------------------

    def _read_length(self) -> int:
        n = self.s.int()
        if n == -1:  # long vector: length follows as two 32-bit halves
            hi, lo = self.s.ints(2)
            n = (hi << 32) | (lo & 0xFFFFFFFF)
        if n < 0:
            raise DataError(f"R serialization has a negative vector length ({n})")
        return n

    def _read_charsxp(self, flags: int) -> Optional[str | bytes]:
        n = self.s.int()
        if n == -1:
            return None  # NA_character_
        raw = self.s.take(n)
        levels = flags >> 12
        if levels & _UTF8_MASK:
            encoding = "utf-8"
        elif levels & _LATIN1_MASK:
            encoding = "latin-1"
        elif levels & _BYTES_MASK:
            return raw  # declared as uninterpreted bytes; leave it to the caller
        elif levels & _ASCII_MASK:
            encoding = "ascii"
        else:
            encoding = self.native_encoding
        try:
            return raw.decode(encoding)
        except (UnicodeDecodeError, LookupError) as e:
            raise DataError(f"R string is not valid {encoding}: {e}") from None

    def _read_vector(self, flags: int) -> RVector:
        t = flags & 0xFF
        if t in (LGLSXP, INTSXP):
            ints = self.s.ints(self._read_length())
            if t == LGLSXP:
                values = [None if v == _NA_INTEGER else bool(v) for v in ints]
            else:
                values = [None if v == _NA_INTEGER else v for v in ints]
        elif t == REALSXP:
            values = list(self.s.doubles(self._read_length()))
        elif t == CPLXSXP:
            parts = self.s.doubles(2 * self._read_length())
            values = [complex(parts[i], parts[i + 1]) for i in range(0, len(parts), 2)]
        elif t == STRSXP:
            values = []
            for _ in range(self._read_length()):
                item_flags = self.s.int()
                if item_flags & 0xFF != CHARSXP:
                    raise DataError(f"R character vector holds a non-string element (type {item_flags & 0xFF})")
                values.append(self.read_item(item_flags))
        elif t in (VECSXP, EXPRSXP):
            values = [self.read_item() for _ in range(self._read_length())]
        elif t == RAWSXP:
            values = list(self.s.take(self._read_length()))
        elif t == S4SXP:
            values = []  # an S4 object is nothing but its attributes
        else:
            name = _TYPE_NAMES.get(t, f"type {t}")
            raise DataError(f"R serialization contains an unsupported object ({name}, SEXP type {t})")
        attributes = self._read_attributes() if flags & _HAS_ATTR else {}
        return RVector(values, sexptype=t, attributes=attributes)

    def _read_attributes(self) -> dict[str, Any]:
        attrs = self.read_item()
        if not isinstance(attrs, RPairList):
            raise DataError("R serialization has attributes that are not a pairlist")
        return {(tag if tag is not None else ""): value for tag, value in attrs}

    def _read_pairlist(self, flags: int) -> RPairList:
        """Read a chain of pairlist cells.

        The chain is followed in a loop rather than by recursing on each cell's tail, so
        long pairlists cannot exhaust Python's recursion limit.
        """
        head_type = flags & 0xFF
        result = RPairList(sexptype=head_type)
        first = True
        while True:
            attributes = self._read_attributes() if flags & _HAS_ATTR else {}
            if first:
                result.attributes = attributes
                first = False
            tag = self.read_item() if flags & _HAS_TAG else None
            if tag is not None and not isinstance(tag, RSymbol):
                raise DataError("R serialization has a pairlist tag that is not a symbol")
            result.append((tag.name if tag is not None else None, self.read_item()))
            flags = self.s.int()
            if flags & 0xFF == NILVALUE_SXP:
                return result
            if flags & 0xFF != LISTSXP:
                # A dotted tail (not a plain list cell): keep it as an untagged last element.
                result.append((None, self.read_item(flags)))
                return result

    def _read_environment(self) -> REnvironment:
        env = REnvironment(locked=bool(self.s.int()))
        self.refs.append(env)  # registered before its contents, which may refer back to it
        env.enclosure = self.read_item()
        env.frame = self.read_item()
        env.hashtab = self.read_item()
        attrs = self.read_item()
        if isinstance(attrs, RPairList):
            env.attributes = {(tag or ""): value for tag, value in attrs}
        return env

    def _read_string_list(self) -> list:
        """The name list of persistent/namespace/package references."""
        if self.s.int() != 0:
            raise DataError("R serialization has a malformed namespace/package reference")
        return [self._expect_string(self.read_item(), "reference name") for _ in range(self.s.int())]

    @staticmethod
    def _expect_string(value: Any, what: str) -> str:
        if not isinstance(value, str):
            raise DataError(f"R serialization has a {what} that is not a string")
        return value


def unserialize(data: bytes) -> Any:
    """Decode one R serialization stream in XDR format (as written by saveRDS/serialize).

    Versions 2 and 3 are accepted. Returns Python values: RVector for vectors (None for
    NA), str/None for single strings, RPairList for pairlists, RSymbol, REnvironment, ...
    Raises DataError for anything malformed or unsupported.
    """
    s = _Stream(bytes(data))
    fmt = s.take(2) if len(data) >= 2 else b""
    if fmt in (b"A\n", b"B\n"):
        raise DataError("R serialization is in ASCII or native-binary format; only XDR ('X') is supported")
    if fmt != b"X\n":
        raise DataError("data is not an R XDR serialization (no 'X\\n' header)")
    version = s.int()
    s.int()  # R version that wrote it
    s.int()  # oldest R version that can read it
    native_encoding = "utf-8"  # v2 streams do not record it; UTF-8 is the sane default
    if version == 3:
        native_encoding = s.take(s.int()).decode("ascii")
    elif version != 2:
        raise DataError(f"R serialization version {version} is not supported (only 2 and 3)")
    return _Unserializer(s, native_encoding).read_item()


# --------------------------------------------------------------------------------------
# Lazy-load databases (.rdb/.rdx)
# --------------------------------------------------------------------------------------


def decode_record(blob: bytes, compressed: int = 1) -> bytes:
    """Undo the compression of one .rdb record and return the raw serialization.

    `compressed` is the index's "compressed" field: 0 = stored as is; 1 (TRUE) = 4-byte
    big-endian length + zlib stream; 2 or 3 = 4-byte length, then a type byte naming the
    method ('Z' zlib, '2' bzip2, 'X' xz, '0' stored).
    """
    if not compressed:
        return bytes(blob)
    if len(blob) < 4:
        raise DataError("lazy-load record is too short to hold its length header")
    expected = struct.unpack(">I", blob[:4])[0]
    payload = blob[4:]
    method = b"Z"
    if compressed in (2, 3):
        method, payload = payload[:1], payload[1:]
    try:
        if method == b"Z":
            out = zlib.decompress(payload)
        elif method == b"2":
            out = bz2.decompress(payload)
        elif method == b"X":
            out = lzma.decompress(payload)
        elif method == b"0":
            out = bytes(payload)
        else:
            raise DataError(f"lazy-load record uses unknown compression type {method!r}")
    except (zlib.error, OSError, lzma.LZMAError, EOFError, ValueError) as e:
        raise DataError(f"lazy-load record does not decompress: {e}") from None
    if len(out) != expected:
        raise DataError(f"lazy-load record decompressed to {len(out)} bytes, header says {expected}")
    return out


def _read_index(path: Path) -> Any:
    """Decode an .rdx file. R writes it with saveRDS (gzip), but accept the other forms too."""
    raw = path.read_bytes()
    try:
        if raw[:2] == b"\x1f\x8b":
            data = gzip.decompress(raw)
        elif raw[:3] == b"BZh":
            data = bz2.decompress(raw)
        elif raw[:6] == b"\xfd7zXZ\x00":
            data = lzma.decompress(raw)
        elif raw[:2] == b"X\n":
            data = raw
        else:
            data = decode_record(raw, 1)  # length-prefixed zlib, like an .rdb record
        return unserialize(data)
    except (OSError, EOFError, lzma.LZMAError, ValueError, DataError) as e:
        raise DataError(f"{path}: not a lazy-load index (.rdx): {e}") from None


def _compression_code(value: Any) -> int:
    if isinstance(value, RVector) and len(value) == 1 and value[0] is not None:
        return int(value[0])
    raise DataError("lazy-load index has a malformed 'compressed' field")


def read_lazyload_db(rdb_path, rdx_path) -> dict[str, object]:
    """Read every variable of an R lazy-load database, in index order.

    The .rdx index is a named list with `variables` (name -> c(offset, length) into the
    .rdb), `references` and `compressed`. Raises DataError for missing or malformed files.
    """
    rdb_path, rdx_path = Path(rdb_path), Path(rdx_path)
    for p in (rdb_path, rdx_path):
        if not p.is_file():
            raise DataError(f"{p}: no such file")
    index = _read_index(rdx_path)
    if not isinstance(index, RVector) or index.sexptype != VECSXP or not index.names:
        raise DataError(f"{rdx_path}: not a lazy-load index (expected a named list)")
    fields = dict(zip(index.names, index))
    if "variables" not in fields or "compressed" not in fields:
        raise DataError(f"{rdx_path}: lazy-load index lacks 'variables' or 'compressed'")
    variables = fields["variables"]
    compressed = _compression_code(fields["compressed"])
    names = getattr(variables, "names", None) or []
    if len(names) != len(variables):
        raise DataError(f"{rdx_path}: lazy-load index has unnamed variables")

    rdb = rdb_path.read_bytes()
    out: dict[str, object] = {}
    for name, where in zip(names, variables):
        if not isinstance(where, RVector) or len(where) != 2 or None in where:
            raise DataError(f"{rdx_path}: bad position for variable {name!r}")
        offset, length = int(where[0]), int(where[1])
        if offset < 0 or length < 0 or offset + length > len(rdb):
            raise DataError(f"{rdb_path}: variable {name!r} lies outside the file")
        try:
            out[name] = unserialize(decode_record(rdb[offset : offset + length], compressed))
        except DataError as e:
            raise DataError(f"{rdb_path}: variable {name!r}: {e}") from None
    return out


# --------------------------------------------------------------------------------------
# Building the corpus files
# --------------------------------------------------------------------------------------


class FileStats(NamedTuple):
    lines: int
    chars: int
    sha256: str


def novel_text(lines: Any, name: str) -> str:
    """Join an R character vector of lines into text: "\\n" between lines and at the end."""
    if not isinstance(lines, RVector) or lines.sexptype != STRSXP:
        raise DataError(f"R object {name!r} is not a character vector")
    if any(not isinstance(line, str) for line in lines):
        raise DataError(f"R object {name!r} has NA or non-text lines")
    return "\n".join(lines) + "\n"


def text_stats(text: str) -> FileStats:
    """Line count, character count (code points) and sha256 of the UTF-8 bytes."""
    return FileStats(text.count("\n"), len(text), hashlib.sha256(text.encode("utf-8")).hexdigest())


def write_gzip(path: Path, text: str) -> None:
    """Write text gzip-compressed with a fixed header (no name, mtime 0) for reproducibility."""
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, compresslevel=9, mtime=0) as gz:
        gz.write(text.encode("utf-8"))
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(buf.getvalue())
    os.replace(tmp, path)  # never leave a half-written corpus file behind


_TABLE_ROW = re.compile(
    r"^\|\s*`?(?P<file>[\w.-]+\.txt\.gz)`?\s*\|\s*(?P<lines>[\d,]+)\s*\|\s*(?P<chars>[\d,]+)\s*\|"
    r"\s*`?(?P<sha>[0-9a-f]{64})`?\s*\|"
)


def parse_provenance(path) -> dict[str, FileStats]:
    """Read the checksum table of PROVENANCE.md: file name -> expected FileStats."""
    out = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        m = _TABLE_ROW.match(line.strip())
        if m:
            out[m["file"]] = FileStats(int(m["lines"].replace(",", "")), int(m["chars"].replace(",", "")), m["sha"])
    return out


def _run(cmd: list[str], cwd=None) -> str:
    if shutil.which(cmd[0]) is None:
        raise DataError(f"`{cmd[0]}` is not available; pass --deb or --rdb-dir instead")
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [ln for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip() and not ln.startswith("W:")]
        raise DataError(f"`{' '.join(cmd)}` failed: {lines[-1] if lines else f'exit {proc.returncode}'}")
    return proc.stdout


def _download_deb(dest: Path) -> Path:
    _run(["apt-get", "download", DEB_PACKAGE], cwd=dest)
    debs = sorted(dest.glob(f"{DEB_PACKAGE}_*.deb"))
    if not debs:
        raise DataError(f"apt-get download produced no {DEB_PACKAGE} .deb")
    return debs[0]


def _rdb_dir_from_deb(deb: Path, dest: Path) -> tuple[Path, str]:
    """Extract the .deb and return (its janeaustenr/data directory, package version)."""
    if not deb.is_file():
        raise DataError(f"{deb}: no such file")
    version = _run(["dpkg-deb", "-f", str(deb), "Version"]).strip()
    _run(["dpkg-deb", "-x", str(deb), str(dest)])
    found = sorted(dest.glob("**/janeaustenr/data/Rdata.rdb"))
    if not found:
        raise DataError(f"{deb}: does not contain janeaustenr/data/Rdata.rdb")
    return found[0].parent, version


def build(rdb_dir: Path, out_dir: Path) -> dict[str, FileStats]:
    """Write the six novels from `rdb_dir` (holding Rdata.rdb/.rdx) into `out_dir`."""
    objects = read_lazyload_db(rdb_dir / "Rdata.rdb", rdb_dir / "Rdata.rdx")
    missing = sorted(set(R_NAMES) - set(objects))
    if missing:
        raise DataError(f"{rdb_dir}: lazy-load database lacks {', '.join(missing)} (has {', '.join(objects)})")
    by_stem = {stem: name for name, stem in R_NAMES.items()}
    out_dir.mkdir(parents=True, exist_ok=True)
    stats = {}
    for stem, _, _ in NOVELS:
        text = novel_text(objects[by_stem[stem]], by_stem[stem])
        file_name = f"{stem}.txt.gz"
        write_gzip(out_dir / file_name, text)
        stats[file_name] = text_stats(text)
    return stats


def verify(stats: dict[str, FileStats], provenance: Path) -> bool:
    """Print the checksum table (markdown) and whether each row matches PROVENANCE.md."""
    expected = parse_provenance(provenance) if provenance.is_file() else {}
    print("| file | lines | chars | sha256 | matches |")
    print("|---|---:|---:|---|---|")
    ok = True
    for name, st in stats.items():
        match = expected.get(name) == st
        ok &= match
        verdict = "yes" if match else ("no reference" if name not in expected else "NO")
        print(f"| `{name}` | {st.lines} | {st.chars} | `{st.sha256}` | {verdict} |")
    return ok


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m megatrain.data.corpus.build",
        description=f"Rebuild the embedded Austen corpus from the Debian package {DEB_PACKAGE}.",
    )
    src = parser.add_mutually_exclusive_group()
    src.add_argument("--deb", type=Path, help=f"a downloaded {DEB_PACKAGE} .deb (default: apt-get download it)")
    src.add_argument("--rdb-dir", type=Path, help="a directory holding Rdata.rdb and Rdata.rdx")
    parser.add_argument("--out", type=Path, default=CORPUS_DIR, help="output directory (default: %(default)s)")
    args = parser.parse_args(argv)

    try:
        with tempfile.TemporaryDirectory(prefix="janeaustenr-") as tmp:
            tmp_dir = Path(tmp)
            if args.rdb_dir is not None:
                if not args.rdb_dir.is_dir():
                    raise DataError(f"{args.rdb_dir}: no such directory")
                rdb_dir, source = args.rdb_dir, str(args.rdb_dir)
            else:
                deb = args.deb if args.deb is not None else _download_deb(tmp_dir)
                rdb_dir, version = _rdb_dir_from_deb(deb, tmp_dir / "root")
                source = f"{DEB_PACKAGE} {version}"
            stats = build(rdb_dir, args.out)
            print(f"source: {source}")
    except MegatrainError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    print(f"wrote {len(stats)} files to {args.out}")
    if verify(stats, CORPUS_DIR / "PROVENANCE.md"):
        print("all files match PROVENANCE.md")
        return 0
    print("error: some files do not match the checksums in PROVENANCE.md", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
