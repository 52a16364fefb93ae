"""Turn a common-format table into TorchRec batches.

:class:`TableBatches` is a map-style dataset whose item ``i`` is the ``i``-th batch: rows
``[i * batch_size, (i + 1) * batch_size)`` of the table in stored (session) order, so the
samples of a session stay together and RecD's per-batch deduplication finds them.

Example::

    from torch.utils.data import DataLoader
    from recd_plugin.data import generate_sessions, split_by_time, TableBatches

    train, test = split_by_time(generate_sessions(seed=0), test_fraction=0.1)
    loader = DataLoader(TableBatches(train, batch_size=1024), batch_size=None,
                        num_workers=2)
    for batch in loader:          # torchrec.datasets.utils.Batch
        batch.sparse_features     # KeyedJaggedTensor, keys = SPARSE_FEATURES
        batch.dense_features      # float32 [B, 2]
        batch.labels              # float32 [B]

The table is converted once to flat arrays (values + offsets per feature); a batch is then
a handful of slices and one concatenation, no per-row work. The concatenation is numpy's:
``torch.cat`` hands large copies to the intra-op thread pool, whose wake-ups cost
milliseconds on a busy host.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa
import torch
from torch.utils.data import Dataset
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from .columns import JaggedColumn, dense_column
from .sessions import CARDINALITIES_KEY, DENSE_FEATURES, SPARSE_FEATURES, cardinalities


def _column(table: pa.Table, name: str) -> pa.Array:
    if name not in table.column_names:
        raise KeyError(f"column '{name}' not in table (columns: {table.column_names})")
    return table.column(name).combine_chunks()  # nulls and types: checked by data.columns


class TableBatches(Dataset):
    """Consecutive fixed-size batches of a table, as ``torchrec.datasets.utils.Batch``.

    Args:
        table: common-format ``pyarrow.Table`` (any table with the named columns works:
            integer or list<integer> sparse columns, numeric dense and label columns).
        batch_size: rows per batch B; the last batch is smaller unless ``drop_last``.
        sparse_features: KJT keys, in this order. Scalar columns give length-1 bags,
            list columns give jagged bags.
        dense_features: columns stacked into ``dense_features`` [B, len(dense_features)].
        label: column for ``labels`` [B].
        drop_last: drop a final partial batch.
    """

    def __init__(
        self,
        table: pa.Table,
        batch_size: int = 1024,
        sparse_features: Sequence[str] = SPARSE_FEATURES,
        dense_features: Sequence[str] = DENSE_FEATURES,
        label: str = "label",
        drop_last: bool = False,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        self.drop_last = drop_last
        self.sparse_features: List[str] = list(sparse_features)
        self.dense_feature_names: List[str] = list(dense_features)
        self._n = table.num_rows
        meta = table.schema.metadata or {}
        self.cardinalities: Optional[Dict[str, int]] = (
            cardinalities(table) if CARDINALITIES_KEY in meta else None
        )
        # Per sparse feature: flat int64 values, and for list columns the int64 offsets
        # [N+1] into them plus int32 lengths [N]; scalar columns have offsets None.
        self._values: List[np.ndarray] = []
        self._offsets: List[Optional[np.ndarray]] = []
        self._lengths: List[Optional[np.ndarray]] = []
        for name in self.sparse_features:
            col = JaggedColumn.from_arrow(_column(table, name), name)
            self._values.append(col.values)
            self._offsets.append(col.offsets)
            self._lengths.append(None if col.offsets is None else np.diff(col.offsets).astype(np.int32))
        dense = [dense_column(_column(table, c), c) for c in dense_features]
        self._dense = np.stack(dense, axis=1) if dense else np.zeros((self._n, 0), np.float32)
        self._labels = dense_column(_column(table, label), label)
        self._ones = np.ones(batch_size, dtype=np.int32)

    @property
    def num_samples(self) -> int:
        """Rows in the table (including a dropped last partial batch)."""
        return self._n

    def __len__(self) -> int:
        if self.drop_last:
            return self._n // self.batch_size
        return -(-self._n // self.batch_size)

    def __getitem__(self, i: int) -> Batch:
        n_batches = len(self)
        if i < 0:
            i += n_batches
        if not 0 <= i < n_batches:
            raise IndexError(f"batch {i} out of range ({n_batches} batches)")
        a = i * self.batch_size
        b = min(a + self.batch_size, self._n)
        values, lengths = [], []
        for vals, off, lens in zip(self._values, self._offsets, self._lengths):
            if off is None:
                values.append(vals[a:b])
                lengths.append(self._ones[: b - a])
            else:
                values.append(vals[off[a] : off[b]])
                lengths.append(lens[a:b])
        kjt = KeyedJaggedTensor(
            keys=self.sparse_features,
            values=torch.from_numpy(np.concatenate(values)),
            lengths=torch.from_numpy(np.concatenate(lengths)),
            stride=b - a,
        )
        # Copies, not views: a view would pin (and, from a DataLoader worker, ship) the
        # whole table's array.
        return Batch(
            dense_features=torch.from_numpy(self._dense[a:b].copy()),
            sparse_features=kjt,
            labels=torch.from_numpy(self._labels[a:b].copy()),
        )


def split_by_time(table: pa.Table, test_fraction: float = 0.1) -> Tuple[pa.Table, pa.Table]:
    """Split by a global time cut: rows with ``timestamp`` at/after the
    ``1 - test_fraction`` quantile go to test; both parts keep the stored row order
    (and the schema metadata)."""
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
    if test_fraction == 0.0 or table.num_rows == 0:
        return table, table.slice(0, 0)
    ts = _column(table, "timestamp").to_numpy()
    test = ts >= np.quantile(ts, 1.0 - test_fraction)
    return table.filter(pa.array(~test)), table.filter(pa.array(test))
