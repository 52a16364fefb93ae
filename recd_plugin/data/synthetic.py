"""Synthetic session-structured data: the embedded default data set.

Users with random profiles start sessions of geometric length; events inside a session are
a few minutes apart, sessions are hours to days apart (so the 30-minute rule of
:func:`recd_plugin.data.sessions.sessionize` recovers them exactly). Items are drawn with
Zipf popularity, have 1-3 of 19 genres and a release-year bucket. The label comes from a
hidden user-item affinity (user genre taste + latent factors + item quality), so a model with
user and item embeddings can learn it (AUC well above 0.5).

Example::

    from recd_plugin.data import generate_sessions, TableBatches
    table = generate_sessions(num_users=2000, seed=0)      # ~64k rows, pyarrow.Table
    batches = TableBatches(table, batch_size=1024)
    batch = batches[0]                                       # torchrec Batch

The same seed always gives an identical table.
"""

from __future__ import annotations

from typing import Any, Dict

import numpy as np
import pyarrow as pa

from .sessions import HISTORY_LENGTH, SESSION_GAP_SECONDS, build_session_table

NUM_AGE = 7
NUM_GENDER = 2
NUM_OCCUPATION = 21
NUM_ZIP = 100
NUM_GENRES = 19
FIRST_YEAR, LAST_YEAR = 1950, 2020
LATENT_DIM = 8
_START_TIME = 1_577_836_800  # 2020-01-01 UTC


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def simulate_events(
    num_users: int = 2000,
    num_items: int = 5000,
    sessions_per_user: float = 4,
    mean_session_length: float = 8,
    zipf_exponent: float = 1.1,
    seed: int = 0,
) -> Dict[str, Any]:
    """Raw synthetic events before sessionization (the input of ``build_session_table``).

    Returns a dict with event arrays [N], already ordered by (user, time):
    ``user_id``, ``item_id``, ``timestamp`` (int64), ``label`` (float32), ``session``
    (the generator's true session index, int64); and the side tables ``users``
    ({profile feature: int64 [num_users]}), ``item_genres`` (list<int64> [num_items]),
    ``item_year`` (int64 [num_items]), ``item_dense_year`` (float32 [num_items]),
    ``cardinalities`` (dict).
    """
    if num_users < 1 or num_items < 1:
        raise ValueError("num_users and num_items must be >= 1")
    if sessions_per_user < 1 or mean_session_length < 1:
        raise ValueError("sessions_per_user and mean_session_length must be >= 1")
    rng = np.random.default_rng(seed)
    U, I = num_users, num_items

    users = {
        "user_age": rng.integers(0, NUM_AGE, U),
        "user_gender": rng.integers(0, NUM_GENDER, U),
        "user_occupation": rng.integers(0, NUM_OCCUPATION, U),
        "user_zip": rng.integers(0, NUM_ZIP, U),
    }

    # Sessions: every user has at least one; lengths are geometric with the requested mean.
    n_sess = 1 + rng.poisson(sessions_per_user - 1, U)
    num_sessions = int(n_sess.sum())
    sess_user = np.repeat(np.arange(U, dtype=np.int64), n_sess)
    sess_len = rng.geometric(1.0 / mean_session_length, num_sessions)
    session = np.repeat(np.arange(num_sessions, dtype=np.int64), sess_len)
    user_id = sess_user[session]
    n = len(session)

    # Time: a per-event delta, cumulated per user. Inside a session 10 s - 10 min; at a
    # session start 2 h - 3 days (always > the 30 min session gap).
    sess_first = np.zeros(num_sessions + 1, dtype=np.int64)
    np.cumsum(sess_len, out=sess_first[1:])
    delta = rng.integers(10, 600, n)
    delta[sess_first[:-1]] = rng.integers(2 * 3600, 3 * 86400, num_sessions)
    t = np.cumsum(delta)
    user_first = sess_first[:-1][np.r_[0, np.cumsum(n_sess)[:-1]]]
    base = _START_TIME + rng.integers(0, 30 * 86400, U)
    timestamp = (t - t[user_first][user_id] + base[user_id]).astype(np.int64)

    # Items: Zipf popularity over a random permutation of ids (popular ids are scattered).
    p = 1.0 / np.arange(1, I + 1, dtype=np.float64) ** zipf_exponent
    rank_to_item = rng.permutation(I)
    item_id = rank_to_item[rng.choice(I, n, p=p / p.sum())].astype(np.int64)

    # 1-3 distinct genres per item, sorted ascending inside each bag.
    k = rng.integers(1, 4, I)
    top3 = rng.random((I, NUM_GENRES)).argsort(axis=1)[:, :3]
    keep = np.arange(3)[None, :] < k[:, None]
    genres = np.sort(np.where(keep, top3, NUM_GENRES), axis=1)  # kept ids sort first
    g_offsets = np.r_[0, np.cumsum(k)].astype(np.int32)
    item_genres = pa.ListArray.from_arrays(
        pa.array(g_offsets), pa.array(genres[keep].astype(np.int64))
    )
    year = np.clip(LAST_YEAR - np.floor(rng.exponential(12.0, I)), FIRST_YEAR, LAST_YEAR)
    item_year = (year - FIRST_YEAR).astype(np.int64)
    item_dense_year = (item_year / (LAST_YEAR - FIRST_YEAR)).astype(np.float32)

    # Hidden affinity -> Bernoulli label. Genre taste generalizes across items, latent
    # factors need per-id embeddings; both are learnable from the sparse features.
    taste = rng.normal(0.0, 1.0, (U, NUM_GENRES))
    multi_hot = np.zeros((I, NUM_GENRES))
    multi_hot[np.repeat(np.arange(I), k), genres[keep]] = 1.0 / np.repeat(k, k)
    u_vec = rng.normal(0.0, 1.0, (U, LATENT_DIM)) / np.sqrt(LATENT_DIM)
    i_vec = rng.normal(0.0, 1.0, (I, LATENT_DIM))
    quality = rng.normal(0.0, 0.5, I)
    user_bias = rng.normal(0.0, 0.5, U)
    affinity = (
        np.einsum("ng,ng->n", taste[user_id], multi_hot[item_id])
        + np.einsum("nd,nd->n", u_vec[user_id], i_vec[item_id])
        + quality[item_id]
        + user_bias[user_id]
        + 0.5 * (item_dense_year[item_id] - 0.5)
    )
    label = (rng.random(n) < _sigmoid(1.5 * affinity)).astype(np.float32)

    card = {
        "user_id": U,
        "user_age": NUM_AGE,
        "user_gender": NUM_GENDER,
        "user_occupation": NUM_OCCUPATION,
        "user_zip": NUM_ZIP,
        "item_id": I,
        "item_genres": NUM_GENRES,
        "item_year": LAST_YEAR - FIRST_YEAR + 1,
    }
    return dict(
        user_id=user_id,
        item_id=item_id,
        timestamp=timestamp,
        label=label,
        session=session,
        users=users,
        item_genres=item_genres,
        item_year=item_year,
        item_dense_year=item_dense_year,
        cardinalities=card,
    )


def generate_sessions(
    num_users: int = 2000,
    num_items: int = 5000,
    sessions_per_user: float = 4,
    mean_session_length: float = 8,
    zipf_exponent: float = 1.1,
    seed: int = 0,
    session_gap: int = SESSION_GAP_SECONDS,
    history_length: int = HISTORY_LENGTH,
) -> pa.Table:
    """Synthetic data in the common format (see ``recd_plugin.data`` for the columns).

    About ``num_users * sessions_per_user * mean_session_length`` rows (64k by default),
    ordered by (user_id, timestamp); deterministic by ``seed``.
    """
    ev = simulate_events(
        num_users, num_items, sessions_per_user, mean_session_length, zipf_exponent, seed
    )
    return build_session_table(
        ev["user_id"],
        ev["item_id"],
        ev["timestamp"],
        ev["label"],
        users=ev["users"],
        item_genres=ev["item_genres"],
        item_year=ev["item_year"],
        item_dense_year=ev["item_dense_year"],
        cardinalities=ev["cardinalities"],
        source="synthetic",
        session_gap=session_gap,
        history_length=history_length,
    )
