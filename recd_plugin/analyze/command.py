"""``recd-plugin analyze``: which of RecD / FAE / DES pays off on your data, before a costly run.

::

    recd-plugin analyze movielens-100k --out analyze_out/          # built-in sources
    recd-plugin analyze criteo-synthetic --sample 200000 --out out/
    recd-plugin analyze data/events.parquet --model model.toml --out out/ --dedup-share 0.8
    recd-plugin analyze data/events.parquet --session-key visit_id --batch-size 2048

Writes ``OUT/report.html`` (self-contained, plots inline), ``OUT/*.png``, ``OUT/hot.npz`` (the
FAE hot set at ``--budget``; the flag's ``fae.hot_set``) and ``OUT/summary.json``, and prints a
short summary ending with the recommended ``--recd`` flag. See docs/analyze.md.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np


def add_arguments(p: argparse.ArgumentParser) -> None:
    from recd_plugin.data.builtin import builtin_names

    p.add_argument("data", help=f"Parquet file/directory, or a built-in source: {', '.join(builtin_names())}")
    p.add_argument("--model", default=None, help="TOML/JSON model config: tables, operators, world size "
                                                 "(default: every sparse feature a dim-16 table, FM + wide, 2 ranks)")
    p.add_argument("--out", type=Path, default=Path("analyze_out"), help="output directory (default analyze_out)")
    p.add_argument("--sample", type=int, default=200_000, help="rows read, from the start (default 200000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the shuffled order and FAE's batch draw")
    p.add_argument("--session-key", default=None, help="session key column (default: session_id if present)")
    p.add_argument("--batch-size", type=int, default=1024, help="training batch size the advice is for")
    p.add_argument("--budget", type=float, default=0.01, help="FAE fast-memory budget, share of table bytes (0.01)")
    p.add_argument("--dedup-share", type=float, default=0.5,
                   help="assumed share f of step time on the user side, for RecD's Amdahl bound (0.5)")
    p.add_argument("--step-ms", type=float, default=None,
                   help="your plain training step time in ms, to set the route's fixed costs against it")
    p.add_argument("--no-progress", action="store_true")


def measured_pooling(sample) -> Dict[str, float]:
    """Mean ids per sample of every sparse feature (1 for scalar columns)."""
    from recd_plugin.data.columns import JaggedColumn

    out = {}
    for c in sample.sparse:
        col = JaggedColumn.from_arrow(sample.table.column(c), c)
        out[c] = 1.0 if col.offsets is None else float(col.values.size / max(sample.rows, 1))
    return out


def feature_dims(cfg) -> Dict[str, int]:
    """Embedding floats per id of each feature: the dims of every table reading it."""
    dims: Dict[str, int] = {}
    for t in cfg.tables.values():
        dims[t.feature] = dims.get(t.feature, 0) + t.dim
    return dims


def analyze(data: str, model: Optional[str] = None, out: Path = Path("analyze_out"), sample_rows: int = 200_000,
            seed: int = 0, session_key: Optional[str] = None, batch_size: int = 1024, budget: float = 0.01,
            dedup_share: float = 0.5, progress: bool = True, step_ms: Optional[float] = None) -> Dict[str, Any]:
    """Run the whole analysis; returns {sample, group, search, fae, des, advice, checks, paths}
    (``search``: the content search, for data without a session key column; else None)."""
    from recd_plugin._plotting import require_matplotlib
    from recd_plugin.analyze.advice import advise
    from recd_plugin.analyze.check import check_predictions
    from recd_plugin.analyze.des import estimate_des
    from recd_plugin.analyze.fae import analyze_fae
    from recd_plugin.analyze.model import load_model_config
    from recd_plugin.analyze.recd import BATCH_SIZES, analyze_groups, content_report, row_costs, search_content
    from recd_plugin.analyze.route import measure_route_costs
    from recd_plugin.analyze.report import write_report
    from recd_plugin.analyze.sources import load_sample
    from recd_plugin.errors import AnalyzeError

    require_matplotlib("recd-plugin analyze's report plots")
    if not 0.0 <= dedup_share <= 1.0:
        raise AnalyzeError(f"--dedup-share is a share of the step time, in [0, 1]; got {dedup_share}")
    if step_ms is not None and not step_ms > 0:
        raise AnalyzeError(f"--step-ms is your plain step time in milliseconds, > 0; got {step_ms}")
    if batch_size < 1:
        raise AnalyzeError(f"--batch-size must be >= 1 samples; got {batch_size}")
    if not 0.0 < budget < 1.0:
        raise AnalyzeError(f"--budget is a share of the tables' bytes, in (0, 1) (0.01 = 1%); got {budget}")
    s = load_sample(data, sample_rows, seed, session_key, progress)
    cfg = load_model_config(model, s.sparse, s.cardinalities)
    # A session key column decides the group; without one, columns repeating by content may.
    sizes = tuple(sorted(set(BATCH_SIZES) | {batch_size}))  # u at the training batch size itself
    search = None
    if s.session_key is not None:
        group = analyze_groups(s, sizes, seed)
    else:  # groups ranked by the embedding work they save: ids per row x the model's dims
        search = search_content(s, row_costs(s, feature_dims(cfg)), seed)
        group = content_report(s, search, sizes, seed)
    width = sum(t.dim for t in cfg.tables.values() if group is not None and t.feature in group.features)
    costs = measure_route_costs(s, group, batch_size, width or None) if group is not None else None
    fae = analyze_fae(s, cfg, budget=budget, seed=seed, progress=progress)
    est = estimate_des(cfg, measured_pooling(s))
    out.mkdir(parents=True, exist_ok=True)
    hot_path = out / "hot.npz"
    if fae.hot is not None:
        fae.hot.save(hot_path)
    advice = advise(s, group, fae, est, hot_path, batch_size, dedup_share, costs, step_ms, search)
    checks = check_predictions(data, s, group, fae, dedup_share)
    result = {"sample": s, "group": group, "search": search, "fae": fae, "des": est, "advice": advice,
              "checks": checks}
    result["paths"] = write_report(result, out)
    (out / "summary.json").write_text(json.dumps(_summary(result), indent=2, default=_jsonable) + "\n")
    result["paths"]["summary"] = out / "summary.json"
    return result


def _jsonable(x: Any) -> Any:
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    return str(x)


def _nan_none(x: Optional[float]) -> Optional[float]:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else x


def _summary(r: Dict[str, Any]) -> Dict[str, Any]:
    g, fae, est = r["group"], r["fae"], r["des"]
    return {
        "data": r["sample"].name, "rows": r["sample"].rows, "flag": r["advice"].flag,
        "advice": [{"technique": a.technique, "recommended": a.recommended, "flag": a.flag, "gain": a.gain,
                    "why": a.why} for a in r["advice"].items],
        "recd": None if g is None else {"key": g.key, "features": g.features, "batch_sizes": g.batch_sizes,
                                        "stored": g.stored, "clustered": g.clustered, "shuffled": g.shuffled},
        "content_search": _search_summary(r.get("search")),
        "fae": {"skew": fae.skew, "hot_fraction": {str(k): _nan_none(v) for k, v in fae.hot_fraction.items()},
                "heldout_hot_fraction": fae.heldout_hot_fraction,
                "static_vs_lru": fae.traffic.ratio("lru") if fae.traffic else None},
        "des": {"des": est.des, "table_wise": est.table_wise, "saving": est.saving},
        "checks": [{"benchmark": c.benchmark, "quantity": c.quantity, "predicted": c.predicted,
                    "measured": c.measured, "relative_error": c.relative_error, "note": c.note} for c in r["checks"]],
    }


def _search_summary(search) -> Optional[Dict[str, Any]]:
    """The content search's columns and every group it tried (None with a session key column)."""
    if search is None:
        return None
    return {"batch_size": search.batch_size, "rows": search.rows, "own_u": search.own,
            "considered": search.considered, "combined": search.combined, "repeating": search.repeating,
            "tried": [{"features": list(t.features), "u": t.u, "saved": t.saved, "entity": t.entity,
                       "independent_part": None if t.split is None else list(t.split), "ratio": t.ratio}
                      for t in search.tried],
            "chosen": None if search.chosen is None else list(search.chosen.features)}


def run(args: argparse.Namespace) -> None:
    from recd_plugin.analyze.check import markdown_table
    from recd_plugin.analyze.report import summary_text

    r = analyze(args.data, args.model, args.out, args.sample, args.seed, args.session_key, args.batch_size,
                args.budget, args.dedup_share, progress=not args.no_progress, step_ms=args.step_ms)
    print(summary_text(r))
    if r["checks"]:
        print("\npredicted vs measured (the benchmarks' last full runs, docs/benchmarks.md):")
        print(markdown_table(r["checks"]))
    print(f"\nwrote {r['paths']['html']} ({len(r['paths']) - 2} plots, hot set, summary.json)")
