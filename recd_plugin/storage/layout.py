"""The deduplicated on-disk layout (RecD data generation) and its manifest.

A dataset directory written by :func:`recd_plugin.storage.preprocess` holds::

    out_dir/
      manifest.json                 # written last: its presence means "complete"
      sessions/part-00000.parquet   # one row per session: session key + session-level columns
      events/part-00000.parquet     # one row per sample: session_row, item_row, per-sample columns
      items/part-00000.parquet      # one row per item: item key + item-level columns

``events/part-i`` holds exactly the events of the sessions in ``sessions/part-i`` (whole
sessions, contiguous, ordered by ``order_by`` inside a session), so a reader shard is one
file index and never needs another shard's sessions. With ``history_mode == "reference"``
(recorded in the manifest) files are cut at user boundaries and the sessions table holds
``history_start`` / ``history_len`` instead of the ``spec.history`` list: the history is the
item ids of those events rows of the same file (preprocess verified this for every session;
if any session's history is not such a slice, the whole dataset is written in "list" mode).
``session_row`` / ``item_row`` are global row numbers in the concatenation of the session /
item files: they are the inverse indices of the IKJT, so the reader never deduplicates
anything. All files are zstd Parquet.

Example::

    from recd_plugin.storage.layout import StorageSpec, read_manifest
    spec = StorageSpec.movielens()          # the common table format of recd_plugin.data
    manifest = read_manifest("/data/ml100k-recd")   # StorageError unless complete
    manifest.totals["samples"], manifest.files["events"][0]["rows"]
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import pyarrow as pa
import pyarrow.parquet as pq

from recd_plugin.data.sessions import (
    DENSE_FEATURES,
    SESSION_FEATURES,
    SPARSE_FEATURES,
)
from recd_plugin.errors import StorageError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TABLES = ("sessions", "events", "items")
SESSION_REF = "session_row"  # events column: global row of the sample's session
ITEM_REF = "item_row"  # events column: global row of the sample's item
#: sessions columns of history stored by reference (``history_mode == "reference"``): the
#: session's history is the item ids of events rows [history_start, history_start + history_len)
#: of the *same* events file (row offsets within the file).
HISTORY_START = "history_start"
HISTORY_LEN = "history_len"
HISTORY_MODES = ("list", "reference")
#: One codec and level for the layout *and* the flat baseline, so byte counts compare.
COMPRESSION = "zstd"
COMPRESSION_LEVEL = 3
#: Dictionary encoding is chosen per column by a probe (:class:`Encodings`): each column of
#: the first table a writer sees is written both ways into memory and keeps the smaller. Why:
#: neither Parquet's default (dictionary everywhere) nor "never" suits both sides of the
#: comparison: a dictionary roughly doubles high-cardinality columns (timestamps, histories)
#: and halves low-cardinality ones (labels, ages, item references). The flat baseline gets the
#: same probe, so both sides are stored as small as this codec allows.
PROBE_ROWS = 64 * 1024
DEFAULT_ROW_GROUP_ROWS = 64 * 1024  # several row groups per file: readers can split a file

PathLike = Union[str, "os.PathLike[str]"]


@dataclass(frozen=True)
class StorageSpec:
    """Which input columns are session-level, item-level, and what the reader emits.

    Every input column that is neither the keys nor listed here is per-sample (events table).

    Args:
        session_key: column naming the session (also stored, once, in the sessions table).
        session_columns: constant within a session (user profile, history, ...).
        item_key: column naming the item; item_columns: constant per item.
        order_by: sort key of the samples inside a session (None: keep input order).
        sparse_features / dense_features / label: the ``Batch`` the reader builds.
    """

    session_key: str = "session_id"
    session_columns: Tuple[str, ...] = tuple(c for c in SESSION_FEATURES if c != "session_id")
    item_key: str = "item_id"
    item_columns: Tuple[str, ...] = ("item_genres", "item_year", "dense_year")
    order_by: Union[str, None] = "timestamp"
    sparse_features: Tuple[str, ...] = tuple(SPARSE_FEATURES)
    dense_features: Tuple[str, ...] = tuple(DENSE_FEATURES)
    label: str = "label"
    #: session-level list column that may be stored by reference (the user's last items
    #: before the session), and the column naming the user (files are cut at user boundaries
    #: when the history is stored by reference). None: always store the history as lists.
    history: Optional[str] = "history"
    user_key: Optional[str] = "user_id"

    def __post_init__(self) -> None:
        for name in ("session_columns", "item_columns", "sparse_features", "dense_features"):
            value = getattr(self, name)
            if isinstance(value, str):
                raise StorageError(f"StorageSpec.{name} must be a list of column names, got the string {value!r}")
            object.__setattr__(self, name, tuple(value))
        both = set(self.session_level) & set(self.item_level)
        if both:
            raise StorageError(f"StorageSpec: column(s) {sorted(both)} are both session- and item-level")
        for reserved in (SESSION_REF, ITEM_REF, HISTORY_START, HISTORY_LEN):
            if reserved in self.session_level or reserved in self.item_level:
                raise StorageError(f"StorageSpec: column name {reserved!r} is reserved by the layout")

    @classmethod
    def movielens(cls) -> "StorageSpec":
        """The spec of the common table format (MovieLens-100k and the synthetic generator):
        user profile + history per session, genres/year per item."""
        return cls()

    @property
    def session_level(self) -> Tuple[str, ...]:
        return (self.session_key,) + tuple(c for c in self.session_columns if c != self.session_key)

    @property
    def item_level(self) -> Tuple[str, ...]:
        return (self.item_key,) + tuple(c for c in self.item_columns if c != self.item_key)

    def required(self) -> List[str]:
        """Columns every input file must have."""
        cols = list(self.session_level) + list(self.item_level) + [self.label]
        cols += [c for c in self.sparse_features + self.dense_features if c not in cols]
        if self.order_by and self.order_by not in cols:
            cols.append(self.order_by)
        return cols

    def event_columns(self, schema: pa.Schema) -> List[str]:
        """Per-sample columns of an input schema, in input order."""
        grouped = set(self.session_level) | set(self.item_level)
        return [n for n in schema.names if n not in grouped]

    def to_json(self) -> Dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_json(cls, d: Dict[str, Any]) -> "StorageSpec":
        return cls(**d)


@dataclass
class Manifest:
    """Contents of ``manifest.json``: what a reader needs before opening any data file."""

    spec: StorageSpec
    files: Dict[str, List[Dict[str, Any]]]  # table -> [{"path", "rows", "bytes", "first_row"}]
    totals: Dict[str, Any]  # samples, sessions, items, label_sum
    schema: Dict[str, List[List[str]]]  # table -> [[column, arrow type]]
    metadata: Dict[str, str] = field(default_factory=dict)  # input schema metadata (cardinalities)
    format_version: int = FORMAT_VERSION
    #: "list": ``spec.history`` stored as a list per session; "reference": as
    #: (HISTORY_START, HISTORY_LEN) into the same events file (see the module docstring).
    history_mode: str = "list"

    def to_json(self) -> Dict[str, Any]:
        return {"format_version": self.format_version, "spec": self.spec.to_json(), "files": self.files,
                "totals": self.totals, "schema": self.schema, "metadata": self.metadata,
                "history_mode": self.history_mode}

    def bytes(self, table: str = "") -> int:
        """Bytes of one table's files, or of all data files."""
        tables = [table] if table else list(TABLES)
        return sum(f["bytes"] for t in tables for f in self.files[t])


