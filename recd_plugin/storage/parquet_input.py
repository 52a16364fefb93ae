"""The user's own Parquet input: one reader, one set of checks and messages for every tool.

Preprocess (``storage.source``), FAE's profiler (``fae.access``, ``recd-plugin profile``) and
the advisor (``analyze.sources``) all read a Parquet file or directory of the user's. They read
it here, so a missing path, an empty directory, a file that is not Parquet, a missing column
or files whose schemas differ get the same message in every tool, naming the file and the
fix. Each caller passes its own error class (``error=HotSetError``, ...): the one its users
already catch. (The plugin's own layout is read by ``storage.layout`` / ``storage.reader``,
with checksums this input does not have.)

A directory is searched recursively for ``*.parquet`` files, sorted by path; files and folders
whose names start with ``.`` or ``_`` (``_SUCCESS``, ``_metadata``, hidden temp files) are
skipped. Every file's footer is read when the input is opened (no data pages), so a broken file
or a missing column fails before any work, not after minutes. Batches are read one row group
at a time and reading stops at ``max_rows``: memory is bounded by a row group plus what the
caller keeps.

Example::

    src = open_parquet("data/events/", required=["user_id", "label"], error=AnalyzeError)
    src.num_rows, src.schema, src.metadata       # from the footers
    for where, batch in src.batches(65_536, columns=["user_id"], max_rows=200_000):
        ...                                      # where: the file the batch came from
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Type, Union

import pyarrow as pa
import pyarrow.parquet as pq

from recd_plugin.errors import RecDError, StorageError, did_you_mean

ErrorClass = Type[RecDError]
PathLike = Union[str, "os.PathLike[str]"]


def parquet_files(path: PathLike, error: ErrorClass = StorageError, hint: str = "") -> List[Path]:
    """The Parquet files of a file or directory path (see the module docstring); ``error``
    when the path does not exist (``hint``: what else the caller would take) or holds none."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise error(f"{path}: no such Parquet file or directory{hint}")
    files = sorted(p for p in path.rglob("*.parquet")
                   if p.is_file() and not any(part.startswith((".", "_")) for part in p.relative_to(path).parts))
    if not files:
        raise error(f"{path}: no *.parquet files in this directory; the input is empty: give the file or "
                    "the folder that holds the Parquet files")
    return files


def not_parquet(name: str, e: BaseException, error: ErrorClass = StorageError) -> RecDError:
    """The error of a file whose footer cannot be read."""
    return error(f"{name}: not a readable Parquet file ({type(e).__name__}: {e}); it is corrupt, truncated "
                 "or not Parquet: copy it again or re-export it (pyarrow.parquet.write_table)")


def read_footer(path: Path, error: ErrorClass = StorageError) -> pq.FileMetaData:
    """The footer (schema, row groups, statistics) of one file, reading no data page."""
    try:
        return pq.read_metadata(str(path))
    except (pa.ArrowException, OSError) as e:
        raise not_parquet(str(path), e, error) from e


def read_error(name: str, e: BaseException, error: ErrorClass = StorageError) -> RecDError:
    """The error of a data page that fails past a readable footer."""
    return error(f"{name}: cannot read Parquet data ({type(e).__name__}: {e}); the file is corrupt or "
                 "truncated: copy it again or re-export it")


def check_schema(name: str, schema: pa.Schema, required: Sequence[str],
                 first: Optional[Tuple[str, pa.Schema]] = None, error: ErrorClass = StorageError,
                 fix: str = "") -> None:
    """``error`` if ``schema`` lacks a required column (``fix``: how the caller's user names
    other columns) or differs from the first file's schema ``first``."""
    for col in required:
        if col not in schema.names:
            raise error(f"{name}: missing column {col!r}{did_you_mean(col, schema.names)}; "
                        f"the file has {schema.names}{fix}")
    if first is None:
        return
    first_name, first_schema = first
    if schema.remove_metadata().equals(first_schema.remove_metadata()):
        return
    for f in first_schema:
        if f.name not in schema.names:
            raise error(f"{name}: schema differs from {first_name}: column {f.name!r} is missing; "
                        "write all files with one schema")
        other = schema.field(f.name)
        if not other.type.equals(f.type):
            raise error(f"{name}: schema differs from {first_name}: column {f.name!r} is "
                        f"{other.type} here but {f.type} there; cast the files to one schema")
    extra = [n for n in schema.names if n not in first_schema.names]
    raise error(f"{name}: schema differs from {first_name}: extra column(s) {extra} or a "
                "different column order; write all files with one schema")


@dataclass
class ParquetInput:
    """An opened input: its files, their footers, and the first file's schema (all files have
    it: checked when opened)."""

    path: Path
    files: List[Path]
    footers: List[pq.FileMetaData]
    schema: pa.Schema
    error: ErrorClass = StorageError

    @property
    def num_rows(self) -> int:
        return sum(f.num_rows for f in self.footers)

    @property
    def bytes(self) -> int:
        return sum(f.stat().st_size for f in self.files)

    @property
    def metadata(self) -> Dict[bytes, bytes]:
        """The first file's schema metadata (e.g. ``b"recd.cardinalities"``)."""
        return dict(self.schema.metadata or {})

    def read_file(self, path: Path, batch_rows: int,
                  columns: Optional[Sequence[str]] = None) -> Iterator[pa.RecordBatch]:
        """One file's record batches, one row group at a time (memory bounded by the row group)."""
        try:
            yield from pq.ParquetFile(str(path)).iter_batches(
                batch_size=batch_rows, columns=None if columns is None else list(columns))
        except (pa.ArrowException, OSError) as e:  # a data page broken past the footer
            raise read_error(str(path), e, self.error) from e

    def batches(self, batch_rows: int, columns: Optional[Sequence[str]] = None,
                max_rows: Optional[int] = None) -> Iterator[Tuple[str, pa.RecordBatch]]:
        """(file, record batch) over all files in order; stops reading once ``max_rows`` rows
        were yielded (the last batch is cut to fit)."""
        left = max_rows
        for path in self.files:
            for batch in self.read_file(path, batch_rows, columns):
                if left is not None:
                    batch = batch.slice(0, left)
                    left -= batch.num_rows
                yield str(path), batch
                if left is not None and left <= 0:
                    return  # bounded memory: nothing past the sample is read


def open_parquet(path: PathLike, required: Sequence[str] = (), *, error: ErrorClass = StorageError,
                 hint: str = "", fix: str = "") -> ParquetInput:
    """Open a Parquet file or directory: every file's footer read, the ``required`` columns and
    one schema across files checked (``error`` naming the file otherwise; see the module
    docstring). ``hint`` follows "no such Parquet file or directory"; ``fix`` a missing column."""
    path = Path(path)
    files = parquet_files(path, error, hint)
    footers: List[pq.FileMetaData] = []
    first: Optional[Tuple[str, pa.Schema]] = None
    for f in files:
        meta = read_footer(f, error)
        schema = meta.schema.to_arrow_schema()
        check_schema(str(f), schema, required, first, error, fix)
        footers.append(meta)
        first = first or (str(f), schema)
    assert first is not None  # parquet_files returns at least one file
    return ParquetInput(path, files, footers, first[1], error)
