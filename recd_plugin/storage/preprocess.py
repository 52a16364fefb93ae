"""RecD data generation: flat events -> the deduplicated, session-clustered layout.

Streams the input batch by batch (memory ~ ``rows_per_file`` rows plus the item table), so
inputs larger than RAM work. The input must already be grouped by session (all rows of a
session contiguous, as ``recd_plugin.data`` and most log exports are); this is verified and a
session that reappears after its rows ended raises :class:`StorageError`. Inside a session the
rows are sorted by ``spec.order_by``. Session-level (item-level) columns are checked to be
constant per session (item): violations are counted in the summary, or rejected with
``strict=True``; the stored value is the session's (item's) first row.

The history (``spec.history``) is stored by reference when possible: files are cut at user
boundaries (``spec.user_key``) and each session stores ``history_start`` / ``history_len``
into its events file instead of the list. Every session's history is verified to equal the
item ids of those rows; if any is not (or the column is not a list of ids), the whole dataset
is written again with lists (``history_mode`` "list" in the manifest and the summary).

Input is validated before anything is written: missing columns, schemas, nulls in the columns
a batch is built from (ids, user, label, dense features, history: :func:`check_values`) and NaN
or infinite labels. Nulls and NaNs found only while streaming (columns whose Parquet statistics
cannot tell) abort the run before ``out_dir`` is touched.

Output is written into a hidden temp directory next to ``out_dir`` and moved into place only
after ``manifest.json`` is complete, so a failed run leaves nothing a reader accepts. Every data
file's sha256 goes into the manifest and every Parquet page gets a CRC, verified by the reader.
Replacing an old ``out_dir`` is journaled (:mod:`recd_plugin.storage.commit`): a run killed at
any point leaves the old or the new dataset, never none and never a mix, and the next
preprocess of the same ``out_dir`` deletes the temp directories killed runs left behind.

Example::

    from recd_plugin.data import load_movielens_100k, storage_roles
    from recd_plugin.storage import StorageSpec, preprocess
    summary = preprocess(load_movielens_100k(), "/data/ml100k-recd", StorageSpec(**storage_roles()))
    print(summary)             # rows, sessions, items, bytes flat vs layout, violations
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from recd_plugin.data.columns import is_list
from recd_plugin.errors import StorageError
from recd_plugin.storage.columns import rows_equal
from recd_plugin.storage.commit import clean_stale, commit, recover, temp_dir, writer_lock
from recd_plugin.storage.history import NotDerivable, history_refs, reference_candidate
from recd_plugin.storage.layout import (
    COMPRESSION, COMPRESSION_LEVEL, DEFAULT_ROW_GROUP_ROWS, HISTORY_LEN, HISTORY_START, ITEM_REF, SESSION_REF,
    CHECKSUM, Encodings, Manifest, StorageSpec, TABLES, part_name, probe_dictionary, schema_json, write_manifest,
    write_table,
)
from recd_plugin.storage.source import Source, null_error, open_source


@dataclass
class PreprocessSummary:
    """What :func:`preprocess` wrote. ``bytes_flat``: the same rows as one flat Parquet file
    with the same codec (None unless ``measure_flat``); ``violations``: column -> count of
    rows that differ from their session's / item's first row, and the first example."""

    rows: int
    sessions: int
    items: int
    files: int
    bytes_out: int
    bytes_source: Optional[int]
    bytes_flat: Optional[int]
    seconds: float
    violations: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    history_mode: str = "list"  # "reference" or "list" (see recd_plugin.storage.layout)

    @property
    def storage_ratio(self) -> Optional[float]:
        return self.bytes_flat / self.bytes_out if self.bytes_flat else None

    def __str__(self) -> str:
        lines = [f"rows {self.rows:,}  sessions {self.sessions:,}  items {self.items:,}  "
                 f"files {self.files}  in {self.seconds:.1f} s",
                 f"bytes out {self.bytes_out:,}" + (f"  source {self.bytes_source:,}" if self.bytes_source else "")
                 + (f"  flat (zstd) {self.bytes_flat:,}  ratio {self.storage_ratio:.2f}x" if self.bytes_flat else ""),
                 f"history stored by {self.history_mode}"]
        for col, v in self.violations.items():
            lines.append(f"NOT CONSTANT: {col}: {v['rows']} rows, e.g. {v['example']}")
        return "\n".join(lines)


class _Writer:
    """State of one run: global session/item numbering, seen sessions, item table, totals."""

    def __init__(self, tmp: Path, spec: StorageSpec, schema: pa.Schema, row_group_rows: int,
                 strict: bool, measure_flat: bool, reference: bool = False) -> None:
        self.tmp, self.spec, self.row_group_rows, self.strict = tmp, spec, row_group_rows, strict
        self.reference = reference
        self.event_cols = spec.event_columns(schema)
        self.files: Dict[str, List[Dict[str, Any]]] = {"sessions": [], "events": [], "items": []}
        self.sessions = self.samples = 0
        self.label_sum = 0.0
        self.finished = np.zeros(0, dtype=schema.field(spec.session_key).type.to_pandas_dtype())
        self.item_keys = np.zeros(0, dtype=schema.field(spec.item_key).type.to_pandas_dtype())
        self.item_rows = np.zeros(0, dtype=np.int64)  # row of item_keys[i] in the item table
        self.item_chunks: List[pa.Table] = []
        self.item_chunk_starts: List[int] = []  # item-table row of each chunk's first row
        self.num_items = 0
        self.violations: Dict[str, Dict[str, Any]] = {}
        self.schemas: Dict[str, pa.Schema] = {}
        self.measure_flat = measure_flat
        self.flat: Optional[pq.ParquetWriter] = None  # opened on the first chunk (its encoding probe)
        self.encodings = {t: Encodings() for t in TABLES}

    def _violation(self, column: str, bad: np.ndarray, keys: np.ndarray, what: str) -> None:
        n = int(bad.sum())
        if not n:
            return
        example = f"{what} {keys[int(np.flatnonzero(bad)[0])]!r}"
        if self.strict:
            raise StorageError(f"column {column!r} is declared {what}-level but is not constant within "
                               f"{example} ({n} rows differ); fix the data or move {column!r} out of "
                               f"StorageSpec.{what}_columns")
        v = self.violations.setdefault(column, {"rows": 0, "example": example})
        v["rows"] += n

    def _write(self, table_name: str, table: pa.Table, first_row: int) -> None:
        index = len(self.files[table_name])
        rel = part_name(table_name, index)
        written = write_table(table, self.tmp / rel, self.row_group_rows, self.encodings[table_name](table))
        self.files[table_name].append({"path": rel, "rows": table.num_rows, "bytes": written.bytes,
                                       "first_row": first_row, CHECKSUM: written.sha256})
        self.schemas[table_name] = table.schema

    def flush(self, table: pa.Table) -> None:
        """Write the complete sessions in ``table`` (contiguous by session key)."""
        spec = self.spec
        keys = table.column(spec.session_key).to_numpy()
        head = np.r_[True, keys[1:] != keys[:-1]]  # first row of each session run
        starts = np.flatnonzero(head)
        run_keys = keys[starts]
        # The grouping assumption: no session key twice in this chunk or in an earlier one.
        reappear = np.isin(run_keys, self.finished)
        if reappear.any() or np.unique(run_keys).size != run_keys.size:
            dup = run_keys[reappear][0] if reappear.any() else _first_dup(run_keys)
            raise StorageError(f"session {dup!r} ({spec.session_key!r}) reappears after its rows ended: "
                               "the input must be grouped by session (sort it by session key first)")
        self.finished = np.union1d(self.finished, run_keys)
        run_id = np.cumsum(head) - 1
        if spec.order_by:
            order = np.lexsort((table.column(spec.order_by).to_numpy(), run_id))
            if not np.array_equal(order, np.arange(order.size)):
                table = table.take(pa.array(order))
        first_of_row = pa.array(starts[run_id])
        for col in spec.session_columns:
            c = table.column(col)
            self._violation(col, ~rows_equal(c, c.take(first_of_row)), keys, "session")
        if self.reference:
            sessions = table.select([c for c in spec.session_level if c != spec.history]).take(pa.array(starts))
            h_start, h_len = history_refs(table, starts, self.spec)
            sessions = sessions.append_column(HISTORY_START, pa.array(h_start, pa.int64()))
            sessions = sessions.append_column(HISTORY_LEN, pa.array(h_len, pa.int32()))
        else:
            sessions = table.select(list(spec.session_level)).take(pa.array(starts))
        item_row = self._items(table)
        events = pa.table({SESSION_REF: pa.array(self.sessions + run_id, pa.int64()),
                           ITEM_REF: pa.array(item_row, pa.int64()),
                           **{c: table.column(c) for c in self.event_cols}})
        self._write("sessions", sessions, self.sessions)
        self._write("events", events, self.samples)
        if self.measure_flat:
            if self.flat is None:
                self.flat = pq.ParquetWriter(str(self.tmp / "_flat.parquet"), table.schema, compression=COMPRESSION,
                                             compression_level=COMPRESSION_LEVEL,
                                             use_dictionary=probe_dictionary(table))
            self.flat.write_table(table, row_group_size=self.row_group_rows)
        self.sessions += sessions.num_rows
        self.samples += table.num_rows
        self.label_sum += float(np.sum(table.column(spec.label).to_numpy(), dtype=np.float64))

    def _items(self, table: pa.Table) -> np.ndarray:
        """Assign item rows (new items appended to the item table), check item constancy."""
        spec = self.spec
        keys = table.column(spec.item_key).to_numpy()
        ukeys, first, inv = np.unique(keys, return_index=True, return_inverse=True)
        first_of_row = pa.array(first[inv])
        for col in spec.item_columns:
            c = table.column(col)
            self._violation(col, ~rows_equal(c, c.take(first_of_row)), keys, "item")
        pos = np.searchsorted(self.item_keys, ukeys)
        found = pos < self.item_keys.size
        found[found] = self.item_keys[pos[found]] == ukeys[found]
        rows = np.empty(ukeys.size, dtype=np.int64)
        rows[found] = self.item_rows[pos[found]]
        if found.any() and self.item_chunks:  # same item seen in an earlier chunk: same columns?
            known = self._item_rows(rows[found])
            here = table.take(pa.array(first[found]))
            for col in spec.item_columns:
                self._violation(col, ~rows_equal(here.column(col), known.column(col)), ukeys[found], "item")
        new = np.flatnonzero(~found)
        rows[new] = self.num_items + np.arange(new.size)
        if new.size:
            self.item_chunk_starts.append(self.num_items)
            self.item_chunks.append(table.select(list(spec.item_level)).take(pa.array(first[new])))
            self.num_items += new.size
            merged_keys = np.concatenate([self.item_keys, ukeys[new]])
            merged_rows = np.concatenate([self.item_rows, rows[new]])
            order = np.argsort(merged_keys, kind="stable")
            self.item_keys, self.item_rows = merged_keys[order], merged_rows[order]
        return rows[inv]

    def _item_rows(self, rows: np.ndarray) -> pa.Table:
        """Rows ``rows`` of the item table so far, in order: taken chunk by chunk, so a
        lookup costs O(len(rows)), not a concatenation of every item chunk each time."""
        chunk = np.searchsorted(np.asarray(self.item_chunk_starts), rows, side="right") - 1
        order = np.argsort(chunk, kind="stable")
        pieces = [self.item_chunks[c].take(pa.array(rows[order][chunk[order] == c] - self.item_chunk_starts[c]))
                  for c in np.unique(chunk)]
        return pa.concat_tables(pieces).take(pa.array(np.argsort(order)))

    def finish(self, rows_per_file: int, metadata: Dict[str, str]) -> Manifest:
        items = pa.concat_tables(self.item_chunks).combine_chunks()
        for start in range(0, items.num_rows, rows_per_file):
            self._write("items", items.slice(start, rows_per_file), start)
        return Manifest(spec=self.spec, files=self.files,
                        totals={"samples": self.samples, "sessions": self.sessions, "items": self.num_items,
                                "label_sum": self.label_sum},
                        schema={t: schema_json(s) for t, s in self.schemas.items()}, metadata=metadata,
                        history_mode="reference" if self.reference else "list")


def _drain(writer: _Writer, table: pa.Table, key: str, rows_per_file: int, final: bool,
           user_key: Optional[str] = None) -> pa.Table:
    """Flush files of whole sessions (whole users if ``user_key``), about ``rows_per_file``
    rows each; return the rows kept back (the last session / user may continue in the next
    input batch unless ``final``)."""
    table = table.combine_chunks()
    keys = table.column(key).to_numpy()
    n = table.num_rows
    change = keys[1:] != keys[:-1]
    if user_key is not None:  # cut only where both the session and the user change
        users = table.column(user_key).to_numpy()
        change &= users[1:] != users[:-1]
    bounds = np.flatnonzero(change) + 1  # session (user) starts after row 0
    if final:
        bounds = np.append(bounds, n)
    pos = 0
    while pos < n and (final or n - pos >= rows_per_file):
        later = bounds[bounds > pos]
        if not later.size:
            break
        fits = later[later <= pos + rows_per_file]
        # The last boundary that fits; a session longer than a file gets a file of its own.
        cut = int(fits[-1] if fits.size else later[0])
        writer.flush(table.slice(pos, cut - pos))
        pos = cut
    return table.slice(pos)


def not_null_columns(spec: StorageSpec, schema: pa.Schema) -> Dict[str, str]:
    """Input columns a batch is built from, which therefore cannot hold nulls -> their role."""
    roles = {spec.session_key: "the session key", spec.item_key: "the item key", spec.label: "the label"}
    extra = [(spec.user_key, "the user key"), (spec.history, "the history"), (spec.order_by, "the order_by key")]
    extra += [(f, "a sparse feature") for f in spec.sparse_features]
    extra += [(f, "a dense feature") for f in spec.dense_features]
    for col, role in extra:
        if col:
            roles.setdefault(col, role)
    return {c: r for c, r in roles.items() if c in schema.names}


def check_values(where: str, data: "pa.Table | pa.RecordBatch", roles: Dict[str, str], label: str) -> None:
    """Refuse nulls in ``roles``' columns and NaN / infinite labels in ``data`` (a whole input
    table up front, or one input batch while streaming) before any of its rows is written."""
    for col, role in roles.items():
        c = data.column(col)
        if c.null_count:
            raise null_error(where, col, role, c.null_count)
        if is_list(c.type):
            inner = pc.list_flatten(c).null_count
            if inner:
                raise null_error(where, col, role, inner, inside=True)
    y = data.column(label)
    if pa.types.is_floating(y.type):
        bad = len(y) - pc.sum(pc.is_finite(y)).as_py() if len(y) else 0
        if bad:
            raise StorageError(f"{where}: label column {label!r} has {bad} NaN or infinite values; a label must be "
                               "a finite number (epoch_check and the loss sum labels): drop or fix those rows "
                               "before preprocess; nothing was written to out_dir")


def _first_dup(keys: np.ndarray) -> Any:
    u, counts = np.unique(keys, return_counts=True)
    return u[counts > 1][0]


def preprocess(source: Source, out_dir: "str | os.PathLike[str]", spec: Optional[StorageSpec] = None, *,
               rows_per_file: int = 1 << 20, row_group_rows: int = DEFAULT_ROW_GROUP_ROWS,
               read_batch_rows: int = 1 << 16, strict: bool = False, overwrite: bool = False,
               measure_flat: bool = True, progress: bool = True, verbose: bool = False) -> PreprocessSummary:
    """Write the deduplicated layout of ``source`` to ``out_dir`` (see the module docstring).

    Args:
        source: pyarrow Table, Parquet file/directory path, or pyarrow dataset (one row per sample).
        spec: the column roles of ``source``; required (None raises StorageError naming the fix:
            the storage layer knows no data set's columns).
            ``StorageSpec(**recd_plugin.data.storage_roles())`` for the common format of
            ``recd_plugin.data``; :meth:`StorageSpec.from_config` from the RecD flag.
        rows_per_file: target samples per events file (whole sessions, so files can be larger).
        row_group_rows: Parquet row-group size (the unit a parallel reader can split on).
        read_batch_rows: rows per input record batch.
        strict: raise on a session-/item-level column that is not constant (default: report).
        overwrite: replace an existing ``out_dir`` (atomically, after the new one is complete).
        measure_flat: also write the rows as flat zstd Parquet in the temp dir, to report
            ``bytes_flat`` (deleted before the commit).
    """
    if not isinstance(spec, StorageSpec):
        raise StorageError(f"preprocess needs the column roles of the input as a StorageSpec, got {spec!r}: "
                           "pass StorageSpec(session_key=..., session_columns=[...], item_key=..., "
                           "item_columns=[...], sparse_features=[...], dense_features=[...], label=...), "
                           "StorageSpec(**recd_plugin.data.storage_roles()) for the common format of "
                           "recd_plugin.data, or StorageSpec.from_config(flag, ...) (docs/storage.md)")
    out = Path(out_dir)
    recover(out)  # a killed overwrite left `out` mid-swap: finish it, so `exists` below is the truth
    if out.exists() and not overwrite:
        raise StorageError(f"{out} already exists; pass overwrite=True or choose another out_dir")
    if rows_per_file < 1 or row_group_rows < 1 or read_batch_rows < 1:
        raise StorageError("rows_per_file, row_group_rows and read_batch_rows must be >= 1")
    src = open_source(source, spec.required(), not_null=lambda schema: not_null_columns(spec, schema))
    if src.num_rows == 0:
        raise StorageError("the input has no rows (empty input); nothing to preprocess")
    if isinstance(source, pa.Table):
        check_values("input table", source, not_null_columns(spec, source.schema), spec.label)
    started = time.perf_counter()
    with writer_lock(out):
        recover(out)
        if out.exists() and not overwrite:  # written by a run that finished while this one started
            raise StorageError(f"{out} already exists; pass overwrite=True or choose another out_dir")
        clean_stale(out)  # under the lock no live run owns them: leftovers of killed runs
        tmp = temp_dir(out)
        try:
            writer = manifest = None
            bytes_flat: Optional[int] = None
            for reference in ([True, False] if reference_candidate(spec, src.schema) else [False]):
                try:
                    writer, manifest, bytes_flat = _write_all(src, tmp, spec, reference, rows_per_file,
                                                              row_group_rows, read_batch_rows, strict, measure_flat,
                                                              progress)
                    break
                except NotDerivable:  # some history is not a slice of earlier events: lists, for all
                    shutil.rmtree(tmp, ignore_errors=True)
            assert writer is not None and manifest is not None
            write_manifest(tmp, manifest)
            commit(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    summary = PreprocessSummary(rows=writer.samples, sessions=writer.sessions, items=writer.num_items,
                                files=len(manifest.files["events"]), bytes_out=manifest.bytes(),
                                bytes_source=src.bytes, bytes_flat=bytes_flat,
                                seconds=time.perf_counter() - started, violations=writer.violations,
                                history_mode=manifest.history_mode)
    if verbose:
        print(summary)
    return summary


def _write_all(src: Any, tmp: Path, spec: StorageSpec, reference: bool, rows_per_file: int,
               row_group_rows: int, read_batch_rows: int, strict: bool, measure_flat: bool,
               progress: bool) -> "tuple[_Writer, Manifest, Optional[int]]":
    """One pass over the source into ``tmp``: (writer, manifest, flat bytes). With
    ``reference`` raises NotDerivable as soon as a history is not derivable."""
    for sub in ("sessions", "events", "items"):
        (tmp / sub).mkdir(parents=True)
    writer = _Writer(tmp, spec, src.schema, row_group_rows, strict, measure_flat, reference)
    user_key = spec.user_key if reference else None
    roles = not_null_columns(spec, src.schema)
    try:
        pending: List[pa.RecordBatch] = []
        buffered = 0
        with tqdm(total=src.num_rows, unit="rows", desc="preprocess", disable=None if progress else True) as bar:
            for where, batch in src.batches(read_batch_rows):
                check_values(where, batch, roles, spec.label)
                pending.append(batch)
                buffered += batch.num_rows
                bar.update(batch.num_rows)
                if buffered >= rows_per_file:
                    rest = _drain(writer, pa.Table.from_batches(pending), spec.session_key, rows_per_file,
                                  final=False, user_key=user_key)
                    pending, buffered = rest.to_batches(), rest.num_rows
        if buffered:
            _drain(writer, pa.Table.from_batches(pending), spec.session_key, rows_per_file, final=True,
                   user_key=user_key)
        if writer.samples == 0:
            raise StorageError("the input has no rows (empty input); nothing to preprocess")
        metadata = {k.decode(): v.decode() for k, v in (src.schema.metadata or {}).items()}
        manifest = writer.finish(rows_per_file, metadata)
    finally:
        if writer.flat is not None:
            writer.flat.close()
    bytes_flat = None
    if writer.flat is not None:
        bytes_flat = os.path.getsize(tmp / "_flat.parquet")
        os.remove(tmp / "_flat.parquet")
    return writer, manifest, bytes_flat
