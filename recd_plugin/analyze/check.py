"""Check the advice: analyze's predictions next to the benchmarks' measurements.

::

    from recd_plugin.analyze.check import check_predictions
    rows = check_predictions("movielens-100k", group=g, fae=None, dedup_share=0.5)
    for r in rows: print(r.benchmark, r.quantity, r.predicted, r.measured, r.relative_error)

Which predictions are checkable depends on the data: the dedup, dist and storage benchmarks
run on MovieLens-100k (checked when DATA is ``movielens-100k``), the FAE benchmark on
criteo-synthetic (checked when DATA is ``criteo-synthetic``), the DES estimate is a formula of
the model config, checked against the DES benchmark's own config on criteo-synthetic, and the
models benchmark (TorchRec's models, unsharded and under DMP) runs its MovieLens cases on
``movielens-100k`` and its DLRM / two-tower cases on ``criteo-sessions``. Its rows are the
route's predicted speed-up (:func:`recd_plugin.analyze.route.predict`: the job's keep rule,
u measured here, f and the plain step time from the benchmark's own timing of that case; its
f = 1 - T_one / T_plain already holds the route's fixed costs) next to the measured one. Measured
numbers come from :mod:`recd_plugin.analyze.measured`; a benchmark that has not run gives a
row with ``measured = None`` ("no measurement yet"), never a made-up number.

relative error = (predicted - measured) / measured.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

from recd_plugin.analyze.advice import storage_estimate
from recd_plugin.analyze.des import estimate_des
from recd_plugin.analyze.fae import FAEReport
from recd_plugin.analyze.model import ModelConfig, TableSpec
from recd_plugin.analyze.recd import GroupReport, amdahl_bound
from recd_plugin.analyze.route import predict
from recd_plugin.analyze.sources import DataSample


@dataclass
class CheckRow:
    benchmark: str
    quantity: str
    predicted: Optional[float]
    measured: Optional[float]
    note: str = ""

    @property
    def relative_error(self) -> Optional[float]:
        if self.predicted is None or self.measured in (None, 0):
            return None
        return (self.predicted - self.measured) / self.measured


def des_bench_config(model: str) -> ModelConfig:
    """The DES benchmark's model (``recd_plugin.bench.des``): 26 fields, D = 16, 2 ranks,
    batch 1024 per rank; FM + wide, DeepFM adds a [32, 16] MLP over 13 dense features."""
    tables = {f"C{i}": TableSpec(f"C{i}", f"C{i}", 100_000, 16, 1.0) for i in range(1, 27)}
    if model == "fm":
        return ModelConfig(tables, ["fm", "wide"], [], 13, 2, 1024, source="bench des: fm")
    return ModelConfig(tables, ["fm", "wide", "first_layer"], [32, 16], 13, 2, 1024, source="bench des: deepfm")


def _missing(bench: str, what: str) -> CheckRow:
    return CheckRow(bench, what, None, None, f"no measurement yet: run `python -m recd_plugin.bench {bench}`")


def check_predictions(data: str, sample: Optional[DataSample] = None, group: Optional[GroupReport] = None,
                      fae: Optional[FAEReport] = None, dedup_share: float = 0.5) -> List[CheckRow]:
    """Rows of predicted vs measured for what DATA lets analyze predict (module docstring)."""
    from recd_plugin.analyze.measured import measured

    rows: List[CheckRow] = []
    if data == "movielens-100k" and group is not None:
        u = group.at(1024, "stored")  # the benchmarks read MovieLens in session (stored) order, batch 1024
        dedup = measured("dedup")
        if dedup is None:
            rows.append(_missing("dedup", "speed-up"))
        for v, m in (dedup or {}).items():
            rows.append(CheckRow("dedup", f"{v}: unique fraction u (B=1024)", u, m["u"]))
            rows.append(CheckRow("dedup", f"{v}: speed-up, Amdahl with measured f={m['f']:.3f}",
                                 amdahl_bound(m["f"], u), m["ratio"], "f taken from the benchmark's timing"))
            rows.append(CheckRow("dedup", f"{v}: speed-up, f={dedup_share:g} assumed", amdahl_bound(dedup_share, u),
                                 m["ratio"], "what analyze predicts without knowing the model"))
        dist = measured("dist")
        if dist is None:
            rows.append(_missing("dist", "embedding comm ratio"))
        for v, m in (dist or {}).items():
            rows.append(CheckRow("dist", f"{v}: dup factor rows/unique rows", 1 / u, m["dup_factor"],
                                 "per rank's batches of 1024"))
            rows.append(CheckRow("dist", f"{v}: embedding bytes ratio plain/plugin (2 ranks)", 1 / u, m["comm_ratio"],
                                 "predicted 1/u: rows only; ids and sequence lengths shrink less"))
        storage = measured("storage")
        ratio = storage_estimate(sample) if sample is not None else None
        if storage is None:
            rows.append(_missing("storage", "stored bytes ratio"))
        elif ratio is not None:
            rows.append(CheckRow("storage", "stored bytes flat/dedup", ratio, storage["storage_ratio"],
                                 "predicted uncompressed; measured zstd on both sides"))
    if data == "criteo-synthetic" and fae is not None:
        m = measured("fae")
        if m is None:
            rows.append(_missing("fae", "slow-tier rows vs LRU"))
        else:
            note = (f"sample of {fae.profiled_batches + fae.heldout_batches} batches of {fae.batch_size}; "
                    "bench profiles 503 of 10,000 batches of 2048")
            rows.append(CheckRow("fae", f"hot-sample fraction at {100 * fae.budget:g}% (held out)",
                                 fae.heldout_hot_fraction, m["hot_fraction"], note))
            if fae.traffic is not None:
                rows.append(CheckRow("fae", "slow-tier rows FAE static / LRU", fae.traffic.ratio("lru"),
                                     m["static_vs_lru"], note))
                rows.append(CheckRow("fae", "slow-tier rows FAE static / LFU", fae.traffic.ratio("lfu"),
                                     m["static_vs_lfu"], note))
    if data == "synthetic" and group is not None:
        rows.append(CheckRow("dedup", "speed-up (synthetic)", amdahl_bound(dedup_share, group.at(1024, "stored")), None,
                             "no measurement yet: the dedup benchmark runs on movielens-100k"))
    rows += models_rows(data, group)
    des = measured("des") if data == "criteo-synthetic" else None  # the DES benchmark's data
    if des is None and data == "criteo-synthetic":
        rows.append(_missing("des", "bytes saving vs table-wise"))
    for model, m in (des or {}).items():
        est = estimate_des(des_bench_config(model), {})
        rows.append(CheckRow("des", f"{model}: DES bytes/step/rank", est.des_bytes, m["des_bytes"]))
        rows.append(CheckRow("des", f"{model}: table-wise bytes/step/rank", est.table_wise_bytes, m["table_wise_bytes"]))
        rows.append(CheckRow("des", f"{model}: saving vs table-wise", est.saving, m["saving"],
                             "ids and dense all-reduce included"))
    return rows


#: The models benchmark's cases by the data they run on (u < 1 cases; the u = 1 controls
#: run on other data: one session per sample).
MODELS_DATA = {"movielens-100k": ("movielens_light", "movielens_transformer"),
               "criteo-sessions": ("dlrm", "dlrm_dcn", "two_tower")}


def models_rows(data: str, group: Optional[GroupReport]) -> List[CheckRow]:
    """Predicted vs measured speed-up of every models-benchmark case on DATA (module doc)."""
    from recd_plugin.analyze.measured import measured

    if data not in MODELS_DATA or group is None:
        return []
    cases = measured("models")
    if cases is None:
        return [_missing("models", "speed-up on TorchRec's models")]
    rows = []
    for c in cases:
        if c["model"] not in MODELS_DATA[data] or c["u"] >= 1.0 or c["batch"] not in group.batch_sizes:
            continue
        u = group.at(c["batch"], "stored")
        p = predict(c["f"], u)
        rows.append(CheckRow("models", f"{c['model']} {c['mode']} B={c['batch']}: speed-up (u={u:.3f}, "
                             f"f={c['f']:.2f})", p.ratio, c["ratio"],
                             f"predicted route {p.route}, measured route {c['route']}"))
    return rows


def markdown_table(rows: List[CheckRow]) -> str:
    """The rows as a markdown table (the report and docs/analyze.md use it)."""
    def fmt(x: Optional[float]) -> str:
        if x is None:
            return "-"
        return f"{x:,.0f}" if abs(x) >= 1000 else f"{x:.3g}"

    lines = ["| benchmark | quantity | predicted | measured | relative error | note |", "|---|---|---|---|---|---|"]
    for r in rows:
        err = r.relative_error
        lines.append(f"| {r.benchmark} | {r.quantity} | {fmt(r.predicted)} | {fmt(r.measured)} | "
                     f"{'-' if err is None else f'{100 * err:+.1f}%'} | {r.note} |")
    return "\n".join(lines)
