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

Integrity: every data file's sha256 and row count are in the manifest, every Parquet page
carries a CRC, and the manifest carries a sha256 of its own content. :func:`read_manifest`
checks the manifest and every file's footer (size, rows, columns) before a reader reads
anything; :func:`read_data_file` checks the sha256 (unless switched off) and the page CRCs of
each file it reads. Any mismatch is a StorageError naming the file and the fix.

Example::

    from recd_plugin.data import storage_roles
    from recd_plugin.storage.layout import StorageSpec, read_manifest
    spec = StorageSpec(**storage_roles())   # the common table format of recd_plugin.data
    manifest = read_manifest("/data/ml100k-recd")   # StorageError unless complete and consistent
    manifest.totals["samples"], manifest.files["events"][0]["rows"]
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple, Union

import pyarrow as pa
import pyarrow.parquet as pq

from recd_plugin.errors import StorageError, did_you_mean
from recd_plugin.storage.commit import recover

if TYPE_CHECKING:
    from recd_plugin.config import RecDConfig

#: 2: every data file's sha256 is in the manifest and every Parquet page has a CRC (version 1
#: files have neither, so they are refused: re-run preprocess).
FORMAT_VERSION = 2
MANIFEST = "manifest.json"
TABLES = ("sessions", "events", "items")
CHECKSUM = "sha256"  # manifest key of a data file's content checksum (hex)
#: Keys of one data file's manifest entry.
FILE_KEYS = ("path", "rows", "bytes", "first_row", CHECKSUM)
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


@dataclass(frozen=True, kw_only=True)
class StorageSpec:
    """Which input columns are session-level, item-level, and what the reader emits.

    The storage layer knows no data set: every role is given by the caller, by keyword. For
    the common format of ``recd_plugin.data`` (MovieLens-100k, the synthetic generator) that
    is ``StorageSpec(**recd_plugin.data.storage_roles())``; from the RecD flag,
    :meth:`from_config`. Every input column that is neither a key nor listed here is
    per-sample (events table).

    Args:
        session_key: column naming the session (also stored, once, in the sessions table).
        session_columns: constant within a session (user profile, history, ...).
        item_key: column naming the item; item_columns: constant per item.
        sparse_features / dense_features / label: the ``Batch`` the reader builds.
        order_by: sort key of the samples inside a session (None: keep input order).
        history: session-level list column that may be stored by reference (the user's last
            items before the session); user_key: the column naming the user (files are cut at
            user boundaries when the history is stored by reference). None: store lists.
    """

    session_key: str
    session_columns: Tuple[str, ...]
    item_key: str
    item_columns: Tuple[str, ...]
    sparse_features: Tuple[str, ...]
    dense_features: Tuple[str, ...]
    label: str
    order_by: Optional[str] = None
    history: Optional[str] = None
    user_key: Optional[str] = None

    def __post_init__(self) -> None:
        for name in ("session_key", "item_key", "label"):
            value = getattr(self, name)
            if not (isinstance(value, str) and value):
                raise StorageError(f"StorageSpec.{name} must be a column name, got {value!r}")
        for name in ("order_by", "history", "user_key"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, str) and value):
                raise StorageError(f"StorageSpec.{name} must be a column name or None, got {value!r}")
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
    def from_config(cls, config: "RecDConfig", *, item_key: str, sparse_features: Sequence[str],
                    dense_features: Sequence[str], label: str, item_columns: Optional[Sequence[str]] = None,
                    group: Optional[str] = None, **roles: Any) -> "StorageSpec":
        """The spec whose session roles come from the RecD flag, so the layout stores once what
        training deduplicates: ``session_key`` is the key of the flag's keyed group and
        ``session_columns`` its features. ``group`` names the group when the flag keys several
        (default: the one keyed group not keyed by ``item_key``). ``item_columns`` default to
        the features of a group keyed by ``item_key``, else none. ``roles``: ``order_by``,
        ``history``, ``user_key``."""
        keyed = [g for g in config.groups if g.key is not None]
        if group is not None:
            names = [g.name for g in config.groups]
            found = [g for g in keyed if g.name == group]
            if not found:
                raise StorageError(f"the flag has no keyed group {group!r}{did_you_mean(group, names)}; its "
                                   f"groups: {names} (a session group needs a key: groups.{group}.key=...)")
            session = found[0]
        else:
            candidates = [g for g in keyed if g.key != item_key]
            if len(candidates) != 1:
                what = "no group with a key" if not candidates else f"{len(candidates)} keyed groups"
                raise StorageError(f"the flag has {what} to take the session columns from (groups: "
                                   f"{[g.name for g in config.groups]}); give a flag whose session group names "
                                   "its key (groups.user.key=session_id), or name the group (group=NAME, --group NAME)")
            session = candidates[0]
        if item_columns is None:
            item_group = next((g for g in keyed if g.key == item_key and g is not session), None)
            item_columns = [f for f in item_group.features if f != item_key] if item_group else []
        assert session.key is not None
        return cls(session_key=session.key, session_columns=[f for f in session.features if f != session.key],
                   item_key=item_key, item_columns=item_columns, sparse_features=sparse_features,
                   dense_features=dense_features, label=label, **roles)

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
    files: Dict[str, List[Dict[str, Any]]]  # table -> [{"path", "rows", "bytes", "first_row", "sha256"}]
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


