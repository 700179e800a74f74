"""Stage 1 of the data path: what a `data.source` names, and reading its documents.

A text source is "embedded" (the shipped corpus), a file, a glob, a directory, a list of these, or a
hub dataset "hf:NAME[:SPLIT]": `resolve_sources` turns it into absolute paths or a `HubSource`,
`check_files` checks the files cheaply, `load_documents` yields their documents, and
`source_fingerprint` identifies their content for the caches built on top.

Other kinds of source are generated on the fly rather than read (`task:multikey`): a module that
generates them registers a `GeneratedSourceKind` under its prefix with `register_source_kind`, and
`source_kind(spec)` finds it, so no other module needs to know the prefixes. The data package
registers its built-in kinds (megatrain.data.tasks) when it is imported.

Text is read through the Hugging Face `datasets` library (its "text", "json" and "parquet" builders
for local files, so `.gz` files are decompressed on the fly), with its cache under
`<cache>/hf_datasets`. Local sources never touch the network: the offline switches are set before
`datasets` is imported unless the run reads a hub dataset.

Data-section settings are read duck-typed (`data_cfg.cache_dir` and the like): this package never
imports megatrain.config.
"""

from __future__ import annotations

import codecs
import contextlib
import glob
import gzip
import itertools
import json
import os
import sys
import zlib
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Protocol, Union

from megatrain.errors import DataError

__all__ = [
    "HubSource",
    "Source",
    "SUPPORTED_EXTENSIONS",
    "GeneratedSourceKind",
    "register_source_kind",
    "source_kind",
    "cache_dir",
    "resolve_sources",
    "check_files",
    "source_fingerprint",
    "describe_source",
    "import_datasets",
    "load_documents",
]

SUPPORTED_EXTENSIONS = (".txt", ".txt.gz", ".jsonl", ".jsonl.gz", ".json", ".parquet")
_TEXT_EXTENSIONS = (".txt", ".txt.gz", ".jsonl", ".jsonl.gz", ".json")  # checked for UTF-8
_BUILDER_BY_EXTENSION = {
    ".txt": "text",
    ".txt.gz": "text",
    ".jsonl": "json",
    ".jsonl.gz": "json",
    ".json": "json",
    ".parquet": "parquet",
}
_READ_CHUNK_BYTES = 1 << 20


@dataclass(frozen=True)
class HubSource:
    """A dataset on the Hugging Face hub, written `hf:NAME` or `hf:NAME:SPLIT` in a config."""

    name: str
    split: str = "train"

    def __str__(self) -> str:
        return f"hf:{self.name}:{self.split}"


# A resolved text source: absolute file paths in reading order, or a hub dataset.
Source = Union[list, HubSource]


# ----------------------------------------------------------------------------------------------
# generated sources: a registry of kinds, keyed by prefix


class GeneratedSourceKind(Protocol):
    """A kind of `data.source` that is generated, not read: specs `PREFIX:NAME` (e.g. task:multikey).

    It has no files, no tokenizer to train and no token cache: `open` builds the tokenizer and the
    blocks directly. `data_cfg` is the run's data section (duck-typed: source, seq_len, and the
    kind's own settings).
    """

    prefix: str

    def validate(self, data_cfg) -> None:
        """Raise ConfigError (one line naming the key) for a spec or setting the kind cannot generate."""

    def vocab_size(self, data_cfg) -> int:
        """Vocabulary of the generated tokens."""

    def required_seq_len(self, data_cfg) -> int:
        """The shortest data.seq_len that holds one generated sequence."""

    def open(self, data_cfg) -> tuple[Any, Any, Any]:
        """(tokenizer, training blocks, validation blocks or None), blocks with PackedBlocks' interface."""


_KINDS: dict[str, GeneratedSourceKind] = {}


def register_source_kind(kind: GeneratedSourceKind) -> None:
    """Make `source_kind` return `kind` for every spec `kind.prefix:...`.

    Raises:
        ValueError: another kind already holds the prefix (or it is "hf", the hub's text sources).
    """
    prefix = kind.prefix
    if not prefix or ":" in prefix or prefix == "hf":
        raise ValueError(f"source kind prefix {prefix!r} must be a non-empty name other than 'hf'")
    if _KINDS.get(prefix, kind) is not kind:
        raise ValueError(f"source kind prefix '{prefix}:' is already registered by {_KINDS[prefix]!r}")
    _KINDS[prefix] = kind


