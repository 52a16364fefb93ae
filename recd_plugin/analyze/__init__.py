"""``recd-plugin analyze``: which of RecD / FAE / DES pays off on *your* data, before a run.

::

    recd-plugin analyze movielens-100k --out analyze_out/
    recd-plugin analyze data/events.parquet --model model.toml --out out/ --dedup-share 0.8

Python::

    from recd_plugin.analyze import analyze
    r = analyze("criteo-synthetic", out=Path("out"))
    r["advice"].flag          # the recommended --recd flag ("off" when nothing pays off)
    r["checks"]               # predictions vs the benchmarks' measurements

The data flows through small modules, one concern each: ``sources`` (bounded sample,
session-level columns) -> ``recd`` (unique fractions) / ``fae`` (skew, hot samples, tier
traffic, with FAE's own profiler) / ``des`` (communication estimate for the ``model`` config)
-> ``advice`` (flag, expected gains, why) -> ``check`` (vs ``measured`` benchmark results) ->
``report`` (PNG plots, one self-contained HTML). ``command`` is the CLI. See docs/analyze.md.
"""

from recd_plugin.analyze.command import analyze

__all__ = ["analyze"]
