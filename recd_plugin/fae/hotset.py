"""FAE's hot set: which rows of which tables live in fast memory, and the tables it was made for.

Written by the profiler (:mod:`recd_plugin.fae.profile`), read by the hot/cold embedding swap,
the batch scheduler and the planner hints. A hot set records the table shapes it was profiled
against; :meth:`HotSet.check_tables` refuses a model whose tables differ (a stale hot set
must never be applied silently: its row ids would point at the wrong rows).

On disk (``HotSet.save(path)``): ``path`` is a ``.npz`` holding one sorted int64 array of hot
row ids per table plus a JSON header (tables, budget, profile facts, the tables that have rows
and a SHA-256 of all of it). The file is written to a temporary name and renamed, so a killed
``profile`` leaves the previous hot set (or none), never half of one. :meth:`HotSet.load`
verifies everything before returning: the zip's CRC-32 per member, the header's fields and
types, the row arrays (1-D integers) and the SHA-256, so a truncated, edited or bit-flipped file
raises :class:`~recd_plugin.errors.HotSetError` instead of giving a different hot set.

Example::

    from recd_plugin.fae.hotset import HotSet, TableShape
    hot = HotSet.load("hot.npz")
    hot.check_tables({"t_C1": TableShape(num_embeddings=1460, embedding_dim=16)})
    hot.rows["t_C1"]          # np.ndarray [H] int64, sorted, unique
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Tuple, Union

import numpy as np

from recd_plugin.errors import HotSetError

# 2: the header carries "row_tables" and "sha256" (format 1 had no checksum: a flipped bit in
# a member name silently dropped a table's hot rows).
FORMAT_VERSION = 2
_HEADER = "__header__"
_ROWS = "rows/"


@dataclass(frozen=True)
class TableShape:
    """One embedding table: rows, dimension, bytes per element (4 for float32)."""

    num_embeddings: int
    embedding_dim: int
    dtype_bytes: int = 4

    @property
    def row_bytes(self) -> int:
        return self.embedding_dim * self.dtype_bytes


@dataclass
class HotSet:
    """Hot rows per table (``rows[name]``: sorted unique int64 ids in [0, num_embeddings)).

    ``tables``: the shapes profiled against; ``budget_bytes``: the fast-memory budget the set
    was chosen for; ``info``: profile facts (sample fraction, seed, samples seen,
    hot-sample fraction, ...), JSON-serializable.
    """

    tables: Dict[str, TableShape]
    rows: Dict[str, np.ndarray]
    budget_bytes: int
    info: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, ids in self.rows.items():
            if name not in self.tables:
                raise HotSetError(f"hot set lists rows of table {name!r} but has no shape for it")
            self.rows[name] = _as_ids(name, ids)
            _check_rows(name, self.rows[name], self.tables[name].num_embeddings)

    @property
    def bytes(self) -> int:
        """Fast-memory bytes the hot rows take."""
        return sum(len(r) * self.tables[t].row_bytes for t, r in self.rows.items())

    def num_hot(self, table: str) -> int:
        return len(self.rows.get(table, ()))

    def check_tables(self, tables: Mapping[str, TableShape]) -> None:
        """HotSetError unless every profiled table exists in ``tables`` with the same shape."""
        for name, shape in self.tables.items():
            if name not in tables:
                raise HotSetError(f"the hot set was profiled for table {name!r}, which the model does not "
                                  f"have (model tables: {sorted(tables)}); re-run `recd-plugin profile` "
                                  "against this model's table config")
            if tables[name].num_embeddings != shape.num_embeddings or tables[name].embedding_dim != shape.embedding_dim:
                raise HotSetError(f"stale hot set: table {name!r} was profiled with {shape.num_embeddings} rows x "
                                  f"dim {shape.embedding_dim}, the model has {tables[name].num_embeddings} x "
                                  f"{tables[name].embedding_dim}; re-run `recd-plugin profile`")

    def save(self, path: Union[str, Path]) -> None:
        """Write ``path`` (``.npz`` appended if missing, like ``np.savez``): temp file + rename."""
        path = Path(path)
        if path.suffix != ".npz":
            path = path.with_name(path.name + ".npz")
        header: Dict[str, Any] = {"format_version": FORMAT_VERSION, "budget_bytes": self.budget_bytes,
                                  "info": self.info, "tables": {t: asdict(s) for t, s in self.tables.items()},
                                  "row_tables": sorted(self.rows)}
        try:  # before any file is touched; the digest is taken over the header as it reads back
            header["sha256"] = _digest(json.loads(json.dumps(header)), self.rows)
        except TypeError as e:
            raise HotSetError(f"hot set info is not JSON-serializable ({e}); store plain ints, floats, strings, "
                              "lists and dicts in HotSet.info (e.g. int(x) for numpy scalars)") from e
        arrays = {f"{_ROWS}{t}": r for t, r in self.rows.items()}
        arrays[_HEADER] = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    @classmethod
    def load(cls, path: Union[str, Path]) -> "HotSet":
        """Read and verify a hot set written by :meth:`save`; HotSetError if anything is off."""
        header, rows = _read(Path(path))
        tables, budget, info = _parse_header(header, path)
        listed = header["row_tables"]
        if sorted(rows) != listed:
            raise HotSetError(f"{path}: the header lists hot rows for tables {listed}, the file holds {sorted(rows)}; "
                              f"the file is damaged: {_REPROFILE}")
        unknown = [t for t in listed if t not in tables]
        if unknown:
            raise HotSetError(f"{path}: the hot set has rows for table(s) {unknown} but no shape for them; the file "
                              f"is damaged: {_REPROFILE}")
        for t, r in rows.items():  # before the digest: it hashes int64 bytes
            rows[t] = _as_ids(t, r, where=f"{path}: ")
        if _digest({k: v for k, v in header.items() if k != "sha256"}, rows) != header["sha256"]:
            raise HotSetError(f"{path}: content checksum mismatch (SHA-256 of the header and rows differs from the one "
                              f"recorded when it was written); the file is damaged: {_REPROFILE}")
        try:  # sorted / unique / in range: a file written by save() always is
            return cls(tables=tables, rows=rows, budget_bytes=budget, info=info)
        except HotSetError as e:
            raise HotSetError(f"{path}: {e}") from e


_REPROFILE = "re-run `recd-plugin profile` (or restore the file from where it was written)"


def _as_ids(table: str, ids: Any, where: str = "") -> np.ndarray:
    """``ids`` as a 1-D int64 array [H], or HotSetError.

    Refuses what ``np.asarray(ids, dtype=np.int64)`` would cast silently: floats (1.7 -> 1),
    strings ("3" -> 3) and booleans, and 2-D arrays (compared row by row below, or numpy's
    ambiguous-truth-value error)."""
    arr = np.asarray(ids)
    if arr.ndim != 1:
        raise HotSetError(f"{where}hot rows of table {table!r} have shape {arr.shape}; they must be a 1-D array of "
                          "row ids (one id per hot row): pass np.array([...], dtype=np.int64) or re-run "
                          "`recd-plugin profile`")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise HotSetError(f"{where}hot rows of table {table!r} are {arr.dtype} (e.g. {arr[0].item()!r}), not "
                          "integer row ids; cast, they would point at other rows. Pass integer ids "
                          "(np.array([...], dtype=np.int64)) or re-run `recd-plugin profile`")
    return arr.astype(np.int64)


def _check_rows(table: str, ids: np.ndarray, num_rows: int) -> None:
    """HotSetError unless ``ids`` [H] int64 are sorted, unique and in [0, num_rows)."""
    if ids.size and (ids[0] < 0 or ids[-1] >= num_rows or np.any(np.diff(ids) <= 0)):
        raise HotSetError(f"hot rows of table {table!r} must be sorted, unique and in [0, {num_rows}); pass "
                          "np.unique(ids) of this table's ids, or re-run `recd-plugin profile` for this table config")


def _digest(header: Mapping[str, Any], rows: Mapping[str, np.ndarray]) -> str:
    """SHA-256 of the header (canonical JSON, without the digest) and every table's rows
    (name, count, little-endian int64 ids), tables in name order."""
    h = hashlib.sha256(json.dumps(header, sort_keys=True, separators=(",", ":")).encode())
    for t in sorted(rows):
        r = np.ascontiguousarray(rows[t], dtype="<i8")
        h.update(f"\0{t}\0{r.size}\0".encode())
        h.update(r.tobytes())
    return h.hexdigest()


def _read(path: Path) -> Tuple[Any, Dict[str, np.ndarray]]:
    """(parsed JSON header, {table: raw row array}) of the file, or HotSetError."""
    try:
        size = path.stat().st_size
    except OSError as e:
        raise HotSetError(f"{path}: not a readable hot set ({e.strerror}); check the path (fae.hot_set) or "
                          "run `recd-plugin profile ... --out DIR` to write DIR/hot.npz") from e
    if size == 0:
        raise HotSetError(f"{path}: not a readable hot set: the file is empty (0 bytes: a placeholder, or written "
                          f"by a killed process); {_REPROFILE}")
    try:
        with np.load(str(path), allow_pickle=False) as z:
            header = json.loads(bytes(z[_HEADER]).decode())
            rows = {k[len(_ROWS):]: z[k] for k in z.files if k.startswith(_ROWS)}
    # A damaged zip fails in many ways (BadZipFile, EOFError, zlib/struct errors, numpy's
    # ValueError / NotImplementedError on a bad .npy header, RuntimeError): any of them
    # means "not a readable hot set".
    except Exception as e:
        raise HotSetError(f"{path}: not a readable hot set ({type(e).__name__}: {e}); {_REPROFILE}") from e
    return header, rows


def _parse_header(header: Any, path: Union[str, Path]) -> Tuple[Dict[str, TableShape], int, Dict[str, Any]]:
    """(tables, budget_bytes, info) from a hot set's JSON header; HotSetError naming the bad field."""
    if not isinstance(header, dict):
        raise HotSetError(f"{path}: the hot set header is a JSON {type(header).__name__}, not an object; {_REPROFILE}")
    version = header.get("format_version")
    if version != FORMAT_VERSION:
        why = " (written before hot sets carried a checksum)" if version == 1 else ""
        raise HotSetError(f"{path}: hot set format {version!r}{why}, this recd-plugin reads {FORMAT_VERSION}; "
                          f"{_REPROFILE}")

    def bad(what: str) -> HotSetError:
        return HotSetError(f"{path}: the hot set header {what}; the file was not written by HotSet.save or is "
                           f"damaged: {_REPROFILE}")

    for key, kind in (("tables", dict), ("budget_bytes", int), ("info", dict), ("row_tables", list), ("sha256", str)):
        if key not in header:
            raise bad(f"has no {key!r}")
        if not isinstance(header[key], kind) or isinstance(header[key], bool):
            raise bad(f"field {key!r} is {header[key]!r}, expected a JSON {kind.__name__}")
    if header["budget_bytes"] < 0:
        raise bad(f"budget_bytes is {header['budget_bytes']}")
    tables = {t: _table_shape(t, s, bad) for t, s in header["tables"].items()}
    return tables, header["budget_bytes"], header["info"]


def _table_shape(name: str, spec: Any, bad: Callable[[str], HotSetError]) -> TableShape:
    """The header's ``{num_embeddings, embedding_dim[, dtype_bytes]}`` of one table."""
    names = [f.name for f in fields(TableShape)]
    if not isinstance(spec, dict) or not set(spec) <= set(names) or not {"num_embeddings", "embedding_dim"} <= set(spec):
        raise bad(f"entry of table {name!r} is {spec!r}; expected {{'num_embeddings': N, 'embedding_dim': D}}")
    for k, v in spec.items():
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise bad(f"gives table {name!r} {k}={v!r}; expected a positive integer")
    return TableShape(**spec)
