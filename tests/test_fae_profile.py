"""FAE profiler, tier-traffic replay and planner hints, checked against plain-Python references.

The hypothesis tests draw small random batches (a few features, tiny tables, jagged bags) and
compare the library's sampled counts, hot set, hot-sample fraction and LRU / LFU misses with
straightforward reference implementations (Counter, sorted lists, linear scans).
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Dict, List

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recd_plugin.errors import HotSetError
from recd_plugin.fae.hints import ProfileCacheStatistics, planner_constraints
from recd_plugin.fae.hotset import HotSet, TableShape
from recd_plugin.fae.profile import profile_accesses
from recd_plugin.fae.trace import AccessTrace, simulate_lfu, simulate_lru, simulate_static

REPO = Path(__file__).resolve().parents[1]
Bags = Dict[str, List[List[int]]]  # feature -> B bags of ids


def make_batch(bags: Bags) -> Batch:
    keys = list(bags)
    b = len(bags[keys[0]])
    values = [i for k in keys for bag in bags[k] for i in bag]
    lengths = [len(bag) for k in keys for bag in bags[k]]
    kjt = KeyedJaggedTensor(keys=keys, values=torch.tensor(values, dtype=torch.int64),
                            lengths=torch.tensor(lengths, dtype=torch.int32), stride=b)
    return Batch(dense_features=torch.zeros(b, 1), sparse_features=kjt, labels=torch.zeros(b))


@st.composite
def cases(draw):
    sizes = draw(st.lists(st.integers(1, 12), min_size=1, max_size=3))
    dims = draw(st.lists(st.sampled_from([2, 4, 8]), min_size=len(sizes), max_size=len(sizes)))
    tables = {f"f{i}": TableShape(n, d) for i, (n, d) in enumerate(zip(sizes, dims))}
    batches = []
    for _ in range(draw(st.integers(1, 4))):
        b = draw(st.integers(1, 6))
        batches.append({t: [draw(st.lists(st.integers(0, s.num_embeddings - 1), max_size=3)) for _ in range(b)]
                        for t, s in tables.items()})
    return tables, batches


def reference(tables, batches, fraction, seed):
    """Sampled counts and per-sample id sets, re-drawing the same masks."""
    rng = np.random.default_rng(seed)
    counts: Dict[str, Counter] = {t: Counter() for t in tables}
    samples = []
    for bags in batches:
        b = len(next(iter(bags.values())))
        mask = rng.random(b) < fraction
        for s in range(b):
            if mask[s]:
                samples.append({t: set(bags[t][s]) for t in tables})
                for t in tables:
                    counts[t].update(bags[t][s])
    return counts, samples


def reference_hot(tables, counts, budget):
    names = list(tables)
    ranked = sorted(((-c, names.index(t), i) for t in names for i, c in counts[t].items()))
    hot, used = {t: [] for t in names}, 0
    for _, ti, i in ranked:
        rb = tables[names[ti]].row_bytes
        if used + rb > budget:
            break  # prefix rule: stop at the first row that does not fit
        used += rb
        hot[names[ti]].append(i)
    return {t: sorted(v) for t, v in hot.items()}


@settings(max_examples=60, deadline=None)
@given(cases(), st.sampled_from([1.0, 0.5]), st.integers(0, 3), st.integers(0, 200))
def test_counts_hot_set_and_hot_fraction_match_reference(case, fraction, seed, budget_rows):
    tables, batches = case
    counts, samples = reference(tables, batches, fraction, seed)
    if not samples:
        with pytest.raises(HotSetError, match="drew no sample"):
            profile_accesses([make_batch(b) for b in batches], tables, sample_fraction=fraction, seed=seed,
                             progress=False)
        return
    prof = profile_accesses([make_batch(b) for b in batches], tables, sample_fraction=fraction, seed=seed,
                            progress=False)
    for t in tables:
        assert dict(zip(prof.ids[t].tolist(), prof.counts[t].tolist())) == dict(counts[t])
    total = sum(s.num_embeddings * s.row_bytes for s in tables.values())
    budget = min(2 + budget_rows, total - 1)
    if budget < min(s.row_bytes for s in tables.values()):
        with pytest.raises(HotSetError, match="smaller than one row"):
            prof.hot_set(budget)
        return
    hot = prof.hot_set(budget)
    want = reference_hot(tables, counts, budget)
    assert {t: r.tolist() for t, r in hot.rows.items()} == want
    assert hot.bytes <= budget
    all_hot = sum(all(ids <= set(want[t]) for t, ids in s.items()) for s in samples)
    assert prof.hot_sample_fraction(hot) == pytest.approx(all_hot / len(samples))


def naive_lru(steps, cap):
    cache, out = [], []
    for keys in steps:
        miss = 0
        for k in sorted(set(keys)):
            if k in cache:
                cache.remove(k)
            else:
                miss += 1
                if len(cache) == cap:
                    cache.pop(0)
            cache.append(k)
        out.append(miss)
    return out


def naive_lfu(steps, cap):
    count, last, cache, out, t = Counter(), {}, set(), [], 0
    for keys in steps:
        miss = 0
        for k in sorted(set(keys)):
            t += 1
            count[k] += 1
            last[k] = t
            if k not in cache:
                miss += 1
                if len(cache) == cap:
                    cache.remove(min(cache, key=lambda x: (count[x], last[x])))
                cache.add(k)
        out.append(miss)
    return out


@settings(max_examples=80, deadline=None)
@given(st.lists(st.lists(st.integers(0, 15), max_size=10), min_size=1, max_size=12), st.integers(1, 8))
def test_lru_lfu_static_match_naive(steps, cap):
    arrays = [np.unique(np.array(s, dtype=np.int64)) for s in steps]
    assert simulate_lru(arrays, cap).tolist() == naive_lru(steps, cap)
    assert simulate_lfu(arrays, cap).tolist() == naive_lfu(steps, cap)
    hot = np.array([0, 3, 7], dtype=np.int64)
    assert simulate_static(arrays, hot).tolist() == [len(set(s) - {0, 3, 7}) for s in steps]


def small_profile(**kw):
    tables = {"a": TableShape(10, 4), "b": TableShape(5, 4)}
    batch = make_batch({"a": [[0, 1], [1], [2, 1]], "b": [[4], [4], [0]]})
    return profile_accesses([batch], tables, sample_fraction=1.0, progress=False, **kw), tables, batch


def test_trace_keys_and_unique_rows_per_step():
    prof, tables, batch = small_profile()
    trace = AccessTrace.from_source([batch, batch], tables)
    assert trace.steps[0].tolist() == [0, 1, 2, 10, 14]  # b's rows start at key 10
    hot = prof.hot_set(3 * 16)  # rows a:1 (3), b:4 (2), a:0 (1; tie with a:2, b:0 by table, id)
    assert hot.rows["a"].tolist() == [0, 1] and hot.rows["b"].tolist() == [4]
    assert simulate_static(trace.steps, trace.hot_keys(hot)).tolist() == [2, 2]


def test_budget_errors():
    prof, _, _ = small_profile()
    with pytest.raises(HotSetError, match="smaller than one row.*16 bytes"):
        prof.hot_set(15)
    with pytest.raises(HotSetError, match="holds all 2 tables.*240 bytes"):
        prof.hot_set(240)


def test_ids_out_of_range_and_unknown_features():
    tables = {"a": TableShape(3, 4)}
    with pytest.raises(HotSetError, match=r"feature 'a': id 5 .* table 'a' of 3 rows"):
        profile_accesses([make_batch({"a": [[5]]})], tables, progress=False)
    with pytest.raises(HotSetError, match=r"feature 'a': id -1"):
        profile_accesses([make_batch({"a": [[-1]]})], tables, progress=False)
    with pytest.raises(HotSetError, match=r"unknown feature.*'item'.*did you mean 'items'"):
        profile_accesses([make_batch({"items": [[0]]})], {"item": TableShape(3, 4)}, progress=False)
    with pytest.raises(HotSetError, match="not among the tables"):
        profile_accesses([make_batch({"a": [[0]]})], tables, feature_to_table={"a": "t_a"}, progress=False)


def test_stale_hot_set_detected(tmp_path):
    prof, tables, _ = small_profile()
    hot = prof.hot_set(64)
    hot.save(tmp_path / "hot.npz")
    loaded = HotSet.load(tmp_path / "hot.npz")
    assert {t: r.tolist() for t, r in loaded.rows.items()} == {t: r.tolist() for t, r in hot.rows.items()}
    loaded.check_tables(tables)
    with pytest.raises(HotSetError, match="stale hot set: table 'a'"):
        loaded.check_tables({"a": TableShape(11, 4), "b": TableShape(5, 4)})
    with pytest.raises(HotSetError, match="does not have"):
        loaded.check_tables({"a": TableShape(10, 4)})


def test_cache_statistics_miss_rate():
    prof, _, _ = small_profile()
    hot = prof.hot_set(64)
    stats = ProfileCacheStatistics(prof, "a")  # a: rows 0, 1, 2 seen (1, 3, 1 times) of 10: unseen mass = 2/5
    clfs = np.linspace(0, 1, 41)
    miss = [stats.expected_miss_rate(c) for c in clfs]
    assert miss[0] == 1.0 and miss[-1] == 0.0
    assert all(x >= y - 1e-12 for x, y in zip(miss, miss[1:]))
    assert stats.unseen_mass == pytest.approx(2 / 5)
    assert stats.expected_miss_rate(0.1) == pytest.approx(1 - (3 / 5) * prof.coverage("a", 0.1))
    full = ProfileCacheStatistics(prof, "b")  # b: rows 4, 0 of 5 seen
    assert 0.0 <= full.cacheability <= 1.0 and stats.expected_lookups > 0
    cons = planner_constraints(prof, hot, hbm_threshold=0.5)
    assert cons["a"].compute_kernels == ["fused_uvm_caching"]
    assert cons["a"].cache_params.stats is not None


def test_cli_profile_parquet(tmp_path):
    from recd_plugin.cli import main

    meta = {b"recd.cardinalities": json.dumps({"a": 10, "b": 5}).encode()}
    table = pa.table({"a": pa.array([[0, 1], [1], [2, 1]], pa.list_(pa.int64())), "b": [4, 4, 0]})
    pq.write_table(table.replace_schema_metadata(meta), tmp_path / "d.parquet")
    out = tmp_path / "out"
    rc = main(["profile", str(tmp_path / "d.parquet"), "--budget", "48", "--dim", "4", "--sample", "1",
               "--out", str(out), "--no-progress"])
    assert rc == 0 and (out / "hot.npz").exists() and (out / "coverage.png").stat().st_size > 1000
    assert HotSet.load(out / "hot.npz").rows["a"].tolist() == [0, 1]
    assert main(["profile", str(tmp_path / "d.parquet"), "--budget", "1", "--out", str(out), "--no-progress"]) == 2


def test_cli_profile_without_matplotlib_still_writes_the_hot_set(tmp_path, monkeypatch, capsys):
    import sys

    from recd_plugin.cli import main

    for name in ("matplotlib", "matplotlib.figure"):
        monkeypatch.setitem(sys.modules, name, None)  # an install without the analyze extra
    meta = {b"recd.cardinalities": json.dumps({"a": 10, "b": 5}).encode()}
    pq.write_table(pa.table({"a": [0, 1, 1, 2], "b": [4, 4, 0, 1]}).replace_schema_metadata(meta), tmp_path / "d.parquet")
    out = tmp_path / "out"
    assert main(["profile", str(tmp_path / "d.parquet"), "--budget", "48", "--dim", "4", "--sample", "1",
                 "--out", str(out), "--no-progress"]) == 0
    assert (out / "hot.npz").exists() and not (out / "coverage.png").exists()
    printed = capsys.readouterr().out
    assert "coverage plot skipped" in printed and "pip install 'recd-plugin[analyze]'" in printed


def test_bench_fae_quick_json(tmp_path):
    """SLOW (~30-60 s): the quick benchmark runs and writes the required JSON keys."""
    out = tmp_path / "fae.json"
    proc = subprocess.run([sys.executable, "-m", "recd_plugin.bench", "fae", "--quick", "--no-docs", "--json",
                           str(out)], cwd=REPO, timeout=1200, capture_output=True, text=True)  # hang guard only
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    for key in ("hot_sample_fraction", "slow_rows_ratio_vs_lru", "slow_rows_ratio_vs_lfu", "cpu_ratio", "gpu_ratio"):
        assert key in result
    assert 0.0 <= result["hot_sample_fraction"] <= 1.0 and result["slow_rows_ratio_vs_lru"] > 0
    if not torch.cuda.is_available():
        assert result["gpu_ratio"] is None
