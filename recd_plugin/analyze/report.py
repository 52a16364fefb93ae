"""The analyze report: PNG plots, one self-contained HTML file, and a short text summary.

::

    from recd_plugin.analyze.report import write_report
    paths = write_report(result, Path("out"))    # out/report.html, out/unique_fraction.png, ...

The HTML embeds every plot as a base64 ``data:`` URI, so the one file can be mailed or
attached to a ticket. Plots are drawn with matplotlib's Figure API (PNG, no display, no pyplot state; the
``analyze`` extra).
"""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path
from typing import Any, Dict, List

from recd_plugin._plotting import figure
from recd_plugin.analyze.check import markdown_table


def plot_unique(group, path: Path) -> Path:
    fig, ax = figure(figsize=(6, 3.6))
    for order, style in (("stored", "o-"), ("clustered", "s--"), ("shuffled", "^:")):
        ax.plot(group.batch_sizes, getattr(group, order), style, label=order)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size")
    ax.set_ylabel("unique fraction u")
    ax.set_title(f"group '{group.name}' ({'key ' + group.key if group.key else 'by content'}): unique rows per batch")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def plot_fae(fae, path: Path, max_tables: int = 26) -> Path:
    fig, (a1, a2) = figure(1, 2, figsize=(10, 3.6))
    names = sorted(fae.tables, key=lambda t: -fae.accesses[t])[:max_tables]
    a1.bar(range(len(names)), [100 * fae.skew[t][0.01] for t in names])
    a1.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
    a1.set_ylabel("% of accesses on top 1% rows")
    a1.set_title("access skew per table")
    shares = sorted(fae.hot_fraction)
    a2.plot([100 * s for s in shares], [100 * fae.hot_fraction[s] for s in shares], "o-", label="in-sample")
    if fae.heldout_hot_fraction is not None:
        a2.plot([100 * fae.budget], [100 * fae.heldout_hot_fraction], "r*", ms=12, label="held out")
    a2.set_xscale("log")
    a2.set_xlabel("fast-memory budget, % of table bytes")
    a2.set_ylabel("hot-sample fraction %")
    a2.set_title("samples whose every id is hot")
    a2.grid(True, alpha=0.3)
    a2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def plot_des(est, path: Path) -> Path:
    fig, ax = figure(figsize=(6, 3.4))
    sides = [("TorchRec table-wise", est.table_wise), ("DES", est.des)]
    comps = sorted({c for _, d in sides for c in d})
    left = [0.0, 0.0]
    for c in comps:
        vals = [d.get(c, 0.0) / 1e3 for _, d in sides]
        ax.barh([s for s, _ in sides], vals, left=left, label=c)
        left = [a + b for a, b in zip(left, vals)]
    ax.set_xlabel("kB sent per rank and training step")
    ax.set_title(f"DES estimate: {100 * est.saving:.1f}% fewer bytes")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def _img(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(path.stem)}" src="data:image/png;base64,{data}">'


def _table(header: List[str], rows: List[List[Any]]) -> str:
    def cell(x: Any) -> str:
        if isinstance(x, float):
            x = "n/a" if math.isnan(x) else f"{x:.4g}"
        return f"<td>{html.escape(str(x))}</td>"
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(cell(x) for x in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _md_to_html(md: str) -> str:
    lines = [ln for ln in md.splitlines() if ln.startswith("|") and not ln.startswith("|---")]
    rows = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines]
    return _table(rows[0], rows[1:]) if rows else ""


def _search_table(search) -> str:
    """The content search: every column's own u, then the groups tried, in order."""
    cols = _table([f"column (own u at batch {search.batch_size}, stored)", "u", "considered"],
                  [[c, u, "yes" if c in search.considered else "no (u > bound)"] for c, u in search.own.items()])
    tried = _table([f"group tried (first {search.rows:,} rows)", "joint u", "work saved", "verdict"],
                   [[", ".join(t.features), t.u, t.saved, "chosen: one entity" if t.entity else
                     f"{', '.join(t.split)} independent of the rest"] for t in search.tried])
    return "<h3>Content search (no session key column)</h3>" + cols + tried


