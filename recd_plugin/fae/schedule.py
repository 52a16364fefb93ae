"""FAE's batch scheduling: classify batches as all-hot or mixed, and regroup samples so more
batches are all-hot.

A sample is *hot* when every id it reads from the hot set's tables is a hot row; a batch is
*all-hot* when all its samples are, and then the hot/cold embedding module serves it from the
hot tier alone (:mod:`recd_plugin.fae.hotcold`). Real batches mix both, so FAE regroups: within
a window of W input batches, hot samples are packed into as many full all-hot batches as
they fill, and the rest (mixed samples plus the leftover hot ones) form the mixed batches::

    from recd_plugin.fae.schedule import HotBatchScheduler
    sched = HotBatchScheduler(loader, hot_set, feature_to_table={"C1": "t_C1", ...}, window=8)
    for batch in sched:            # ScheduledBatch: a torchrec Batch with `all_hot`
        loss = model(batch)...
    sched.stats                    # this epoch: samples/labels/ids in and out, hot/mixed batches
    sched.check()                  # raises if any sample was lost or duplicated

Rules (all deterministic, no randomness):

* ``window=None``: classify only; batches pass through unchanged (same tensors).
* ``window=W``: W consecutive input batches form a window (the epoch's last window may be
  shorter). Output batch i of a window has exactly the size of input batch i, so a partial
  last batch stays last and partial. Hot samples come first, in input order, then the others
  in input order: the first ``floor(hot / B)`` batches are all-hot, the rest mixed. A
  sample never leaves its window: its output position lies in the window's positions.
* Features not in ``feature_to_table`` are not looked at (their tables are not split, so
  they never touch a cold tier). Default map: each hot-set table is the feature of its name.
* ``on_switch``: called whenever the output switches between all-hot and mixed batches: FAE
  synchronizes hot rows there. With :class:`HotColdEmbeddingBagCollection` pass its ``sync``:
  it is a no-op because each row lives in one tier (see hotcold.py), but the count of
  switches is kept in the stats.

Sample content is preserved exactly: dense rows, labels, every KJT row (multi-hot lengths,
ids, weights, dtypes). Counters per epoch prove conservation (:class:`ScheduleStats`); the
end of every epoch runs :meth:`HotBatchScheduler.check`. The scheduler wraps the DataLoader's
*output* in the main process (workers keep decoding in parallel); it holds W batches at once.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field, fields
from typing import Callable, Iterable, Iterator, List, Mapping, Optional

import numpy as np
import torch
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recd_plugin.errors import ConfigError, HotSetError, MalformedBatchError, RecDError, did_you_mean
from recd_plugin.fae.hotset import HotSet
from recd_plugin.sparse.ikjt import complete_cumsum, jagged_index_select


@dataclass
class ScheduledBatch(Batch):
    """A torchrec ``Batch`` that knows whether all its samples are hot."""

    all_hot: bool = False

    def to(self, device: torch.device, non_blocking: bool = False) -> "ScheduledBatch":
        b = super().to(device, non_blocking)
        return ScheduledBatch(b.dense_features, b.sparse_features, b.labels, self.all_hot)

    def pin_memory(self) -> "ScheduledBatch":
        b = super().pin_memory()
        return ScheduledBatch(b.dense_features, b.sparse_features, b.labels, self.all_hot)


@dataclass
class ScheduleStats:
    """One epoch's counters. ``*_in`` count input batches, ``*_out`` output batches."""

    batches_in: int = 0
    batches_out: int = 0
    samples_in: int = 0
    samples_out: int = 0
    label_sum_in: float = 0.0
    label_sum_out: float = 0.0
    ids_in: int = 0
    ids_out: int = 0
    id_sum_in: int = 0
    id_sum_out: int = 0
    dense_sum_in: float = 0.0
    dense_sum_out: float = 0.0
    hot_samples: int = 0
    hot_batches: int = 0
    mixed_batches: int = 0
    switches: int = 0
    _last_kind: Optional[bool] = field(default=None, repr=False)

    def add(self, batch: Batch, side: str) -> None:
        kjt = batch.sparse_features
        setattr(self, f"batches_{side}", getattr(self, f"batches_{side}") + 1)
        for name, value in (("samples", int(batch.labels.shape[0])), ("label_sum", float(batch.labels.double().sum())),
                            ("ids", int(kjt.values().numel())), ("id_sum", int(kjt.values().long().sum())),
                            ("dense_sum", float(batch.dense_features.double().sum()))):
            setattr(self, f"{name}_{side}", getattr(self, f"{name}_{side}") + value)

    def check(self) -> None:
        """RecDError unless everything that went in came out (dense sums within 1e-9)."""
        for f in fields(self):
            if f.name.endswith("_in"):
                a, b = getattr(self, f.name), getattr(self, f.name[:-3] + "_out")
                ok = abs(a - b) <= 1e-9 * max(1.0, abs(a)) if f.name == "dense_sum_in" else a == b
                if not ok:
                    raise RecDError(f"FAE scheduler lost or duplicated samples: {f.name}={a} but "
                                    f"{f.name[:-3]}_out={b}; this is a bug in recd_plugin.fae.schedule")


