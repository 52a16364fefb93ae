"""The benchmarks' measured numbers, for checking the advice against them.

::

    from recd_plugin.analyze.measured import measured
    measured("dedup")     # {"transformer": {"ratio": 22.0, "bound": 23.4, "u": 0.028, "f": 0.985}, ...}
    measured("des")       # {"fm": {"des_bytes": ..., "table_wise_bytes": ..., "saving": ...}, ...}
    measured("models")    # [{"model": "dlrm", "mode": "dmp2", "batch": 1024, "u": 0.0625, "f": ..., ...}, ...]

Source, in order: ``docs/bench/<name>.json`` (written by ``publish`` with every
``python -m recd_plugin.bench NAME`` run that rewrites its docs section), else the markdown
tables of docs/benchmarks.md between ``<!-- bench:NAME:start -->`` and ``...:end -->``
(``models``: its JSON only).
A benchmark that has run neither way gives None: the report then says "no measurement yet".
The parser is deliberately small: it reads the pipe tables of one section, keyed by their
header cells, and takes the first number of a cell ("2.04x", "2,365 vs 3,468", "29.0% (...)").
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Dict, List, Optional

DOCS = Path(__file__).resolve().parents[2] / "docs"
_NUM = re.compile(r"-?[0-9][0-9,]*\.?[0-9]*(?:e[-+]?[0-9]+)?")


def section(name: str, path: Optional[Path] = None) -> Optional[str]:
    """The markdown of ``name``'s section of docs/benchmarks.md, None when absent."""
    path = path or DOCS / "benchmarks.md"
    if not path.exists():
        return None
    text = path.read_text()
    start, end = f"<!-- bench:{name}:start -->", f"<!-- bench:{name}:end -->"
    if start not in text or end not in text:
        return None
    return text[text.index(start) + len(start): text.index(end)]


def tables(markdown: str) -> List[List[Dict[str, str]]]:
    """Every pipe table of ``markdown`` as a list of {header cell: cell} rows."""
    out, rows = [], []
    for line in markdown.splitlines() + [""]:
        if line.strip().startswith("|"):
            rows.append([c.strip() for c in line.strip().strip("|").split("|")])
            continue
        if len(rows) >= 2:
            header = rows[0]
            out.append([dict(zip(header, r)) for r in rows[2:]])  # rows[1] is the |---| line
        rows = []
    return out


def number(cell: str, index: int = 0) -> Optional[float]:
    """The ``index``-th number in ``cell`` (commas dropped), None when there is none."""
    found = _NUM.findall(cell or "")
    if len(found) <= index:
        return None
    try:
        return float(found[index].replace(",", ""))
    except ValueError:
        return None


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


def _from_markdown(name: str, md: str) -> Optional[Dict[str, Any]]:
    ts = tables(md)
    if not ts:
        return None
    rows = ts[0]
    if name == "dedup":
        return {r["variant"]: {"ratio": number(r["ratio"]), "bound": number(r["Amdahl bound"]),
                               "u": number(r["unique fraction u"]), "f": number(r["dedup fraction f"])} for r in rows}
    if name == "dist":
        return {r["variant"]: {"comm_ratio": number(r["comm ratio"]), "dup_factor": number(r["dup factor"]),
                               "ratio": number(r["ratio"])} for r in rows}
    if name == "storage":
        by = {r[""]: r for r in rows}
        return {"storage_ratio": number(by["bytes"]["ratio"]),
                "preprocess_ratio": number(next(r for k, r in by.items() if k.startswith("read"))["ratio"])}
    if name == "des":
        side = {(r["model"], r["side"]): number(r["bytes/step/rank"]) for r in rows}
        return {m: {"des_bytes": side[(m, "des")], "table_wise_bytes": side[(m, "table_wise")],
                    "saving": 1 - side[(m, "des")] / side[(m, "table_wise")]} for m in ("fm", "deepfm")}
    if name == "fae":
        by = {r[""]: r for r in rows}

        def row(prefix: str) -> Dict[str, str]:
            return next(r for k, r in by.items() if k.startswith(prefix))
        return {"hot_fraction": number(row("hot-sample fraction")["value"]) / 100,
                "static_vs_lru": number(row("slow-tier rows/step: FAE static vs LRU")["ratio"]),
                "static_vs_lfu": number(row("slow-tier rows/step: FAE static vs LFU")["ratio"])}
    return None


def measured(name: str, docs: Optional[Path] = None) -> Any:
    """Normalised measured results of benchmark ``name`` (see the module doc), or None."""
    docs = docs or DOCS
    path = docs / "bench" / f"{name}.json"
    try:
        if path.exists():
            return _from_json(name, json.loads(path.read_text()))
        md = section(name, docs / "benchmarks.md")
        return _from_markdown(name, md) if md else None
    except (KeyError, StopIteration, TypeError, ValueError, ZeroDivisionError):
        return None  # a section whose layout changed: reported as "no measurement yet", not a crash
