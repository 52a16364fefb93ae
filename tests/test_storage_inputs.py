"""The user's Parquet input, read by one helper for every tool, and the storage spec taken
from the caller (no data set's schema in storage/)."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import List

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import recd_plugin.storage as storage_pkg
from recd_plugin.analyze.sources import load_sample
from recd_plugin.cli import main
from recd_plugin.config import RecDConfig
from recd_plugin.data import generate_sessions, storage_roles
from recd_plugin.errors import AnalyzeError, HotSetError, StorageError
from recd_plugin.fae.access import iter_accesses
from recd_plugin.storage import DedupReader, StorageSpec, epoch_check, preprocess
from recd_plugin.storage.parquet_input import ParquetInput, open_parquet

FLAG = "groups.user.key=session_id; groups.user.features=user_id,user_age,history"


@pytest.fixture(scope="module")
def table() -> pa.Table:
    return generate_sessions(num_users=40, num_items=60, seed=3)


def _three_readers(path: Path) -> List:
    """The three tools' reads of a Parquet path, each with its own error class."""
    return [
        (StorageError, lambda: preprocess(path, path.parent / "out", StorageSpec(**storage_roles()), progress=False)),
        (HotSetError, lambda: list(iter_accesses(path, ["user_id"]))),
        (AnalyzeError, lambda: load_sample(str(path), progress=False)),
    ]


def _raises_in_every_tool(path: Path, message: str) -> None:
    for cls, read in _three_readers(path):
        with pytest.raises(cls, match=message):
            read()


def test_missing_empty_and_not_parquet_read_alike_in_every_tool(tmp_path: Path) -> None:
    _raises_in_every_tool(tmp_path / "missing.parquet", "missing.parquet: no such Parquet file or directory")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "_SUCCESS").write_text("")
    _raises_in_every_tool(empty, "no \\*.parquet files in this directory; the input is empty")
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"PAR1 this is not parquet")
    _raises_in_every_tool(bad, "bad.parquet: not a readable Parquet file .*re-export it")


def test_missing_column_names_the_closest_and_the_fix(tmp_path: Path, table: pa.Table) -> None:
    path = tmp_path / "t.parquet"
    pq.write_table(table.rename_columns([c if c != "user_id" else "userid" for c in table.column_names]), path)
    with pytest.raises(HotSetError, match="missing column 'user_id' \\(did you mean 'userid'\\?\\).*--tables"):
        list(iter_accesses(path, ["user_id"]))
    with pytest.raises(StorageError, match="missing column 'user_id'.*name the input's own columns in the StorageSpec"):
        preprocess(path, tmp_path / "out", StorageSpec(**storage_roles()), progress=False)
    with pytest.raises(AnalyzeError, match="t.parquet: missing column 'user_id' \\(did you mean 'userid'\\?\\)"):
        open_parquet(path, ["label", "user_id"], error=AnalyzeError)


def test_files_of_a_directory_must_share_one_schema(tmp_path: Path, table: pa.Table) -> None:
    pq.write_table(table.slice(0, 100), tmp_path / "a.parquet")
    pq.write_table(table.slice(100, 100).drop_columns(["label"]), tmp_path / "b.parquet")
    with pytest.raises(HotSetError, match="b.parquet: schema differs from .*a.parquet: column 'label' is missing"):
        open_parquet(tmp_path, error=HotSetError)


def test_reading_stops_once_the_sample_is_full(tmp_path: Path, table: pa.Table, monkeypatch) -> None:
    for i in range(3):
        pq.write_table(table.slice(i * 300, 300), tmp_path / f"part-{i}.parquet", row_group_size=100)
    opened: List[str] = []
    real = ParquetInput.read_file

    def counting(self, path, batch_rows, columns=None):
        opened.append(Path(path).name)
        return real(self, path, batch_rows, columns)

    monkeypatch.setattr(ParquetInput, "read_file", counting)
    parquet = open_parquet(tmp_path, ["user_id"])
    assert parquet.num_rows == 900 and parquet.files[0].name == "part-0.parquet"
    got = [b for _, b in parquet.batches(64, columns=["user_id"], max_rows=250)]
    assert sum(b.num_rows for b in got) == 250 and got[0].schema.names == ["user_id"]
    assert opened == ["part-0.parquet"]  # the other files are never read
    sample = load_sample(str(tmp_path), max_rows=450, progress=False)
    assert sample.rows == 450 and sample.total_rows == 900
    assert opened[1:] == ["part-0.parquet", "part-1.parquet"]


