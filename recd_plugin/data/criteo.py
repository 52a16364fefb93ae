"""Synthetic Criteo-like click data: 26 one-hot sparse fields, 13 dense, Zipf-skewed ids.

The shape of the Criteo Kaggle display-advertising data (the DLRM benchmark) without the
data itself: field ``C{i}`` has Criteo Kaggle's published cardinality (DLRM's
``--arch-embedding-size`` for Kaggle), capped by ``max_rows`` so tests and CPU benchmarks stay
small. Ids are drawn from a truncated power law (Zipf, exponent ``zipf_exponent``) over
popularity ranks, and ranks are scattered over row ids by a per-field affine permutation
(``(rank * a + b) mod n``), so hot rows are not simply ids 0..k and no table-sized array is
ever built (fields of 10^7 rows cost nothing). Dense features are log-normal counts like
Criteo's ``I1..I13`` (after ``log1p``). The label is a Bernoulli click whose logit depends on
the dense features and on hidden per-row effects of a few fields, so FM / DeepFM models can
learn it (AUC well above 0.5).

Default skew: with ``zipf_exponent=1.2`` the top 1% of rows of a 10^7-row field take about
94% of its accesses, the regime reported for Criteo (about 1% of rows take about 90%).

Example::

    from recd_plugin.data.criteo import criteo_batches, criteo_table, CRITEO_KAGGLE_CARDINALITIES
    for batch in criteo_batches(num_batches=10, batch_size=2048, seed=0, max_rows=100_000):
        batch.sparse_features          # KJT, keys C1..C26, one id per sample and key
        batch.dense_features           # [B, 13] float32
    table = criteo_table(100_000, seed=0)   # pyarrow.Table: I1..I13, C1..C26, label
    table = criteo_table(100_000, session=16)  # + session_id; C1..C13 constant within a session

With ``session`` > 1 the data is session-structured: runs of ``session`` consecutive samples
share the session-level fields ``C1..C13`` (one user's context, repeated over the impressions
it saw), the other fields stay per sample. This is RecD's case; with ``session=16``, batches of
a multiple of 16 samples have a unique fraction of exactly 1/16 on those fields.

The same arguments always give the same data.
"""

from __future__ import annotations

import math
from typing import Dict, Iterator, List, Optional

import numpy as np
import pyarrow as pa
import torch
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

#: Criteo Kaggle cardinalities of C1..C26 (DLRM's Kaggle ``--arch-embedding-size``).
CRITEO_KAGGLE_CARDINALITIES: List[int] = [
    1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194, 27,
    14992, 5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572,
]
SPARSE_FIELDS: List[str] = [f"C{i}" for i in range(1, 27)]
DENSE_FIELDS: List[str] = [f"I{i}" for i in range(1, 14)]
#: The session-level fields of session-structured data (``session`` > 1).
SESSION_FIELDS: List[str] = [f"C{i}" for i in range(1, 14)]
#: Samples per session of the session-structured data the benchmarks and analyze use.
SESSION = 16
DEFAULT_ZIPF_EXPONENT = 1.2
_LABEL_FIELDS = (0, 1, 4, 6, 13)  # fields whose hidden per-row effect drives the click


def criteo_cardinalities(max_rows: Optional[int] = None) -> Dict[str, int]:
    """{``C1``..``C26``: rows}, each capped at ``max_rows`` (None: the full Kaggle sizes)."""
    cap = max_rows if max_rows is not None else max(CRITEO_KAGGLE_CARDINALITIES)
    if cap < 1:
        raise ValueError(f"max_rows must be >= 1, got {max_rows}")
    return {f: min(n, cap) for f, n in zip(SPARSE_FIELDS, CRITEO_KAGGLE_CARDINALITIES)}


def zipf_ranks(rng: np.random.Generator, n: int, size: int, exponent: float) -> np.ndarray:
    """``size`` popularity ranks in [0, n) with P(rank k) ~ (k+1)^-exponent (inverse CDF of
    the continuous power law on [1, n+1), floored)."""
    u = rng.random(size)
    if abs(exponent - 1.0) < 1e-9:
        k = np.exp(u * math.log(n + 1.0))
    else:
        e = 1.0 - exponent
        k = (1.0 + u * ((n + 1.0) ** e - 1.0)) ** (1.0 / e)
    return np.minimum(np.floor(k).astype(np.int64) - 1, n - 1)


def _scatter(ranks: np.ndarray, n: int, field: int) -> np.ndarray:
    """Rank -> row id by a bijection of [0, n): (rank * a + b) mod n with gcd(a, n) = 1."""
    a = 2_654_435_761 % n if n > 1 else 1
    while math.gcd(a, n) != 1:
        a += 1
    b = (field * 7_919) % n
    return (ranks * a + b) % n


def _row_effect(ids: np.ndarray, field: int) -> np.ndarray:
    """A fixed pseudo-random effect in [-1, 1) per (field, row): the hidden click signal."""
    h = (ids.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15) + np.uint64(field * 1_000_003)) >> np.uint64(40)
    return (h % np.uint64(2001)).astype(np.float64) / 1000.0 - 1.0


