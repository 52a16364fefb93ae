"""Turn the measurements into advice: which technique to switch on, its flag, the expected
gain and why.

::

    from recd_plugin.analyze.advice import advise
    advice = advise(sample, group, fae, des, out_dir=Path("out"), dedup_share=0.5)
    advice.flag                       # "groups.session.key=session_id; groups.session.features=...; fae.hot_set=out/hot.npz"
    for rec in advice.items: print(rec.technique, rec.recommended, rec.gain, rec.why)

Rules (thresholds are module constants, chosen so each technique is advised only where the
benchmarks measured a gain):

* **RecD** when the session-level group's unique fraction u at the training batch size is at
  most ``RECD_MAX_U`` (at least 2 rows per unique row) in the order the data will be read.
  Expected speed-up: :func:`recd_plugin.analyze.route.predict`, a cost model of the step under
  the job's own keep rule, with u *measured here*, the route's fixed costs *timed here* on the data (the
  expansion of deduplicated rows, at the model's embedding width), and f, the share of the
  step time spent on the user side (embedding lookups of the group's features and user
  towers), *assumed* (``--dedup-share``, default 0.5; ``bench models`` measured 0.16 for a
  two-tower's query MLP, 0.5 for a mean-pooled history, 0.99 for a transformer over it):
  analyze sees the data, not your model's timing. With ``--step-ms`` (your plain step time)
  the fixed costs are set against the step; without it the gain is the Amdahl bound
  1 / ((1 - f) + f u). Where the route would not pay, the prediction is 1.0x: the job's own
  decision would leave the group on TorchRec's plain path. Only the job decides for a model built
  on ``meta`` or trained on a GPU (its first steps are timed both ways). Distributed: the group's tables receive about
  1/u fewer ids.
* **FAE** when FAE's static hot set at the budget fetches at most ``FAE_MAX_LRU_RATIO`` of the
  slow-tier rows an LRU cache of the same size fetches, on held-out batches. It only matters
  when the tables do not fit in fast memory (GPU HBM); the report gives their size.
* **DES** when the estimated saving of bytes per step against TorchRec table-wise sharding is
  at least ``DES_MIN_SAVING``. DES is a model change (``recd_plugin.des`` operators and
  ``DESSharder``), not a flag.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import numpy as np

from recd_plugin.analyze.des import DESEstimate
from recd_plugin.analyze.fae import FAEReport
from recd_plugin.analyze.recd import GroupReport
from recd_plugin.analyze.route import RouteCosts, predict
from recd_plugin.analyze.sources import DataSample

RECD_MAX_U = 0.5
FAE_MAX_LRU_RATIO = 0.9
DES_MIN_SAVING = 0.3
DEDUP_SHARES = (0.25, 0.5, 0.75, 0.95)


@dataclass
class Recommendation:
    technique: str
    recommended: bool
    flag: str
    gain: str
    why: List[str] = field(default_factory=list)


@dataclass
class Advice:
    items: List[Recommendation]
    batch_size: int

    @property
    def flag(self) -> str:
        """The plugin flag of every recommended technique ("off" when none)."""
        parts = [r.flag for r in self.items if r.recommended and r.flag]
        return "; ".join(parts) if parts else "off"


def storage_estimate(sample: DataSample) -> Optional[float]:
    """Uncompressed bytes of the flat sample / bytes with session columns stored once per
    session (an upper bound of the stored-size ratio: a codec already squeezes part of the
    repetition out of the flat file)."""
    if sample.session_key is None or not sample.session_columns:
        return None
    t = sample.table
    key = t.column(sample.session_key).to_numpy()
    _, first = np.unique(key, return_index=True)
    per_row = [c for c in t.column_names if c not in sample.session_columns]
    dedup = t.select(sample.session_columns + [sample.session_key]).take(first).nbytes + t.select(per_row).nbytes
    return t.nbytes / dedup


def advise_recd(sample: DataSample, group: Optional[GroupReport], batch_size: int, dedup_share: float,
                costs: Optional[RouteCosts] = None, step_ms: Optional[float] = None) -> Recommendation:
    if group is None:
        why = (["no session key column (looked for 'session_id'; give --session-key COLUMN), and no columns "
                "repeat together within batches: every row is an independent sample, RecD does not apply"]
               if sample.session_key is None else
               [f"no column is constant within {sample.session_key!r}: nothing to deduplicate"])
        return Recommendation("RecD", False, "", "none", why)
    b = batch_size if batch_size in group.batch_sizes else 1024
    u_stored, u_clustered = group.at(b, "stored"), group.at(b, "clustered")
    u = min(u_stored, u_clustered)
    by = repr(group.key) if group.key else "their content"
    why = ([f"session-level group (constant within {group.key!r}): {', '.join(group.features)}"] if group.key else
           [f"no session key column, but these columns repeat together within batches (rows compared by "
            f"content): {', '.join(group.features)}"])
    why.append(f"unique fraction at batch {b}: {u_stored:.3f} as stored, {u_clustered:.3f} after clustering by "
               f"{by} ({group.mean_rows_per_session():.1f} rows per unique row; shuffled: "
               f"{group.at(b, 'shuffled'):.3f})")
    if u > RECD_MAX_U:
        why.append(f"u > {RECD_MAX_U}: fewer than 2 rows per unique row, the IKJT bookkeeping would eat the gain")
        return Recommendation("RecD", False, "", f"none (u = {u:.2f})", why)
    if u_stored > 1.5 * u_clustered:
        why.append(f"stored order mixes sessions: write the clustered layout first with `recd-plugin preprocess "
                   f"{sample.name} OUT` (u {u_stored:.3f} -> {u_clustered:.3f})")
    p = predict(dedup_share, u_clustered, costs, step_ms)
    table = ", ".join(f"f={f:g}: {predict(f, u_clustered, costs, step_ms).ratio:.2f}x" for f in DEDUP_SHARES)
    why.append(f"expected speed-up {p.ratio:.2f}x (route {p.route}: {p.why}) with u = {u_clustered:.3f} measured and "
               f"f = {dedup_share:g} ASSUMED (share of step time on the user side; --dedup-share); other f: {table}")
    if costs is not None:
        why.append(f"route fixed costs timed here at batch {costs.batch_size}: {costs.expand_ms:.2f} ms per step to "
                   f"expand {costs.width} floats per sample (forward + backward), {costs.loader_ms:.2f} ms per batch "
                   "to build the IKJT in the data loader" + ("" if step_ms else "; give --step-ms (your plain step "
                                                            "time) to set them against your step"))
    why.append(f"sharded: the group's tables receive about 1/u = {1 / u_clustered:.0f}x fewer ids")
    ratio = storage_estimate(sample)
    if ratio is not None:
        why.append(f"storage: session columns stored once per session: {ratio:.2f}x fewer bytes uncompressed "
                   "(an upper bound; the codec already shrinks the flat file)")
    # Only features the batch's KJT carries (embedding features): rows compared by content.
    # A session column is not an embedding feature of the data, so the batch may not carry it.
    flag = f"groups.{group.name}.features={','.join(group.features)}"
    if group.key:
        why.append(f"the flag compares the group's rows by content; if your batch's KJT carries {group.key!r} as a "
                   f"sparse feature, add groups.{group.name}.key={group.key} (one id compared instead of the rows)")
    why.append(f"add towers.<your user tower module>={group.name} when a dense module reads only these features")
    if p.route == "plain":
        why.append(f"at f = {dedup_share:g} the prediction leaves the group on the plain path; the job still "
                   "times its first steps both ways and keeps the route where it pays")
    return Recommendation("RecD", True, flag, f"{'up to ' if step_ms is None else ''}{p.ratio:.2f}x training "
                          f"throughput (f = {dedup_share:g} assumed)", why)


def advise_fae(fae: Optional[FAEReport], hot_path: Path) -> Recommendation:
    if fae is None or fae.hot is None:
        return Recommendation("FAE", False, "", "none", (fae.notes if fae else []) or ["no profile"])
    mib = fae.total_bytes / 2**20
    why = [f"{len(fae.tables)} tables, {mib:,.1f} MiB (fp32); budget {100 * fae.budget:g}% = "
           f"{fae.budget_bytes / 2**20:,.2f} MiB of fast memory",
           f"skew: top 1% of rows take {100 * fae.overall_skew(0.01):.0f}% of accesses (0.1%: "
           f"{100 * fae.overall_skew(0.001):.0f}%, 10%: {100 * fae.overall_skew(0.1):.0f}%), access-weighted over tables"]
    if fae.heldout_hot_fraction is not None:
        why.append(f"hot-sample fraction at the budget: {100 * fae.heldout_hot_fraction:.1f}% of held-out samples "
                   f"have every id hot (in-sample {100 * fae.hot_fraction.get(fae.budget, float('nan')):.1f}%)")
    if fae.traffic is None:
        why.append("no held-out batches to replay: cannot compare with LRU; raise --sample")
        return Recommendation("FAE", False, "", "unknown", why + fae.notes)
    lru, lfu = fae.traffic.ratio("lru"), fae.traffic.ratio("lfu")
    why.append(f"slow-tier rows per step on held-out batches: FAE static {fae.traffic.per_step('static'):,.0f} vs "
               f"LRU {fae.traffic.per_step('lru'):,.0f} (ratio {lru:.3f}) vs LFU {fae.traffic.per_step('lfu'):,.0f} "
               f"(ratio {lfu:.3f})")
    why.append("matters only when the tables do not fit in GPU memory; if they fit, keep them there")
    ok = lru <= FAE_MAX_LRU_RATIO
    if not ok:
        why.append(f"static/LRU ratio {lru:.2f} > {FAE_MAX_LRU_RATIO}: accesses not skewed enough for a static hot set")
    return Recommendation("FAE", ok, f"fae.hot_set={hot_path}" if ok else "",
                          f"{100 * (1 - lru):.0f}% fewer slow-tier rows than LRU" if ok else "none", why + fae.notes)


def advise_des(est: DESEstimate) -> Recommendation:
    cfg = est.config
    if cfg.source.startswith("default"):
        # DES rewrites operators the model has (FM, wide, first dense layer): without --model,
        # analyze does not know whether yours has any.
        return Recommendation("DES", False, "", "unknown: give --model", [
            "DES applies only to models with FM, wide or first-dense-layer operators over pooled embeddings; "
            "describe yours with --model model.toml (operators = [...]) for an estimate",
            f"for illustration, FM + wide over every sparse feature would send {est.des_bytes:,.0f} instead of "
            f"{est.table_wise_bytes:,.0f} bytes per rank and step ({100 * est.saving:.1f}% fewer)"])
    why = [f"model: {cfg.source}", f"{len(cfg.tables)} fields, operators {cfg.operators}, {cfg.world_size} ranks, "
           f"batch {cfg.batch_size} per rank; partial width K = {est.partial_width} floats per sample",
           f"bytes per rank and step: DES {est.des_bytes:,.0f} vs TorchRec table-wise {est.table_wise_bytes:,.0f} "
           f"(ids, pooled rows / partials forward + backward, dense all-reduce; see docs/analyze.md)",
           f"ids are {100 * est.ids_share_of_des:.0f}% of DES's bytes (they travel in both designs); embedding "
           f"traffic alone: {100 * est.analytic_embedding_saving:.1f}% saved",
           "requires SUM pooling and operators that read pooled embeddings (not sequence features / attention)"]
    ok = est.saving >= DES_MIN_SAVING
    return Recommendation("DES", ok, "", f"{100 * est.saving:.1f}% fewer bytes per step" if ok else
                          f"none ({100 * est.saving:.1f}% saving)", why + (
                              ["model change, not a flag: recd_plugin.des operators + DESSharder (docs/des.md)"] if ok else []))


def advise(sample: DataSample, group: Optional[GroupReport], fae: Optional[FAEReport], des: DESEstimate,
           hot_path: Path, batch_size: int = 1024, dedup_share: float = 0.5, costs: Optional[RouteCosts] = None,
           step_ms: Optional[float] = None) -> Advice:
    """All three recommendations (see the module docstring for the rules)."""
    return Advice([advise_recd(sample, group, batch_size, dedup_share, costs, step_ms), advise_fae(fae, hot_path),
                   advise_des(des)], batch_size)
