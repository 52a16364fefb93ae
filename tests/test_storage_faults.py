"""Fault injection on the stored layout: flipped bits, edited manifests, inconsistent files, bad
input values, interrupted commits (in process; killed processes: integration_tests).

Every case must either read exactly the samples preprocess wrote, or raise StorageError naming
the file and the fix (rewrite with preprocess) before the first batch of that file.
"""

from __future__ import annotations

import importlib
import json
import shutil
from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from recd_plugin.data import generate_sessions, storage_roles
from recd_plugin.storage import (
    DedupReader, FlatReader, StorageError, StorageSpec, epoch_check, preprocess, read_manifest, write_flat,
)
from recd_plugin.storage.commit import commit, journal_path, lock_path, temp_dir, writer_lock
from recd_plugin.storage.layout import CHECKSUM, MANIFEST, manifest_digest, write_manifest, write_table

SPEC = StorageSpec(**storage_roles())
Signature = List[Tuple[bytes, ...]]


@pytest.fixture(scope="module")
def table() -> pa.Table:
    return generate_sessions(num_users=40, num_items=60, seed=1)


@pytest.fixture(scope="module")
def base(table: pa.Table, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("faults") / "ds"
    preprocess(table, out, SPEC, rows_per_file=400, row_group_rows=128, progress=False)
    return out


def signature(path: Path, verify: bool = True) -> Signature:
    """Every batch's bytes (IKJT values, lengths, inverse indices, dense, labels), in order."""
    out = []
    for b in DedupReader(path, 50, verify_checksums=verify):
        kjt = b.sparse_features
        out.append(tuple(t.numpy().tobytes() for t in (kjt.values(), kjt.lengths(), kjt.inverse_indices()[1],
                                                        b.dense_features, b.labels)))
    return out


@pytest.fixture(scope="module")
def reference(base: Path) -> Signature:
    return signature(base)


def _files(path: Path) -> List[str]:
    m = read_manifest(path)
    return [f["path"] for t in ("sessions", "events", "items") for f in m.files[t]] + [MANIFEST]


def _copy(base: Path, dest: Path) -> Path:
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(base, dest)
    return dest


def _exact_or_refused(path: Path, reference: Signature, rel: str, verify: bool = True) -> str:
    """'exact' or 'refused' (StorageError naming ``rel`` and the fix); anything else fails."""
    try:
        got = signature(path, verify)
    except StorageError as e:
        assert rel in str(e) and "preprocess" in str(e), str(e)
        return "refused"
    assert got == reference, f"flip in {rel} silently changed the samples"
    return "exact"


# ---- item 4: flipped bits --------------------------------------------------------------------

@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_a_flipped_bit_anywhere_is_refused(base: Path, reference: Signature, tmp_path: Path,
                                           data: st.DataObject) -> None:
    rel = data.draw(st.sampled_from(_files(base)), "file")
    work = _copy(base, tmp_path / "ds")
    raw = bytearray((work / rel).read_bytes())
    pos = data.draw(st.integers(0, len(raw) - 1), "byte")
    raw[pos] ^= 1 << data.draw(st.integers(0, 7), "bit")
    (work / rel).write_bytes(bytes(raw))
    # The sha256 covers every byte of the file (the manifest: its own), so no flip is ever read.
    assert _exact_or_refused(work, reference, rel) == "refused"


def test_flips_without_content_checksums_are_exact_or_refused(base: Path, reference: Signature,
                                                              tmp_path: Path) -> None:
    """The speed switch (verify_checksums=False) still has Parquet page CRCs, row counts and the
    reference checks: over a seeded sweep of every file, no flip gives wrong samples."""
    rng = np.random.default_rng(0)
    outcomes = {"exact": 0, "refused": 0}
    for rel in _files(base)[:-1]:
        size = (base / rel).stat().st_size
        for pos in rng.choice(size, 12, replace=False):
            work = _copy(base, tmp_path / "ds")
            raw = bytearray((work / rel).read_bytes())
            raw[int(pos)] ^= 1 << int(rng.integers(8))
            (work / rel).write_bytes(bytes(raw))
            outcomes[_exact_or_refused(work, reference, rel, verify=False)] += 1
    assert outcomes["refused"] > 0


def _flip_in_page(path: Path, column: str) -> None:
    """Flip the last byte of ``column``'s first column chunk: page data, not a page header."""
    rg = pq.ParquetFile(path).metadata.row_group(0)
    chunk = next(rg.column(c) for c in range(rg.num_columns) if rg.column(c).path_in_schema == column)
    end = (chunk.dictionary_page_offset or chunk.data_page_offset) + chunk.total_compressed_size
    raw = bytearray(path.read_bytes())
    raw[end - 1] ^= 0x01
    path.write_bytes(bytes(raw))


def test_page_checksums_are_written_and_verified(base: Path, tmp_path: Path) -> None:
    work = _copy(base, tmp_path / "ds")
    rel = read_manifest(work).files["events"][0]["path"]
    _flip_in_page(work / rel, "label")
    with pytest.raises(StorageError, match=f"{rel}: cannot read .*CRC checksum verification failed"):
        signature(work, verify=False)
    flat = tmp_path / "flat.parquet"
    write_flat(generate_sessions(num_users=5, num_items=10, seed=0), flat)
    _flip_in_page(flat, "label")
    with pytest.raises(StorageError, match="flat.parquet: cannot read .*CRC checksum verification failed"):
        list(FlatReader(flat, 16, SPEC))


def test_truncated_file_is_refused_at_open(base: Path, tmp_path: Path) -> None:
    work = _copy(base, tmp_path / "ds")
    rel = read_manifest(work).files["items"][0]["path"]
    (work / rel).write_bytes((work / rel).read_bytes()[:-100])
    with pytest.raises(StorageError, match=f"{rel}.*different size.*preprocess"):
        DedupReader(work, 50)


# ---- item 4: edited manifests, checked before the first batch --------------------------------

def _edit(path: Path, change: Callable[[Dict[str, Any]], None], sign: bool = True) -> None:
    """Edit the manifest; ``sign``: and recompute its own checksum, as a tool that rewrites
    manifests would, so that only the consistency checks stand between the edit and the reader."""
    d = json.loads((path / MANIFEST).read_text())
    d.pop(CHECKSUM)
    change(d)
    if sign:
        d[CHECKSUM] = manifest_digest(d)
    (path / MANIFEST).write_text(json.dumps(d))


def _fewer_rows(d: Dict[str, Any], consistent: bool) -> None:
    """3 rows removed from one events file's count (and, if ``consistent``, from the totals
    and the later files' first_row, so only the file itself disagrees)."""
    files = d["files"]["events"]
    files[1]["rows"] -= 3
    if consistent:
        d["totals"]["samples"] -= 3
        for f in files[2:]:
            f["first_row"] -= 3


EDITS: Dict[str, Tuple[Callable[[Dict[str, Any]], None], str]] = {
    "rows_only": (lambda d: _fewer_rows(d, False), "first_row is .* but the files before it hold"),
    "rows_consistent": (lambda d: _fewer_rows(d, True), "events/part-00001.parquet: the file holds .* rows but the "
                                                        "manifest says"),
    "totals": (lambda d: d["totals"].update(items=d["totals"]["items"] + 1), "totals\\['items'\\]"),
    "first_row": (lambda d: d["files"]["sessions"][1].update(first_row=0), "sessions/part-00001.*first_row"),
    "checksum": (lambda d: d["files"]["items"][0].update({CHECKSUM: "0" * 64}), "items/part-00000.*checksum"),
    "no_checksum": (lambda d: d["files"]["events"][0].pop(CHECKSUM), "lacks one of"),
    "no_first_row": (lambda d: d["files"]["sessions"][0].pop("first_row"), "lacks one of"),
    "swapped_paths": (lambda d: d["files"]["events"].reverse(), "first_row|rows"),
    "path_escape": (lambda d: d["files"]["items"][0].update(path="../x.parquet"), "not a file of the items/"),
    "label_sum_nan": (lambda d: d["totals"].update(label_sum=float("nan")), "label_sum"),
    "files_not_a_list": (lambda d: d["files"].update(items={}), "not a list"),
    "schema_not_pairs": (lambda d: d["schema"].update(items=["x"]), "schema"),
    "schema_column": (lambda d: d["schema"]["items"].append(["extra", "int64"]), "columns .* differ"),
    "version_1": (lambda d: d.update(format_version=1), "format version 1.*checksums.*overwrite=True"),
    "files_list": (lambda d: d.update(files=[]), "malformed manifest"),
}


@pytest.mark.parametrize("edit", sorted(EDITS))
def test_edited_manifest_is_refused_before_any_batch(base: Path, tmp_path: Path, edit: str) -> None:
    change, message = EDITS[edit]
    work = _copy(base, tmp_path / "ds")
    _edit(work, change, sign=False)
    with pytest.raises(StorageError, match="format version 1|manifest.json is damaged or was edited.*overwrite=True"):
        DedupReader(work, 50)
    work = _copy(base, tmp_path / "ds")
    _edit(work, change)
    with pytest.raises(StorageError, match=message) as e:
        next(iter(DedupReader(work, 50)))  # refused before the first batch
    assert "preprocess" in str(e.value)


# ---- item 16: layouts whose files pass their checksums but do not fit together ---------------

def _rewrite(path: Path, rel: str, change: Callable[[pa.Table], pa.Table]) -> None:
    """Replace data file ``rel`` by ``change(its table)`` and record it in the manifest (valid
    checksum, size and rows), so that only the layout's own consistency checks remain."""
    written_table = change(pq.read_table(path / rel))
    written = write_table(written_table, path / rel)
    manifest = read_manifest(path, check_files=False)
    for files in manifest.files.values():
        for f in files:
            if f["path"] == rel:
                f.update(bytes=written.bytes, rows=written_table.num_rows, **{CHECKSUM: written.sha256})
    write_manifest(path, manifest)


def _set(column: str, values: Callable[[np.ndarray], np.ndarray]) -> Callable[[pa.Table], pa.Table]:
    def change(t: pa.Table) -> pa.Table:
        i = t.schema.get_field_index(column)
        return t.set_column(i, column, pa.array(values(t.column(column).to_numpy().copy()), t.schema.field(i).type))
    return change


def _bump_last(v: np.ndarray, by: int) -> np.ndarray:
    v[-1] += by
    return v


INCONSISTENT: Dict[str, Tuple[str, int, Callable[[pa.Table], pa.Table], str]] = {
    # (table, file index, change, expected message)
    "session_row_past_file": ("events", 0, _set("session_row", lambda v: _bump_last(v, 10_000)),
                              "'session_row' holds .* outside"),
    "session_row_negative": ("events", 1, _set("session_row", lambda v: v - 10_000), "'session_row' holds"),
    "item_row_past_items": ("events", 0, _set("item_row", lambda v: _bump_last(v, 10_000)), "'item_row' holds"),
    "events_out_of_order": ("events", 0, _set("session_row", lambda v: v[::-1]), "not stored in session order"),
    "session_without_events": ("events", 0, _set("session_row", lambda v: np.full_like(v, v[0])), "have no events"),
    "history_past_file": ("sessions", 0, _set("history_start", lambda v: v + 10_000),
                          "history reference .* points outside"),
    "history_negative_len": ("sessions", 0, _set("history_len", lambda v: v - 100), "history reference"),
}


@pytest.mark.parametrize("case", sorted(INCONSISTENT))
def test_inconsistent_layout_raises_storage_error(base: Path, tmp_path: Path, case: str) -> None:
    table_name, index, change, message = INCONSISTENT[case]
    work = _copy(base, tmp_path / "ds")
    rel = read_manifest(work).files[table_name][index]["path"]
    _rewrite(work, rel, change)
    with pytest.raises(StorageError, match=message) as e:
        signature(work)
    assert "inconsistent layout" in str(e.value) and "overwrite=True" in str(e.value)


def test_a_dropped_column_is_refused_at_open(base: Path, tmp_path: Path) -> None:
    work = _copy(base, tmp_path / "ds")
    rel = read_manifest(work).files["items"][0]["path"]
    _rewrite(work, rel, lambda t: t.drop_columns(["item_year"]))
    with pytest.raises(StorageError, match=f"{rel}: columns .* differ"):
        DedupReader(work, 50)


def test_backstop_names_the_file_for_any_other_raw_error(base: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    work = _copy(base, tmp_path / "ds")
    reader = DedupReader(work, 50)
    monkeypatch.setattr(DedupReader, "_session_counts", lambda *a: (_ for _ in ()).throw(IndexError("boom")))
    with pytest.raises(StorageError, match="events/part-00000.parquet: inconsistent layout: IndexError"):
        list(reader)


# ---- item 21: nulls refused at preprocess, before anything is written ------------------------

def _with_nulls(table: pa.Table, column: str, inside: bool = False) -> pa.Table:
    values = table.column(column).to_pylist()
    if inside:
        row = next(i for i, v in enumerate(values) if v)
        values[row] = [None] + values[row][1:]
    else:
        values[5] = values[17] = None
    return table.set_column(table.schema.get_field_index(column), column,
                            pa.array(values, table.schema.field(column).type))


NULL_CASES = [("session_id", False, "the session key", 2), ("item_id", False, "the item key", 2),
              ("user_id", False, "the user key", 2), ("label", False, "the label", 2),
              ("dense_hour", False, "a dense feature", 2), ("user_age", False, "a sparse feature", 2),
              ("history", False, "the history", 2), ("history", True, "the history", 1),
              ("item_genres", False, "a sparse feature", 2), ("timestamp", False, "the order_by key", 2)]


@pytest.mark.parametrize("source_kind", ["table", "file", "dataset"])
@pytest.mark.parametrize("column,inside,role,n", NULL_CASES)
def test_nulls_are_refused_before_anything_is_written(table: pa.Table, tmp_path: Path, column: str,
                                                      inside: bool, role: str, n: int, source_kind: str) -> None:
    bad = _with_nulls(table, column, inside)
    source: Any = bad
    if source_kind != "table":
        pq.write_table(bad, tmp_path / "in.parquet")
        source = tmp_path / "in.parquet"
        if source_kind == "dataset":
            source = ds.dataset(str(source), format="parquet")
    out = tmp_path / "out"
    what = f"{n} null values inside its lists" if inside else f"{n} null rows"
    with pytest.raises(StorageError, match=f"column '{column}' \\({role}\\) has {what}.*fill or drop"):
        preprocess(source, out, SPEC, progress=False, rows_per_file=300)
    assert sorted(p.name for p in tmp_path.iterdir()) == (["in.parquet"] if source_kind != "table" else [])


def test_flat_column_nulls_in_a_file_are_refused_from_its_footer(table: pa.Table, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Flat columns with statistics fail before a single data page is read or written."""
    pq.write_table(_with_nulls(table, "label"), tmp_path / "in.parquet")
    pre = importlib.import_module("recd_plugin.storage.preprocess")  # the module, not the function
    monkeypatch.setattr(pre, "_write_all", lambda *a, **k: pytest.fail("preprocess started writing"))
    with pytest.raises(StorageError, match="in.parquet: column 'label'"):
        preprocess(tmp_path / "in.parquet", tmp_path / "out", SPEC, progress=False)


# ---- item 17: NaN labels ---------------------------------------------------------------------

def _nan_labels(table: pa.Table, rows: List[int]) -> pa.Table:
    y = table.column("label").to_numpy().copy()
    y[rows] = np.nan
    return table.set_column(table.schema.get_field_index("label"), "label", pa.array(y))


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_preprocess_refuses_nan_labels(table: pa.Table, tmp_path: Path, value: float) -> None:
    y = table.column("label").to_numpy().copy()
    y[[3, 900]] = value
    bad = table.set_column(table.schema.get_field_index("label"), "label", pa.array(y))
    pq.write_table(bad, tmp_path / "in.parquet")
    for source in (bad, tmp_path / "in.parquet"):
        with pytest.raises(StorageError, match="label column 'label' has 2 NaN or infinite values"):
            preprocess(source, tmp_path / "out", SPEC, progress=False, rows_per_file=300)
    assert [p.name for p in tmp_path.iterdir()] == ["in.parquet"]


def test_epoch_check_counts_nan_labels_instead_of_reporting_loss(table: pa.Table, tmp_path: Path) -> None:
    bad = _nan_labels(table, [0, 10, 500])
    flat = tmp_path / "flat.parquet"
    write_flat(bad, flat, row_group_rows=100)
    report = epoch_check(FlatReader(flat, 64, SPEC), source=bad)
    assert report.samples == bad.num_rows and report.nan_labels == 3
    assert report.label_sum == pytest.approx(float(np.nansum(bad.column("label").to_numpy())))
    batches = list(FlatReader(flat, 64, SPEC))
    with pytest.raises(StorageError, match="lost 64 samples"):
        epoch_check(batches[1:], source=bad)
    altered = list(batches)
    altered[0].labels[0] = 0.0  # a NaN label replaced: same count, one NaN fewer
    with pytest.raises(StorageError, match="delivered 2 NaN labels but the source has 3"):
        epoch_check(altered, source=bad)


# ---- item 5: the overwrite commit (in process; killed processes: integration_tests) ---------

def _hidden(parent: Path) -> List[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_overwrite_interrupted_between_renames_is_finished_by_the_next_open(base: Path, tmp_path: Path,
                                                                           reference: Signature,
                                                                           table: pa.Table) -> None:
    out = tmp_path / "ds"
    preprocess(table.slice(0, 300), out, SPEC, progress=False)  # the old dataset
    new = _copy(base, temp_dir(out))  # a complete new copy, as preprocess leaves it before commit
    # The state after the commit's first rename (old copy moved aside), as a kill leaves it:
    old_name = f".ds.old-{'ab' * 4}"
    journal_path(out).write_text(json.dumps({"new": new.name, "old": old_name}))
    out.rename(tmp_path / old_name)
    assert not out.exists()
    assert signature(out) == reference  # the open finished the swap: the new dataset
    assert _hidden(tmp_path) == []


def test_overwrite_interrupted_before_the_first_rename_is_rolled_forward(base: Path, tmp_path: Path,
                                                                        reference: Signature,
                                                                        table: pa.Table) -> None:
    out = tmp_path / "ds"
    preprocess(table.slice(0, 300), out, SPEC, progress=False)
    new = _copy(base, temp_dir(out))
    journal_path(out).write_text(json.dumps({"new": new.name, "old": f".ds.old-{'cd' * 4}"}))
    assert signature(out) == reference
    assert _hidden(tmp_path) == []


def test_preprocess_cleans_temp_dirs_of_killed_runs(table: pa.Table, tmp_path: Path) -> None:
    out = tmp_path / "ds"
    preprocess(table, out, SPEC, progress=False)
    for stale in (".ds.tmp-0123abcd", ".ds.old-89abcdef"):
        (tmp_path / stale / "events").mkdir(parents=True)
        (tmp_path / stale / "events" / "part-00000.parquet").write_bytes(b"x")
    (tmp_path / ".other.tmp-0123abcd").mkdir()  # another dataset's: not ours to delete
    preprocess(table.slice(0, 500), out, SPEC, progress=False, overwrite=True)
    assert _hidden(tmp_path) == [".other.tmp-0123abcd"]
    assert read_manifest(out).totals["samples"] == 500


def test_a_second_writer_is_refused_while_the_first_holds_the_lock(table: pa.Table, tmp_path: Path) -> None:
    out = tmp_path / "ds"
    with writer_lock(out):
        with pytest.raises(StorageError, match="another preprocess is writing"):
            preprocess(table, out, SPEC, progress=False)
    assert not lock_path(out).exists()  # released and removed
    preprocess(table, out, SPEC, progress=False)
    assert _hidden(tmp_path) == []


def test_unreadable_journal_is_refused_with_the_manual_fix(base: Path, tmp_path: Path) -> None:
    out = _copy(base, tmp_path / "ds")
    journal_path(out).write_text("{not json")
    with pytest.raises(StorageError, match="unreadable commit journal.*delete"):
        DedupReader(out, 50)
    journal_path(out).write_text(json.dumps({"new": "../../etc", "old": ".ds.old-00000000"}))
    with pytest.raises(StorageError, match="not a temp directory"):
        DedupReader(out, 50)
    assert out.is_dir()


def test_commit_without_old_dataset_is_one_rename(base: Path, tmp_path: Path, reference: Signature) -> None:
    out = tmp_path / "ds"
    tmp = _copy(base, temp_dir(out))
    with writer_lock(out):
        commit(tmp, out)
    assert signature(out) == reference and _hidden(tmp_path) == []