@dataclass(frozen=True)
class WrittenFile:
    """Size and content checksum of a file as written (recorded in the manifest)."""

    bytes: int
    sha256: str


def write_table(table: pa.Table, path: PathLike, row_group_rows: int = DEFAULT_ROW_GROUP_ROWS,
                dictionary: Optional[List[str]] = None) -> WrittenFile:
    """Write ``table`` with the layout's codec and Parquet page checksums; returns its size and
    sha256. The bytes are hashed in memory before they reach the disk, so the checksum is of what
    preprocess produced (a write that corrupts them is caught when the file is read).

    ``dictionary``: the columns to dictionary-encode (default: probe this table).
    """
    if dictionary is None:
        dictionary = probe_dictionary(table)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression=COMPRESSION, compression_level=COMPRESSION_LEVEL,
                   use_dictionary=dictionary, row_group_size=row_group_rows, write_page_checksum=True)
    data = sink.getvalue()
    with open(path, "wb") as f:
        f.write(memoryview(data))
        f.flush()
        os.fsync(f.fileno())  # durable before the manifest that vouches for it
    return WrittenFile(data.size, hashlib.sha256(memoryview(data)).hexdigest())


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


def manifest_digest(body: Dict[str, Any]) -> str:
    """sha256 of a manifest's content (canonical JSON: independent of key order and spacing)."""
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def write_manifest(directory: PathLike, manifest: Manifest) -> None:
    """Write ``manifest.json`` with a checksum of its own content (via a temp file + rename:
    never a half-written manifest)."""
    path = Path(directory) / MANIFEST
    tmp = path.with_suffix(".json.tmp")
    body = manifest.to_json()
    with open(tmp, "w") as f:
        f.write(json.dumps({**body, CHECKSUM: manifest_digest(body)}, indent=1, sort_keys=True))
        f.flush()
        os.fsync(f.fileno())  # the manifest vouches for the data: never durable before it is whole
    os.replace(tmp, path)


def _fix(directory: Path) -> str:
    return (f"re-run recd_plugin.storage.preprocess(source, '{directory}', spec) (a preprocess that "
            "failed or is still running leaves no manifest)")


def rewrite_fix(directory: Path) -> str:
    """The fix of a damaged or inconsistent dataset, for error messages."""
    return (f"the dataset is damaged or was edited after preprocess: rewrite it with "
            f"recd_plugin.storage.preprocess(source, '{directory}', spec, overwrite=True) "
            f"(recd-plugin preprocess SOURCE {directory} --overwrite)")


