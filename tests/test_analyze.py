"""recd-plugin analyze: unique fractions vs a brute-force reference, the advice's decisions, the
DES estimate's formula, the CLI's outputs, and clear errors on bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from recd_plugin.analyze.advice import advise_recd
from recd_plugin.analyze.des import estimate_des
from recd_plugin.analyze.model import ModelConfig, TableSpec, load_model_config
from recd_plugin.analyze.recd import analyze_groups, content_group, unique_fraction
from recd_plugin.analyze.sources import load_sample, row_codes
from recd_plugin.cli import main
from recd_plugin.config import RecDConfig
from recd_plugin.errors import AnalyzeError, RecDError


def brute_unique_fraction(keys, batch_size):
    batches = [keys[i:i + batch_size] for i in range(0, len(keys), batch_size)]
    return sum(len(set(b)) for b in batches) / len(keys)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 20), min_size=1, max_size=200), st.integers(1, 64))
def test_unique_fraction_matches_brute_force(keys, batch_size):
    got = unique_fraction(np.array(keys, dtype=np.int64), batch_size)
    assert got == pytest.approx(brute_unique_fraction(keys, batch_size))


@settings(max_examples=80, deadline=None)
@given(st.lists(st.integers(0, 15), min_size=1, max_size=150), st.integers(1, 40))
def test_clustering_costs_at_most_one_split_run_per_batch_boundary(keys, batch_size):
    # Clustering is not optimal at every batch size: a boundary can split a run of equal keys
    # ([0, 2, 2, 1] in batches of 3 keeps 3 rows, sorted [0, 1, 2 | 2] keeps 4). What holds:
    # sorted batches keep every distinct key once, plus at most one per boundary, and no order
    # keeps fewer than the distinct keys.
    k = np.array(keys, dtype=np.int64)
    n, boundaries = k.size, (k.size - 1) // batch_size
    distinct = np.unique(k).size
    clustered = unique_fraction(np.sort(k, kind="stable"), batch_size) * n
    shuffled = unique_fraction(k, batch_size) * n
    assert distinct - 1e-9 <= clustered <= distinct + boundaries + 1e-9
    assert clustered <= shuffled + boundaries + 1e-9
    if boundaries == 0:
        assert clustered == pytest.approx(shuffled)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.lists(st.integers(0, 5), max_size=4), min_size=1, max_size=40))
def test_list_row_codes_equal_iff_rows_equal(rows):
    codes = row_codes(pa.array(rows, type=pa.list_(pa.int64())))
    for i in range(len(rows)):
        for j in range(len(rows)):
            assert (codes[i] == codes[j]) == (rows[i] == rows[j])


def _session_parquet(path: Path, sessions: int = 60, per: int = 5, shuffle: bool = False) -> Path:
    rng = np.random.default_rng(0)
    sid = np.repeat(np.arange(sessions), per)
    user = sid // 2
    per_session = [[int(x) for x in rng.integers(0, 50, size=k % 4)] for k in range(sessions)]
    hist = [per_session[k] for k in sid]  # constant within a session, like a user history
    item = rng.integers(0, 100, size=sid.size)
    order = rng.permutation(sid.size) if shuffle else np.arange(sid.size)
    t = pa.table({"session_id": sid[order], "user_id": user[order],
                  "history": pa.array([hist[i] for i in order], type=pa.list_(pa.int64())),
                  "item_id": item[order], "label": rng.random(sid.size).astype(np.float32)[order]})
    pq.write_table(t, path)
    return path


def test_session_columns_detected_and_shuffle_hurts(tmp_path):
    s = load_sample(str(_session_parquet(tmp_path / "s.parquet", shuffle=True)), progress=False)
    assert s.session_key == "session_id"
    assert s.session_columns == ["user_id", "history"] and s.varying_columns == ["item_id"]
    g = analyze_groups(s, batch_sizes=(16, 64))
    assert all(c <= st_ + 1e-12 for c, st_ in zip(g.clustered, g.stored))
    assert g.clustered[0] == pytest.approx(brute_unique_fraction(sorted(s.table.column("session_id").to_pylist()), 16))


def test_advice_picks_recd_for_sessions_not_for_criteo(tmp_path):
    s = load_sample(str(_session_parquet(tmp_path / "s.parquet", sessions=100, per=20)), progress=False)
    rec = advise_recd(s, analyze_groups(s, batch_sizes=(256, 1024)), 256, 0.5)
    # The flag names only features the batch's KJT carries (the session column is not one of
    # the data's embedding features): rows compared by content; the key is offered in `why`.
    assert rec.recommended and rec.flag == "groups.session.features=user_id,history"
    assert any("groups.session.key=session_id" in w for w in rec.why)
    config = RecDConfig.from_string(rec.flag)  # a flag the plugin takes as it is
    assert config.groups[0].key is None and config.groups[0].features == ("user_id", "history")
    c = load_sample("criteo-synthetic", max_rows=2000, progress=False)
    assert c.session_key is None and analyze_groups(c) is None and content_group(c) is None
    rec = advise_recd(c, None, 1024, 0.5)
    assert not rec.recommended and "RecD does not apply" in rec.why[0]


def _impressions_parquet(path: Path, rows: int = 10_000, combos: int = 240) -> Path:
    """Logged impressions without a session column: four user features with ``combos``
    distinct combinations (about rows / combos rows each, in random order), per-row items."""
    rng = np.random.default_rng(3)
    user = rng.integers(0, combos, size=rows)
    t = pa.table({"user_id": user, "user_age": user % 7, "user_region": (user * 31) % 50,
                  "user_device": user % 3, "item_id": rng.integers(0, 5000, size=rows),
                  "item_cat": rng.integers(0, 40, size=rows), "label": rng.random(rows).astype(np.float32)})
    pq.write_table(t, path)
    return path


def test_features_repeating_by_content_are_found_without_a_session_column(tmp_path):
    s = load_sample(str(_impressions_parquet(tmp_path / "imp.parquet")), progress=False)
    assert s.session_key is None
    g = content_group(s)
    assert g is not None and g.key is None
    assert set(g.features) == {"user_id", "user_age", "user_region", "user_device"}
    assert g.at(1024, "stored") <= 0.24  # at most 240 distinct combinations per batch of 1024
    rec = advise_recd(s, g, 1024, 0.5)
    assert rec.recommended and rec.flag == "groups.repeated.features=user_id,user_age,user_region,user_device"
    assert "compared by content" in rec.why[0]


def test_des_is_not_assumed_without_a_model(tmp_path):
    from recd_plugin.analyze.advice import advise_des
    from recd_plugin.analyze.model import default_config

    s = load_sample(str(_impressions_parquet(tmp_path / "imp.parquet")), progress=False)
    rec = advise_des(estimate_des(default_config(s.sparse, s.cardinalities), {}))
    assert not rec.recommended and "give --model" in rec.gain


def test_des_estimate_is_the_analytic_formula():
    w, b, f, d, h, dense = 4, 512, 10, 8, 24, 5
    tables = {f"t{i}": TableSpec(f"t{i}", f"f{i}", 100, d, 2.0) for i in range(f)}
    cfg = ModelConfig(tables, ["fm", "wide", "first_layer"], [h, 12], dense, w, b)
    est = estimate_des(cfg, {})
    r = (w - 1) / w
    ids = b * r * f * (8 * 2.0 + 4)
    k = (d + 1) + 1 + h
    rest = h * 12 + 12 + 12 * 1 + 1
    assert est.des == pytest.approx({"ids": ids, "partials": 2 * (w - 1) * b * k * 4,
                                     "dense all-reduce": 2 * r * 4 * (dense * h + h + rest)})
    assert est.table_wise == pytest.approx({"ids": 2 * ids, "pooled rows": 2 * b * r * f * (d + 1) * 4,
                                            "dense all-reduce": 2 * r * 4 * ((dense + f * d) * h + h + rest)})
    assert est.saving == pytest.approx(1 - sum(est.des.values()) / sum(est.table_wise.values()))
    assert est.analytic_embedding_saving == pytest.approx(1 - k / (f * d))


def test_cli_writes_html_and_pngs(tmp_path, capsys):
    data = _session_parquet(tmp_path / "s.parquet", sessions=300, per=8)
    out = tmp_path / "out"
    assert main(["analyze", str(data), "--out", str(out), "--no-progress", "--batch-size", "256"]) == 0
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 3 and "<script" not in html
    assert {p.name for p in out.glob("*.png")} == {"unique_fraction.png", "fae_skew.png", "des_bytes.png"}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["advice"][0]["technique"] == "RecD" and summary["advice"][0]["recommended"]
    assert "flag: --recd" in capsys.readouterr().out


def test_cli_errors_are_clear(tmp_path, capsys):
    assert main(["analyze", str(tmp_path / "missing.parquet"), "--out", str(tmp_path / "o")]) == 2
    assert "no such Parquet file" in capsys.readouterr().err
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"PAR1 this is not parquet")
    assert main(["analyze", str(bad), "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    assert "not a readable Parquet" in capsys.readouterr().err
    assert main(["analyze", "movielens-1m", "--out", str(tmp_path / "o")]) == 2
    assert "did you mean 'movielens-100k'" in capsys.readouterr().err


def test_model_config_naming_unknown_tables(tmp_path):
    data = _session_parquet(tmp_path / "s.parquet")
    cfg = tmp_path / "model.toml"
    cfg.write_text('operators = ["fm"]\n[tables]\nuser_id = {}\nitem_idd = {dim = 16}\n')
    with pytest.raises(AnalyzeError, match="item_idd.*did you mean 'item_id'"):
        load_model_config(str(cfg), ["user_id", "history", "item_id"], {"user_id": 30, "history": 50, "item_id": 100})
    assert main(["analyze", str(data), "--model", str(cfg), "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    cfg.write_text('{"tables": ["user_id"], "operators": ["fm", "first_layer"]}')
    json_cfg = cfg.with_suffix(".json")
    cfg.rename(json_cfg)
    with pytest.raises(RecDError, match="needs its width"):
        load_model_config(str(json_cfg), ["user_id"], {"user_id": 30})


def test_measured_results_parse_or_say_none(tmp_path):
    from recd_plugin.analyze.measured import RESULTS, measured

    assert measured("dedup", results=tmp_path) is None  # no result: "no measurement yet"
    (tmp_path / "storage.json").write_text('{"storage_ratio": 3.0, "preprocess_ratio": 1.5}')
    assert measured("storage", results=tmp_path) == {"storage_ratio": 3.0, "preprocess_ratio": 1.5}
    (tmp_path / "fae.json").write_text('{"renamed": 1}')
    assert measured("fae", results=tmp_path) is None  # a layout that changed: none, not a crash
    # the published results ship inside the package (package data), found without the docs
    assert {p.name for p in RESULTS.glob("*.json")} >= {"dedup.json", "models.json", "storage.json"}
    assert measured("models")[0]["model"] == "dlrm"


def test_the_wheel_ships_the_published_results():
    import tomllib
    from pathlib import Path

    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    assert "results/*.json" in pyproject["tool"]["setuptools"]["package-data"]["recd_plugin.bench"]


def test_route_prediction_follows_the_jobs_keep_rule():
    from recd_plugin.analyze.route import RouteCosts, predict
    from recd_plugin.transforms.route import KEEP_BELOW as MARGIN

    p = predict(0.5, 0.1)
    assert p.route == "dedup" and p.ratio == pytest.approx(1 / (0.5 + 0.05)) == pytest.approx(p.bound)
    # Saves less than 1 - KEEP_BELOW of the step: the job keeps TorchRec's plain path, 1.0x.
    f = 0.5 * (1 - MARGIN)
    assert predict(f, 0.0).route == "plain" and predict(f, 0.0).ratio == 1.0
    # Fixed costs set against the step: 2 ms on a 10 ms step lowers 1/0.55 to 1/0.75.
    costs = RouteCosts(batch_size=1024, width=32, expand_ms=2.0, loader_ms=1.0)
    p = predict(0.5, 0.1, costs, step_ms=10.0)
    assert p.route == "dedup" and p.ratio == pytest.approx(1 / 0.75)
    assert predict(0.5, 0.1, costs, step_ms=4.0).route == "plain"  # 0.55 + 0.5 > MARGIN


def test_route_costs_are_timed_on_the_data(tmp_path):
    from recd_plugin.analyze.route import measure_route_costs

    s = load_sample("criteo-sessions", max_rows=4096, progress=False)
    g = analyze_groups(s, batch_sizes=(32, 1024))
    assert g.features == [f"C{i}" for i in range(1, 14)]
    assert g.at(1024, "stored") == pytest.approx(1 / 16) and g.at(32, "stored") == pytest.approx(1 / 16)
    costs = measure_route_costs(s, g, 1024, width=13 * 16, batches=2)
    assert costs is not None and costs.width == 208 and costs.expand_ms > 0 and costs.loader_ms > 0
    assert measure_route_costs(s, g, 8192) is None  # less than one batch in the sample


def test_models_check_rows_only_for_the_benchmarks_data(tmp_path, monkeypatch):
    from recd_plugin.analyze import check, measured

    cases = [{"model": "dlrm", "mode": "dmp2", "batch": 1024, "unique_fraction": 0.0625, "f": 0.5,
              "route": "dedup", "ratio": 1.8, "samples_per_s_plain": 1e5},
             {"model": "movielens_light", "mode": "unsharded", "batch": 1024, "unique_fraction": 0.03, "f": 0.5,
              "route": "dedup", "ratio": 1.9, "samples_per_s_plain": 1e5},
             {"model": "dlrm", "mode": "dmp2", "batch": 1024, "unique_fraction": 1.0, "f": 0.0,
              "route": "plain", "ratio": 1.0, "samples_per_s_plain": 1e5}]
    (tmp_path / "models.json").write_text(json.dumps({"cases": cases}))
    monkeypatch.setattr(measured, "RESULTS", tmp_path)
    s = load_sample("criteo-sessions", max_rows=2048, progress=False)
    g = analyze_groups(s, batch_sizes=(1024,))
    rows = check.models_rows("criteo-sessions", g)
    assert [r.quantity.split(":")[0] for r in rows] == ["dlrm dmp2 B=1024"]  # its data, u < 1 only
    assert rows[0].predicted == pytest.approx(1 / (0.5 + 0.5 / 16)) and rows[0].measured == 1.8
    assert check.models_rows("criteo-synthetic", g) == [] and check.models_rows("my.parquet", g) == []


def test_step_ms_sets_fixed_costs_against_the_step(tmp_path):
    data = _session_parquet(tmp_path / "s.parquet", sessions=300, per=8)
    with pytest.raises(AnalyzeError, match="--step-ms"):
        from recd_plugin.analyze.command import analyze
        analyze(str(data), out=tmp_path / "o", step_ms=0.0, progress=False)
    summary_cmd = ["analyze", str(data), "--out", str(tmp_path / "o"), "--no-progress", "--batch-size", "256"]
    assert main(summary_cmd + ["--step-ms", "50"]) == 0
    why = json.loads((tmp_path / "o" / "summary.json").read_text())["advice"][0]["why"]
    assert any("route fixed costs timed here at batch 256" in w for w in why)
    assert any("fixed costs on a 50 ms step" in w for w in why)


def test_analyze_without_matplotlib_names_the_extra(tmp_path, monkeypatch, capsys):
    import sys

    from recd_plugin.errors import OptionalDependencyError

    for name in ("matplotlib", "matplotlib.figure"):
        monkeypatch.setitem(sys.modules, name, None)  # what an install without the extra sees
    data = _session_parquet(tmp_path / "s.parquet")
    from recd_plugin.analyze.command import analyze
    with pytest.raises(OptionalDependencyError, match=r"pip install 'recd-plugin\[analyze\]'"):
        analyze(str(data), out=tmp_path / "o", progress=False)
    assert not (tmp_path / "o").exists()  # refused before anything was written
    assert main(["analyze", str(data), "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    assert "recd-plugin[analyze]" in capsys.readouterr().err


def test_report_plots_leave_the_process_plotting_state_alone(tmp_path):
    import matplotlib

    backend = matplotlib.get_backend()
    data = _session_parquet(tmp_path / "s.parquet")
    assert main(["analyze", str(data), "--out", str(tmp_path / "o"), "--no-progress"]) == 0
    assert matplotlib.get_backend() == backend  # no matplotlib.use() inside the library
    import matplotlib.pyplot as plt
    assert plt.get_fignums() == []  # no pyplot figure left open
