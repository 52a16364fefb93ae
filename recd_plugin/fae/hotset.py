"""FAE's hot set: which rows of which tables live in fast memory, and the tables it was made for.

Written by the profiler (:mod:`recd_plugin.fae.profile`), read by the hot/cold embedding swap,
the batch scheduler and the planner hints. A hot set records the table shapes it was profiled
against; :meth:`HotSet.check_tables` refuses a model whose tables differ (a stale hot set
must never be applied silently: its row ids would point at the wrong rows).

On disk (``HotSet.save(path)``): ``path`` is a ``.npz`` holding one sorted int64 array of hot
row ids per table plus a JSON header (tables, budget, profile facts).

Example::

    from recd_plugin.fae.hotset import HotSet, TableShape
    hot = HotSet.load("hot.npz")
    hot.check_tables({"t_C1": TableShape(num_embeddings=1460, embedding_dim=16)})
    hot.rows["t_C1"]          # np.ndarray [H] int64, sorted, unique
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, Mapping, Union

import numpy as np

from recd_plugin.errors import HotSetError

FORMAT_VERSION = 1
_HEADER = "__header__"


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
            ids = np.asarray(ids, dtype=np.int64)
            n = self.tables[name].num_embeddings
            if ids.size and (ids[0] < 0 or ids[-1] >= n or np.any(np.diff(ids) <= 0)):
                raise HotSetError(f"hot rows of table {name!r} must be sorted, unique and in [0, {n})")
            self.rows[name] = ids

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
        header = {"format_version": FORMAT_VERSION, "budget_bytes": self.budget_bytes, "info": self.info,
                  "tables": {t: asdict(s) for t, s in self.tables.items()}}
        arrays = {f"rows/{t}": r for t, r in self.rows.items()}
        np.savez(str(path), **arrays, **{_HEADER: np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)})

    @classmethod
    def load(cls, path: Union[str, Path]) -> "HotSet":
        try:
            with np.load(str(path), allow_pickle=False) as z:
                header = json.loads(bytes(z[_HEADER]).decode())
                rows = {k[len("rows/"):]: z[k] for k in z.files if k.startswith("rows/")}
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
            raise HotSetError(f"{path}: not a readable hot set ({e!r}); re-run `recd-plugin profile`") from e
        if header.get("format_version") != FORMAT_VERSION:
            raise HotSetError(f"{path}: hot set format {header.get('format_version')}, expected {FORMAT_VERSION}; "
                              "re-run `recd-plugin profile`")
        tables = {t: TableShape(**s) for t, s in header["tables"].items()}
        return cls(tables=tables, rows=rows, budget_bytes=int(header["budget_bytes"]), info=header["info"])
