"""Index math of the IKJT build, planned on the host with numpy.

Deduplicating a batch is a few dozen tiny index operations (offsets, unique ids, kept rows,
positions of the kept values) followed by one gather of the values. The gather stays a torch
``index_select`` (on the batch's device); the planning runs here, in numpy, because an IKJT
is built where batches are made, on the host (in the loader or its workers, before
``.to(device)``), and numpy's per-call cost is a fraction of torch's dispatcher: the build of
a MovieLens batch drops from about 215 us to well under half.

All arrays are int64 numpy arrays; shapes follow ``ikjt.py`` (K keys, batch B, U unique).
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import numpy as np


def offsets_of(lengths: np.ndarray) -> np.ndarray:
    """[N] lengths -> [N + 1] offsets starting at 0."""
    offsets = np.zeros(lengths.size + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return offsets


def unique_first(ids: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Unique ids (or rows of a [B, C] matrix) in order of first appearance.

    Returns:
        (first [U]: sample of each unique row's first appearance, increasing;
        inverse [B]: unique row of each sample). No repeats -> identity inverse.
    """
    if ids.ndim == 1:
        runs = _unique_runs(ids)
        if runs is not None:
            return runs
        _, first, inverse = np.unique(ids, return_index=True, return_inverse=True)
    else:
        _, first, inverse = np.unique(ids, axis=0, return_index=True, return_inverse=True)
    inverse = inverse.reshape(-1)
    # np.unique sorts by value; renumber by first appearance, so a batch without repeats gets
    # the identity inverse and unique rows keep the batch's (session) order.
    order = np.argsort(first, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    return first[order].astype(np.int64), rank[inverse].astype(np.int64)


def _unique_runs(ids: np.ndarray) -> Optional[Tuple[np.ndarray, np.ndarray]]:
    """Fast path for session-clustered batches (RecD's data layout).

    When equal ids form contiguous runs and no id starts two runs, the run starts are the
    first appearances and the run number is the inverse: no sort needed. None otherwise.
    """
    if ids.size == 0:
        return None
    head = np.empty(ids.size, dtype=bool)
    head[0] = True
    np.not_equal(ids[1:], ids[:-1], out=head[1:])
    first = np.flatnonzero(head)
    if np.unique(ids[first]).size != first.size:
        return None  # an id appears in two separate runs: use the general path
    return first, np.cumsum(head) - 1


def content_rows(lengths: np.ndarray, offsets: np.ndarray, values: np.ndarray, weights: Optional[np.ndarray],
                 keys_in_group: List[int], batch: int) -> np.ndarray:
    """[B, C] int64 matrix whose equal rows are exactly the equal samples of a group.

    Per key: the row's length, then its ids zero-padded to the batch's longest row (so [1]
    and [1, 0] differ by length), then the weights' bit patterns if the KJT is weighted.
    """
    cols: List[np.ndarray] = []
    for k in keys_in_group:
        lens = lengths[k * batch:(k + 1) * batch]
        start, end = offsets[k * batch], offsets[(k + 1) * batch]
        cols.append(lens.reshape(-1, 1))
        width = int(lens.max()) if batch else 0
        if width:
            rows = np.repeat(np.arange(batch), lens)
            at = (rows, np.arange(end - start) - (offsets[k * batch:(k + 1) * batch] - start)[rows])
            ids = np.zeros((batch, width), dtype=np.int64)
            ids[at] = values[start:end]
            cols.append(ids)
            if weights is not None:
                bits = np.zeros((batch, width), dtype=np.int64)
                bits[at] = weights[start:end].astype(np.float64).view(np.int64)
                cols.append(bits)
    return np.concatenate(cols, axis=1)


def segment_positions(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Positions of the segments ``[starts[i], starts[i] + lengths[i])`` laid end to end.

    The one jagged gather of this package (IKJT build, storage reader, history columns):
    ``values[segment_positions(offsets[rows], lengths[rows])]`` are the values of ``rows``.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    out_offsets = offsets_of(lengths)
    shift = np.repeat(np.asarray(starts, dtype=np.int64) - out_offsets[:-1], lengths)
    return np.arange(out_offsets[-1], dtype=np.int64) + shift


def jagged_positions(lengths: np.ndarray, offsets: np.ndarray, select: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Rows ``select`` [M] of a jagged tensor -> (their lengths [M], positions of their values)."""
    out_lengths = lengths[select]
    return out_lengths, segment_positions(offsets[select], out_lengths)