def source_kind(source: Any) -> Optional[GeneratedSourceKind]:
    """The registered kind generating `source` ('PREFIX:...'), or None for a text source."""
    if not isinstance(source, str) or ":" not in source:
        return None
    return _KINDS.get(source.split(":", 1)[0])


def read_jsonl_records(path: str, key: str) -> Iterator[tuple[int, dict]]:
    """(line number, record) for every non-blank line of a jsonl file of JSON objects.

    For the record-per-line task files of the jobs (RL problems, long-context sets). Raises DataError
    naming `key`, the file and the line: missing file, not UTF-8, a line that is not JSON or not an
    object, or no records at all.
    """
    if not os.path.isfile(path):
        raise DataError(f"{key}: file '{path}' does not exist")
    count = 0
    try:
        with open(path, encoding="utf-8") as fh:
            for number, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{key}: '{path}' line {number} is not valid JSON ({exc.msg})") from None
                if not isinstance(record, dict):
                    raise DataError(f"{key}: '{path}' line {number} is not a JSON object")
                count += 1
                yield number, record
    except UnicodeDecodeError:
        raise DataError(f"{key}: '{path}' is not UTF-8 text") from None
    if not count:
        raise DataError(f"{key}: '{path}' holds no records")


# ----------------------------------------------------------------------------------------------
# resolving and checking text sources


def cache_dir(data_cfg=None) -> str:
    """The cache root (created): data.cache_dir, else $MEGATRAIN_CACHE, else ~/.cache/megatrain."""
    from megatrain.env import cache_root

    root = getattr(data_cfg, "cache_dir", None) or cache_root() or "~/.cache/megatrain"
    root = os.path.abspath(os.path.expanduser(root))
    os.makedirs(root, exist_ok=True)
    return root


def _extension(path: str) -> Optional[str]:
    """The supported extension `path` ends with (longest match), or None."""
    lower = path.lower()
    for ext in sorted(SUPPORTED_EXTENSIONS, key=len, reverse=True):
        if lower.endswith(ext):
            return ext
    return None


def _allowed() -> str:
    return ", ".join(SUPPORTED_EXTENSIONS)


def _embedded_files(key: str) -> list[str]:
    # Imported here: the corpus package is data, and most callers never need it.
    from megatrain.data.corpus import TRAIN_FILES, VAL_FILES

    return [str(path) for path in (VAL_FILES if key.endswith("val_source") else TRAIN_FILES)]


def _parse_hub(spec: str, key: str) -> HubSource:
    parts = spec[len("hf:") :].split(":")
    if not parts[0] or len(parts) > 2 or (len(parts) == 2 and not parts[1]):
        raise DataError(f"{key}: '{spec}' is not of the form hf:NAME or hf:NAME:SPLIT")
    return HubSource(parts[0], parts[1] if len(parts) == 2 else "train")


def _resolve_one(spec: str, key: str) -> list[str]:
    path = os.path.abspath(os.path.expanduser(spec))
    if any(ch in spec for ch in "*?["):
        matches = sorted(p for p in glob.glob(os.path.expanduser(spec), recursive=True) if os.path.isfile(p))
        if not matches:
            raise DataError(f"{key}: '{spec}' matches no files")
        bad = [p for p in matches if _extension(p) is None]
        if bad:
            raise DataError(
                f"{key}: '{bad[0]}' (matched by '{spec}') has an unsupported extension (allowed: {_allowed()})"
            )
        return [os.path.abspath(p) for p in matches]
    if os.path.isdir(path):
        # Only the directory's own files: a directory tree is read with an explicit 'dir/**/*.jsonl'.
        files = sorted(
            os.path.join(path, name)
            for name in os.listdir(path)
            if not name.startswith(".") and _extension(name) is not None and os.path.isfile(os.path.join(path, name))
        )
        if not files:
            raise DataError(f"{key}: directory '{spec}' has no {_allowed()} files")
        return files
    if not os.path.exists(path):
        raise DataError(f"{key}: file '{spec}' does not exist")
    if _extension(path) is None:
        raise DataError(f"{key}: file '{spec}' has an unsupported extension (allowed: {_allowed()})")
    return [path]