# ---- the spec comes from the caller -------------------------------------------------------

def test_storage_imports_no_data_set_schema() -> None:
    """storage/ may use data/'s generic column helpers, never a data set's column names."""
    for path in Path(storage_pkg.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                assert node.module not in ("recd_plugin.data", "recd_plugin.data.sessions",
                                           "recd_plugin.data.movielens", "recd_plugin.data.synthetic",
                                           "recd_plugin.data.builtin"), f"{path.name} imports {node.module}"


def test_spec_roles_are_required(tmp_path: Path, table: pa.Table) -> None:
    with pytest.raises(TypeError):
        StorageSpec(session_key="session_id")  # type: ignore[call-arg]
    with pytest.raises(StorageError, match="preprocess needs the column roles of the input as a StorageSpec.*"
                                           "storage_roles"):
        preprocess(table, tmp_path / "out")
    with pytest.raises(StorageError, match="StorageSpec.item_key must be a column name"):
        StorageSpec(**dict(storage_roles(), item_key=""))
    assert not (tmp_path / "out").exists()


def test_spec_from_the_flag() -> None:
    rest = dict(item_key="item_id", sparse_features=["user_id", "item_id"], dense_features=[], label="label")
    spec = StorageSpec.from_config(RecDConfig.from_string(FLAG), **rest, order_by="timestamp")
    assert (spec.session_key, spec.session_columns) == ("session_id", ("user_id", "user_age", "history"))
    assert spec.item_columns == () and spec.order_by == "timestamp"
    both = RecDConfig.from_string(FLAG + "; groups.item.key=item_id; groups.item.features=item_genres,item_year")
    spec = StorageSpec.from_config(both, **rest)
    assert spec.session_key == "session_id" and spec.item_columns == ("item_genres", "item_year")
    two = RecDConfig.from_string(FLAG + "; groups.visit.key=visit_id; groups.visit.features=device")
    with pytest.raises(StorageError, match="2 keyed groups.*--group NAME"):
        StorageSpec.from_config(two, **rest)
    assert StorageSpec.from_config(two, group="visit", **rest).session_key == "visit_id"
    with pytest.raises(StorageError, match="no keyed group 'usr' \\(did you mean 'user'\\?\\)"):
        StorageSpec.from_config(two, group="usr", **rest)


def test_cli_preprocess_of_parquet_takes_its_roles_from_the_options(tmp_path: Path, table: pa.Table,
                                                                     capsys) -> None:
    src = tmp_path / "events.parquet"
    pq.write_table(table, src)
    out = tmp_path / "layout"
    assert main(["preprocess", str(src), str(out)]) == 2
    err = capsys.readouterr().err
    assert "needs its column roles: give --recd FLAG (or --session-key COL), --item-key COL, --sparse" in err
    assert not out.exists()
    sparse = "session_id,user_id,user_age,history,item_id"
    assert main(["preprocess", str(src), str(out), "--recd", FLAG, "--item-key", "item_id", "--sparse", sparse,
                 "--dense", "dense_hour", "--order-by", "timestamp", "--history", "history",
                 "--user-key", "user_id"]) == 0, capsys.readouterr().err
    reader = DedupReader(out, 64)
    assert reader.spec.session_columns == ("user_id", "user_age", "history")
    assert reader.spec.sparse_features == tuple(sparse.split(","))
    assert epoch_check(reader, source=table).samples == table.num_rows
    # the same roles without a flag
    assert main(["preprocess", str(src), str(tmp_path / "b"), "--session-key", "session_id", "--session-columns",
                 "user_id", "--item-key", "item_id", "--sparse", "user_id,item_id"]) == 0
    assert main(["preprocess", str(src), str(tmp_path / "c"), "--recd", FLAG, "--session-key", "session_id",
                 "--item-key", "item_id", "--sparse", "user_id"]) == 2
    assert "give the session columns once" in capsys.readouterr().err