def read_manifest(directory: PathLike, check_files: bool = True) -> Manifest:
    """Load and validate ``manifest.json``; StorageError unless the layout is complete and
    consistent.

    First finishes a ``preprocess(overwrite=True)`` commit that a killed process left half done
    (:func:`recd_plugin.storage.commit.recover`). The manifest's own numbers must agree (each
    file's ``first_row`` is the rows before it, totals are the sums). ``check_files`` also reads
    every data file's Parquet footer (no data pages): it must exist with the recorded size, row
    count and columns, catching a directory copied or pruned partially, or a manifest edited by
    hand, before anything is read. Content checksums are verified when a file is read
    (:func:`read_data_file`).
    """
    directory = Path(directory)
    recover(directory)
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
            raise StorageError(f"{path}: format version {version}, this reader reads version {FORMAT_VERSION} "
                               f"(version 2 added content checksums); {_fix(directory)} with overwrite=True")
        # The manifest vouches for every file's checksum and count: it is checked itself first.
        body = {k: v for k, v in d.items() if k != CHECKSUM}
        if d.get(CHECKSUM) != manifest_digest(body):
            raise StorageError(f"{path} is damaged or was edited: its {CHECKSUM} does not match its content; "
                               f"{rewrite_fix(directory)}")
        manifest = Manifest(spec=StorageSpec.from_json(d["spec"]), files=d["files"], totals=d["totals"],
                            schema=d["schema"], metadata=d.get("metadata", {}), format_version=version,
                            history_mode=d.get("history_mode", "list"))
        if manifest.history_mode not in HISTORY_MODES:
            raise StorageError(f"{path}: unknown history_mode {manifest.history_mode!r}; {_fix(directory)}")
        if not all(isinstance(x, dict) for x in (manifest.files, manifest.totals, manifest.schema)):
            raise TypeError("files, totals and schema must be JSON objects")
        missing = [t for t in TABLES if t not in manifest.files or t not in manifest.schema]
        missing += [k for k in ("samples", "sessions", "items", "label_sum") if k not in manifest.totals]
    except (ValueError, KeyError, TypeError, AttributeError) as e:  # UnicodeDecodeError is a ValueError
        if isinstance(e, StorageError):
            raise
        raise StorageError(f"{path}: malformed manifest ({e!r}); {rewrite_fix(directory)}") from e
    if missing:
        raise StorageError(f"{path}: manifest lacks {missing}; {rewrite_fix(directory)}")
    _check_counts(path, manifest)
    if check_files:
        for table in TABLES:
            for f in manifest.files[table]:
                _check_footer(directory, table, f, manifest.schema[table])
    return manifest


def _is_count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _check_counts(path: Path, manifest: Manifest) -> None:
    """The manifest's numbers agree with each other (the reader indexes by them: a count edited
    by hand would otherwise drop or misplace samples silently)."""
    directory = path.parent

    def bad(what: str) -> StorageError:
        return StorageError(f"{path}: {what}; {rewrite_fix(directory)}")

    if len(manifest.files["sessions"]) != len(manifest.files["events"]):
        raise bad(f"{len(manifest.files['sessions'])} session files but {len(manifest.files['events'])} event files")
    for table, total in (("events", "samples"), ("sessions", "sessions"), ("items", "items")):
        files = manifest.files[table]
        if not isinstance(files, list):
            raise bad(f"files[{table!r}] is not a list")
        row = 0
        for f in files:
            if not isinstance(f, dict) or not all(k in f for k in FILE_KEYS):
                raise bad(f"a {table} file entry lacks one of {list(FILE_KEYS)}: {f!r}")
            if not isinstance(f["path"], str) or not f["path"].startswith(f"{table}/") or ".." in f["path"]:
                raise bad(f"{table} file path {f['path']!r} is not a file of the {table}/ folder")
            if not all(_is_count(f[k]) for k in ("rows", "bytes", "first_row")):
                raise bad(f"{f['path']}: rows, bytes and first_row must be integers >= 0, got {f!r}")
            if not (isinstance(f[CHECKSUM], str) and re.fullmatch(r"[0-9a-f]{64}", f[CHECKSUM])):
                raise bad(f"{f['path']}: {CHECKSUM} is not a hex digest")
            if f["first_row"] != row:
                raise bad(f"{f['path']}: first_row is {f['first_row']} but the files before it hold {row} rows")
            row += f["rows"]
        if manifest.totals[total] != row:
            raise bad(f"totals[{total!r}] is {manifest.totals[total]!r} but the {table} files hold {row} rows")
        columns = manifest.schema[table]
        if not (isinstance(columns, list) and all(isinstance(c, list) and len(c) == 2 for c in columns)):
            raise bad(f"schema[{table!r}] is not a list of [column, type] pairs")
    label_sum = manifest.totals["label_sum"]
    if not isinstance(label_sum, (int, float)) or not math.isfinite(label_sum):
        raise bad(f"totals['label_sum'] is {label_sum!r}, not a finite number")


