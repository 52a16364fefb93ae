"""Tests for recd_plugin.data: common table format, sources, and TorchRec batches."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import List

import numpy as np
import pyarrow as pa
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from recd_plugin.data import (
    DENSE_FEATURES,
    HISTORY_LENGTH,
    SPARSE_FEATURES,
    MovieLensFormatError,
    MovieLensNotFoundError,
    TableBatches,
    build_session_table,
    cardinalities,
    fetch_movielens_100k,
    generate_sessions,
    load_movielens_100k,
    simulate_events,
    split_by_time,
)
from recd_plugin.data import movielens as ml
from recd_plugin.data.movielens import GENRES, default_root
from recd_plugin.data.sessions import COLUMNS

LIST_COLUMNS = {"history", "item_genres"}
FLOAT_COLUMNS = {"dense_hour", "dense_year", "label"}


@pytest.fixture(scope="module")
def synthetic() -> pa.Table:
    return generate_sessions(num_users=300, num_items=800, seed=1)


@pytest.fixture(scope="module")
def movielens() -> pa.Table:
    try:
        return load_movielens_100k(download=True)
    except (MovieLensNotFoundError, OSError) as e:
        pytest.skip(f"MovieLens-100k not available: {e}")


def check_format(table: pa.Table) -> None:
    assert table.column_names == COLUMNS
    for name in COLUMNS:
        t = table.schema.field(name).type
        if name in LIST_COLUMNS:
            assert t == pa.list_(pa.int64()), name
        elif name in FLOAT_COLUMNS:
            assert t == pa.float32(), name
        else:
            assert t == pa.int64(), name
        assert table.column(name).null_count == 0, name
    card = cardinalities(table)
    assert set(card) == set(SPARSE_FEATURES)
    assert card["history"] == card["item_id"]
    assert table.schema.metadata[b"recd.source"]
    for name in SPARSE_FEATURES:  # dense 0-based ids that index the embedding tables
        col = table.column(name).combine_chunks()
        v = (col.flatten() if name in LIST_COLUMNS else col).to_numpy()
        if len(v):
            assert v.min() >= 0 and v.max() < card[name], name
    sid = table.column("session_id").to_numpy()
    assert sid[0] == 0 and sid[-1] == card["session_id"] - 1
    assert np.all(np.diff(sid) >= 0) and np.all(np.diff(sid) <= 1)
    user, ts = table.column("user_id").to_numpy(), table.column("timestamp").to_numpy()
    assert np.all((np.diff(user) > 0) | ((np.diff(user) == 0) & (np.diff(ts) >= 0)))
    for name in ("dense_hour", "dense_year"):
        d = table.column(name).to_numpy()
        assert d.min() >= 0.0 and d.max() <= 1.0
    assert set(np.unique(table.column("label").to_numpy())) <= {0.0, 1.0}
    assert max(len(h) for h in table.column("history").to_pylist()) <= HISTORY_LENGTH


def history_matches_session_start(table: pa.Table) -> bool:
    """Every row's history equals that of its session's first row (vectorized)."""
    h = table.column("history").combine_chunks()
    off = np.asarray(h.offsets)
    vals = h.values.to_numpy()
    sid = table.column("session_id").to_numpy()
    first = np.flatnonzero(np.r_[True, sid[1:] != sid[:-1]])[sid - sid[0]]
    lens = np.diff(off)
    if not np.array_equal(lens, lens[first]):
        return False
    k = np.arange(off[-1]) - np.repeat(off[:-1], lens)
    return bool(np.array_equal(vals, vals[np.repeat(off[first], lens) + k]))


# ----------------------------------------------------------------- synthetic source
def test_synthetic_schema(synthetic: pa.Table) -> None:
    check_format(synthetic)
    assert history_matches_session_start(synthetic)
    assert synthetic.schema.metadata[b"recd.source"] == b"synthetic"


def test_synthetic_deterministic_by_seed() -> None:
    a = generate_sessions(num_users=100, seed=7)
    assert a.equals(generate_sessions(num_users=100, seed=7), check_metadata=True)
    assert not a.equals(generate_sessions(num_users=100, seed=8))


def test_synthetic_sessions_recovered_by_gap_rule() -> None:
    kw = dict(num_users=200, num_items=500, sessions_per_user=5, mean_session_length=6)
    ev = simulate_events(**kw, seed=3)
    table = generate_sessions(**kw, seed=3)
    # Generation order is already (user, time), so rows line up with the events.
    assert np.array_equal(table.column("item_id").to_numpy(), ev["item_id"])
    assert np.array_equal(table.column("session_id").to_numpy(), ev["session"])
    # A gap longer than any inter-session gap merges each user's sessions into one.
    merged = generate_sessions(**kw, seed=3, session_gap=10**9)
    assert np.array_equal(merged.column("session_id").to_numpy(),
                          merged.column("user_id").to_numpy())


def test_synthetic_label_has_signal() -> None:
    table = generate_sessions(num_users=500, seed=0)
    train, test = split_by_time(table, 0.2)
    y = train.column("label").to_numpy()
    score = np.zeros(test.num_rows)
    for col in ("user_id", "item_id"):  # smoothed target mean encoding
        c, n_emb = train.column(col).to_numpy(), cardinalities(table)[col]
        mean = (np.bincount(c, y, n_emb) + 5 * y.mean()) / (np.bincount(c, None, n_emb) + 5)
        score += mean[test.column(col).to_numpy()]
    yt = test.column("label").to_numpy()
    ranks = np.argsort(np.argsort(score)) + 1
    pos = yt.sum()
    auc = (ranks[yt == 1].sum() - pos * (pos + 1) / 2) / (pos * (len(yt) - pos))
    assert auc > 0.58


# ------------------------------------------------------- sessionization and history
def reference_history(user: List[int], item: List[int], ts: List[int], gap: int,
                      length: int) -> List[List[int]]:
    """Slow pure-Python reference; input sorted by (user, ts)."""
    out, start_ts = [], None
    for i in range(len(user)):
        if i == 0 or user[i] != user[i - 1] or ts[i] - ts[i - 1] > gap:
            start_ts = ts[i]
        before = [item[j] for j in range(len(user)) if user[j] == user[i] and ts[j] < start_ts]
        out.append(before[-length:] if length else [])
    return out


@pytest.mark.parametrize("length", [HISTORY_LENGTH, 3])
def test_history_against_reference(length: int) -> None:
    table = generate_sessions(num_users=12, num_items=40, sessions_per_user=8,
                              mean_session_length=10, seed=5, history_length=length)
    assert table.num_rows > 200  # some users exceed 50 previous items
    cols = {c: table.column(c).to_pylist() for c in ("user_id", "item_id", "timestamp")}
    ref = reference_history(cols["user_id"], cols["item_id"], cols["timestamp"], 1800, length)
    assert table.column("history").to_pylist() == ref
    assert max(map(len, ref)) == length
    assert history_matches_session_start(table)


def tiny_table(user, item, ts, gap: int = 1800, length: int = HISTORY_LENGTH) -> pa.Table:
    """build_session_table on raw events with trivial side tables (ids < 2 users/30 items)."""
    profile = ("user_age", "user_gender", "user_occupation", "user_zip")
    return build_session_table(
        np.asarray(user), np.asarray(item), np.asarray(ts), np.ones(len(user)),
        users={k: np.zeros(4, np.int64) for k in profile},
        item_genres=pa.array([[0]] * 30, pa.list_(pa.int64())), item_year=np.zeros(30),
        item_dense_year=np.zeros(30), source="test",
        cardinalities={"user_id": 4, "user_age": 1, "user_gender": 1, "user_occupation": 1,
                       "user_zip": 1, "item_id": 30, "item_genres": 1, "item_year": 1},
        session_gap=gap, history_length=length)


def test_build_session_table_gap_edges_and_order() -> None:
    # User 1 events given out of order; gaps of exactly 1800 s keep the session.
    table = tiny_table(user=[1, 0, 1, 1, 0, 1, 0], item=[11, 20, 10, 12, 21, 13, 22],
                       ts=[1800, 0, 0, 3601, 5000, 5401, 6801])
    check_format(table)
    assert table.column("item_id").to_pylist() == [20, 21, 22, 10, 11, 12, 13]
    assert table.column("session_id").to_pylist() == [0, 1, 2, 3, 3, 4, 4]
    assert table.column("history").to_pylist() == [[], [20], [20, 21], [], [], [10, 11],
                                                   [10, 11]]


# ------------------------------------------------------------------- TableBatches
def concat_batches(batches) -> dict:
    out = {k: ([], []) for k in SPARSE_FEATURES}
    dense, labels = [], []
    for b in batches:
        assert b.sparse_features.keys() == SPARSE_FEATURES
        assert b.sparse_features.values().dtype == torch.int64
        assert b.sparse_features.lengths().dtype == torch.int32
        assert b.dense_features.dtype == torch.float32 and b.labels.dtype == torch.float32
        assert b.dense_features.shape == (len(b.labels), len(DENSE_FEATURES))
        for k, jt in b.sparse_features.to_dict().items():
            out[k][0].append(jt.values())
            out[k][1].append(jt.lengths())
        dense.append(b.dense_features)
        labels.append(b.labels)
    res = {k: (torch.cat(v), torch.cat(n)) for k, (v, n) in out.items()}
    return dict(sparse=res, dense=torch.cat(dense), labels=torch.cat(labels))


def check_round_trip(table: pa.Table, got: dict) -> None:
    for k in SPARSE_FEATURES:
        values, lengths = got["sparse"][k]
        col = table.column(k).combine_chunks()
        if k in LIST_COLUMNS:
            assert lengths.tolist() == pc_lengths(col)
            assert values.tolist() == col.flatten().to_pylist()
        else:
            assert lengths.tolist() == [1] * table.num_rows
            assert values.tolist() == col.to_pylist()
    dense = np.stack([table.column(c).to_numpy() for c in DENSE_FEATURES], axis=1)
    assert np.array_equal(got["dense"].numpy(), dense)
    assert np.array_equal(got["labels"].numpy(), table.column("label").to_numpy())


def pc_lengths(col: pa.Array) -> List[int]:
    return [len(x) for x in col.to_pylist()]


@pytest.mark.parametrize("start,stop", [(0, None), (37, 700)])
def test_table_batches_round_trip(synthetic: pa.Table, start: int, stop) -> None:
    table = synthetic.slice(start, (stop or synthetic.num_rows) - start)  # sliced buffers
    ds = TableBatches(table, batch_size=100)
    assert len(ds) == -(-table.num_rows // 100) and ds.num_samples == table.num_rows
    check_round_trip(table, concat_batches(ds[i] for i in range(len(ds))))
    assert ds[-1].labels.shape[0] == ds[len(ds) - 1].labels.shape[0]
    with pytest.raises(IndexError):
        ds[len(ds)]
    dropped = TableBatches(table, batch_size=100, drop_last=True)
    assert len(dropped) == table.num_rows // 100
    assert all(dropped[i].labels.shape[0] == 100 for i in range(len(dropped)))


def test_table_batches_dataloader_workers(synthetic: pa.Table) -> None:
    table = synthetic.slice(0, 2000)
    ds = pickle.loads(pickle.dumps(TableBatches(table, batch_size=256)))
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2)
    check_round_trip(table, concat_batches(loader))


def test_split_by_time(synthetic: pa.Table) -> None:
    train, test = split_by_time(synthetic, 0.25)
    assert train.num_rows + test.num_rows == synthetic.num_rows
    assert abs(test.num_rows / synthetic.num_rows - 0.25) < 0.01
    assert train.column("timestamp").to_numpy().max() < test.column("timestamp").to_numpy().min()
    for part in (train, test):  # stored order kept
        assert np.all(np.diff(part.column("session_id").to_numpy()) >= 0)
        assert cardinalities(part) == cardinalities(synthetic)
    assert split_by_time(synthetic, 0.0)[1].num_rows == 0
    with pytest.raises(ValueError):
        split_by_time(synthetic, 1.0)


# ------------------------------------------------------------- MovieLens loader
def write_grouplens(dest: Path, users, items, ratings) -> None:
    """users: (id, age, gender, occ, zip); items: (id, title, year or '', [genre names]);
    ratings: (user, item, rating, ts)."""
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "u.user").write_text("".join("|".join(map(str, u)) + "\n" for u in users))
    lines = []
    for iid, title, year, genres in items:
        flags = ["1" if g in genres else "0" for g in GENRES]
        date = f"01-Jan-{year}" if year else ""
        lines.append("|".join([str(iid), title, date, "", "http://x"] + flags) + "\n")
    (dest / "u.item").write_bytes("".join(lines).encode("latin-1", "replace"))
    (dest / "u.data").write_text("".join("\t".join(map(str, r)) + "\n" for r in ratings))


def recbole_to_grouplens(src: Path, dest: Path) -> None:
    def rows(name):
        lines = (src / name).read_text(encoding="utf8").splitlines()
        return [line.split("\t") for line in lines[1:] if line]
    items = [(r[0], r[1], r[2] if r[2].isdigit() else "", r[3].split()) for r in
             rows("ml-100k.item")]
    write_grouplens(dest, rows("ml-100k.user"), items,
                    [(u, i, int(float(r)), int(float(t))) for u, i, r, t in
                     rows("ml-100k.inter")])


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    root = tmp_path / "gl"
    write_grouplens(root, [(1, 24, "M", "writer", "85711"), (5, 61, "F", "other", "T8H1N")],
                    [(1, "A (1995)", 1995, ["Action", "Comedy"]), (2, "B", "", ["unknown"])],
                    [(5, 2, 4, 100), (1, 1, 3, 5000), (1, 2, 5, 10)])
    return root


def test_loader_tiny_grouplens(tiny: Path) -> None:
    table = load_movielens_100k(tiny, download=False)
    check_format(table)
    assert table.column("user_id").to_pylist() == [0, 0, 1]
    assert table.column("item_id").to_pylist() == [1, 0, 1]
    assert table.column("label").to_pylist() == [1.0, 0.0, 1.0]
    assert table.column("user_zip").to_pylist() == [85, 85, 100]
    assert table.column("user_age").to_pylist() == [1, 1, 6]
    assert table.column("item_year").to_pylist() == [0, 1, 0]  # 0 = unknown year
    assert table.column("item_genres").to_pylist() == [[0], [1, 5], [0]]
    assert table.column("history").to_pylist() == [[], [1], []]


def test_loader_errors(tiny: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="u.data"):
        load_movielens_100k(tmp_path / "nothing", download=False)
    (tiny / "u.item").unlink()
    with pytest.raises(MovieLensNotFoundError, match="u.item"):
        load_movielens_100k(tiny, download=True)  # partial copy: no download over it
    bad = tmp_path / "bad"
    write_grouplens(bad, [(1, 24, "M", "x", "1")], [(1, "A", 1995, [])], [(1, 1, 3, 5)])
    with open(bad / "u.data", "a") as f:
        f.write("1\t1\t3\n")
    with pytest.raises(MovieLensFormatError, match="u.data"):
        load_movielens_100k(bad, download=False)
    (bad / "u.data").write_text("1\t7\t3\t5\n")
    with pytest.raises(ValueError, match="unknown item id 7"):
        load_movielens_100k(bad, download=False)
    rb = tmp_path / "rb"
    rb.mkdir()
    (rb / "ml-100k.inter").write_text("user_id:token\titem_id:token\trating:float\n1\t1\t3\n")
    (rb / "ml-100k.user").write_text("user_id:token\n1\n")
    (rb / "ml-100k.item").write_text("item_id:token\n1\n")
    with pytest.raises(MovieLensFormatError, match="'timestamp'"):
        load_movielens_100k(rb, download=False)


def test_fetch_falls_back_and_installs_atomically(tmp_path: Path, monkeypatch) -> None:
    def offline(tmp, timeout):
        raise OSError("offline")

    def fake_wheel(tmp):
        for name in ml.RECBOLE_FILES:
            (tmp / name).write_text(name)

    monkeypatch.setattr(ml, "_fetch_grouplens", offline)
    monkeypatch.setattr(ml, "_fetch_recbole", fake_wheel)
    for dest in (tmp_path / "new", tmp_path / "existing"):
        if dest.name == "existing":
            dest.mkdir()
            (dest / "keep.txt").write_text("x")
        assert fetch_movielens_100k(dest) == dest
        assert sorted(p.name for p in dest.iterdir() if p.name != "keep.txt") == sorted(
            ml.RECBOLE_FILES)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing", "new"]  # no tmp left


def test_movielens_real(movielens: pa.Table) -> None:
    check_format(movielens)
    card = cardinalities(movielens)
    assert movielens.num_rows == 100_000
    assert (card["user_id"], card["item_id"]) == (943, 1682)
    assert len(np.unique(movielens.column("user_id").to_numpy())) == 943
    assert history_matches_session_start(movielens)
    sid = movielens.column("session_id").to_numpy()
    unique = [len(np.unique(sid[i:i + 1024])) / len(sid[i:i + 1024])
              for i in range(0, len(sid), 1024)]
    assert np.mean(unique) < 0.1  # sessions cluster: batches are highly duplicated


def test_movielens_layouts_agree(movielens: pa.Table, tmp_path: Path) -> None:
    root = default_root()
    if not (root / "ml-100k.inter").is_file():
        pytest.skip("cached copy is not in the RecBole layout")
    recbole_to_grouplens(root, tmp_path / "gl")
    grouplens = load_movielens_100k(tmp_path / "gl", download=False)
    assert grouplens.num_rows == movielens.num_rows
    assert grouplens.column("label").equals(movielens.column("label"))
    assert grouplens.equals(movielens, check_metadata=True)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 29), st.integers(0, 20)),
                min_size=1, max_size=60),
       st.integers(0, 4))
def test_history_property(events, length: int) -> None:
    """Random events (unsorted, timestamp ties, gaps around the limit) vs the reference."""
    user, item, step = map(list, zip(*events))
    ts = [s * 300 for s in step]  # multiples of 300 s: gaps of exactly 1800 s occur
    table = tiny_table(user, item, ts, gap=1800, length=length)
    rows = sorted(zip(user, ts, item))
    u, t, i = (list(x) for x in zip(*rows))
    assert table.column("item_id").to_pylist() == i
    assert table.column("history").to_pylist() == reference_history(u, i, t, 1800, length)
    check_format(table)
