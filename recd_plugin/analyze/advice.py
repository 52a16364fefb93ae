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
  1 / ((1 - f) + f u). One rule: where the prediction says the job's own keep rule
  (``recd_plugin.transforms.route.keeps``) would leave the group on TorchRec's plain path,
  RecD is **not recommended** (no flag; ``why`` says what would change it). Where it is
  recommended, ``why`` says the number is a prediction and the job decides: its first steps
  are timed both ways, and only the job can time a model built on ``meta``, a GPU step and
  the user's own loop. Distributed: the group's tables receive about 1/u fewer ids.
  u is the session group's after clustering (``recd-plugin preprocess`` clusters by the key);
  a group found by content (no key to cluster by) is advised on its u as stored.
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
from recd_plugin.analyze.recd import ContentSearch, GroupReport
from recd_plugin.analyze.route import RouteCosts, predict
from recd_plugin.transforms.route import KEEP_BELOW
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


def _no_group(sample: DataSample, search: Optional[ContentSearch]) -> Recommendation:
    """RecD's advice when no group repeats: why, with what the content search tried."""
    if sample.session_key is not None:
        return Recommendation("RecD", False, "", "none",
                              [f"no column is constant within {sample.session_key!r}: nothing to deduplicate"])
    why = ["no session key column (looked for 'session_id'; give --session-key COLUMN), and no columns repeat "
           "together within batches as one entity: RecD does not apply"]
    if search is not None:  # what was searched, in one line (the summary's), then in detail
        why += [search.verdict()] + search.why()
    return Recommendation("RecD", False, "", "none", why)


def _group_lines(group: GroupReport, b: int) -> List[str]:
    """What the group is and how often its rows repeat at batch ``b``."""
    u_stored, u_clustered, u_shuffled = (group.at(b, o) for o in ("stored", "clustered", "shuffled"))
    if group.key:
        return [f"session-level group (constant within {group.key!r}): {', '.join(group.features)}",
                f"unique fraction at batch {b}: {u_stored:.3f} as stored, {u_clustered:.3f} after clustering by "
                f"{group.key!r} ({group.mean_rows_per_session():.1f} rows per unique row; shuffled: {u_shuffled:.3f})"]
    return [f"no session key column, but these columns repeat together within batches as one entity's tuple "
            f"(rows compared by content): {', '.join(group.features)}",
            f"unique fraction of the tuple at batch {b}: {u_stored:.3f} as stored ({1 / u_stored:.1f} rows per unique "
            f"row; each column alone at batch {group.search.batch_size if group.search else 1024}: "
            + ", ".join(f"{c} {u:.3f}" for c, u in group.per_feature.items())
            + f"; sorted by the tuple: {u_clustered:.3f}, shuffled: {u_shuffled:.3f})"] + (
                group.search.why() if group.search is not None else [])


def _cluster_hint(sample: DataSample, group: GroupReport, u_stored: float, u_clustered: float) -> str:
    """What to do when the stored order spreads a group's rows over batches."""
    if group.key:
        return (f"stored order mixes sessions: write the clustered layout first with `recd-plugin preprocess "
                f"{sample.name} OUT` (u {u_stored:.3f} -> {u_clustered:.3f})")
    # preprocess clusters by a session key; a content group has none, so the advice is for the
    # stored order and sorting is the user's call (it changes the order training sees).
    return (f"rows of one tuple are spread over batches: sorted by the tuple, u would be {u_clustered:.3f}; "
            "`recd-plugin preprocess` clusters by a session column (--session-key), which this data does not have. "
            "The advice below is for the stored order")