def hot_samples(kjt: KeyedJaggedTensor, hot_set: HotSet, feature_to_table: Mapping[str, str]) -> np.ndarray:
    """[B] bool: samples whose every id of the mapped features is a hot row of its table."""
    if kjt.variable_stride_per_key():
        raise MalformedBatchError("schedule plain batches: this KJT has variable strides (a RecD IKJT); put "
                                  "the FAE scheduler before the dedup transform")
    keys, batch = kjt.keys(), kjt.stride()
    lengths = kjt.lengths().detach().cpu().numpy().reshape(len(keys), batch)
    values = kjt.values().detach().cpu().numpy()
    opk = kjt.offset_per_key()
    cold = np.zeros(batch, dtype=np.int64)  # cold ids per sample
    for f, table in feature_to_table.items():
        if f not in keys:
            raise MalformedBatchError(f"feature {f!r} of feature_to_table is not in the batch's KJT "
                                      f"{keys}{did_you_mean(f, keys)}")
        k = keys.index(f)
        ids = values[opk[k]:opk[k + 1]]
        n = hot_set.tables[table].num_embeddings
        if ids.size and (ids.min() < 0 or ids.max() >= n):
            bad = ids[(ids < 0) | (ids >= n)][0]
            raise HotSetError(f"feature {f!r}: id {bad} is outside table {table!r} (rows 0..{n - 1}); a hot set "
                              "for another table config, or bad input ids")
        hot = hot_set.rows.get(table, np.zeros(0, np.int64))
        pos = np.minimum(np.searchsorted(hot, ids), max(len(hot) - 1, 0))
        is_cold = hot[pos] != ids if len(hot) else np.ones(len(ids), dtype=bool)
        cold += np.bincount(np.repeat(np.arange(batch), lengths[k]), weights=is_cold,
                            minlength=batch).astype(np.int64)
    return cold == 0


