"""Sessionization and user history: the one code path every data source goes through.

A source (synthetic generator, MovieLens loader, ...) only has to produce *raw events*
(user, item, timestamp, label) plus per-user profile and per-item attribute tables with
0-based dense ids. :func:`build_session_table` then

1. sorts the events by (user_id, timestamp, item_id) -- deterministic, and it puts the
   samples of a session next to each other, which is what makes RecD's batches dedupable;
2. splits each user's events into sessions (a new session at the user's first event and
   whenever the gap to the previous event exceeds ``session_gap`` seconds);
3. attaches the user's history (last ``history_length`` items *strictly before* the
   session started), identical for every row of a session;
4. joins the user profile and item attributes and returns the common ``pyarrow.Table``.

Example::

    table = build_session_table(
        user_id, item_id, timestamp, label,
        users={"user_age": age, "user_gender": gender, ...},       # indexed by user id
        item_genres=genres_list_array, item_year=year_bucket,       # indexed by item id
        item_dense_year=year01,
        cardinalities={"user_id": U, "item_id": I, ...},
        source="synthetic",
    )

Everything is vectorized: the history of a session is a contiguous slice of the sorted item
column (the user's previous events), so it is gathered with one ``np.repeat`` + ``arange``.
"""

from __future__ import annotations

import json
from typing import Any, Dict, Mapping

import numpy as np
import pyarrow as pa

from recd_plugin.sparse.plan import segment_positions

HISTORY_LENGTH = 50
SESSION_GAP_SECONDS = 1800
USER_PROFILE_FEATURES = ["user_age", "user_gender", "user_occupation", "user_zip"]
SESSION_FEATURES = ["session_id", "user_id"] + USER_PROFILE_FEATURES + ["history"]
ITEM_FEATURES = ["item_id", "item_genres", "item_year"]
SPARSE_FEATURES = SESSION_FEATURES + ITEM_FEATURES
DENSE_FEATURES = ["dense_hour", "dense_year"]

CARDINALITIES_KEY = b"recd.cardinalities"
SOURCE_KEY = b"recd.source"

# Column order of the common format every built-in source produces: the session features, the
# item features, the timestamp, the dense features, the label.
COLUMNS = SESSION_FEATURES + ITEM_FEATURES + ["timestamp"] + DENSE_FEATURES + ["label"]


def storage_roles() -> Dict[str, Any]:
    """The common format's column roles, as keyword arguments of
    ``recd_plugin.storage.StorageSpec``: ``StorageSpec(**storage_roles())``.

    They live here, with the format they describe, because the storage layer takes every
    schema from its caller and knows no data set's columns. Session level: the user profile and
    the history (constant within a session); item level: genres, year and its dense form.
    A fresh dict each call, so a caller may change it (``dict(storage_roles(), history=None)``).
    """
    return {
        "session_key": "session_id",
        "session_columns": [c for c in SESSION_FEATURES if c != "session_id"],
        "item_key": "item_id",
        "item_columns": [c for c in ITEM_FEATURES if c != "item_id"] + ["dense_year"],
        "sparse_features": list(SPARSE_FEATURES),
        "dense_features": list(DENSE_FEATURES),
        "label": "label",
        "order_by": "timestamp",
        "history": "history",
        "user_key": "user_id",
    }


def cardinalities(table: pa.Table) -> Dict[str, int]:
    """``{sparse feature: num_embeddings}`` stored in the table's schema metadata."""
    meta = table.schema.metadata or {}
    if CARDINALITIES_KEY not in meta:
        raise KeyError(
            "table has no b'recd.cardinalities' schema metadata; build it with "
            "recd_plugin.data (generate_sessions / load_movielens_100k)"
        )
    return {k: int(v) for k, v in json.loads(meta[CARDINALITIES_KEY]).items()}


def sessionize(user_id: np.ndarray, timestamp: np.ndarray, session_gap: int) -> np.ndarray:
    """Session index per event. Inputs [N] must already be sorted by (user, timestamp).

    Returns int64 [N], 0..S-1, non-decreasing: a new session starts at each user's first
    event and after every gap strictly greater than ``session_gap`` seconds.
    """
    n = len(user_id)
    start = np.ones(n, dtype=bool)
    if n > 1:
        start[1:] = (user_id[1:] != user_id[:-1]) | (
            np.diff(timestamp) > session_gap
        )
    return np.cumsum(start, dtype=np.int64) - 1


