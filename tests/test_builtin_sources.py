"""The built-in data sources: one registry (``recd_plugin.data.builtin``), the same names in
every command (preprocess, profile, analyze), one "did you mean" for a misspelt name, and a
clear refusal naming the usable sources where a command cannot take one."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pyarrow as pa
import pytest

from recd_plugin.analyze.sources import load_sample
from recd_plugin.cli import main
from recd_plugin.data import builtin, generate_sessions
from recd_plugin.data.builtin import BuiltinSource, builtin_names, builtin_source, resolve_data
from recd_plugin.errors import AnalyzeError, DataSourceError, HotSetError, StorageError

NAMES = ("synthetic", "movielens-100k", "criteo-synthetic", "criteo-sessions")


def _small_common_format(num_samples: int, seed: int, max_rows: int) -> pa.Table:
    return generate_sessions(num_users=40, num_items=60, seed=seed)


@pytest.fixture
def small_sources(monkeypatch: pytest.MonkeyPatch) -> None:
    """The two common-format sources made small and offline (MovieLens would be fetched):
    these tests are about dispatch, not about the data."""
    for name in ("synthetic", "movielens-100k"):
        monkeypatch.setitem(builtin._SOURCES, name,
                            dataclasses.replace(builtin._SOURCES[name], loader=_small_common_format))


def test_registry_names_and_lookup() -> None:
    assert builtin_names() == NAMES
    for name in NAMES:
        assert isinstance(builtin_source(name), BuiltinSource) and resolve_data(name) is builtin_source(name)
    with pytest.raises(DataSourceError, match="unknown data source 'movielens-1m' .*did you mean 'movielens-100k'"):
        builtin_source("movielens-1m")
    with pytest.raises(HotSetError, match="did you mean 'criteo-sessions'"):  # the caller's class
        resolve_data("criteo-session", HotSetError)
    # Paths: anything with a separator or a suffix, or that exists, is left to the Parquet reader.
    assert resolve_data("events.parquet") == Path("events.parquet")
    assert resolve_data("data/events") == Path("data/events")


def test_loaders_take_the_same_keywords_and_report_cardinalities(small_sources: None) -> None:
    for name in NAMES:
        data = builtin_source(name).load(num_samples=96, seed=1, max_rows=500)
        assert data.table.num_rows > 0 and data.cardinalities
        assert set(data.cardinalities) <= set(data.table.column_names)
    criteo = builtin_source("criteo-sessions").load(num_samples=96, max_rows=500)
    assert criteo.table.num_rows == 96 and max(criteo.cardinalities.values()) == 500
    batches, cards = builtin_source("criteo-sessions").batches(3, 32, max_rows=500)
    assert len(list(batches)) == 3 and cards == criteo.cardinalities
    assert builtin_source("synthetic").batches(3, 32) is None  # no lazy form: batch the table


def test_storage_roles_or_a_refusal_naming_the_usable_sources() -> None:
    from recd_plugin.storage import StorageSpec

    for name in ("synthetic", "movielens-100k"):
        assert StorageSpec(**builtin_source(name).storage_roles()).session_key == "session_id"
    for name in ("criteo-synthetic", "criteo-sessions"):
        with pytest.raises(StorageError, match=f"{name} cannot be preprocessed: it has no item column.*"
                                               "preprocess takes: synthetic, movielens-100k"):
            builtin_source(name).storage_roles(StorageError)


@pytest.mark.parametrize("name", NAMES)
def test_every_command_takes_every_name(name: str, small_sources: None, tmp_path: Path, capsys) -> None:
    # analyze: the sample of the source
    sample = load_sample(name, max_rows=300, progress=False)
    assert sample.rows == 300 and sample.sparse
    # profile: a hot set (criteo-*: --batches x --batch-size samples, tables capped at --max-rows)
    out = tmp_path / "fae"
    assert main(["profile", name, "--budget", "1%", "--batches", "2", "--batch-size", "128", "--max-rows",
                 "1000", "--sample", "1", "--no-progress", "--out", str(out)]) == 0, capsys.readouterr().err
    assert (out / "hot.npz").exists()
    # preprocess: the sources with a session key and an item key; the others refused by name
    rc = main(["preprocess", name, str(tmp_path / "layout")])
    err = capsys.readouterr().err
    if builtin_source(name).roles is not None:
        assert rc == 0 and (tmp_path / "layout" / "manifest.json").exists()
    else:
        assert rc == 2 and "cannot be preprocessed" in err and "synthetic, movielens-100k" in err
        assert not (tmp_path / "layout").exists()


def test_every_command_refuses_a_misspelt_name_alike(tmp_path: Path, capsys) -> None:
    commands = [["preprocess", "criteo-synthtic", str(tmp_path / "o")],
                ["profile", "criteo-synthtic", "--budget", "1%", "--out", str(tmp_path / "p")],
                ["analyze", "criteo-synthtic", "--out", str(tmp_path / "a"), "--no-progress"]]
    for argv in commands:
        assert main(argv) == 2
        assert "unknown data source 'criteo-synthtic' (did you mean 'criteo-synthetic'?)" in capsys.readouterr().err
    with pytest.raises(AnalyzeError, match="did you mean 'criteo-synthetic'"):
        load_sample("criteo-synthtic", progress=False)


def test_preprocess_refuses_role_options_for_a_builtin_source(tmp_path: Path, capsys) -> None:
    assert main(["preprocess", "synthetic", str(tmp_path / "o"), "--item-key", "item_id"]) == 2
    assert "built-in source with its own column roles: drop --item-key" in capsys.readouterr().err
