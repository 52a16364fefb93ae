"""Open the flat input of preprocessing as a validated stream of record batches.

A source is a ``pyarrow.Table``, a Parquet file, a directory of Parquet files (searched
recursively, sorted by path) or a ``pyarrow.dataset.Dataset``. Every file's footer is read
up front, so a corrupt or truncated file, a missing column, a schema that differs between
files or nulls in a column that must have none (when the footer's statistics count them)
fail *before* anything is written, with an error naming the file and the column.

Example::

    src = open_source("/data/events/", required=["session_id", "label"])
    src.schema, src.num_rows
    for where, batch in src.batches(65536):   # where: the file the batch came from
        ...
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from recd_plugin.errors import StorageError, did_you_mean

Source = Union[pa.Table, ds.Dataset, str, "os.PathLike[str]"]


@dataclass
class OpenSource:
    """A validated input: common schema, row count, on-disk bytes (None for a table)."""

    schema: pa.Schema
    num_rows: int
    bytes: Optional[int]
    parts: List[Tuple[str, Callable[[int], Iterator[pa.RecordBatch]]]]  # (name, batches(n))

    def batches(self, batch_rows: int) -> Iterator[Tuple[str, pa.RecordBatch]]:
        for name, read in self.parts:
            try:
                for batch in read(batch_rows):
                    yield name, batch
            except (pa.ArrowException, OSError) as e:  # a data page broken past the footer
                raise StorageError(f"{name}: cannot read Parquet data ({e}); the file is corrupt or "
                                   "truncated: re-export it") from e


def _parquet_files(path: Path) -> List[Path]:
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise StorageError(f"{path}: no such file or directory (expected Parquet input)")
    files = sorted(p for p in path.rglob("*.parquet")
                   if p.is_file() and not any(part.startswith((".", "_")) for part in p.relative_to(path).parts))
    if not files:
        raise StorageError(f"{path}: no *.parquet files in this directory; the input is empty")
    return files


def _footer(path: Path) -> pq.FileMetaData:
    try:
        return pq.read_metadata(str(path))
    except (pa.ArrowException, OSError) as e:
        raise StorageError(f"{path}: not a readable Parquet file ({e}); it is corrupt or truncated: "
                           "re-export it") from e


def check_schema(name: str, schema: pa.Schema, required: Sequence[str],
                 first: Optional[Tuple[str, pa.Schema]] = None) -> None:
    """Raise if ``schema`` lacks a required column or differs from the first file's schema."""
    for col in required:
        if col not in schema.names:
            raise StorageError(f"{name}: missing column {col!r}{did_you_mean(col, schema.names)}; "
                               f"the file has {schema.names}")
    if first is None:
        return
    first_name, first_schema = first
    if schema.remove_metadata().equals(first_schema.remove_metadata()):
        return
    for f in first_schema:
        if f.name not in schema.names:
            raise StorageError(f"{name}: schema differs from {first_name}: column {f.name!r} is missing")
        other = schema.field(f.name)
        if not other.type.equals(f.type):
            raise StorageError(f"{name}: schema differs from {first_name}: column {f.name!r} is "
                               f"{other.type} here but {f.type} there; cast the files to one schema")
    extra = [n for n in schema.names if n not in first_schema.names]
    raise StorageError(f"{name}: schema differs from {first_name}: extra column(s) {extra} or a "
                       "different column order; write all files with one schema")


#: ``not_null(schema)``: the columns that must hold no nulls -> their role (for the message).
NotNull = Callable[[pa.Schema], Dict[str, str]]


def null_error(where: str, col: str, role: str, n: int, inside: bool = False) -> StorageError:
    """The refusal of a null in a column a batch is built from (``where``: file or "input table")."""
    what = f"{n} null values inside its lists" if inside else f"{n} null rows"
    return StorageError(f"{where}: column {col!r} ({role}) has {what}; the reader cannot build a batch "
                        f"from them: fill or drop those rows before preprocess (e.g. "
                        f"table.filter(pyarrow.compute.is_valid(table[{col!r}]))); nothing was written to out_dir")