def session_history(
    user_id: np.ndarray,
    item_id: np.ndarray,
    session_id: np.ndarray,
    history_length: int = HISTORY_LENGTH,
) -> pa.ListArray:
    """Per-row history: the user's last ``history_length`` items before the session start.

    Inputs [N] sorted by (user, timestamp), ``session_id`` from :func:`sessionize`.
    Returns a ``list<int64>`` array of length N (oldest item first).
    """
    n = len(user_id)
    if n == 0:
        return pa.array([], type=pa.list_(pa.int64()))
    pos = np.arange(n, dtype=np.int64)
    # First row of each row's session and of each row's user (both runs are contiguous).
    sess_first = np.flatnonzero(np.r_[True, session_id[1:] != session_id[:-1]])
    user_first = np.flatnonzero(np.r_[True, user_id[1:] != user_id[:-1]])
    s_start = sess_first[session_id - session_id[0]]
    u_start = user_first[np.searchsorted(user_first, pos, side="right") - 1]
    # The history is the contiguous slice [max(user start, session start - L), session start)
    # of the sorted item column: previous sessions are strictly earlier in time.
    h_start = np.maximum(u_start, s_start - history_length)
    lengths = s_start - h_start
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    if offsets[-1] > np.iinfo(np.int32).max:
        # list<int64> has int32 offsets; build such tables in pieces instead.
        raise ValueError(
            f"history column too large ({offsets[-1]} values > 2**31-1); "
            "split the events by user and build several tables"
        )
    idx = segment_positions(h_start, lengths)
    return pa.ListArray.from_arrays(
        pa.array(offsets.astype(np.int32)), pa.array(item_id[idx].astype(np.int64))
    )


def build_session_table(
    user_id: np.ndarray,
    item_id: np.ndarray,
    timestamp: np.ndarray,
    label: np.ndarray,
    *,
    users: Mapping[str, np.ndarray],
    item_genres: pa.ListArray,
    item_year: np.ndarray,
    item_dense_year: np.ndarray,
    cardinalities: Mapping[str, int],
    source: str,
    session_gap: int = SESSION_GAP_SECONDS,
    history_length: int = HISTORY_LENGTH,
) -> pa.Table:
    """Build the common format from raw events.

    Args:
        user_id, item_id, timestamp, label: [N] raw events in any order (dense ids,
            unix seconds, label in {0, 1}).
        users: ``USER_PROFILE_FEATURES`` -> int array [num_users] indexed by user id.
        item_genres: list<int64> array [num_items]; item_year: int [num_items] bucket;
        item_dense_year: float [num_items] in [0, 1].
        cardinalities: num_embeddings of every sparse feature except ``session_id`` and
            ``history`` (derived here).
        source: short name stored under ``b"recd.source"``.

    Returns:
        ``pyarrow.Table`` with :data:`COLUMNS`, one row per event, ordered by
        (user_id, timestamp, item_id).
    """
    user_id = np.asarray(user_id, dtype=np.int64)
    item_id = np.asarray(item_id, dtype=np.int64)
    timestamp = np.asarray(timestamp, dtype=np.int64)
    order = np.lexsort((item_id, timestamp, user_id))
    user_id, item_id, timestamp = user_id[order], item_id[order], timestamp[order]
    label = np.asarray(label, dtype=np.float32)[order]

    session_id = sessionize(user_id, timestamp, session_gap)
    history = session_history(user_id, item_id, session_id, history_length)
    num_sessions = int(session_id[-1]) + 1 if len(session_id) else 0

    cols: Dict[str, pa.Array] = {
        "session_id": pa.array(session_id),
        "user_id": pa.array(user_id),
    }
    for name in USER_PROFILE_FEATURES:
        cols[name] = pa.array(np.asarray(users[name], dtype=np.int64)[user_id])
    cols["history"] = history
    cols["item_id"] = pa.array(item_id)
    cols["item_genres"] = item_genres.cast(pa.list_(pa.int64())).take(pa.array(item_id))
    cols["item_year"] = pa.array(np.asarray(item_year, dtype=np.int64)[item_id])
    cols["timestamp"] = pa.array(timestamp)
    cols["dense_hour"] = pa.array(((timestamp // 3600) % 24).astype(np.float32) / 23.0)
    cols["dense_year"] = pa.array(np.asarray(item_dense_year, dtype=np.float32)[item_id])
    cols["label"] = pa.array(label)

    card = dict(cardinalities)
    card["session_id"] = max(num_sessions, 1)
    card["history"] = card["item_id"]
    card = {k: int(card[k]) for k in SPARSE_FEATURES}
    metadata = {
        CARDINALITIES_KEY: json.dumps(card).encode(),
        SOURCE_KEY: source.encode(),
    }
    return pa.table([cols[c] for c in COLUMNS], names=COLUMNS, metadata=metadata)