def criteo_arrays(num_samples: int, seed: int = 0, max_rows: Optional[int] = 100_000,
                  zipf_exponent: float = DEFAULT_ZIPF_EXPONENT) -> Dict[str, np.ndarray]:
    """The columns as numpy: ``I1..I13`` float32 [N], ``C1..C26`` int64 [N], ``label`` float32 [N]."""
    if num_samples < 0:
        raise ValueError(f"num_samples must be >= 0, got {num_samples}")
    if zipf_exponent <= 0:
        raise ValueError(f"zipf_exponent must be > 0, got {zipf_exponent}")
    rng = np.random.default_rng(seed)
    cols: Dict[str, np.ndarray] = {}
    dense = np.log1p(rng.lognormal(mean=1.0, sigma=1.2, size=(num_samples, len(DENSE_FIELDS))))
    for j, name in enumerate(DENSE_FIELDS):
        cols[name] = dense[:, j].astype(np.float32)
    logit = 0.4 * (dense[:, 0] - dense[:, 0].mean()) - 0.3 * (dense[:, 3] - dense[:, 3].mean()) - 1.0
    for f, (name, n) in enumerate(criteo_cardinalities(max_rows).items()):
        ids = _scatter(zipf_ranks(rng, n, num_samples, zipf_exponent), n, f)
        cols[name] = ids
        if f in _LABEL_FIELDS:
            logit = logit + 1.2 * _row_effect(ids, f)
    cols["label"] = (rng.random(num_samples) < 1.0 / (1.0 + np.exp(-logit))).astype(np.float32)
    return cols


def with_sessions(cols: Dict[str, np.ndarray], session: int) -> Dict[str, np.ndarray]:
    """``cols`` with ``SESSION_FIELDS`` constant over runs of ``session`` consecutive samples
    (each run takes its first sample's ids) and a ``session_id`` column [N] (int64)."""
    if session < 1:
        raise ValueError(f"session must be >= 1 samples, got {session}")
    n = len(cols["label"])
    first = (np.arange(n) // session) * session
    out = dict(cols, **{f: cols[f][first] for f in SESSION_FIELDS})
    out["session_id"] = np.arange(n, dtype=np.int64) // session
    return out


def criteo_table(num_samples: int, seed: int = 0, max_rows: Optional[int] = 100_000,
                 zipf_exponent: float = DEFAULT_ZIPF_EXPONENT, session: int = 1) -> pa.Table:
    """One row per sample (``I1..I13``, ``C1..C26``, ``label``; ``session_id`` when ``session``
    > 1, see the module doc); cardinalities in the schema metadata under ``recd.cardinalities``
    like the other sources."""
    import json

    cols = criteo_arrays(num_samples, seed, max_rows, zipf_exponent)
    if session > 1:
        cols = with_sessions(cols, session)
    meta = {"recd.cardinalities": json.dumps(criteo_cardinalities(max_rows)),
            "recd.source": "criteo-synthetic" if session == 1 else "criteo-sessions"}
    return pa.table(cols).replace_schema_metadata(meta)


def criteo_batches(num_batches: int, batch_size: int, seed: int = 0, max_rows: Optional[int] = 100_000,
                   zipf_exponent: float = DEFAULT_ZIPF_EXPONENT, session: int = 1) -> Iterator[Batch]:
    """``num_batches`` torchrec Batches of ``batch_size`` samples: dense [B, 13], a KJT with
    keys ``C1..C26`` and one id per sample and key (lengths all 1), labels [B]; ``session`` > 1:
    session-structured within each batch (module doc; the KJT does not carry ``session_id``)."""
    for b in range(num_batches):
        cols = criteo_arrays(batch_size, seed * 1_000_003 + b, max_rows, zipf_exponent)
        yield to_batch(with_sessions(cols, session) if session > 1 else cols)


class CriteoBatches:
    """Map-style view of :func:`criteo_batches`: ``CriteoBatches(...)[b]`` is the ``b``-th
    batch of ``criteo_batches(num_batches, batch_size, seed, max_rows, zipf_exponent, session)``,
    built on demand (a profiler sampling 5% of the batches generates only those)."""

    def __init__(self, num_batches: int, batch_size: int, seed: int = 0, max_rows: Optional[int] = 100_000,
                 zipf_exponent: float = DEFAULT_ZIPF_EXPONENT, session: int = 1) -> None:
        if session < 1:
            raise ValueError(f"session must be >= 1 samples, got {session}")
        self.num_batches, self.batch_size, self.seed = num_batches, batch_size, seed
        self.max_rows, self.zipf_exponent, self.session = max_rows, zipf_exponent, session

    def __len__(self) -> int:
        return self.num_batches

    def __getitem__(self, b: int) -> Batch:
        if not 0 <= b < self.num_batches:
            raise IndexError(f"batch {b} out of range ({self.num_batches} batches)")
        cols = criteo_arrays(self.batch_size, self.seed * 1_000_003 + b, self.max_rows, self.zipf_exponent)
        return to_batch(with_sessions(cols, self.session) if self.session > 1 else cols)

    def __iter__(self) -> Iterator[Batch]:
        return (self[b] for b in range(self.num_batches))


def to_batch(cols: Dict[str, np.ndarray]) -> Batch:
    """Criteo columns (numpy, as from :func:`criteo_arrays`) -> a torchrec Batch."""
    n = len(cols["label"])
    values = torch.from_numpy(np.stack([cols[f] for f in SPARSE_FIELDS]).reshape(-1))  # key-major
    kjt = KeyedJaggedTensor(keys=list(SPARSE_FIELDS), values=values,
                            lengths=torch.ones(n * len(SPARSE_FIELDS), dtype=torch.int32))
    dense = torch.from_numpy(np.stack([cols[f] for f in DENSE_FIELDS], axis=1))
    return Batch(dense_features=dense, sparse_features=kjt, labels=torch.from_numpy(cols["label"]))