def _check_footer(directory: Path, table: str, f: Dict[str, Any], schema: List[List[str]]) -> None:
    """File ``f`` exists with the recorded size, and its footer's row count and columns match."""
    p = directory / f["path"]
    if not p.is_file() or p.stat().st_size != f["bytes"]:
        raise StorageError(f"{directory}: data file {f['path']} is missing or has a different size than the "
                           f"manifest records; {rewrite_fix(directory)}")
    try:
        meta = pq.read_metadata(str(p))
        columns = meta.schema.to_arrow_schema().names
    except (pa.ArrowException, OSError, ValueError) as e:
        raise StorageError(f"{p}: unreadable Parquet footer ({e}); {rewrite_fix(directory)}") from e
    if meta.num_rows != f["rows"]:
        raise StorageError(f"{p}: the file holds {meta.num_rows} rows but the manifest says {f['rows']}; "
                           f"{rewrite_fix(directory)}")
    # Names only: Parquet renames a list's item field ("item" -> "element"), and a column of
    # an unexpected type is refused when the reader converts it.
    expected = [c[0] for c in schema]
    if columns != expected:
        raise StorageError(f"{p}: columns {columns} differ from the manifest's {table} columns {expected}; "
                           f"{rewrite_fix(directory)}")


def read_data_file(directory: PathLike, entry: Dict[str, Any], columns: List[str],
                   verify_checksum: bool = True) -> pa.Table:
    """``columns`` of the data file of manifest entry ``entry`` (a table of ``entry["rows"]`` rows),
    verified: its sha256 (unless ``verify_checksum`` is False: the documented speed switch), its
    Parquet page CRCs and its row count; StorageError naming the file otherwise."""
    directory = Path(directory)
    p = directory / entry["path"]
    try:
        if verify_checksum:
            data = p.read_bytes()
            if hashlib.sha256(data).hexdigest() != entry[CHECKSUM]:
                raise StorageError(f"{p}: content checksum ({CHECKSUM}) differs from the manifest: the file "
                                   f"was corrupted or changed after preprocess; {rewrite_fix(directory)}")
            source: Any = pa.BufferReader(data)  # parse exactly the bytes that were verified
        else:
            source = str(p)
        table = pq.read_table(source, columns=columns, page_checksum_verification=True)
    except (pa.ArrowException, OSError) as e:
        raise StorageError(f"{p}: cannot read ({e}); the file is corrupt or truncated; {rewrite_fix(directory)}") from e
    if table.num_rows != entry["rows"]:
        raise StorageError(f"{p}: the file holds {table.num_rows} rows but the manifest says {entry['rows']}; "
                           f"{rewrite_fix(directory)}")
    return table


def part_name(table: str, index: int) -> str:
    return f"{table}/part-{index:05d}.parquet"


def concat_rows(files: Sequence[Dict[str, Any]]) -> int:
    return sum(int(f["rows"]) for f in files)
