"""recd_plugin.storage: preprocess -> layout -> DedupReader / FlatReader -> epoch_check."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict, List

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader

from conftest import assert_kjt_equal
from recd_plugin.data import TableBatches, generate_sessions, storage_roles
from recd_plugin.sparse.ikjt import DedupSpec, FeatureGroup, build_ikjt, expand
from recd_plugin.storage import (
    DedupReader, FlatReader, StorageError, StorageSpec, epoch_check, pack_sessions, preprocess,
    read_manifest, write_flat,
)
from recd_plugin.storage.layout import probe_dictionary

SPEC = StorageSpec(**storage_roles())
GROUPS = DedupSpec([
    FeatureGroup("session", [f for f in SPEC.session_columns if f in SPEC.sparse_features], key="session_id"),
    FeatureGroup("item", [f for f in SPEC.item_columns if f in SPEC.sparse_features], key="item_id"),
])


@pytest.fixture(scope="module")
def table() -> pa.Table:
    return generate_sessions(num_users=150, num_items=300, seed=3)


@pytest.fixture(scope="module")
def stored(table: pa.Table, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("store") / "ds"
    summary = preprocess(table, out, SPEC, rows_per_file=700, row_group_rows=256, progress=False)
    assert summary.rows == table.num_rows and not summary.violations
    assert summary.files >= 4 and summary.bytes_flat and summary.bytes_out < summary.bytes_flat
    return out


def _session_rows(table: pa.Table) -> Dict[int, np.ndarray]:
    sid = table.column("session_id").to_numpy()
    starts = np.flatnonzero(np.r_[True, sid[1:] != sid[:-1]])
    ends = np.r_[starts[1:], sid.size]
    return {int(sid[s]): np.arange(s, e) for s, e in zip(starts, ends)}


def _source_rows(table: pa.Table, batches: List) -> List[np.ndarray]:
    """Source row indices of every batch, from the batch's session ids (sessions are
    contiguous in the source and kept in order by the reader)."""
    rows_of = _session_rows(table)
    used: Dict[int, int] = {}
    out = []
    for b in batches:
        sid = expand(b.sparse_features).to_dict()["session_id"].values().numpy()
        starts = np.flatnonzero(np.r_[True, sid[1:] != sid[:-1]])
        lens = np.diff(np.r_[starts, sid.size])
        idx = []
        for s, n in zip(sid[starts], lens):
            k = used.get(int(s), 0)
            idx.append(rows_of[int(s)][k:k + n])
            used[int(s)] = k + n
        out.append(np.concatenate(idx))
    return out


def _check_batches(table: pa.Table, batches: List) -> None:
    """Each batch equals the plain batch of its source rows, and its IKJT equals build_ikjt's."""
    for b, rows in zip(batches, _source_rows(table, batches)):
        plain = TableBatches(table.take(pa.array(rows)), batch_size=len(rows))[0]
        assert_kjt_equal(expand(b.sparse_features), plain.sparse_features)
        ref = build_ikjt(plain.sparse_features, GROUPS)
        assert b.sparse_features.stride_per_key() == ref.stride_per_key()
        assert torch.equal(b.sparse_features.values(), ref.values())
        assert torch.equal(b.sparse_features.inverse_indices()[1], ref.inverse_indices()[1])
        assert torch.equal(b.dense_features, plain.dense_features)
        assert torch.equal(b.labels, plain.labels)


def test_round_trip_in_order(table: pa.Table, stored: Path) -> None:
    batches = list(DedupReader(stored, 64))
    assert sum(b.labels.numel() for b in batches) == table.num_rows
    rows = np.concatenate(_source_rows(table, batches))
    assert np.array_equal(rows, np.arange(table.num_rows))  # shuffle=False: stored order
    _check_batches(table, batches)
    report = epoch_check(DedupReader(stored, 64), source=table)
    assert report.samples == table.num_rows


def test_shuffled_epoch_is_a_permutation_of_sessions(table: pa.Table, stored: Path) -> None:
    batches = list(DedupReader(stored, 50, shuffle=True, seed=1, epoch=2))
    rows = np.concatenate(_source_rows(table, batches))
    assert np.array_equal(np.sort(rows), np.arange(table.num_rows))
    assert not np.array_equal(rows, np.arange(table.num_rows))
    _check_batches(table, batches)


