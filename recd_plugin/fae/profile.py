"""FAE's access profiler: sample the input, count row accesses, pick the hot set for a budget.

FAE (Adnan et al., VLDB 2022) observes that embedding accesses are extremely skewed, profiles
a small sample of the training input (about 5%), ranks rows of *all* tables by access count
and keeps the top rows that fit the fast-memory budget hot. This module is that profiler.

Python API::

    from recd_plugin.data.criteo import criteo_batches
    from recd_plugin.fae.hotset import TableShape
    from recd_plugin.fae.profile import profile_accesses

    tables = {f"C{i}": TableShape(num_embeddings=n, embedding_dim=16) for i, n in ...}
    profile = profile_accesses(criteo_batches(200, 2048, max_rows=10**6), tables,
                               sample_fraction=0.05, seed=0)
    hot = profile.hot_set(budget_bytes=64 << 20)     # HotSet: hot rows per table
    hot.save("out/hot.npz")

    from recd_plugin.fae.coverage import build_report, plot_coverage
    print(build_report(profile, hot))                 # coverage table + hot-sample fraction
    plot_coverage(profile, "out/coverage.png")        # matplotlib: the analyze extra

``tables`` is keyed by table name; pass ``feature_to_table`` when features share tables or
are named differently (``recd_plugin.fae.access.tables_from_configs`` reads both from an
EBC's configs). ``source`` may also be a Parquet file/directory path. Command line:
``recd-plugin profile criteo-synthetic --budget 64MiB --out out/`` (docs/fae.md).

Choices, and why:

* **Sampling** is Bernoulli(``sample_fraction``) per *sample* (``unit="sample"``, default: a
  representative sample even of a few batches) or per *batch* (``unit="batch"``: FAE's whole
  mini-batches), drawn from ``np.random.default_rng(seed)``: the same source and seed pick the
  same samples. Every id of every batch read is range-checked. A map-style source
  (``__len__`` + ``__getitem__``, e.g. ``TableBatches`` or ``CriteoBatches``) sampled with
  ``unit="batch"`` reads only the drawn batches (same draws as iterating it), so profiling
  5% of a large data set costs 5% of reading it; ``samples_seen`` is then estimated from
  the read batches' sizes.
* **Counting is exact on the sampled ids** and never allocates a table-sized array (tables
  may have 10^8 rows): sampled ids are buffered and periodically merged into one sorted
  ``(ids, counts)`` pair per table with ``np.unique`` + ``np.bincount`` over the merge.
  Memory is O(distinct sampled rows + 4M buffered ids); a count-min sketch would bound it
  further but makes the ranking approximate, which the hot set cannot afford at this size.
* **Ranking** is by raw sampled count across all tables (as FAE does; no normalisation per
  table), ties broken by table order then id. The hot set is the longest *prefix* of that
  ranking whose bytes (rows x dim x dtype bytes, per table) fit the budget: it stops at the
  first row that does not fit rather than skipping to smaller rows, so a larger budget always
  gives a superset. Rows never seen in the sample are never hot.
* **Hot-sample fraction** (samples whose every id is hot) is measured on the sampled samples
  (at most ``max_eval_samples`` of them, kept as (sample, id) pairs); it is in-sample, so the
  benchmark also measures it on held-out batches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Tuple

import numpy as np

from recd_plugin.errors import HotSetError
from recd_plugin.fae.access import Source, check_ids, iter_accesses, resolve_tables
from recd_plugin.fae.hotset import HotSet, TableShape

_MERGE_EVERY = 1 << 22  # buffered ids per table before a merge: bounds the buffer's memory


def _merge(ids: np.ndarray, counts: np.ndarray, new: List[np.ndarray]) -> Tuple[np.ndarray, np.ndarray]:
    """Sorted unique ids and exact counts of (ids with counts) + every id in ``new``."""
    allids = np.concatenate([ids, *new])
    weights = np.concatenate([counts, np.ones(allids.size - ids.size, dtype=np.int64)])
    uniq, inv = np.unique(allids, return_inverse=True)
    return uniq, np.bincount(inv, weights=weights, minlength=uniq.size).astype(np.int64)


@dataclass
class AccessProfile:
    """Sampled access counts per table.

    ``ids[t]`` int64 [R_t] sorted distinct sampled rows, ``counts[t]`` int64 [R_t] their
    sampled access counts; ``eval_sample[t]`` / ``eval_ids[t]`` int64 [E_t] the (sample index,
    id) pairs of the first ``eval_samples`` sampled samples (for the hot-sample fraction).
    """

    tables: Dict[str, TableShape]
    feature_to_table: Dict[str, str]
    ids: Dict[str, np.ndarray]
    counts: Dict[str, np.ndarray]
    eval_sample: Dict[str, np.ndarray]
    eval_ids: Dict[str, np.ndarray]
    eval_samples: int
    samples_seen: int
    samples_sampled: int
    batches_seen: int
    batches_sampled: int
    batch_size: int
    sample_fraction: float
    seed: int
    unit: str = "sample"
    _sorted: Dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    # -- per-table distribution -------------------------------------------------------
    def accesses(self, table: str) -> int:
        """Sampled accesses of ``table``."""
        return int(self.counts[table].sum())

    def sorted_counts(self, table: str) -> np.ndarray:
        """int64 [R_t]: the table's sampled counts, largest first."""
        if table not in self._sorted:
            self._sorted[table] = np.sort(self.counts[table])[::-1]
        return self._sorted[table]

    def coverage(self, table: str, row_fraction: float) -> float:
        """Share of ``table``'s sampled accesses taken by its top ``row_fraction`` x
        num_embeddings rows (linear between whole rows; 0 at 0, 1 at 1, non-decreasing)."""
        c = self.sorted_counts(table)
        total = c.sum()
        if total == 0:
            return 1.0 if row_fraction > 0 else 0.0
        k = min(max(row_fraction, 0.0), 1.0) * self.tables[table].num_embeddings
        whole = int(math.floor(k))
        covered = c[:whole].sum() + ((k - whole) * c[whole] if whole < c.size else 0.0)
        return float(min(covered / total, 1.0))

    # -- hot set ------------------------------------------------------------------------
    def ranking(self) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """All sampled rows ranked by count: (table index int64 [R], id int64 [R], count [R]);
        table index into ``list(self.tables)``; ties by table order, then id."""
        names = list(self.tables)
        tidx = np.concatenate([np.full(self.ids[t].size, i, dtype=np.int64) for i, t in enumerate(names)])
        ids = np.concatenate([self.ids[t] for t in names])
        counts = np.concatenate([self.counts[t] for t in names])
        order = np.lexsort((ids, tidx, -counts))
        return tidx[order], ids[order], counts[order]

    def check_budget(self, budget_bytes: int) -> None:
        """HotSetError for a budget below one row or one that holds every table."""
        smallest = min(self.tables.values(), key=lambda s: s.row_bytes)
        if budget_bytes < smallest.row_bytes:
            raise HotSetError(f"budget {budget_bytes} bytes is smaller than one row (smallest row: "
                              f"{smallest.row_bytes} bytes = dim {smallest.embedding_dim} x "
                              f"{smallest.dtype_bytes} bytes); give at least {smallest.row_bytes} bytes")
        total = sum(s.num_embeddings * s.row_bytes for s in self.tables.values())
        if budget_bytes >= total:
            raise HotSetError(f"budget {budget_bytes} bytes holds all {len(self.tables)} tables "
                              f"({total} bytes): nothing would be cold, so FAE has nothing to do; keep the "
                              "tables in fast memory as they are (plain EBC / compute kernel FUSED), or "
                              "give a budget below the tables' size")

    def hot_set(self, budget_bytes: int) -> HotSet:
        """The hot set for ``budget_bytes`` of fast memory (see the module docstring)."""
        budget_bytes = int(budget_bytes)
        self.check_budget(budget_bytes)
        names = list(self.tables)
        tidx, ids, _ = self.ranking()
        row_bytes = np.array([self.tables[t].row_bytes for t in names], dtype=np.int64)[tidx]
        fits = np.cumsum(row_bytes) <= budget_bytes
        take = int(fits.size if fits.all() else np.argmin(fits))  # longest fitting prefix
        rows = {t: np.sort(ids[:take][tidx[:take] == i]) for i, t in enumerate(names)}
        hot = HotSet(tables=dict(self.tables), rows=rows, budget_bytes=budget_bytes, info={})
        hot.info = {
            "sample_fraction": self.sample_fraction, "seed": self.seed, "unit": self.unit,
            "samples_seen": self.samples_seen, "samples_sampled": self.samples_sampled,
            "feature_to_table": self.feature_to_table, "hot_bytes": hot.bytes,
            "hot_sample_fraction": self.hot_sample_fraction(hot),
            "all_sampled_rows_hot": take == ids.size,
        }
        return hot

    def hot_sample_fraction(self, hot: HotSet) -> float:
        """Share of the kept sampled samples whose every id is in ``hot`` (empty bags count
        as hot)."""
        if self.eval_samples == 0:
            return float("nan")
        cold = np.zeros(self.eval_samples, dtype=bool)
        for t in self.tables:
            is_hot = np.isin(self.eval_ids[t], hot.rows.get(t, np.zeros(0, np.int64)))
            cold[self.eval_sample[t][~is_hot]] = True
        return float(1.0 - cold.mean())


