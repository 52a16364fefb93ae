"""Column helpers shared by preprocessing and the reader: row equality and jagged gathers.

Both work on whole columns at once (numpy / pyarrow compute), never row by row: the
preprocessor compares every row with its session's first row, and the reader gathers the
unique rows of a batch, per feature, with one ``take``-like operation each.

Example::

    rows_equal(pa.array([[1, 2], [3]]), pa.array([[1, 2], [4]]))   # array([ True, False])
    col = JaggedColumn.from_arrow(pa.array([[1, 2], [], [3]]), "history")
    col.gather(np.array([2, 0]))      # (values [3, 1, 2], lengths [1, 2] int32)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple, Union

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from recd_plugin.errors import StorageError
from recd_plugin.sparse.plan import segment_positions

ArrowColumn = Union[pa.Array, pa.ChunkedArray]


def _array(a: ArrowColumn) -> pa.Array:
    return a.combine_chunks() if isinstance(a, pa.ChunkedArray) else a


def _is_list(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t)


def rows_equal(a: ArrowColumn, b: ArrowColumn) -> np.ndarray:
    """bool [N]: row i of ``a`` equals row i of ``b`` (nulls equal nulls; lists compared whole)."""
    a, b = _array(a), _array(b)
    if len(a) == 0:
        return np.zeros(0, dtype=bool)
    if _is_list(a.type):
        # Null lists get length -1, so null == null but null != [].
        la = pc.fill_null(pc.list_value_length(a), -1).to_numpy().astype(np.int64)
        lb = pc.fill_null(pc.list_value_length(b), -1).to_numpy().astype(np.int64)
        eq = la == lb
        sub = np.flatnonzero(eq & (la > 0))
        if sub.size:
            idx = pa.array(sub)
            same = rows_equal(pc.list_flatten(a.take(idx)), pc.list_flatten(b.take(idx)))
            row_of = np.repeat(np.arange(sub.size), la[sub])
            bad = np.zeros(sub.size, dtype=bool)
            bad[row_of[~same]] = True
            eq[sub[bad]] = False
        return eq
    same = pc.fill_null(pc.equal(a, b), False)
    both_null = pc.and_(a.is_null(), b.is_null())
    return pc.or_(same, both_null).to_numpy(zero_copy_only=False).astype(bool)


def _int64(arr: pa.Array, name: str) -> np.ndarray:
    if not pa.types.is_integer(arr.type):
        raise StorageError(f"sparse column {name!r} must hold integers, got {arr.type}")
    if arr.null_count:
        raise StorageError(f"sparse column {name!r} has {arr.null_count} nulls; fill them before preprocessing")
    return arr.to_numpy(zero_copy_only=False).astype(np.int64, copy=False)


@dataclass
class JaggedColumn:
    """A sparse column as flat int64 values plus offsets (None for a one-id-per-row column)."""

    values: np.ndarray
    offsets: Optional[np.ndarray]

    @classmethod
    def from_arrow(cls, col: ArrowColumn, name: str) -> "JaggedColumn":
        col = _array(col)
        if _is_list(col.type):
            if col.null_count:
                raise StorageError(f"sparse column {name!r} has {col.null_count} null lists")
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
    col = _array(col)
    if col.null_count:
        raise StorageError(f"dense column {name!r} has {col.null_count} nulls; fill them before preprocessing")
    return col.to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