def test_sessions_never_split_unless_longer_than_batch(table: pa.Table, stored: Path) -> None:
    size = {s: r.size for s, r in _session_rows(table).items()}
    batch_size = 20
    seen: Dict[int, int] = {}
    for b in DedupReader(stored, batch_size, shuffle=True, seed=0):
        assert b.labels.numel() <= batch_size
        sid = expand(b.sparse_features).to_dict()["session_id"].values().numpy()
        for s, n in zip(*np.unique(sid, return_counts=True)):
            seen[int(s)] = seen.get(int(s), 0) + int(n)
            if size[int(s)] <= batch_size:
                assert n == size[int(s)]
    assert seen == size


def test_pack_sessions() -> None:
    assert pack_sessions(np.array([3, 2, 4, 1]), 5) == [[(0, 0, 3), (1, 0, 2)], [(2, 0, 4), (3, 0, 1)]]
    assert pack_sessions(np.array([2, 12, 1]), 5) == [[(0, 0, 2)], [(1, 0, 5)], [(1, 5, 5)], [(1, 10, 2), (2, 0, 1)]]


def _sample_keys(batches) -> List[tuple]:
    keys = []
    for b in batches:
        d = expand(b.sparse_features).to_dict()
        keys += list(zip(d["session_id"].values().tolist(), d["item_id"].values().tolist(),
                         b.dense_features[:, 0].tolist()))
    return keys


def test_ranks_and_workers_partition_exactly(table: pa.Table, stored: Path) -> None:
    everything = sorted(_sample_keys(DedupReader(stored, 64)))
    parts = [_sample_keys(DedupReader(stored, 64, rank=r, world_size=2, shuffle=True, seed=5)) for r in range(2)]
    assert parts[0] and parts[1] and sorted(parts[0] + parts[1]) == everything
    loader = DataLoader(DedupReader(stored, 64, rank=0, world_size=1), batch_size=None, num_workers=2)
    assert sorted(_sample_keys(loader)) == everything
    assert epoch_check(loader, read_manifest(stored), source=table).samples == table.num_rows


def test_deterministic_by_seed(stored: Path) -> None:
    a = _sample_keys(DedupReader(stored, 64, shuffle=True, seed=7))
    assert a == _sample_keys(DedupReader(stored, 64, shuffle=True, seed=7))
    assert a != _sample_keys(DedupReader(stored, 64, shuffle=True, seed=8))
    r = DedupReader(stored, 64, shuffle=True, seed=7)
    r.set_epoch(1)
    assert a != _sample_keys(r)


def test_flat_reader_matches_table_batches(table: pa.Table, tmp_path: Path) -> None:
    path = tmp_path / "flat.parquet"
    assert write_flat(table, path, row_group_rows=500) == os.path.getsize(path)
    batches = list(FlatReader(path, 128, SPEC))
    for i, b in enumerate(batches):
        assert_kjt_equal(b.sparse_features, TableBatches(table, 128)[i].sparse_features)
    shards = [sum(b.labels.numel() for b in FlatReader(path, 128, SPEC, rank=r, world_size=3)) for r in range(3)]
    assert sum(shards) == table.num_rows
    assert epoch_check(FlatReader(path, 128, SPEC), source=table).samples == table.num_rows


def test_manifest_guard(table: pa.Table, tmp_path: Path) -> None:
    out = tmp_path / "ds"
    preprocess(table, out, SPEC, progress=False)
    (out / "manifest.json").unlink()
    with pytest.raises(StorageError, match="no manifest.json.*preprocess"):
        DedupReader(out, 64)
    with pytest.raises(StorageError, match="already exists"):
        preprocess(table, out, SPEC, progress=False)


def test_epoch_check_detects_loss(table: pa.Table, stored: Path) -> None:
    batches = list(DedupReader(stored, 64))
    with pytest.raises(StorageError, match="lost"):
        epoch_check(batches[1:], read_manifest(stored))


def _no_output(tmp_path: Path) -> None:
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".") or p.name == "out"] == []


