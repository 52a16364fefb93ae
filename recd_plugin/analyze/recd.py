"""RecD on your data: unique fraction of the session-level feature group per batch size.

::

    from recd_plugin.analyze.sources import load_sample
    from recd_plugin.analyze.recd import analyze_groups
    g = analyze_groups(load_sample("movielens-100k"))
    g.stored, g.clustered     # unique fraction u at BATCH_SIZES, as stored / sorted by session

The *unique fraction* u of a feature group at batch size B is what the IKJT keeps: batches of
B consecutive rows, per batch the number of distinct session keys (the group is deduplicated
by its key, ``groups.NAME.key``), summed over batches and divided by the rows. This is the
definition ``DedupStats.unique_fraction`` (the dedup benchmark's u) uses, the last partial
batch included. Three row orders are measured:

* **stored**: the rows as they are in the data (what the plugin sees if you feed the files
  in order);
* **clustered**: stably sorted by the session key (``recd-plugin preprocess`` writes this
  layout; RecD's data-generation step);
* **shuffled**: a random permutation (``--seed``): what a pipeline that shuffles samples
  gets, the reason RecD clusters sessions first.

Data without a session key column can still repeat features by content: logged impressions
of one user carry the same user features row after row. :func:`content_group` finds such a
group (columns that repeat within batches and move together, e.g. a user's id, age and
region), whose rows the plugin compares by content (a group without ``key``). Data where
nothing repeats (criteo-synthetic: one independent impression per row) has no group: RecD
does not apply, and both return None.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np

from recd_plugin.analyze.sources import DataSample, row_codes

BATCH_SIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)


def unique_fraction(keys: np.ndarray, batch_size: int) -> float:
    """Distinct ``keys`` per batch of ``batch_size`` consecutive rows, summed over batches,
    divided by the rows (nan for no rows)."""
    n = int(keys.size)
    if n == 0:
        return float("nan")
    batch = np.arange(n, dtype=np.int64) // batch_size
    order = np.lexsort((keys, batch))  # rows grouped by batch, keys sorted within it
    k, b = keys[order], batch[order]
    new = np.ones(n, dtype=bool)
    new[1:] = (k[1:] != k[:-1]) | (b[1:] != b[:-1])
    return float(new.sum() / n)


#: A column joins a content group while it repeats within batches (per-column u at batch
#: 1024 at most this) ...
CONTENT_MAX_U = 0.5
#: ... and adding it raises the group's joint u by at most this factor (it moves with the rest).
CONTENT_GROWTH = 1.05


@dataclass
class GroupReport:
    """The session-level feature group and its unique fractions (lists aligned with
    ``batch_sizes``; nan where the sample has fewer rows than the batch). ``key`` is None for
    a group found by content (no session key column)."""

    name: str
    key: Optional[str]
    features: List[str]
    rows: int
    sessions: int
    batch_sizes: List[int]
    stored: List[float]
    clustered: List[float]
    shuffled: List[float]
    per_feature: Dict[str, float] = field(default_factory=dict)  # distinct values per row, B=1024

    def at(self, batch_size: int, order: str = "clustered") -> float:
        """u at ``batch_size`` (one of ``batch_sizes``) in ``order``."""
        return getattr(self, order)[self.batch_sizes.index(batch_size)]

    def mean_rows_per_session(self) -> float:
        return self.rows / max(self.sessions, 1)


def analyze_groups(sample: DataSample, batch_sizes=BATCH_SIZES, seed: int = 0,
                   name: str = "session") -> Optional[GroupReport]:
    """Unique fractions of the session-level group of ``sample``; None without a session key."""
    if sample.session_key is None or not sample.session_columns:
        return None
    key = row_codes(sample.table.column(sample.session_key))
    clustered = key[np.argsort(key, kind="stable")]
    shuffled = key[np.random.default_rng(seed).permutation(key.size)]

    def curve(k: np.ndarray) -> List[float]:
        return [unique_fraction(k, b) if b <= k.size else float("nan") for b in batch_sizes]

    per_feature = {c: unique_fraction(row_codes(sample.table.column(c)), min(1024, key.size))
                   for c in sample.session_columns}
    return GroupReport(name=name, key=sample.session_key, features=list(sample.session_columns),
                       rows=int(key.size), sessions=int(np.unique(key).size), batch_sizes=list(batch_sizes),
                       stored=curve(key), clustered=curve(clustered), shuffled=curve(shuffled),
                       per_feature=per_feature)


def _dense_codes(codes: np.ndarray) -> Tuple[np.ndarray, int]:
    """(codes renumbered 0..n-1, n)."""
    values, inverse = np.unique(codes, return_inverse=True)
    return inverse.reshape(-1).astype(np.int64), int(values.size)


def _joint(a: Tuple[np.ndarray, int], b: Tuple[np.ndarray, int]) -> Tuple[np.ndarray, int]:
    """Dense codes of the row pairs (a, b): equal pairs -> equal codes (no overflow: n <= rows)."""
    return _dense_codes(a[0] * b[1] + b[0])


def content_group(sample: DataSample, batch_sizes=BATCH_SIZES, seed: int = 0,
                  name: str = "repeated") -> Optional[GroupReport]:
    """Columns that repeat by content within batches of the stored order (no key column).

    Candidates are the sparse columns whose own u at batch 1024 is at most ``CONTENT_MAX_U``;
    starting from the most specific one (largest u, e.g. a user id), each next column joins
    while the group's joint u grows by at most ``CONTENT_GROWTH`` (it is determined by the
    same entity: a user's age and region, not the item's genre). A group needs two columns or
    more: a single repeating column is a popular id (FAE's case), not an entity's features.
    None when no such group exists.
    """
    b = min(1024, sample.rows)
    if b == 0:
        return None
    codes = {c: _dense_codes(row_codes(sample.table.column(c))) for c in sample.sparse}
    own = {c: unique_fraction(codes[c][0], b) for c in sample.sparse}
    candidates = sorted((c for c, u in own.items() if u <= CONTENT_MAX_U), key=lambda c: -own[c])
    group: List[str] = []
    for start in candidates:  # the most specific column first; a lone column is only a popular id
        group, joint, u_joint = [start], codes[start], own[start]
        for c in candidates:
            if c in group:
                continue
            pair = _joint(joint, codes[c])
            u = unique_fraction(pair[0], b)
            if u <= u_joint * CONTENT_GROWTH:
                group.append(c)
                joint, u_joint = pair, max(u_joint, u)
        if len(group) >= 2:
            break
    if len(group) < 2:
        return None
    key = joint[0]
    clustered = key[np.argsort(key, kind="stable")]
    shuffled = key[np.random.default_rng(seed).permutation(key.size)]

    def curve(k: np.ndarray) -> List[float]:
        return [unique_fraction(k, bs) if bs <= k.size else float("nan") for bs in batch_sizes]

    return GroupReport(name=name, key=None, features=sorted(group, key=sample.sparse.index), rows=int(key.size),
                       sessions=int(np.unique(key).size), batch_sizes=list(batch_sizes), stored=curve(key),
                       clustered=curve(clustered), shuffled=curve(shuffled),
                       per_feature={c: own[c] for c in group})


def amdahl_bound(f: float, u: float) -> float:
    """RecD's speed-up bound 1 / ((1 - f) + f * u): a share ``f`` of the step time is
    deduplicable work, which shrinks to the unique fraction ``u`` of the rows."""
    return 1.0 / ((1.0 - f) + f * u)