def advise_recd(sample: DataSample, group: Optional[GroupReport], batch_size: int, dedup_share: float,
                costs: Optional[RouteCosts] = None, step_ms: Optional[float] = None,
                search: Optional[ContentSearch] = None) -> Recommendation:
    """RecD's advice for ``group`` (None: none found; ``search``: what the content search tried)."""
    if group is None:
        return _no_group(sample, search)
    b = batch_size if batch_size in group.batch_sizes else 1024
    u_stored, u_clustered = group.at(b, "stored"), group.at(b, "clustered")
    # A session key lets `recd-plugin preprocess` cluster the sessions; a content group has no
    # key to cluster by, so training reads its rows as stored.
    u, u_pred = (min(u_stored, u_clustered), u_clustered) if group.key else (u_stored, u_stored)
    why = _group_lines(group, b)
    if u > RECD_MAX_U:
        why.append(f"u > {RECD_MAX_U}: fewer than 2 rows per unique row, the IKJT bookkeeping would eat the gain")
        return Recommendation("RecD", False, "", f"none (u = {u:.2f})", why)
    if u_stored > 1.5 * u_clustered:
        why.append(_cluster_hint(sample, group, u_stored, u_clustered))
    p = predict(dedup_share, u_pred, costs, step_ms)
    table = ", ".join(f"f={f:g}: {predict(f, u_pred, costs, step_ms).ratio:.2f}x" for f in DEDUP_SHARES)
    why.append(f"expected speed-up {p.ratio:.2f}x (route {p.route}: {p.why}) with u = {u_pred:.3f} measured and "
               f"f = {dedup_share:g} ASSUMED (share of step time on the user side; --dedup-share); other f: {table}")
    if costs is not None:
        why.append(f"route fixed costs timed here at batch {costs.batch_size}: {costs.expand_ms:.2f} ms per step to "
                   f"expand {costs.width} floats per sample (forward + backward), {costs.loader_ms:.2f} ms per batch "
                   "to build the IKJT in the data loader" + ("" if step_ms else "; give --step-ms (your plain step "
                                                            "time) to set them against your step"))
    # Only features the batch's KJT carries (embedding features): rows compared by content.
    # A session column is not an embedding feature of the data, so the batch may not carry it.
    flag = f"groups.{group.name}.features={','.join(group.features)}"
    if p.route == "plain":  # one rule: what the job would leave plain is not recommended
        why.append(f"not recommended: at f = {dedup_share:g} the job's own keep rule (a step of at most {KEEP_BELOW:g} "
                   "x plain's) would leave the group on TorchRec's plain path. Only the job can decide: if your user "
                   "side is a larger share of the step, give --dedup-share (and --step-ms); to let the job time it "
                   f"anyway, --recd \"{flag}\" (it keeps the group only where its own steps are faster)")
        return Recommendation("RecD", False, "", f"none (predicted {p.ratio:.2f}x: the job would keep the plain "
                                                 "path)", why)
    why.append(f"a prediction: the job decides. Its first training steps run both routes, timed, and keep the group "
               f"only where the deduplicated step takes at most {KEEP_BELOW:g} x the plain one (the rule applied "
               "above); only the job can time a model built on `meta`, a GPU step, and your own loop and loader")
    why.append(f"sharded: the group's tables receive about 1/u = {1 / u_pred:.0f}x fewer ids")
    ratio = storage_estimate(sample)
    if ratio is not None:
        why.append(f"storage: session columns stored once per session: {ratio:.2f}x fewer bytes uncompressed "
                   "(an upper bound; the codec already shrinks the flat file)")
    if group.key:
        why.append(f"the flag compares the group's rows by content; if your batch's KJT carries {group.key!r} as a "
                   f"sparse feature, add groups.{group.name}.key={group.key} (one id compared instead of the rows)")
    why.append(f"add towers.<your user tower module>={group.name} when a dense module reads only these features")
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
           step_ms: Optional[float] = None, search: Optional[ContentSearch] = None) -> Advice:
    """All three recommendations (see the module docstring for the rules)."""
    return Advice([advise_recd(sample, group, batch_size, dedup_share, costs, step_ms, search),
                   advise_fae(fae, hot_path), advise_des(des)], batch_size)
