"""Exact tier-traffic simulation: FAE's static hot set vs an LRU and an LFU cache.

Replays the embedding accesses of N training steps against a fast tier of a fixed capacity
in rows and counts, per step, the rows fetched from the slow tier (misses)::

    from recd_plugin.fae.trace import AccessTrace, compare_tiers
    trace = AccessTrace.from_source(held_out_batches, tables)        # N steps
    traffic = compare_tiers(trace, hot, warmup_steps=10)             # hot: a HotSet
    print(traffic)          # rows fetched per step: static / LRU / LFU, and the ratios
    traffic.misses["lru"]   # int64 [N - warmup_steps]

The exact policy (what "simulated exactly, row by row" means here):

* a row is the global key ``offset[table] + id`` (tables in ``tables`` order); a step
  accesses the *unique* rows of its batch once each, in increasing key order (a batch is
  served as a whole: a row needed by several samples of one step is fetched once);
* **static** (FAE): the hot rows are preloaded and never change; a miss is an accessed row
  that is not hot;
* **LRU**: an access moves the row to the most-recent end; a miss inserts it and, when the
  cache is over capacity, evicts the least recently accessed row (``OrderedDict``);
* **LFU**: "perfect" LFU like FBGEMM's ``lfu_state``: every row's access count since the
  start of the replay is kept, also for rows not in the cache; a miss always admits the row
  and, when full, evicts the cached row with the smallest count, ties broken by the least
  recent access (exact, with a lazy min-heap of (count, last access, key));
* LRU and LFU start empty; the first ``warmup_steps`` steps warm them and are not counted.

Capacity is in rows: all tables are assumed to have the same row size (true of the
benchmark); with mixed dims compare at equal rows, not bytes.
"""

from __future__ import annotations

import heapq
import numbers
from collections import OrderedDict
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence

import numpy as np

from recd_plugin.errors import ConfigError
from recd_plugin.fae.access import Source, check_ids, iter_accesses, resolve_tables
from recd_plugin.fae.hotset import HotSet, TableShape


@dataclass
class AccessTrace:
    """``steps[s]``: int64 [U_s] sorted unique global row keys of step ``s``;
    ``offsets`` int64 [T + 1] the first key of each table (``tables`` order)."""

    tables: List[str]
    offsets: np.ndarray
    steps: List[np.ndarray]
    samples: List[int]

    @classmethod
    def from_source(cls, source: Source, tables: Mapping[str, TableShape],
                    feature_to_table: Optional[Mapping[str, str]] = None,
                    max_steps: Optional[int] = None) -> "AccessTrace":
        f2t = resolve_tables(tables, feature_to_table)
        names = list(tables)
        offsets = np.concatenate([[0], np.cumsum([tables[t].num_embeddings for t in names])]).astype(np.int64)
        base = {t: offsets[i] for i, t in enumerate(names)}
        steps, samples = [], []
        for s, (b, feats) in enumerate(iter_accesses(source, list(f2t))):
            if max_steps is not None and s >= max_steps:
                break
            parts = []
            for f, (vals, _) in feats.items():
                check_ids(f, vals, f2t[f], tables[f2t[f]], s)
                parts.append(vals + base[f2t[f]])
            steps.append(np.unique(np.concatenate(parts)) if parts else np.zeros(0, np.int64))
            samples.append(b)
        return cls(names, offsets, steps, samples)

    def hot_keys(self, hot: HotSet) -> np.ndarray:
        """int64 [H]: sorted global keys of the hot rows (checked against the trace's tables)."""
        keys = [hot.rows[t] + self.offsets[i] for i, t in enumerate(self.tables) if t in hot.rows]
        return np.sort(np.concatenate(keys)) if keys else np.zeros(0, np.int64)


def simulate_static(steps: Sequence[np.ndarray], hot_keys: np.ndarray) -> np.ndarray:
    """int64 [N]: per step, accessed rows that are not hot."""
    return np.array([int(np.count_nonzero(~np.isin(k, hot_keys))) for k in steps], dtype=np.int64)


def simulate_lru(steps: Sequence[np.ndarray], capacity: int) -> np.ndarray:
    """int64 [N]: LRU misses per step (see the module docstring for the policy)."""
    cache: "OrderedDict[int, None]" = OrderedDict()
    out = np.zeros(len(steps), dtype=np.int64)
    for s, keys in enumerate(steps):
        miss = 0
        for k in keys.tolist():
            if k in cache:
                cache.move_to_end(k)
            else:
                miss += 1
                cache[k] = None
                if len(cache) > capacity:
                    cache.popitem(last=False)
        out[s] = miss
    return out