def write_table(table: pa.Table, path: PathLike, row_group_rows: int = DEFAULT_ROW_GROUP_ROWS,
                dictionary: Optional[List[str]] = None) -> int:
    """Write ``table`` with the layout's codec; returns the file's size in bytes.

    ``dictionary``: the columns to dictionary-encode (default: probe this table).
    """
    if dictionary is None:
        dictionary = probe_dictionary(table)
    pq.write_table(table, str(path), compression=COMPRESSION, compression_level=COMPRESSION_LEVEL,
                   use_dictionary=dictionary, row_group_size=row_group_rows)
    return os.path.getsize(path)


def _column_bytes(table: pa.Table, dictionary: bool) -> Dict[str, int]:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression=COMPRESSION, compression_level=COMPRESSION_LEVEL,
                   use_dictionary=dictionary)
    meta = pq.ParquetFile(io.BytesIO(buf.getvalue())).metadata
    sizes: Dict[str, int] = {}
    for g in range(meta.num_row_groups):
        for c in range(meta.num_columns):
            col = meta.row_group(g).column(c)
            top = col.path_in_schema.split(".")[0]  # a list column's leaf is "name.list.element"
            sizes[top] = sizes.get(top, 0) + col.total_compressed_size
    return sizes


def probe_dictionary(table: pa.Table) -> List[str]:
    """Columns of ``table`` that are smaller dictionary-encoded, judged on its first rows."""
    sample = table.slice(0, PROBE_ROWS)
    plain, encoded = _column_bytes(sample, False), _column_bytes(sample, True)
    return [name for name in table.schema.names if encoded[name] < plain[name]]


