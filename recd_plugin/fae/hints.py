"""Planner hints from an FAE profile: cache statistics and constraints for TorchRec's planner.

TorchRec's planner sizes ``FUSED_UVM_CACHING`` caches from ``CacheParams(load_factor,
stats)``; without statistics it assumes a fixed 20% hit-bandwidth mix for every table. This
module feeds it the measured access distribution instead:

* :class:`ProfileCacheStatistics` -- a ``torchrec.distributed.types.CacheStatistics``:
  ``expected_miss_rate(clf) = 1 - (share of accesses taken by the table's top
  clf x num_embeddings rows)`` (the miss rate of a cache that holds the most frequent rows,
  i.e. FAE's static set; a dynamic LRU cache misses more). The share comes from the sampled
  counts, corrected for rows the sample never saw by the Good-Turing estimate of their
  access mass (rows seen once / sampled accesses), spread over the unseen rows below every
  sampled row. ``cacheability`` = the area under
  that miss-rate curve (0: very cacheable, 1: not at all, like TorchRec's own
  ``EmbeddingOffloadStats``), ``expected_lookups`` = expected distinct rows per global batch
  if samples were i.i.d. draws from the profile (sum over rows of 1 - (1 - p_row)^(B x L)).
  TorchRec's perf estimator uses miss rate x lookups for the cache-fetch cost, and
  ``EmbeddingOffloadScaleupProposer`` ranks tables by cacheability x lookups.
* :func:`planner_constraints` -- per table ``ParameterConstraints``: a table whose hot share
  of rows is at least ``hbm_threshold`` stays whole in HBM (compute kernel ``FUSED``); every
  other table gets ``FUSED_UVM_CACHING`` with ``load_factor`` = its hot share of rows and the
  statistics above.
* :func:`hot_set_constraints` -- the same placement from the hot set alone (what the flag's
  ``fae.hot_set`` gives a sharded run, ``recd_plugin.sharding.for_dmp``): hot share of rows
  per table -> HBM or ``FUSED_UVM_CACHING`` at that load factor, but *no* cache statistics (the
  hot set keeps no access counts), so TorchRec's planner costs those caches with its own
  defaults. The profile's :func:`planner_constraints` is the better hint when it is at hand.
* :func:`show_plans` -- plans the tables twice with ``EmbeddingShardingPlanner`` on a GPU
  ``Topology`` (planning is pure Python and runs on a CPU-only host; nothing is allocated:
  the module is built on the meta device) and prints both plans side by side.

Example::

    from recd_plugin.fae.hints import planner_constraints, show_plans
    constraints = planner_constraints(profile, hot)            # {table: ParameterConstraints}
    planner = EmbeddingShardingPlanner(topology=topology, constraints=constraints)
    print(show_plans(ebc.embedding_bag_configs(), profile, hot, world_size=2, hbm_cap=4 << 30))

Limits: the miss curve assumes a static placement by frequency and i.i.d. accesses (no
temporal locality, which would help LRU); the unseen-row correction is an estimate.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import numpy as np
from torchrec.distributed.planner.types import ParameterConstraints
from torchrec.distributed.types import CacheParams, CacheStatistics

from recd_plugin.errors import HotSetError
from recd_plugin.fae.hotset import HotSet
from recd_plugin.fae.profile import AccessProfile


class ProfileCacheStatistics(CacheStatistics):
    """Cache statistics of one table, from its sampled access counts.

    ``batch_size``: global batch size B (default: the profile's median batch size).
    """

    def __init__(self, profile: AccessProfile, table: str, batch_size: Optional[int] = None) -> None:
        self.profile, self.table = profile, table
        self.num_embeddings = profile.tables[table].num_embeddings
        counts = profile.sorted_counts(table).astype(np.float64)  # [R] largest first
        total, n, m = counts.sum(), self.num_embeddings, counts.size
        b = batch_size or profile.batch_size
        if total == 0:
            self.unseen_mass, self._lookups, self._cacheability = 0.0, 0.0, 0.0
            return
        # Good-Turing: rows seen once estimate the access mass of rows never sampled, which
        # rank below every sampled row (spread evenly over them).
        self.unseen_mass = float(np.count_nonzero(counts == 1) / total) if m < n else 0.0
        p = counts / total * (1.0 - self.unseen_mass)
        draws = b * total / max(profile.samples_sampled, 1)  # ids of this table per batch
        self._lookups = float(-np.expm1(draws * np.log1p(-np.minimum(p, 1 - 1e-12))).sum())
        if m < n:  # the unseen rows, each with mass unseen_mass / (n - m)
            q = self.unseen_mass / (n - m)
            self._lookups += float((n - m) * -np.expm1(draws * np.log1p(-min(q, 1 - 1e-12))))
        # area under the piecewise-linear miss curve (trapezoids over the sampled rows, then a
        # straight line from unseen_mass down to 0 over the unseen rows)
        cover = np.concatenate([[0.0], np.cumsum(counts) / total])
        seen_area = ((cover[:-1] + cover[1:]) / 2).sum()
        self._cacheability = float((m - (1.0 - self.unseen_mass) * seen_area + (n - m) * self.unseen_mass / 2) / n)

    @property
    def expected_lookups(self) -> float:
        return self._lookups

    def expected_miss_rate(self, clf: float) -> float:
        """1.0 at clf 0, 0.0 at clf 1, non-increasing in between."""
        n, m = self.num_embeddings, self.profile.ids[self.table].size
        k = min(max(clf, 0.0), 1.0) * n
        if k <= m:
            return 1.0 - (1.0 - self.unseen_mass) * self.profile.coverage(self.table, clf)
        return self.unseen_mass * (1.0 - (k - m) / (n - m))

    @property
    def cacheability(self) -> float:
        return self._cacheability


def _placement(share: float, hbm_threshold: float, min_load_factor: float, algorithm,
               stats: Optional[CacheStatistics]) -> ParameterConstraints:
    """One table's hint from its hot share of rows: whole in HBM, or UVM-cached at that share."""
    from torchrec.distributed.embedding_types import EmbeddingComputeKernel

    if share >= hbm_threshold:
        return ParameterConstraints(compute_kernels=[EmbeddingComputeKernel.FUSED.value])
    params = CacheParams(algorithm=algorithm, load_factor=max(share, min_load_factor), stats=stats)
    return ParameterConstraints(compute_kernels=[EmbeddingComputeKernel.FUSED_UVM_CACHING.value],
                                cache_params=params)


def planner_constraints(profile: AccessProfile, hot: HotSet, hbm_threshold: float = 0.5,
                        min_load_factor: float = 0.01, batch_size: Optional[int] = None,
                        algorithm=None) -> Dict[str, ParameterConstraints]:
    """``{table: ParameterConstraints}``: hot tables in HBM, the others UVM-cached at their
    hot share of rows (at least ``min_load_factor``). ``algorithm``: a fbgemm
    ``CacheAlgorithm`` (None: FBGEMM's default, LRU)."""
    hot.check_tables(profile.tables)
    return {t: _placement(hot.num_hot(t) / shape.num_embeddings, hbm_threshold, min_load_factor, algorithm,
                          ProfileCacheStatistics(profile, t, batch_size))
            for t, shape in profile.tables.items()}


def hot_set_constraints(hot: HotSet, tables: Optional[Sequence[str]] = None, hbm_threshold: float = 0.5,
                        min_load_factor: float = 0.01, algorithm=None) -> Dict[str, ParameterConstraints]:
    """``{table: ParameterConstraints}`` from the hot set alone (no access profile at hand).

    The placement is :func:`planner_constraints`' (a table whose hot share of rows is at least
    ``hbm_threshold`` stays whole in HBM with the ``FUSED`` kernel; the others get
    ``FUSED_UVM_CACHING`` with ``load_factor`` = their hot share of rows, at least
    ``min_load_factor``), but the caches carry no ``CacheStatistics``: a hot set holds which
    rows are hot, not how often rows are read, so the planner's cost of each cache is its own
    default estimate. ``tables``: only these tables of the hot set (default: every table it
    profiled; a table with no hot row is cached at ``min_load_factor``).

    Example::

        hot = HotSet.load("out/hot.npz")
        cons = hot_set_constraints(hot)   # {"t_C1": ParameterConstraints(compute_kernels=["fused"]), ...}
    """
    names = list(hot.tables) if tables is None else list(tables)
    for t in names:
        if t not in hot.tables:
            raise HotSetError(f"hot_set_constraints: table {t!r} is not in the hot set (it has {sorted(hot.tables)})")
    return {t: _placement(hot.num_hot(t) / hot.tables[t].num_embeddings, hbm_threshold, min_load_factor, algorithm,
                          None) for t in names}


def _plan_rows(configs: Sequence, world_size: int, hbm_cap: Optional[int], batch_size: int,
               constraints: Optional[Dict]) -> Dict[str, List[str]]:
    import torch
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
    from torchrec.distributed.planner.types import PlannerError
    from torchrec.modules.embedding_modules import EmbeddingBagCollection

    ebc = EmbeddingBagCollection(tables=list(configs), device=torch.device("meta"))
    topology = Topology(world_size=world_size, compute_device="cuda", hbm_cap=hbm_cap)
    planner = EmbeddingShardingPlanner(topology=topology, batch_size=batch_size, constraints=constraints)
    try:
        plan = planner.plan(ebc, [EmbeddingBagCollectionSharder()])
    except PlannerError as e:
        return {c.name: ["no plan", str(e).splitlines()[0][:60], ""] for c in configs}
    rows = {}
    for _, params in plan.plan.items():
        for name, ps in params.items():  # type: ignore[union-attr]
            clf = ps.cache_params.load_factor if ps.cache_params and ps.cache_params.load_factor else None
            clf_s = f"{clf:.3f}" if clf is not None else ("0.2 (default)" if "caching" in ps.compute_kernel else "-")
            rows[name] = [ps.sharding_type, ps.compute_kernel, clf_s]
    return rows


def show_plans(configs: Sequence, profile: AccessProfile, hot: HotSet, world_size: int = 2,
               hbm_cap: Optional[int] = None, batch_size: Optional[int] = None, **hint_args) -> str:
    """The sharding plan of ``configs`` (``EmbeddingBagConfig`` list) without and with the
    profile's hints on a ``world_size``-GPU topology of ``hbm_cap`` bytes per GPU, as a
    text table (sharding type, compute kernel, cache load factor per table)."""
    import logging
    import warnings

    b = batch_size or profile.batch_size
    quiet = logging.getLogger("torchrec.distributed.planner")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # the planner's topology / reservation warnings drown the table
    logging.disable(logging.WARNING)  # and root-logger "Sharding spec not found" for data-parallel
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # HeuristicalStorageReservation's notice
            plain = _plan_rows(configs, world_size, hbm_cap, b, None)
            hinted = _plan_rows(configs, world_size, hbm_cap, b,
                                planner_constraints(profile, hot, batch_size=b, **hint_args))
    finally:
        logging.disable(logging.NOTSET)
        quiet.setLevel(level)
    head = ["table", "rows", "hot rows", "sharding", "kernel", "clf", "| hinted sharding", "kernel", "clf"]
    lines = [head]
    for c in configs:
        lines.append([c.name, f"{c.num_embeddings:,}", f"{hot.num_hot(c.name):,}", *plain.get(c.name, ["?"] * 3),
                      "| " + hinted.get(c.name, ["?"] * 3)[0], *hinted.get(c.name, ["?"] * 3)[1:]])
    widths = [max(len(r[i]) for r in lines) for i in range(len(head))]
    cap = "default" if hbm_cap is None else f"{hbm_cap:,} B"
    text = [f"plan on {world_size} x cuda (HBM {cap} each), batch {b}: without hints | with FAE hints"]
    text += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in lines]
    return "\n".join(text)
