"""History stored by reference: a session's history as a slice of the user's own events.

In session-ordered data a session's history (the user's last N items before it) is exactly the
item ids of the same user's events just before the session, which the events table already
holds. Preprocess then stores ``(history_start, history_len)`` per session instead of the list,
after checking it for every session (``NotDerivable`` otherwise: the dataset is written with
explicit lists); the reader rebuilds the lists from the events file.
"""

from __future__ import annotations

from typing import Tuple

import numpy as np
import pyarrow as pa

from recd_plugin.sparse.plan import segment_positions
from recd_plugin.storage.layout import StorageSpec


class NotDerivable(Exception):
    """A session's history is not a slice of the same file's earlier item ids: use lists."""


def reference_candidate(spec: StorageSpec, schema: pa.Schema) -> bool:
    """Can ``spec.history`` be stored by reference at all (a list column, a user key)?"""
    if not spec.history or not spec.user_key or spec.history not in spec.session_columns:
        return False
    if spec.user_key not in spec.session_level or spec.user_key not in schema.names:
        return False
    t = schema.field(spec.history).type
    return ((pa.types.is_list(t) or pa.types.is_large_list(t)) and pa.types.is_integer(t.value_type)
            and pa.types.is_integer(schema.field(spec.item_key).type))


def history_refs(table: pa.Table, starts: np.ndarray, spec: StorageSpec) -> Tuple[np.ndarray, np.ndarray]:
    """(history_start, history_len) per session of ``table`` (one whole events file): the
    history must equal the item ids of the ``len`` rows right before the session's first
    row in this file. Verified for every session; raises NotDerivable otherwise."""
    hist = table.column(spec.history).take(pa.array(starts)).combine_chunks()
    if hist.null_count:
        raise NotDerivable(f"{hist.null_count} null histories")
    off = np.asarray(hist.offsets, dtype=np.int64)
    lens = np.diff(off)
    h_start = starts.astype(np.int64) - lens
    if (h_start < 0).any():
        raise NotDerivable("a history is longer than the events before its session in the file")
    values = hist.values.slice(off[0], off[-1] - off[0]).to_numpy(zero_copy_only=False).astype(np.int64)
    if values.size:
        item_ids = table.column(spec.item_key).to_numpy().astype(np.int64, copy=False)
        if not np.array_equal(item_ids[segment_positions(h_start, lens)], values):
            raise NotDerivable("a history differs from the item ids of the events before its session")
    return h_start, lens.astype(np.int32)
