"""The benchmarks' measured numbers, for checking the advice against them.

::

    from recd_plugin.analyze.measured import measured
    measured("dedup")     # {"transformer": {"ratio": 22.0, "bound": 23.4, "u": 0.028, "f": 0.985}, ...}
    measured("des")       # {"fm": {"des_bytes": ..., "table_wise_bytes": ..., "saving": ...}, ...}
    measured("models")    # [{"model": "dlrm", "mode": "dmp2", "batch": 1024, "u": 0.0625, "f": ..., ...}, ...]

Source: ``recd_plugin/bench/results/<name>.json``, the result of the last full
``recd-plugin bench NAME`` run (written with its section of docs/benchmarks.md) and shipped
in the wheel as package data, so an installed ``recd-plugin analyze`` reads the same numbers
as a source checkout. A benchmark that has not run gives None: the report then says "no
measurement yet".
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Optional

#: Where ``recd-plugin bench`` publishes its results (``recd_plugin.bench.report.BENCH_JSON_DIR``):
#: read by path, not imported, as analyze and bench are separate tools.
RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results"


def _from_json(name: str, r: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    if name == "dedup":
        return {v: {"ratio": x["ratio"], "bound": x["bound"], "u": x["unique_fraction"], "f": x["f"]}
                for v, x in r["variants"].items()}
    if name == "dist":
        return {v: {"comm_ratio": x["comm_ratio"], "dup_factor": x["dup_factor"], "ratio": x["ratio"]}
                for v, x in r["variants"].items()}
    if name == "storage":
        return {"storage_ratio": r["storage_ratio"], "preprocess_ratio": r["preprocess_ratio"]}
    if name == "des":
        return {m: {"des_bytes": r[m]["sides"]["des"]["bytes_per_step"],
                    "table_wise_bytes": r[m]["sides"]["table_wise"]["bytes_per_step"],
                    "saving": r[m]["comm_saving_vs_table_wise"]} for m in ("fm", "deepfm")}
    if name == "models":
        return [{"model": c["model"], "mode": c["mode"], "batch": c["batch"], "u": c["unique_fraction"],
                 "f": c["f"], "route": c["route"], "ratio": c["ratio"],
                 "step_ms": 1000.0 * c["batch"] / c["samples_per_s_plain"]} for c in r["cases"]]
    if name == "fae":
        return {"hot_fraction": r["hot_sample_fraction"], "static_vs_lru": r["slow_rows_ratio_vs_lru"],
                "static_vs_lfu": r["slow_rows_ratio_vs_lfu"]}
    return None


def measured(name: str, results: Optional[Path] = None) -> Any:
    """Normalised measured results of benchmark ``name`` (see the module doc), or None."""
    path = (results or RESULTS) / f"{name}.json"
    try:
        return _from_json(name, json.loads(path.read_text())) if path.exists() else None
    except (KeyError, StopIteration, TypeError, ValueError, ZeroDivisionError):
        return None  # a result whose layout changed: reported as "no measurement yet", not a crash