class HotBatchScheduler:
    """Iterable of :class:`ScheduledBatch` over ``batches`` (any iterable of ``Batch``; each
    ``iter()`` is one epoch). See the module doc for the rules.

    Args:
        batches: the input batches (a DataLoader, a list, a generator for one epoch).
        hot_set: the hot rows.
        feature_to_table: feature -> table of the hot set (default: the table's own name).
        window: batches per regrouping window (None: classify only).
        on_switch: called when the output switches between all-hot and mixed batches.
    """

    def __init__(self, batches: Iterable[Batch], hot_set: HotSet, feature_to_table: Optional[Mapping[str, str]] = None,
                 window: Optional[int] = None, on_switch: Optional[Callable[[], None]] = None) -> None:
        if window is not None and (isinstance(window, bool) or not isinstance(window, numbers.Integral) or window < 1):
            raise ConfigError(f"HotBatchScheduler: window must be an integer >= 1 (input batches regrouped together), "
                              f"or None to classify batches only (what the flag's fae.window=0 means); got {window!r}")
        if feature_to_table is not None and not isinstance(feature_to_table, Mapping):
            raise ConfigError(f"HotBatchScheduler: feature_to_table must map features to hot-set tables, e.g. "
                              f"{{'C1': 't_C1'}}, or be None (each table is the feature of its name); got "
                              f"{type(feature_to_table).__name__}")
        if on_switch is not None and not callable(on_switch):
            raise ConfigError(f"HotBatchScheduler: on_switch must be a callable taking no arguments (e.g. the "
                              f"hot/cold module's sync), or None; got {type(on_switch).__name__}")
        if feature_to_table is None:
            feature_to_table = {t: t for t in hot_set.tables}
        self.feature_to_table = dict(feature_to_table)
        for f, t in self.feature_to_table.items():
            if t not in hot_set.tables:
                raise HotSetError(f"feature {f!r} maps to table {t!r}, which the hot set does not have "
                                  f"(it has {sorted(hot_set.tables)}){did_you_mean(t, list(hot_set.tables))}")
        self.batches, self.hot_set, self.window, self.on_switch = batches, hot_set, window, on_switch
        self.epochs: List[ScheduleStats] = []

    @property
    def stats(self) -> ScheduleStats:
        """The current (or last) epoch's counters."""
        if not self.epochs:
            raise RecDError("no epoch has started yet: iterate over the scheduler first")
        return self.epochs[-1]

    def check(self) -> None:
        """RecDError unless the last epoch lost or duplicated nothing."""
        self.stats.check()

    def __iter__(self) -> Iterator[ScheduledBatch]:
        stats = ScheduleStats()
        self.epochs.append(stats)
        buffer: List[Batch] = []
        for batch in self.batches:
            stats.add(batch, "in")
            if self.window is None:
                hot = self._hot(batch)
                stats.hot_samples += int(hot.sum())
                yield self._emit(batch, bool(hot.all()), stats)
                continue
            buffer.append(batch)
            if len(buffer) == self.window:
                yield from self._regroup(buffer, stats)
                buffer = []
        if buffer:
            yield from self._regroup(buffer, stats)
        stats.check()

    def _hot(self, batch: Batch) -> np.ndarray:
        return hot_samples(batch.sparse_features, self.hot_set, self.feature_to_table)

    def _emit(self, batch: Batch, all_hot: bool, stats: ScheduleStats) -> ScheduledBatch:
        if stats._last_kind is not None and stats._last_kind != all_hot:
            stats.switches += 1
            if self.on_switch is not None:
                self.on_switch()
        stats._last_kind = all_hot
        stats.hot_batches += all_hot
        stats.mixed_batches += not all_hot
        out = ScheduledBatch(batch.dense_features, batch.sparse_features, batch.labels, all_hot)
        stats.add(out, "out")
        return out

    def _regroup(self, window: List[Batch], stats: ScheduleStats) -> Iterator[ScheduledBatch]:
        """One window: hot samples first, then the others; output sizes = input sizes."""
        kjts = [b.sparse_features for b in window]
        keys, weighted = kjts[0].keys(), kjts[0].weights_or_none() is not None
        for k in kjts[1:]:
            if k.keys() != keys or (k.weights_or_none() is not None) != weighted:
                raise MalformedBatchError(f"batches of one window differ in KJT keys or weights ({keys} vs "
                                          f"{k.keys()}); the scheduler needs batches of one schema")
        hot = np.concatenate([self._hot(b) for b in window])
        stats.hot_samples += int(hot.sum())
        order = torch.from_numpy(np.concatenate([np.flatnonzero(hot), np.flatnonzero(~hot)]))
        sizes = [k.stride() for k in kjts]
        # Window rows in the concatenation of the batches' (key-major) rows; row_of[k, s] is
        # the row of key k for window sample s, so any sample subset is one jagged select.
        lengths = torch.cat([k.lengths() for k in kjts])
        values = torch.cat([k.values() for k in kjts])
        weights = torch.cat([k.weights() for k in kjts]) if weighted else None
        row_base = np.cumsum([0] + [len(keys) * b for b in sizes])
        row_of = torch.from_numpy(np.concatenate(
            [row_base[i] + np.arange(len(keys))[:, None] * b + np.arange(b)[None, :] for i, b in enumerate(sizes)],
            axis=1))
        offsets = complete_cumsum(lengths)
        dense = torch.cat([b.dense_features for b in window])
        labels = torch.cat([b.labels for b in window])
        n_hot, start = int(hot.sum()), 0
        for b in sizes:
            idx = order[start:start + b]
            rows = row_of.index_select(1, idx).reshape(-1)
            v, ln, pos = jagged_index_select(values, lengths, rows, offsets)
            kjt = KeyedJaggedTensor(keys=list(keys), values=v, lengths=ln.to(lengths.dtype), stride=b,
                                    weights=None if weights is None else weights.index_select(0, pos))
            out = Batch(dense.index_select(0, idx), kjt, labels.index_select(0, idx))
            yield self._emit(out, start + b <= n_hot, stats)
            start += b
