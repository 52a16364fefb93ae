"""Embedding accesses of a data source, feature by feature: the input side of FAE's profiler.

A *source* is any iterable of ``torchrec.datasets.utils.Batch`` (its ``sparse_features`` KJT
is read) or the path of a Parquet file / directory with one row per sample (integer or
list<integer> columns named like the features; read by ``recd_plugin.storage.parquet_input``,
the Parquet reader every tool shares, so its errors read as in preprocess and analyze).
:func:`iter_accesses` turns either into chunks of ``(B, {feature: (ids, sample)})`` where
``ids`` int64 [N] are the feature's ids in the chunk and ``sample`` int64 [N] the index in
[0, B) of the sample each id belongs to, so the profiler and the trace replay never touch a
KJT themselves.

Tables: FAE ranks *table rows*, and several features may share a table.
:func:`tables_from_configs` reads ``EmbeddingBagConfig`` / ``EmbeddingConfig`` lists into
``({table: TableShape}, {feature: table})``::

    from recd_plugin.fae.access import tables_from_configs
    tables, feature_to_table = tables_from_configs(ebc.embedding_bag_configs())

Every id is checked against its table size (a HotSetError names the feature, the id and the
table size): a hot set profiled against the wrong table config must not be built at all.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torchrec.datasets.utils import Batch
from torchrec.modules.embedding_configs import BaseEmbeddingConfig, data_type_to_dtype

from recd_plugin.errors import HotSetError, did_you_mean
from recd_plugin.fae.hotset import TableShape

Source = Union[Iterable[Batch], str, Path]
#: (B, {feature: (ids int64 [N], sample index int64 [N] in [0, B))})
Chunk = Tuple[int, Dict[str, Tuple[np.ndarray, np.ndarray]]]


def tables_from_configs(configs: Sequence[BaseEmbeddingConfig]) -> Tuple[Dict[str, TableShape], Dict[str, str]]:
    """``({table name: TableShape}, {feature name: table name})`` of TorchRec table configs."""
    tables: Dict[str, TableShape] = {}
    feature_to_table: Dict[str, str] = {}
    for c in configs:
        elem = torch.empty((), dtype=data_type_to_dtype(c.data_type)).element_size()
        tables[c.name] = TableShape(c.num_embeddings, c.embedding_dim, elem)
        for f in c.feature_names:
            feature_to_table[f] = c.name
    return tables, feature_to_table


def resolve_tables(tables: Mapping[str, TableShape],
                   feature_to_table: Optional[Mapping[str, str]]) -> Dict[str, str]:
    """The feature -> table map; without one every table is the feature of the same name."""
    if feature_to_table is None:
        return {t: t for t in tables}
    for f, t in feature_to_table.items():
        if t not in tables:
            raise HotSetError(f"feature {f!r} maps to table {t!r}, which is not among the tables "
                              f"{sorted(tables)}{did_you_mean(t, list(tables))}")
    return dict(feature_to_table)


def _check_features(features: Sequence[str], available: Sequence[str], where: str) -> None:
    missing = [f for f in features if f not in available]
    if missing:
        hints = "".join(did_you_mean(m, available) for m in missing[:1])
        raise HotSetError(f"unknown feature(s) {missing}{hints}: {where} has {list(available)}; "
                          "name features that exist in the data (--tables / feature_to_table)")


def _kjt_chunk(batch: Batch, features: Sequence[str], checked: List[bool]) -> Chunk:
    kjt = batch.sparse_features
    keys = kjt.keys()
    if not checked[0]:
        _check_features(features, keys, "the batches' KJT")
        checked[0] = True
    if kjt.variable_stride_per_key():
        # A RecD IKJT holds unique rows only: counting it would undercount duplicated rows.
        raise HotSetError("profile plain batches: this KJT has variable strides (a RecD IKJT); "
                          "profile the data before the dedup transform")
    b = kjt.stride()
    lengths = kjt.lengths().numpy().astype(np.int64, copy=False).reshape(len(keys), b)
    values = kjt.values().numpy().astype(np.int64, copy=False)
    starts = np.concatenate([[0], np.cumsum(lengths.sum(axis=1))])
    out = {}
    for f in features:
        k = keys.index(f)
        sample = np.repeat(np.arange(b, dtype=np.int64), lengths[k])
        out[f] = (values[starts[k]:starts[k + 1]], sample)
    return b, out


#: How a profile's user fixes a feature the Parquet input lacks.
PARQUET_FIX = ": name features that exist in the data (--tables / feature_to_table)"


def _parquet_chunks(path: Path, features: Sequence[str], batch_rows: int) -> Iterator[Chunk]:
    from recd_plugin.data.columns import JaggedColumn
    from recd_plugin.storage.parquet_input import open_parquet

    parquet = open_parquet(path, features, error=HotSetError, fix=PARQUET_FIX)
    for _, rb in parquet.batches(batch_rows, columns=features):
        b = rb.num_rows
        out = {}
        for f in features:
            col = JaggedColumn.from_arrow(rb.column(f), f)
            if col.offsets is None:
                out[f] = (col.values, np.arange(b, dtype=np.int64))
            else:
                out[f] = (col.values, np.repeat(np.arange(b, dtype=np.int64), np.diff(col.offsets)))
        yield b, out


def iter_accesses(source: Source, features: Sequence[str], batch_rows: int = 65_536) -> Iterator[Chunk]:
    """Chunks of ``source`` restricted to ``features`` (Batches one by one, Parquet by
    ``batch_rows`` rows). Raises HotSetError for features the source does not have."""
    if isinstance(source, (str, Path)):
        yield from _parquet_chunks(Path(source), features, batch_rows)
        return
    checked = [False]
    for batch in source:
        yield _kjt_chunk(batch, features, checked)


def check_ids(feature: str, ids: np.ndarray, table: str, shape: TableShape, chunk_index: int) -> None:
    """HotSetError if an id of ``feature`` is outside its table (names feature, id, size)."""
    if ids.size == 0:
        return
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= shape.num_embeddings:
        bad = lo if lo < 0 else hi
        raise HotSetError(f"feature {feature!r}: id {bad} in batch {chunk_index} is outside table {table!r} "
                          f"of {shape.num_embeddings} rows (valid ids 0..{shape.num_embeddings - 1}); "
                          "the table config does not match the data: fix the table sizes (--tables / "
                          "num_embeddings) or remap the ids")
