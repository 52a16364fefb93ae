"""Arrow columns -> numpy for batch building: sparse (jagged) and dense columns.

Shared by ``TableBatches`` (a table in memory) and the storage reader (Parquet files): both
turn whole columns into flat int64 values plus offsets once, then build every batch with
slices and gathers, never row by row.

Example::

    col = JaggedColumn.from_arrow(pa.array([[1, 2], [], [3]]), "history")
    col.gather(np.array([2, 0]))      # (values [3, 1, 2], lengths [1, 2] int32)
    dense_column(pa.array([0.5, 1.0]), "dense_hour")   # float32 [2]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple, Union

import numpy as np
import pyarrow as pa

from recd_plugin.errors import MalformedBatchError
from recd_plugin.sparse.plan import segment_positions

ArrowColumn = Union[pa.Array, pa.ChunkedArray]


def as_array(a: ArrowColumn) -> pa.Array:
    return a.combine_chunks() if isinstance(a, pa.ChunkedArray) else a


def is_list(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t)


def _int64(arr: pa.Array, name: str) -> np.ndarray:
    if not pa.types.is_integer(arr.type):
        raise MalformedBatchError(f"sparse column {name!r} must hold integers, got {arr.type}")
    if arr.null_count:
        raise MalformedBatchError(f"sparse column {name!r} has {arr.null_count} nulls; fill them first")
    return arr.to_numpy(zero_copy_only=False).astype(np.int64, copy=False)


@dataclass
class JaggedColumn:
    """A sparse column as flat int64 values plus offsets (None for a one-id-per-row column)."""

    values: np.ndarray
    offsets: Optional[np.ndarray]

    @classmethod
    def from_arrow(cls, col: ArrowColumn, name: str) -> "JaggedColumn":
        col = as_array(col)
        if is_list(col.type):
            if col.null_count:
                raise MalformedBatchError(f"sparse column {name!r} has {col.null_count} null lists")
            off = np.asarray(col.offsets, dtype=np.int64)
            # .offsets index into .values, which ignores a slice's start: re-base.
            flat = col.values.slice(off[0], off[-1] - off[0])
            return cls(_int64(flat, name), off - off[0])
        return cls(_int64(col, name), None)

    def gather(self, rows: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """(values, int32 lengths) of ``rows`` in order (repeats allowed)."""
        if self.offsets is None:
            return self.values[rows], np.ones(rows.size, dtype=np.int32)
        starts = self.offsets[rows]
        lengths = self.offsets[rows + 1] - starts
        return self.values[segment_positions(starts, lengths)], lengths.astype(np.int32)


def dense_column(col: ArrowColumn, name: str) -> np.ndarray:
    """float32 [N] of a numeric column (nulls rejected: a batch cannot hold them)."""
    col = as_array(col)
    if col.null_count:
        raise MalformedBatchError(f"dense column {name!r} has {col.null_count} nulls; fill them first")
    return col.to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
