"""Read a bounded sample of the data to analyze, and find its session-level columns.

::

    from recd_plugin.analyze.sources import load_sample
    sample = load_sample("movielens-100k", max_rows=100_000)     # or a Parquet path
    sample.session_key, sample.session_columns                   # "session_id", [user_id, ...]

DATA is a Parquet file / directory (one row per sample) or a built-in source name, the names
every command takes (``recd_plugin.data.builtin``): ``synthetic``
(``recd_plugin.data.generate_sessions``), ``movielens-100k`` (``load_movielens_100k``, fetched
into the cache when missing), ``criteo-synthetic`` (``recd_plugin.data.criteo.criteo_table``,
tables capped at 10^6 rows like the FAE benchmark: independent impressions) or
``criteo-sessions`` (the same in sessions of 16 samples sharing ``C1..C13``, with a
``session_id`` column: the data of ``recd-plugin bench models``).

The sample is the *first* ``max_rows`` rows, in stored order: the unique fraction "as stored"
depends on which rows sit next to each other, which a random sample would destroy. A Parquet
input is read record batch by record batch (64k rows) by the reader every tool shares
(``recd_plugin.storage.parquet_input``) and reading stops once the sample is full, so memory
is bounded by the sample, not by the data set.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import pyarrow as pa

from recd_plugin.data.builtin import BuiltinSource, not_found_hint, resolve_data
from recd_plugin.errors import AnalyzeError, did_you_mean
from recd_plugin.storage.parquet_input import open_parquet

#: Integer columns that are not embedding features in the common formats.
NOT_FEATURES = {"label", "click", "timestamp"}
_READ_ROWS = 65_536
_HASH_SEED = 0x5EED


@dataclass
class DataSample:
    """A bounded sample of the data, rows in stored order.

    ``sparse``: integer / list<integer> columns usable as embedding features (the session key
    excluded); ``cardinalities``: rows per feature (schema metadata ``recd.cardinalities``,
    else max id + 1 in the sample); ``total_rows``: rows in the whole source when known.
    """

    name: str
    table: pa.Table
    total_rows: Optional[int]
    session_key: Optional[str]
    sparse: List[str]
    cardinalities: Dict[str, int]
    session_columns: List[str] = field(default_factory=list)
    varying_columns: List[str] = field(default_factory=list)

    @property
    def rows(self) -> int:
        return self.table.num_rows


def _is_int(t: pa.DataType) -> bool:
    from recd_plugin.data.columns import is_list

    return pa.types.is_integer(t) or (is_list(t) and pa.types.is_integer(t.value_type))


def _read_parquet(path: Path, max_rows: int, progress: bool) -> Tuple[pa.Table, int]:
    parquet = open_parquet(path, error=AnalyzeError, hint=not_found_hint())
    total = parquet.num_rows
    if total == 0:
        raise AnalyzeError(f"{path}: the Parquet data has no rows: nothing to analyze")
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=min(total, max_rows), desc="read", unit="row")
    batches = []
    for _, rb in parquet.batches(_READ_ROWS, max_rows=max_rows):  # stops once the sample is full
        batches.append(rb)
        if bar is not None:
            bar.update(rb.num_rows)
    if bar is not None:
        bar.close()
    return pa.Table.from_batches(batches, schema=parquet.schema), total


def _builtin(source: BuiltinSource, max_rows: int, seed: int) -> Tuple[pa.Table, Optional[int]]:
    # Generated sources make exactly the sample (their tables capped at 10^6 rows, like the FAE
    # benchmark, so predictions compare); fixed-size ones are read whole and cut.
    table = source.load(num_samples=max_rows, seed=seed).table
    return table.slice(0, max_rows), (table.num_rows if source.fixed_size else None)


def load_sample(data: str, max_rows: int = 200_000, seed: int = 0, session_key: Optional[str] = None,
                progress: bool = True) -> DataSample:
    """Read DATA's first ``max_rows`` rows and classify its columns (see the module doc)."""
    if max_rows < 1:
        raise AnalyzeError(f"--sample must be >= 1 rows, got {max_rows}")
    found = resolve_data(data, AnalyzeError)
    if isinstance(found, Path):
        table, total = _read_parquet(found, max_rows, progress)
    else:
        table, total = _builtin(found, max_rows, seed)
    meta = table.schema.metadata or {}
    known = json.loads(meta[b"recd.cardinalities"]) if b"recd.cardinalities" in meta else {}
    if session_key is None:
        session_key = "session_id" if "session_id" in table.column_names else None
    elif session_key not in table.column_names:
        raise AnalyzeError(f"--session-key {session_key!r} is not a column of {data}"
                           f"{did_you_mean(session_key, table.column_names)}; columns: {table.column_names}")
    sparse = [c for c in table.column_names
              if _is_int(table.schema.field(c).type) and c not in NOT_FEATURES and c != session_key]
    if not sparse:
        raise AnalyzeError(f"{data}: no integer or list<integer> column to use as an embedding feature "
                           f"(columns: {table.column_names})")
    cards = {}
    for c in sparse:
        if c in known:
            cards[c] = int(known[c])
        else:  # no metadata: the sample's largest id bounds the table (an assumption, stated)
            values = id_values(table.column(c))
            cards[c] = int(values.max()) + 1 if values.size else 1
    sample = DataSample(data, table, total, session_key, sparse, cards)
    if session_key is not None:
        key = row_codes(table.column(session_key))
        constant = [c for c in sparse if is_constant_within(key, row_codes(table.column(c)))]
        sample.session_columns = constant
        sample.varying_columns = [c for c in sparse if c not in constant]
    return sample


def id_values(col) -> np.ndarray:
    """int64 [N]: every id of a scalar or list column (list values flattened)."""
    from recd_plugin.data.columns import JaggedColumn

    return JaggedColumn.from_arrow(col, "column").values


def row_codes(col) -> np.ndarray:
    """int64 [N]: one code per row, equal rows -> equal codes.

    Scalar columns: the value. List columns: a 64-bit polynomial hash of (length, values) with
    random odd weights per position (wrapping uint64 arithmetic); two different rows share a
    code with probability about 2^-64 per pair, negligible for unique-fraction estimates.
    """
    from recd_plugin.data.columns import JaggedColumn

    jc = JaggedColumn.from_arrow(col, "column")
    if jc.offsets is None:
        return jc.values.astype(np.int64, copy=False)
    lengths = np.diff(jc.offsets)
    pos = np.arange(jc.values.size) - np.repeat(jc.offsets[:-1], lengths)  # position within its row
    rng = np.random.default_rng(_HASH_SEED)
    weights = rng.integers(1, 2**63, size=int(lengths.max(initial=0)) + 1, dtype=np.uint64) | np.uint64(1)
    with np.errstate(over="ignore"):
        terms = jc.values.astype(np.uint64) * weights[pos]
        # Row sums as differences of one wrapping cumulative sum (exact modulo 2^64).
        cum = np.concatenate([np.zeros(1, np.uint64), np.cumsum(terms, dtype=np.uint64)])
        sums = cum[jc.offsets[1:]] - cum[jc.offsets[:-1]]
        codes = sums * np.uint64(0x9E3779B97F4A7C15) + lengths.astype(np.uint64)
    return codes.view(np.int64)


def is_constant_within(key: np.ndarray, codes: np.ndarray) -> bool:
    """True when every row with the same ``key`` has the same ``codes`` value."""
    pairs = np.unique(np.stack([key, codes], axis=1), axis=0)
    return pairs.shape[0] == np.unique(key).size