def resolve_sources(source: Any, key: str = "data.source") -> Source:
    """Turn a text source's config value into absolute file paths, or a HubSource.

    `source` is "embedded" (the shipped corpus: its training novels, or for `data.val_source` its
    held-out novel), a file, a glob (`**` recurses), a directory (its supported files, sorted), a
    list of these, or "hf:NAME[:SPLIT]". Files keep the order given; globs and directories are sorted.
    Generated sources (`source_kind(source)` is not None) have no files and are not resolved here.

    Raises:
        DataError: one line naming `key` and the path, for a missing file, a pattern or directory
            with no matching files, or an unsupported extension.
    """
    if isinstance(source, str) and source.startswith("hf:"):
        return _parse_hub(source, key)
    items = list(source) if isinstance(source, (list, tuple)) else [source]
    if not items:
        raise DataError(f"{key}: the list of sources is empty")
    files: list[str] = []
    for item in items:
        if not isinstance(item, (str, os.PathLike)):
            raise DataError(
                f"{key}: {item!r} is not a path (expected 'embedded', a file, a glob, a "
                f"directory, a list of these, or 'hf:NAME[:SPLIT]')"
            )
        item = os.fspath(item)
        if item.startswith("hf:"):
            raise DataError(f"{key}: a hub dataset ('{item}') cannot be mixed with other sources in a list")
        files.extend(_embedded_files(key) if item == "embedded" else _resolve_one(item, key))
    return files


def _utf8_error_offset(stream) -> Optional[int]:
    """Offset of the first byte of `stream` that is not valid UTF-8, or None if it all decodes."""
    carry = b""  # an incomplete multi-byte character cut by the chunk boundary
    base = 0  # stream offset of carry[0]
    while True:
        chunk = stream.read(_READ_CHUNK_BYTES)
        data = carry + chunk
        try:
            # final=False leaves a trailing partial character for the next chunk instead of failing.
            _, consumed = codecs.utf_8_decode(data, "strict", not chunk)
        except UnicodeDecodeError as exc:
            return base + exc.start
        if not chunk:
            return None
        carry = data[consumed:]
        base += consumed


def check_files(files: Source, key: str = "data.source") -> None:
    """Check that every local file exists, is not empty, and (for text formats) is valid UTF-8.

    Streams each file in 1 MiB chunks (gzip files decompressed), so tens of MB take well under a
    second. A HubSource is not checked here.

    Raises:
        DataError: e.g. "data.source: file 'x.txt' is not valid UTF-8 (first bad byte at offset 1234)".
    """
    if isinstance(files, HubSource):
        return
    for path in files:
        if not os.path.isfile(path):
            raise DataError(f"{key}: file '{path}' does not exist")
        if os.path.getsize(path) == 0:
            raise DataError(f"{key}: file '{path}' is empty")
        ext = _extension(path)
        if ext not in _TEXT_EXTENSIONS:
            continue
        opener = gzip.open if ext.endswith(".gz") else open
        try:
            with opener(path, "rb") as fh:
                bad = _utf8_error_offset(fh)
                empty = fh.tell() == 0
        except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
            raise DataError(f"{key}: file '{path}' is not a valid gzip file ({exc})") from None
        except OSError as exc:
            raise DataError(f"{key}: file '{path}' cannot be read: {exc.strerror or exc}") from None
        if empty:
            raise DataError(f"{key}: file '{path}' is empty")
        if bad is not None:
            where = "uncompressed offset" if ext.endswith(".gz") else "offset"
            raise DataError(f"{key}: file '{path}' is not valid UTF-8 (first bad byte at {where} {bad})")


def source_fingerprint(source: Source) -> list:
    """What identifies a source's content cheaply: per file [path, size, mtime_ns]; hub: name, split."""
    if isinstance(source, HubSource):
        return [["hf", source.name, source.split]]
    out = []
    for path in source:
        try:
            st = os.stat(path)
        except OSError:
            raise DataError(f"data source file '{path}' does not exist") from None
        out.append([os.path.abspath(path), st.st_size, st.st_mtime_ns])
    return out


def describe_source(source: Source) -> str:
    """A short quoted description of a source for error messages (first three files)."""
    if isinstance(source, HubSource):
        return f"'{source}'"
    shown = ", ".join(f"'{f}'" for f in source[:3])
    return f"({shown}{', ...' if len(source) > 3 else ''})"


# ----------------------------------------------------------------------------------------------
# reading documents through `datasets`


def import_datasets(local_only: bool):
    """Import `datasets`, offline unless a hub source is read.

    The switches are read when `datasets` is first imported, so they only take effect here if nothing
    imported it earlier: a run that reads any hub source calls this with local_only=False before
    its first local read. They are defaults: a user's own HF_HUB_OFFLINE / HF_DATASETS_OFFLINE
    always wins.
    """
    if local_only and "datasets" not in sys.modules:
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import datasets

    return datasets