def simulate_lfu(steps: Sequence[np.ndarray], capacity: int) -> np.ndarray:
    """int64 [N]: perfect-LFU misses per step (ties: least recent access evicted first).

    Exact with a *lazy* min-heap: each cached row has one heap entry (count, last access,
    key) that may lag behind its true values, which only grow. A hit updates the dicts only;
    on eviction a popped entry that lags is pushed back with its true values, and the first
    entry that is up to date is the true minimum (every other row's true key >= its entry
    >= this one).
    """
    count: Dict[int, int] = {}
    last: Dict[int, int] = {}
    cached: set = set()
    heap: List[tuple] = []
    push, pop = heapq.heappush, heapq.heappop
    out = np.zeros(len(steps), dtype=np.int64)
    t = 0
    for s, keys in enumerate(steps):
        miss = 0
        for k in keys.tolist():
            t += 1
            c = count.get(k, 0) + 1
            count[k] = c
            last[k] = t
            if k in cached:
                continue
            miss += 1
            if capacity <= 0:
                continue
            if len(cached) >= capacity:
                while True:
                    ec, et, ek = pop(heap)
                    tc, tt = count[ek], last[ek]
                    if tc == ec and tt == et:
                        cached.discard(ek)
                        break
                    push(heap, (tc, tt, ek))
            cached.add(k)
            push(heap, (c, t, k))
        out[s] = miss
    return out


@dataclass
class TierTraffic:
    """Slow-tier rows fetched per measured step, per policy ("static", "lru", "lfu")."""

    capacity_rows: int
    warmup_steps: int
    misses: Dict[str, np.ndarray]
    accessed: np.ndarray  # int64 [N]: unique rows accessed per measured step

    def per_step(self, policy: str) -> float:
        return float(self.misses[policy].mean()) if self.misses[policy].size else float("nan")

    def ratio(self, other: str) -> float:
        """FAE static misses / ``other`` policy's misses (over all measured steps)."""
        den = self.misses[other].sum()
        return float(self.misses["static"].sum() / den) if den else float("nan")

    def __str__(self) -> str:
        acc = float(self.accessed.mean()) if self.accessed.size else 0.0
        lines = [f"capacity {self.capacity_rows:,} rows; {self.accessed.size} measured steps after "
                 f"{self.warmup_steps} warm-up steps; {acc:,.0f} unique rows accessed per step",
                 "policy   slow-tier rows/step   miss rate   FAE static / policy"]
        for p in ("static", "lru", "lfu"):
            mr = self.misses[p].sum() / max(self.accessed.sum(), 1)
            lines.append(f"{p:<8} {self.per_step(p):>20,.1f} {100 * mr:>10.1f}%   {self.ratio(p):.3f}")
        return "\n".join(lines)


def compare_tiers(trace: AccessTrace, hot: HotSet, warmup_steps: int = 0,
                  capacity_rows: Optional[int] = None) -> TierTraffic:
    """Replay ``trace`` against FAE's ``hot`` set and LRU / LFU caches of the same number of
    rows (``capacity_rows``, default: the hot set's row count)."""
    if (isinstance(warmup_steps, bool) or not isinstance(warmup_steps, numbers.Integral)
            or not 0 <= warmup_steps < len(trace.steps)):
        raise ConfigError(f"compare_tiers: warmup_steps must be an integer in [0, {len(trace.steps)}) (steps of the "
                          f"trace that warm the caches, at least one left to measure), got {warmup_steps!r}; "
                          "pass fewer warm-up steps or a longer trace")
    keys = trace.hot_keys(hot)
    cap = int(keys.size if capacity_rows is None else capacity_rows)
    measured = trace.steps[warmup_steps:]
    misses = {
        "static": simulate_static(measured, keys),
        "lru": simulate_lru(trace.steps, cap)[warmup_steps:],
        "lfu": simulate_lfu(trace.steps, cap)[warmup_steps:],
    }
    return TierTraffic(cap, warmup_steps, misses, np.array([k.size for k in measured], dtype=np.int64))


def hot_sample_fraction(source: Source, hot: HotSet, tables: Mapping[str, TableShape],
                        feature_to_table: Optional[Mapping[str, str]] = None) -> float:
    """Share of all samples of ``source`` whose every id is hot (held-out evaluation)."""
    f2t = resolve_tables(tables, feature_to_table)
    hot.check_tables(tables)
    all_hot = total = 0
    for s, (b, feats) in enumerate(iter_accesses(source, list(f2t))):
        cold = np.zeros(b, dtype=bool)
        for f, (vals, smp) in feats.items():
            check_ids(f, vals, f2t[f], tables[f2t[f]], s)
            cold[smp[~np.isin(vals, hot.rows.get(f2t[f], np.zeros(0, np.int64)))]] = True
        all_hot += int(b - cold.sum())
        total += b
    return all_hot / total if total else float("nan")