def footer_nulls(name: str, meta: pq.FileMetaData, not_null: NotNull) -> None:
    """Refuse a file whose row-group statistics count nulls in a ``not_null`` column, before any
    data page is read. Only flat columns: a list column's leaf statistics count empty lists as
    nulls too, so its nulls are found while streaming (``preprocess.check_values``)."""
    roles = not_null(meta.schema.to_arrow_schema())
    if not roles or meta.num_row_groups == 0:
        return
    leaves = {meta.schema.column(i).path: i for i in range(meta.num_columns)}
    for col, role in roles.items():
        if col not in leaves:  # nested: its leaf is "col.list.element"
            continue
        stats = [meta.row_group(g).column(leaves[col]).statistics for g in range(meta.num_row_groups)]
        if all(st is not None and st.has_null_count for st in stats):
            n = sum(st.null_count for st in stats)
            if n:
                raise null_error(name, col, role, n)


def open_source(source: Source, required: Sequence[str], not_null: Optional[NotNull] = None) -> OpenSource:
    """Validate ``source`` (see the module docstring) and return how to stream it."""
    if isinstance(source, pa.Table):
        check_schema("input table", source.schema, required)
        table = source
        return OpenSource(source.schema, source.num_rows, None,
                          [("input table", lambda n: iter(table.to_batches(max_chunksize=n)))])
    if isinstance(source, ds.Dataset):
        return _open_dataset(source, required, not_null)
    if isinstance(source, (str, os.PathLike)):
        files = _parquet_files(Path(source))
        parts = []
        first: Optional[Tuple[str, pa.Schema]] = None
        rows = size = 0
        for f in files:
            meta = _footer(f)
            schema = meta.schema.to_arrow_schema()
            check_schema(str(f), schema, required, first)
            if not_null is not None:
                footer_nulls(str(f), meta, not_null)
            first = first or (str(f), schema)
            rows += meta.num_rows
            size += f.stat().st_size
            parts.append((str(f), _file_reader(f)))
        assert first is not None
        return OpenSource(first[1], rows, size, parts)
    raise StorageError(f"unsupported source type {type(source).__name__}: pass a pyarrow Table, a "
                       "Parquet file or directory path, or a pyarrow dataset")


def _file_reader(path: Path) -> Callable[[int], Iterator[pa.RecordBatch]]:
    def read(n: int) -> Iterator[pa.RecordBatch]:
        # iter_batches reads one row group at a time: memory stays bounded by the row group.
        yield from pq.ParquetFile(str(path)).iter_batches(batch_size=n)
    return read


def _open_dataset(dataset: ds.Dataset, required: Sequence[str], not_null: Optional[NotNull]) -> OpenSource:
    if not isinstance(dataset, ds.FileSystemDataset):
        # In-memory datasets have no files to name; stream them as one part.
        check_schema("input dataset", dataset.schema, required)
        return OpenSource(dataset.schema, dataset.count_rows(), None,
                          [("input dataset", lambda n: dataset.to_batches(batch_size=n))])
    parts = []
    first: Optional[Tuple[str, pa.Schema]] = None
    rows = size = 0
    for frag in sorted(dataset.get_fragments(), key=lambda fr: fr.path):
        try:
            schema = frag.physical_schema
            n = frag.count_rows()
        except (pa.ArrowException, OSError) as e:
            raise StorageError(f"{frag.path}: not a readable Parquet file ({e}); it is corrupt or "
                               "truncated: re-export it") from e
        check_schema(frag.path, schema, required, first)
        if not_null is not None and isinstance(frag, ds.ParquetFileFragment):
            footer_nulls(frag.path, frag.metadata, not_null)
        first = first or (frag.path, schema)
        rows += n
        try:
            size += os.path.getsize(frag.path)
        except OSError:
            pass  # remote filesystem: bytes in stays approximate
        parts.append((frag.path, (lambda fr: lambda b: fr.to_batches(batch_size=b))(frag)))
    if first is None:
        raise StorageError("input dataset has no files; the input is empty")
    return OpenSource(first[1], rows, size or None, parts)