def _is_map_style(source: Source) -> bool:
    return not isinstance(source, (str, Path)) and hasattr(source, "__len__") and hasattr(source, "__getitem__")


def profile_accesses(source: Source, tables: Mapping[str, TableShape],
                     feature_to_table: Optional[Mapping[str, str]] = None, sample_fraction: float = 0.05,
                     seed: int = 0, unit: str = "sample", progress: bool = True,
                     max_eval_samples: int = 250_000, batch_rows: int = 65_536) -> AccessProfile:
    """Profile ``source`` (iterable of Batch, or Parquet path) against ``tables``.

    ``feature_to_table``: feature -> table name (default: each table is the feature of the
    same name). ``sample_fraction`` in (0, 1]; ``unit``: "sample" or "batch" (what is drawn).
    """
    if not 0.0 < sample_fraction <= 1.0:
        raise HotSetError(f"sample_fraction must be in (0, 1], got {sample_fraction}")
    if unit not in ("sample", "batch"):
        raise HotSetError(f"unit must be 'sample' or 'batch', got {unit!r}")
    if not tables:
        raise HotSetError("no tables to profile: give at least one table")
    f2t = resolve_tables(tables, feature_to_table)
    features = list(f2t)
    rng = np.random.default_rng(seed)
    ids = {t: np.zeros(0, np.int64) for t in tables}
    counts = {t: np.zeros(0, np.int64) for t in tables}
    pending: Dict[str, List[np.ndarray]] = {t: [] for t in tables}
    pending_n = {t: 0 for t in tables}
    ev_s: Dict[str, List[np.ndarray]] = {t: [] for t in tables}
    ev_i: Dict[str, List[np.ndarray]] = {t: [] for t in tables}
    seen = sampled = batches = kept = drawn = 0
    sizes: List[int] = []
    # A map-style source (len + getitem, e.g. TableBatches) sampled by batch reads only the
    # drawn batches: the same draws as iterating it (one rng.random() per batch, in order).
    picked_only = unit == "batch" and _is_map_style(source)
    if picked_only:
        total_batches = len(source)  # type: ignore[arg-type]
        index = np.flatnonzero(rng.random(total_batches) < sample_fraction)
        if total_batches and index.size == 0:
            raise HotSetError(f"sample_fraction {sample_fraction} drew none of the {total_batches} batches "
                              "(unit='batch'): raise --sample, use unit='sample', or give more data")
        dataset = source
        source = (dataset[int(i)] for i in index)  # type: ignore[index]
    chunks = iter_accesses(source, features, batch_rows)
    if progress:
        from tqdm import tqdm

        chunks = tqdm(chunks, desc="profile", unit="batch", total=len(index) if picked_only else None)
    for b, feats in chunks:
        if unit == "sample":
            mask = rng.random(b) < sample_fraction
        else:
            mask = np.full(b, picked_only or rng.random() < sample_fraction)
        local = np.cumsum(mask) - 1 + sampled  # global sampled index of each sample
        n_keep = int(min(mask.sum(), max(max_eval_samples - kept, 0)))
        for f, (vals, smp) in feats.items():
            t = f2t[f]
            check_ids(f, vals, t, tables[t], batches)
            sel = mask[smp]
            picked, where = vals[sel], local[smp[sel]]
            pending[t].append(picked)
            pending_n[t] += picked.size
            if n_keep:
                keep = where < sampled + n_keep
                ev_s[t].append(where[keep])
                ev_i[t].append(picked[keep])
            if pending_n[t] >= _MERGE_EVERY:
                ids[t], counts[t] = _merge(ids[t], counts[t], pending[t])
                pending[t], pending_n[t] = [], 0
        seen += b
        sampled += int(mask.sum())
        kept += n_keep
        drawn += bool(mask.any())
        batches += 1
        sizes.append(b)
    if picked_only and batches:
        # unread batches: their sizes are estimated from the read ones
        seen, batches = int(round(total_batches * seen / batches)), total_batches
    if batches == 0:
        raise HotSetError("the source yielded no batches: nothing to profile")
    if sampled == 0:
        raise HotSetError(f"sample_fraction {sample_fraction} drew no sample out of {seen} "
                          f"({batches} batches, unit={unit!r}): raise --sample or give more data")
    for t in tables:
        ids[t], counts[t] = _merge(ids[t], counts[t], pending[t])

    def cat(parts: List[np.ndarray]) -> np.ndarray:
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)

    return AccessProfile(
        tables=dict(tables), feature_to_table=f2t, ids=ids, counts=counts,
        eval_sample={t: cat(ev_s[t]) for t in tables}, eval_ids={t: cat(ev_i[t]) for t in tables},
        eval_samples=kept, samples_seen=seen, samples_sampled=sampled, batches_seen=batches, batches_sampled=drawn,
        batch_size=int(np.median(sizes)), sample_fraction=sample_fraction, seed=seed, unit=unit,
    )
