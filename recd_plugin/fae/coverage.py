"""Coverage report and plot of an :class:`~recd_plugin.fae.profile.AccessProfile`.

This module reads the profile; the profile knows nothing of it (one-way)::

    from recd_plugin.fae.coverage import build_report, plot_coverage
    print(build_report(profile, hot))
    plot_coverage(profile, "out/coverage.png")

``build_report(profile, hot)`` gives a :class:`ProfileReport`; ``print(report)`` shows, per table,
its rows, dim, sampled accesses, distinct sampled rows, the share of its accesses covered by
its top 0.1 / 1 / 10 % rows and its hot rows; then the budget, the hot bytes and the
hot-sample fraction (samples whose every id is hot)::

    table        rows  dim  accesses  distinct  top0.1%  top1%  top10%  hot rows  hot share
    C3        1000000   16    10240      5120    71.2%   88.0%   97.6%      9000     89.9%
    ...
    budget 16,000,000 B, hot 15,999,936 B (249,999 rows); hot-sample fraction 41.3%

``plot_coverage(profile, path)`` writes a PNG (matplotlib, the ``analyze`` extra; no display needed): cumulative
share of accesses against the fraction of rows ranked by count, log x axis, for the largest
``max_tables`` tables plus the global curve over all tables' rows together.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import numpy as np

from recd_plugin.fae.hotset import HotSet
from recd_plugin.fae.profile import AccessProfile

TOP_FRACTIONS = (0.001, 0.01, 0.1)


@dataclass
class TableCoverage:
    table: str
    rows: int
    dim: int
    accesses: int
    distinct: int
    top: Dict[float, float]  # row fraction -> share of the table's sampled accesses
    hot_rows: int = 0
    hot_share: float = 0.0  # share of the table's sampled accesses that hit hot rows


@dataclass
class ProfileReport:
    tables: List[TableCoverage]
    samples_seen: int
    samples_sampled: int
    sample_fraction: float
    seed: int
    budget_bytes: Optional[int] = None
    hot_bytes: int = 0
    hot_rows: int = 0
    hot_access_share: float = 0.0
    hot_sample_fraction: Optional[float] = None
    notes: List[str] = field(default_factory=list)

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        for t in d["tables"]:
            t["top"] = {f"{k:g}": v for k, v in t["top"].items()}
        return d

    def __str__(self) -> str:
        head = ["table", "rows", "dim", "accesses", "distinct"] + [f"top{100 * f:g}%" for f in TOP_FRACTIONS]
        if self.budget_bytes is not None:
            head += ["hot rows", "hot share"]
        lines = []
        for t in self.tables:
            row = [t.table, f"{t.rows:,}", str(t.dim), f"{t.accesses:,}", f"{t.distinct:,}"]
            row += [f"{100 * t.top[f]:.1f}%" for f in TOP_FRACTIONS]
            if self.budget_bytes is not None:
                row += [f"{t.hot_rows:,}", f"{100 * t.hot_share:.1f}%"]
            lines.append(row)
        widths = [max(len(h), *(len(r[i]) for r in lines)) for i, h in enumerate(head)]
        fmt = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
        out = [fmt(head)] + [fmt(r) for r in lines]
        out.append(f"sampled {self.samples_sampled:,} of {self.samples_seen:,} samples "
                   f"(fraction {self.sample_fraction:g}, seed {self.seed})")
        if self.budget_bytes is not None:
            out.append(f"budget {self.budget_bytes:,} B, hot {self.hot_bytes:,} B ({self.hot_rows:,} rows) "
                       f"covering {100 * self.hot_access_share:.1f}% of sampled accesses; "
                       f"hot-sample fraction {100 * (self.hot_sample_fraction or 0.0):.1f}% "
                       "(sampled samples whose every id is hot)")
        out += self.notes
        return "\n".join(out)


def build_report(profile: AccessProfile, hot: Optional[HotSet] = None) -> ProfileReport:
    rows = []
    hot_acc = total_acc = 0
    for t, shape in profile.tables.items():
        acc = profile.accesses(t)
        cov = TableCoverage(t, shape.num_embeddings, shape.embedding_dim, acc, int(profile.ids[t].size),
                            {f: profile.coverage(t, f) for f in TOP_FRACTIONS})
        if hot is not None:
            hr = hot.rows.get(t, np.zeros(0, np.int64))
            h = int(profile.counts[t][np.isin(profile.ids[t], hr)].sum())
            cov.hot_rows, cov.hot_share = int(hr.size), (h / acc if acc else 0.0)
            hot_acc += h
        total_acc += acc
        rows.append(cov)
    rep = ProfileReport(rows, profile.samples_seen, profile.samples_sampled, profile.sample_fraction, profile.seed)
    if hot is not None:
        rep.budget_bytes, rep.hot_bytes = hot.budget_bytes, hot.bytes
        rep.hot_rows = sum(len(r) for r in hot.rows.values())
        rep.hot_access_share = hot_acc / total_acc if total_acc else 0.0
        rep.hot_sample_fraction = profile.hot_sample_fraction(hot)
        if hot.info.get("all_sampled_rows_hot"):
            rep.notes.append("note: every sampled row is hot and the budget is not full; a larger "
                             "--sample would rank more rows")
    return rep


def _curve(sorted_counts: np.ndarray, num_rows: int, points: int = 400):
    """(x = fraction of rows, y = cumulative access share) at ~``points`` log-spaced ranks."""
    cum = np.cumsum(sorted_counts, dtype=np.float64)
    total = cum[-1] if cum.size else 1.0
    ks = np.unique(np.geomspace(1, max(num_rows, 1), points).astype(np.int64))
    y = np.where(ks <= cum.size, cum[np.minimum(ks, cum.size) - 1], total) / total
    return ks / num_rows, y


def plot_coverage(profile: AccessProfile, path: Union[str, Path], max_tables: int = 8) -> Path:
    from recd_plugin._plotting import figure

    fig, ax = figure(figsize=(7, 4.5))  # before any file is touched: names the extra if missing
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    biggest = sorted(profile.tables, key=lambda t: -profile.tables[t].num_embeddings)[:max_tables]
    for t in biggest:
        x, y = _curve(profile.sorted_counts(t), profile.tables[t].num_embeddings)
        ax.plot(x, y, lw=1, label=f"{t} ({profile.tables[t].num_embeddings:,} rows)")
    all_counts = np.sort(np.concatenate([profile.counts[t] for t in profile.tables]))[::-1]
    x, y = _curve(all_counts, sum(s.num_embeddings for s in profile.tables.values()))
    ax.plot(x, y, "k", lw=2.5, label="all tables")
    ax.set_xscale("log")
    ax.set_xlabel("fraction of rows (ranked by sampled access count)")
    ax.set_ylabel("cumulative share of accesses")
    ax.set_ylim(0, 1.01)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    ax.set_title(f"Access coverage ({profile.samples_sampled:,} sampled samples)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path