def test_bad_inputs(table: pa.Table, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    pq.write_table(table.slice(0, 500), src / "a.parquet")
    pq.write_table(table.slice(500, 500), src / "b.parquet")
    out = tmp_path / "out"
    with pytest.raises(StorageError, match=r"missing column 'label'"):
        preprocess(table.drop_columns(["label"]), out, SPEC, progress=False)
    with pytest.raises(StorageError, match="b.parquet: missing column 'dense_hour'"):
        pq.write_table(table.slice(500, 500).drop_columns(["dense_hour"]), src / "b.parquet")
        preprocess(src, out, SPEC, progress=False)
    b = table.slice(500, 500)
    pq.write_table(b.set_column(b.schema.get_field_index("label"), "label", b.column("label").cast(pa.float64())),
                   src / "b.parquet")
    with pytest.raises(StorageError, match="b.parquet: schema differs from .*a.parquet: column 'label' is double"):
        preprocess(src, out, SPEC, progress=False)
    (src / "b.parquet").write_bytes((src / "a.parquet").read_bytes()[:300])  # truncated
    with pytest.raises(StorageError, match="b.parquet: not a readable Parquet"):
        preprocess(src, out, SPEC, progress=False)
    with pytest.raises(StorageError, match="empty"):
        preprocess(table.slice(0, 0), out, SPEC, progress=False)
    nulls = table.set_column(0, "session_id", pa.array([None] + table.column(0).to_pylist()[1:], pa.int64()))
    with pytest.raises(StorageError, match="'session_id' \\(the session key\\) has 1 null rows.*fill or drop"):
        preprocess(nulls, out, SPEC, progress=False)
    ungrouped = pa.concat_tables([table.slice(0, 10), table.slice(100, 10), table.slice(0, 10)])
    with pytest.raises(StorageError, match="reappears"):
        preprocess(ungrouped, out, SPEC, progress=False, read_batch_rows=7, rows_per_file=5)
    _no_output(tmp_path)
    (src / "b.parquet").unlink()
    with pytest.raises(StorageError, match="empty"):
        (src / "a.parquet").unlink()
        preprocess(src, out, SPEC, progress=False)


def test_constancy_violations(table: pa.Table, tmp_path: Path) -> None:
    age = table.column("user_age").to_numpy().copy()
    age[1] += 1  # row 1 shares its session with row 0 in generated data
    assert table.column("session_id")[0] == table.column("session_id")[1]
    bad = table.set_column(table.schema.get_field_index("user_age"), "user_age", pa.array(age))
    summary = preprocess(bad, tmp_path / "a", SPEC, progress=False)
    assert summary.violations["user_age"]["rows"] == 1
    with pytest.raises(StorageError, match="'user_age'.*not constant"):
        preprocess(bad, tmp_path / "b", SPEC, strict=True, progress=False)
    year = table.column("item_year").to_numpy().copy()
    year[-1] += 1
    bad = table.set_column(table.schema.get_field_index("item_year"), "item_year", pa.array(year))
    assert preprocess(bad, tmp_path / "c", SPEC, progress=False, rows_per_file=300).violations["item_year"]["rows"] >= 1
    assert not (tmp_path / "b").exists()


def test_dataset_and_directory_sources(table: pa.Table, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    sid = table.column("session_id").to_numpy()
    cut = int(np.flatnonzero(sid != sid[999])[0])  # files split at a session boundary
    pq.write_table(table.slice(0, cut), src / "a.parquet")
    pq.write_table(table.slice(cut), src / "b.parquet")
    for i, source in enumerate([src, ds.dataset(str(src), format="parquet")]):
        s = preprocess(source, tmp_path / f"o{i}", SPEC, progress=False, read_batch_rows=333, rows_per_file=900)
        assert s.rows == table.num_rows and s.bytes_source
        assert epoch_check(DedupReader(tmp_path / f"o{i}", 100), source=table).samples == table.num_rows
    manifest = json.loads((tmp_path / "o0" / "manifest.json").read_text())
    assert manifest["totals"]["sessions"] == np.unique(sid).size


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.integers(1, 40), st.integers(1, 9), st.integers(1, 12), st.integers(0, 10_000), st.booleans())
def test_property_small_tables(tmp_path_factory: pytest.TempPathFactory, users: int, batch: int,
                               rows_per_file: int, seed: int, shuffle: bool) -> None:
    table = generate_sessions(num_users=users, num_items=20, sessions_per_user=2, mean_session_length=3, seed=seed)
    out = tmp_path_factory.mktemp("prop") / "ds"
    preprocess(table, out, SPEC, rows_per_file=rows_per_file, read_batch_rows=5, progress=False)
    batches = list(DedupReader(out, batch, shuffle=shuffle, seed=seed))
    assert all(b.labels.numel() <= batch for b in batches)
    rows = np.concatenate(_source_rows(table, batches))
    assert np.array_equal(np.sort(rows), np.arange(table.num_rows))
    _check_batches(table, batches)


def test_cli_preprocess_writes_a_layout_and_reports_errors(tmp_path, capsys) -> None:
    from recd_plugin.cli import main

    out = tmp_path / "layout"
    assert main(["preprocess", "synthetic", str(out)]) == 0
    assert (out / "manifest.json").exists() and "sessions" in capsys.readouterr().out
    assert main(["preprocess", str(tmp_path / "missing.parquet"), str(tmp_path / "x")]) == 2
    assert "missing.parquet" in capsys.readouterr().err and not (tmp_path / "x").exists()


# ---- history stored by reference ----------------------------------------------------------

def pc_list_lengths(col) -> np.ndarray:
    import pyarrow.compute as pc
    return pc.list_value_length(col).to_numpy(zero_copy_only=False)


def _sessions_schema(out: Path) -> List[str]:
    return [c for c, _ in read_manifest(out).schema["sessions"]]


def test_manifest_records_reference_mode_and_files_hold_whole_users(table: pa.Table, stored: Path) -> None:
    manifest = read_manifest(stored)
    assert manifest.history_mode == "reference"
    assert json.loads((stored / "manifest.json").read_text())["history_mode"] == "reference"
    assert "history" not in _sessions_schema(stored)
    assert {"history_start", "history_len"} <= set(_sessions_schema(stored))
    # Every user's sessions (hence events) live in exactly one file.
    file_of: Dict[int, int] = {}
    for i, f in enumerate(manifest.files["sessions"]):
        for u in pq.read_table(stored / f["path"], columns=["user_id"]).column(0).to_pylist():
            assert file_of.setdefault(u, i) == i
    assert sorted(file_of) == sorted(set(table.column("user_id").to_pylist()))


def test_list_mode_round_trip_when_disabled(table: pa.Table, tmp_path: Path) -> None:
    spec = StorageSpec(**dict(storage_roles(), history=None))
    summary = preprocess(table, tmp_path / "ds", spec, rows_per_file=700, progress=False)
    assert summary.history_mode == "list" and "history stored by list" in str(summary)
    assert read_manifest(tmp_path / "ds").history_mode == "list"
    assert "history" in _sessions_schema(tmp_path / "ds")
    _check_batches(table, list(DedupReader(tmp_path / "ds", 64, shuffle=True, seed=3)))


def _movielens_like(seed: int = 0, users: int = 25, events: int = 3000) -> pa.Table:
    """Raw events with heavy users (histories truncated at HISTORY_LENGTH), timestamp ties
    and repeated items, through the same builder as MovieLens."""
    from recd_plugin.data.sessions import build_session_table

    rng = np.random.default_rng(seed)
    n_items = 60
    user = rng.integers(0, users, events)
    ts = rng.integers(0, 40, events) * 3600 * rng.integers(1, 4, events)  # many ties, gaps
    return build_session_table(
        user, rng.integers(0, n_items, events), ts, rng.integers(0, 2, events).astype(np.float32),
        users={f: rng.integers(0, 5, users) for f in ("user_age", "user_gender", "user_occupation", "user_zip")},
        item_genres=pa.array([[int(g)] for g in rng.integers(0, 19, n_items)], pa.list_(pa.int64())),
        item_year=rng.integers(0, 10, n_items), item_dense_year=rng.random(n_items).astype(np.float32),
        cardinalities={"user_id": users, "user_age": 5, "user_gender": 5, "user_occupation": 5, "user_zip": 5,
                       "item_id": n_items, "item_genres": 19, "item_year": 10},
        source="movielens-like")


@pytest.mark.parametrize("rows_per_file", [1, 400, 1 << 20])
def test_reference_round_trip_movielens_like(tmp_path: Path, rows_per_file: int) -> None:
    table = _movielens_like()
    lens = pc_list_lengths(table.column("history"))
    assert lens.max() == 50  # some histories are truncated at HISTORY_LENGTH
    out = tmp_path / "ds"
    summary = preprocess(table, out, SPEC, rows_per_file=rows_per_file, read_batch_rows=97, progress=False)
    assert summary.history_mode == "reference" and not summary.violations
    batches = list(DedupReader(out, 37, shuffle=True, seed=1))
    assert np.array_equal(np.sort(np.concatenate(_source_rows(table, batches))), np.arange(table.num_rows))
    _check_batches(table, batches)


def test_reference_round_trip_movielens(tmp_path: Path) -> None:
    from recd_plugin.data import MovieLensNotFoundError, load_movielens_100k

    try:
        table = load_movielens_100k(download=False)
    except (MovieLensNotFoundError, OSError) as e:
        pytest.skip(f"MovieLens-100k not available: {e}")
    table = table.slice(0, 6000)
    summary = preprocess(table, tmp_path / "ds", SPEC, rows_per_file=1500, progress=False)
    assert summary.history_mode == "reference"
    _check_batches(table, list(DedupReader(tmp_path / "ds", 256, shuffle=True, seed=0)))


def _set_history(table: pa.Table, rows: np.ndarray, history: List[int]) -> pa.Table:
    hist = table.column("history").to_pylist()
    for r in rows:
        hist[int(r)] = list(history)
    return table.set_column(table.schema.get_field_index("history"), "history",
                            pa.array(hist, table.schema.field("history").type))


@pytest.mark.parametrize("how", ["altered", "too_long"])
def test_fallback_to_list_mode_when_a_history_is_not_derivable(table: pa.Table, tmp_path: Path, how: str) -> None:
    rows_of = _session_rows(table)
    lens = pc_list_lengths(table.column("history"))
    sid = table.column("session_id").to_numpy()
    if how == "altered":  # a later session: one history item replaced (whole session, so still constant)
        cand = np.flatnonzero(lens > 3)
        s = int(sid[cand[cand.size // 2]])
        old = table.column("history")[int(rows_of[s][0])].as_py()
        bad = _set_history(table, rows_of[s], old[:-1] + [old[-1] + 1])
    else:  # the user's first session claims a history
        s = int(sid[np.flatnonzero(lens == 0)[0]])
        bad = _set_history(table, rows_of[s], [1, 2])
    out = tmp_path / "ds"
    summary = preprocess(bad, out, SPEC, rows_per_file=700, progress=False)
    assert summary.history_mode == "list" and summary.rows == table.num_rows
    assert read_manifest(out).history_mode == "list" and "history" in _sessions_schema(out)
    assert [p.name for p in tmp_path.iterdir()] == ["ds"]  # the aborted reference pass left nothing
    _check_batches(bad, list(DedupReader(out, 64)))


def test_encoding_probe_picks_the_smaller_encoding_per_column(stored: Path) -> None:
    rng = np.random.default_rng(0)
    n = 20_000
    t = pa.table({"label": pa.array(rng.integers(0, 2, n).astype(np.float32)),  # 2 values: dictionary wins
                  "ts": pa.array(rng.integers(0, 2**40, n))})                    # all distinct: plain wins
    assert probe_dictionary(t) == ["label"]
    # Every file of a table is written with one choice, recorded in the file's column encodings.
    manifest = read_manifest(stored)
    for f in manifest.files["events"]:
        meta = pq.ParquetFile(stored / f["path"]).metadata.row_group(0)
        encodings = {meta.column(c).path_in_schema: meta.column(c).encodings for c in range(meta.num_columns)}
        assert any("DICTIONARY" in e for e in encodings["label"]), encodings["label"]
        assert not any("DICTIONARY" in e for e in encodings["timestamp"]), encodings["timestamp"]