def summary_text(r: Dict[str, Any]) -> str:
    """The short text the command prints."""
    s = r["sample"]
    lines = [f"analyzed {s.rows:,} rows of {s.name}" + (f" (of {s.total_rows:,})" if s.total_rows else "")]
    for rec in r["advice"].items:
        lines.append(f"  {rec.technique:<5} {'YES' if rec.recommended else 'no ':<3}  {rec.gain}")
        lines.append(f"        why: {rec.why[1] if len(rec.why) > 1 else rec.why[0]}")
    lines.append(f"flag: --recd \"{r['advice'].flag}\"")
    return "\n".join(lines)


def write_report(r: Dict[str, Any], out: Path) -> Dict[str, Path]:
    """Write the plots and ``report.html`` into ``out``; returns {name: path}."""
    out.mkdir(parents=True, exist_ok=True)
    paths: Dict[str, Path] = {}
    group, fae, est, advice, sample = r["group"], r["fae"], r["des"], r["advice"], r["sample"]
    parts = [f"<h1>recd-plugin analyze: {html.escape(sample.name)}</h1>",
             f"<p>{sample.rows:,} rows analyzed (the first rows, in stored order)"
             + (f" of {sample.total_rows:,}" if sample.total_rows else "") + "</p>",
             "<h2>Recommendation</h2>", f"<pre>--recd \"{html.escape(advice.flag)}\"</pre>"]
    for rec in advice.items:
        parts.append(f"<h3>{rec.technique}: {'recommended' if rec.recommended else 'not recommended'} "
                     f"({html.escape(rec.gain)})</h3><ul>"
                     + "".join(f"<li>{html.escape(w)}</li>" for w in rec.why) + "</ul>")
    parts.append("<h2>RecD: unique fraction of the session-level group</h2>")
    if group is None:
        parts.append(f"<p>{html.escape(advice.items[0].why[0])}</p>")
    else:
        paths["unique_fraction"] = plot_unique(group, out / "unique_fraction.png")
        parts.append(_table(["batch size", "stored", "clustered by key", "shuffled"],
                            [[b, s, c, x] for b, s, c, x in zip(group.batch_sizes, group.stored, group.clustered,
                                                                  group.shuffled)]))
        parts.append(_img(paths["unique_fraction"]))
        parts.append(_table(["feature", "distinct values per row (B=1024, stored)"],
                            [[f, u] for f, u in group.per_feature.items()]))
    if r.get("search") is not None:
        parts.append(_search_table(r["search"]))
    parts.append("<h2>FAE: access skew and hot samples</h2>")
    if fae is not None:
        paths["fae"] = plot_fae(fae, out / "fae_skew.png")
        parts.append(_table(["table", "rows", "sampled accesses", "top 0.1%", "top 1%", "top 10%"],
                            [[t, fae.tables[t].num_embeddings, fae.accesses[t], *fae.skew[t].values()]
                             for t in fae.tables]))
        parts.append(_table(["budget (% of table bytes)", "hot-sample fraction (in-sample)"],
                            [[f"{100 * b:g}%", h] for b, h in sorted(fae.hot_fraction.items())]))
        if fae.traffic is not None:
            parts.append(f"<pre>{html.escape(str(fae.traffic))}</pre>")
        parts.append(_img(paths["fae"]))
    parts.append("<h2>DES: estimated communication</h2>")
    paths["des"] = plot_des(est, out / "des_bytes.png")
    comps = sorted(set(est.des) | set(est.table_wise))
    parts.append(_table(["component", "TorchRec table-wise B/step/rank", "DES B/step/rank"],
                        [[c, est.table_wise.get(c, 0.0), est.des.get(c, 0.0)] for c in comps]
                        + [["total", est.table_wise_bytes, est.des_bytes]]))
    parts.append(_img(paths["des"]))
    parts.append("<h2>Check: predictions vs the benchmarks' measurements</h2>"
                 "<p>relative error = (predicted - measured) / measured; measured numbers from "
                 "the last full benchmark runs (recd_plugin/bench/results/*.json, as docs/benchmarks.md shows them).</p>")
    parts.append(_md_to_html(markdown_table(r["checks"])) if r["checks"] else "<p>nothing to compare</p>")
    style = ("body{font-family:sans-serif;max-width:1000px;margin:2em auto}table{border-collapse:collapse;"
             "margin:1em 0}td,th{border:1px solid #ccc;padding:2px 8px;font-size:13px}img{max-width:100%}")
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>recd-plugin analyze</title>"
            f"<style>{style}</style></head><body>{''.join(parts)}</body></html>")
    paths["html"] = out / "report.html"
    paths["html"].write_text(page)
    return paths
