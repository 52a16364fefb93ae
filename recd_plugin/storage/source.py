"""Open the flat input of preprocessing as a validated stream of record batches.

A source is a ``pyarrow.Table``, a Parquet file, a directory of Parquet files (searched
recursively, sorted by path: :mod:`recd_plugin.storage.parquet_input`, the reader every tool
shares) or a ``pyarrow.dataset.Dataset``. Every file's footer is read up front, so a corrupt or
truncated file, a missing column, a schema that differs between files or nulls in a column that
must have none (when the footer's statistics count them) fail *before* anything is written,
with an error naming the file and the column.

Example::

    src = open_source("/data/events/", required=["session_id", "label"])
    src.schema, src.num_rows
    for where, batch in src.batches(65536):   # where: the file the batch came from
        ...
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from recd_plugin.errors import StorageError
from recd_plugin.storage.parquet_input import check_schema, not_parquet, open_parquet, read_error

Source = Union[pa.Table, ds.Dataset, str, "os.PathLike[str]"]
#: How a user fixes a missing input column: the spec names it, the data lacks it.
_FIX = ": add it to the input, or name the input's own columns in the StorageSpec"


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
                raise read_error(name, e) from e


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
        check_schema("input table", source.schema, required, fix=_FIX)
        table = source
        return OpenSource(source.schema, source.num_rows, None,
                          [("input table", lambda n: iter(table.to_batches(max_chunksize=n)))])
    if isinstance(source, ds.Dataset):
        return _open_dataset(source, required, not_null)
    if isinstance(source, (str, os.PathLike)):
        parquet = open_parquet(source, required, error=StorageError, fix=_FIX)
        if not_null is not None:
            for f, meta in zip(parquet.files, parquet.footers):
                footer_nulls(str(f), meta, not_null)
        parts = [(str(f), (lambda f: lambda n: parquet.read_file(f, n))(f)) for f in parquet.files]
        return OpenSource(parquet.schema, parquet.num_rows, parquet.bytes, parts)
    raise StorageError(f"unsupported source type {type(source).__name__}: pass a pyarrow Table, a "
                       "Parquet file or directory path, or a pyarrow dataset")


def _open_dataset(dataset: ds.Dataset, required: Sequence[str], not_null: Optional[NotNull]) -> OpenSource:
    if not isinstance(dataset, ds.FileSystemDataset):
        # In-memory datasets have no files to name; stream them as one part.
        check_schema("input dataset", dataset.schema, required, fix=_FIX)
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
            raise not_parquet(frag.path, e) from e
        check_schema(frag.path, schema, required, first, fix=_FIX)
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
