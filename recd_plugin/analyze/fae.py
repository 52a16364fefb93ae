"""FAE on your data: access skew per table, hot-sample fraction per budget, tier traffic.

::

    from recd_plugin.analyze.fae import analyze_fae
    fae = analyze_fae(sample, model_config, budgets=(0.001, 0.01, 0.1))
    fae.skew["C3"]            # {0.001: share of accesses on the top 0.1% rows, 0.01: ..., 0.1: ...}
    fae.hot_fraction          # {budget share: in-sample hot-sample fraction}
    fae.traffic               # TierTraffic: FAE static vs LRU vs LFU on held-out batches
    fae.hot.save("out/hot.npz")

Everything here is FAE's own code (``recd_plugin.fae``): the sample is cut into batches of
``batch_size`` consecutive rows (``TableBatches``), FAE's profiler
(``profile_accesses``, ``unit="batch"``) reads a share ``profile_fraction`` of them, and the
batches it did not read are held out: the hot set for the recommended budget is replayed
against them (``AccessTrace`` + ``compare_tiers``: slow-tier rows per step for FAE's static
hot set vs an LRU and an LFU cache of the same rows), so the traffic ratio is not measured on
the data the hot set was picked from. Budgets are shares of all tables' bytes
(rows x dim x 4 bytes); a budget that holds every table or less than a row is skipped.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

import numpy as np
import pyarrow as pa

from recd_plugin.analyze.model import ModelConfig
from recd_plugin.analyze.sources import DataSample
from recd_plugin.errors import HotSetError

SKEW_SHARES = (0.001, 0.01, 0.1)
BUDGETS = (0.001, 0.01, 0.1)


@dataclass
class FAEReport:
    """Skew ``{table: {row share: access share}}``, in-sample hot-sample fraction per budget
    share, the hot set and held-out tier traffic at ``budget`` (None when too few batches)."""

    tables: Dict[str, object]  # {table: TableShape}
    skew: Dict[str, Dict[float, float]]
    accesses: Dict[str, int]
    hot_fraction: Dict[float, float]
    budget: float
    budget_bytes: int
    hot: object  # HotSet at ``budget``
    heldout_hot_fraction: Optional[float]
    traffic: Optional[object]  # fae.trace.TierTraffic
    batch_size: int
    profiled_batches: int
    heldout_batches: int
    notes: List[str] = field(default_factory=list)

    def overall_skew(self, share: float) -> float:
        """Access-weighted mean over tables of the top-``share`` rows' access share."""
        total = sum(self.accesses.values())
        return sum(self.skew[t][share] * a for t, a in self.accesses.items()) / total if total else float("nan")

    @property
    def total_bytes(self) -> int:
        return int(sum(s.num_embeddings * s.row_bytes for s in self.tables.values()))


def _batches(sample: DataSample, cfg: ModelConfig, batch_size: int):
    from recd_plugin.data import TableBatches

    table = sample.table
    features = sorted({t.feature for t in cfg.tables.values()})
    if "label" not in table.column_names:  # TableBatches wants a label; the profiler ignores it
        table = table.append_column("label", pa.array(np.zeros(table.num_rows, np.float32)))
    return TableBatches(table, batch_size, sparse_features=features, dense_features=[], label="label")


def analyze_fae(sample: DataSample, cfg: ModelConfig, budget: float = 0.01, budgets=BUDGETS,
                batch_size: int = 2048, profile_fraction: float = 0.5, seed: int = 0,
                max_trace_steps: int = 60, progress: bool = True) -> FAEReport:
    """Profile ``sample`` against ``cfg``'s tables (see the module docstring)."""
    from recd_plugin.fae.hotset import TableShape
    from recd_plugin.fae.profile import profile_accesses
    from recd_plugin.fae.trace import AccessTrace, compare_tiers

    # FAE's profiler maps a feature to one table; a second table reading the same feature
    # (e.g. a wide term's 1-dim table) has the same accesses, so the first one stands for both.
    first: Dict[str, object] = {}
    for t in cfg.tables.values():
        first.setdefault(t.feature, t)
    tables = {t.name: TableShape(t.rows, t.dim) for t in first.values()}
    f2t = {f: t.name for f, t in first.items()}
    batch_size = min(batch_size, max(sample.rows // 4, 1))  # a small sample still gives held-out batches
    data = _batches(sample, cfg, batch_size)
    notes: List[str] = []
    # unit="batch" on a map-style source: the profiler reads only the drawn batches; the same
    # draws (one rng.random() per batch, in order) tell which batches are held out.
    fraction = profile_fraction if len(data) >= 2 else 1.0
    profile = profile_accesses(data, tables, feature_to_table=f2t, sample_fraction=fraction, seed=seed,
                               unit="batch", progress=progress)
    drawn = np.random.default_rng(seed).random(len(data)) < fraction
    heldout = [int(i) for i in np.flatnonzero(~drawn)]
    skew = {t: {s: profile.coverage(t, s) for s in SKEW_SHARES} for t in tables}
    total = sum(s.num_embeddings * s.row_bytes for s in tables.values())
    hot_fraction: Dict[float, float] = {}
    for share in budgets:
        try:
            hot_fraction[share] = profile.hot_set(int(share * total)).info["hot_sample_fraction"]
        except HotSetError:
            hot_fraction[share] = float("nan")  # below one row, or holds every table
    budget_bytes = int(budget * total)
    try:
        hot = profile.hot_set(budget_bytes)
    except HotSetError as e:
        notes.append(f"no hot set at {100 * budget:g}% of the tables' bytes: {e}")
        hot = None
    traffic, heldout_hot = None, None
    if hot is not None and len(heldout) >= 3:
        from recd_plugin.fae.trace import hot_sample_fraction

        steps = [data[i] for i in heldout[:max_trace_steps]]
        trace = AccessTrace.from_source(steps, tables, feature_to_table=f2t)
        traffic = compare_tiers(trace, hot, warmup_steps=len(steps) // 3)
        heldout_hot = hot_sample_fraction(steps, hot, tables, feature_to_table=f2t)
    elif hot is not None:
        notes.append("too few batches in the sample to hold some out: no tier-traffic replay; raise --sample")
    return FAEReport(tables=tables, skew=skew, accesses={t: profile.accesses(t) for t in tables},
                     hot_fraction=hot_fraction, budget=budget, budget_bytes=budget_bytes, hot=hot,
                     heldout_hot_fraction=heldout_hot, traffic=traffic, batch_size=batch_size,
                     profiled_batches=int(drawn.sum()), heldout_batches=len(heldout), notes=notes)
