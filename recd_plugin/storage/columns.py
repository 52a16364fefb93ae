"""Row equality of whole columns: how preprocessing checks session/item constancy.

Vectorized (numpy / pyarrow compute), never row by row: every row is compared with its
session's (or item's) first row at once. Column conversion lives in ``recd_plugin.data.columns``.

Example::

    rows_equal(pa.array([[1, 2], [3]]), pa.array([[1, 2], [4]]))   # array([ True, False])
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from recd_plugin.data.columns import ArrowColumn, as_array, is_list


def rows_equal(a: ArrowColumn, b: ArrowColumn) -> np.ndarray:
    """bool [N]: row i of ``a`` equals row i of ``b`` (nulls equal nulls; lists compared whole)."""
    a, b = as_array(a), as_array(b)
    if len(a) == 0:
        return np.zeros(0, dtype=bool)
    if is_list(a.type):
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