class Encodings:
    """One writer's dictionary choice: probed on the first table, then kept for every file,
    so all files of a table are encoded alike (and the probe runs once per table)."""

    def __init__(self) -> None:
        self.dictionary: Optional[List[str]] = None

    def __call__(self, table: pa.Table) -> List[str]:
        if self.dictionary is None:
            self.dictionary = probe_dictionary(table)
        return self.dictionary


def schema_json(schema: pa.Schema) -> List[List[str]]:
    return [[f.name, str(f.type)] for f in schema]


def write_manifest(directory: PathLike, manifest: Manifest) -> None:
    """Write ``manifest.json`` (via a temp file + rename: never a half-written manifest)."""
    path = Path(directory) / MANIFEST
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest.to_json(), indent=1, sort_keys=True))
    os.replace(tmp, path)


def _fix(directory: Path) -> str:
    return (f"re-run recd_plugin.storage.preprocess(source, '{directory}', spec) (a preprocess that "
            "failed or is still running leaves no manifest)")


def read_manifest(directory: PathLike, check_files: bool = True) -> Manifest:
    """Load and validate ``manifest.json``; StorageError unless the layout is complete.

    ``check_files`` also checks that every listed file exists with its recorded size (cheap:
    one ``stat`` per file), catching a directory that was copied or pruned partially.
    """
    directory = Path(directory)
    path = directory / MANIFEST
    if not directory.is_dir():
        raise StorageError(f"{directory}: no such dataset directory; {_fix(directory)}")
    if not path.is_file():
        raise StorageError(f"{directory}: no {MANIFEST}, so the layout is incomplete or not a RecD "
                           f"dataset; {_fix(directory)}")
    try:
        d = json.loads(path.read_text())
        version = d["format_version"]
        if version != FORMAT_VERSION:
            raise StorageError(f"{path}: format version {version}, this reader reads version "
                               f"{FORMAT_VERSION}; {_fix(directory)}")
        manifest = Manifest(spec=StorageSpec.from_json(d["spec"]), files=d["files"], totals=d["totals"],
                            schema=d["schema"], metadata=d.get("metadata", {}), format_version=version,
                            history_mode=d.get("history_mode", "list"))
        if manifest.history_mode not in HISTORY_MODES:
            raise StorageError(f"{path}: unknown history_mode {manifest.history_mode!r}; {_fix(directory)}")
        missing = [t for t in TABLES if t not in manifest.files]
        missing += [k for k in ("samples", "sessions", "items", "label_sum") if k not in manifest.totals]
    except (ValueError, KeyError, TypeError) as e:
        if isinstance(e, StorageError):
            raise
        raise StorageError(f"{path}: malformed manifest ({e!r}); {_fix(directory)}") from e
    if missing:
        raise StorageError(f"{path}: manifest lacks {missing}; {_fix(directory)}")
    if len(manifest.files["sessions"]) != len(manifest.files["events"]):
        raise StorageError(f"{path}: {len(manifest.files['sessions'])} session files but "
                           f"{len(manifest.files['events'])} event files; {_fix(directory)}")
    if check_files:
        for table in TABLES:
            for f in manifest.files[table]:
                p = directory / f["path"]
                if not p.is_file() or p.stat().st_size != f["bytes"]:
                    raise StorageError(f"{directory}: data file {f['path']} is missing or has a different "
                                       f"size than the manifest records; {_fix(directory)}")
    return manifest


def part_name(table: str, index: int) -> str:
    return f"{table}/part-{index:05d}.parquet"


def concat_rows(files: Sequence[Dict[str, Any]]) -> int:
    return sum(int(f["rows"]) for f in files)
