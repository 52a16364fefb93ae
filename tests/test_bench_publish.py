"""Benchmark publishing: only full runs with default settings, in a source checkout, rewrite the
published figures; quick or partial runs and installed wheels never do."""

from __future__ import annotations

import argparse

from recd_plugin.bench import report
from recd_plugin.bench.__main__ import publishable


def _args(**kw) -> argparse.Namespace:
    base = dict(quick=False, batch_size=None, seed=0, models=None, modes=None, no_docs=False)
    return argparse.Namespace(**{**base, **kw})


def test_only_full_default_runs_publish(capsys):
    assert publishable(_args())
    for changed in (dict(quick=True), dict(batch_size=32), dict(seed=1), dict(models=["dlrm"]),
                    dict(modes=["dmp2"])):
        assert not publishable(_args(**changed))
        out = capsys.readouterr().out
        assert "not rewritten" in out and f"--{next(iter(changed)).replace('_', '-')}" in out


def test_publish_never_writes_outside_a_source_checkout(tmp_path, monkeypatch, capsys):
    wheel_docs = tmp_path / "site-packages" / "docs" / "benchmarks.md"  # no pyproject.toml above it
    monkeypatch.setattr(report, "DOCS", wheel_docs)
    monkeypatch.setattr(report, "BENCH_JSON_DIR", wheel_docs.parent / "bench")
    json_path = tmp_path / "out.json"
    report.publish("dedup", "| a |\n|---|\n| 1 |", {"x": 1}, str(json_path), write_docs=True)
    assert json_path.exists() and not wheel_docs.parent.exists()
    assert "not in a source checkout" in capsys.readouterr().out
    checkout = tmp_path / "repo"
    (checkout / "docs").mkdir(parents=True)
    (checkout / "pyproject.toml").write_text("")
    monkeypatch.setattr(report, "DOCS", checkout / "docs" / "benchmarks.md")
    monkeypatch.setattr(report, "BENCH_JSON_DIR", checkout / "recd_plugin" / "bench" / "results")
    report.publish("dedup", "| a |\n|---|\n| 1 |", {"x": 1}, None, write_docs=True)
    assert "bench:dedup:start" in (checkout / "docs" / "benchmarks.md").read_text()
    assert (checkout / "recd_plugin" / "bench" / "results" / "dedup.json").exists()