@contextlib.contextmanager
def _quiet(datasets):
    """Silence `datasets`' progress bars and info logs ("Generating train split ...") for one load."""
    bars_were_enabled = datasets.is_progress_bar_enabled()
    verbosity = datasets.logging.get_verbosity()
    datasets.disable_progress_bars()
    # CRITICAL, not ERROR: a malformed file is reported once, as our DataError naming the file.
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    try:
        yield
    finally:
        datasets.logging.set_verbosity(verbosity)
        if bars_were_enabled:
            datasets.enable_progress_bars()


def _first_line(exc: BaseException) -> str:
    # datasets wraps parse errors (DatasetGenerationError); the cause says what was wrong.
    while exc.__cause__ is not None:
        exc = exc.__cause__
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _load_local(datasets, builder: str, files: list[str], hf_cache: str):
    kwargs = {"sample_by": "document"} if builder == "text" else {}
    with _quiet(datasets):
        return datasets.load_dataset(builder, data_files=files, split="train", cache_dir=hf_cache, **kwargs)


def _load_group(datasets, builder: str, files: list[str], hf_cache: str):
    """Load consecutive files of one format as one dataset; name the failing file on a parse error."""
    import pyarrow

    # What datasets and pyarrow raise for a malformed file (parse errors arrive wrapped in a
    # DatasetGenerationError); anything else is a bug and keeps its traceback.
    malformed = (datasets.exceptions.DatasetsError, pyarrow.ArrowException, ValueError, OSError)
    try:
        return _load_local(datasets, builder, files, hf_cache)
    except malformed as exc:
        culprit, reason = files[0], _first_line(exc)
        if len(files) > 1:  # find which file it was; only on this error path
            for path in files:
                try:
                    _load_local(datasets, builder, [path], hf_cache)
                except malformed as single:
                    culprit, reason = path, _first_line(single)
                    break
        raise DataError(f"file '{culprit}' cannot be read as {builder}: {reason}") from None


def _texts(ds, text_field: str, origin: str) -> Iterator[str]:
    if text_field not in ds.column_names:
        raise DataError(
            f"field '{text_field}' (data.text_field) is not in {origin} "
            f"(fields present: {', '.join(ds.column_names) or 'none'})"
        )
    dtype = getattr(ds.features[text_field], "dtype", None)
    if dtype not in ("string", "large_string"):
        raise DataError(
            f"field '{text_field}' (data.text_field) of {origin} holds {dtype or 'non-text'} values, not text"
        )
    for batch in ds.select_columns([text_field]).iter(batch_size=256):
        for text in batch[text_field]:
            if text:
                yield text


def load_documents(
    source: Union[Source, str], text_field: str = "text", cache_root: Optional[str] = None
) -> Iterator[str]:
    """Yield the documents of a source, in order, through the `datasets` library.

    A .txt/.txt.gz file is one document (the "text" builder with sample_by="document"; `\\r\\n`
    becomes `\\n` as in any text-mode read); a .jsonl/.json/.parquet record is one document (its
    `text_field`); a HubSource yields the `text_field` of each row of its split. Empty documents are
    skipped. `datasets` keeps its cache under `<cache_root>/hf_datasets`.

    Raises:
        DataError: a file that cannot be parsed, or records without `text_field` (the message names
            the field and the fields present).
    """
    if isinstance(source, (str, os.PathLike)):
        source = resolve_sources(os.fspath(source))
    hf_cache = os.path.join(cache_root or cache_dir(), "hf_datasets")
    if isinstance(source, HubSource):
        datasets = import_datasets(local_only=False)
        try:
            with _quiet(datasets):
                ds = datasets.load_dataset(source.name, split=source.split, cache_dir=hf_cache)
        except Exception as exc:
            hint = ""
            if datasets.config.HF_HUB_OFFLINE:
                hint = " (offline mode is on: set HF_HUB_OFFLINE=0 to download it)"
            raise DataError(f"hub dataset '{source}' cannot be loaded: {_first_line(exc)}{hint}") from None
        yield from _texts(ds, text_field, f"hub dataset '{source}'")
        return
    datasets = import_datasets(local_only=True)
    for builder, group in itertools.groupby(source, key=lambda p: _BUILDER_BY_EXTENSION.get(_extension(p))):
        files = list(group)
        if builder is None:
            raise DataError(f"file '{files[0]}' has an unsupported extension (allowed: {_allowed()})")
        ds = _load_group(datasets, builder, files, hf_cache)
        origin = f"'{files[0]}'" if len(files) == 1 else f"the {builder} files ('{files[0]}', ...)"
        yield from _texts(ds, text_field, origin)
