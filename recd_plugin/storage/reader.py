"""Readers: the deduplicated layout -> IKJT batches, and the flat baseline -> plain KJT batches.

:class:`DedupReader` builds each batch's IKJT straight from the layout: the unique session
rows are the batch's sessions (their rows are read once from the sessions table) and the
session inverse is the run number of each sample; the unique item rows come from the events'
``item_row`` references. Nothing is hashed or compared at read time. The IKJT is the
format of :func:`recd_plugin.sparse.ikjt.build_ikjt` with groups ``session`` (keyed by the
session key) and ``item`` (keyed by the item key), so ``expand(batch.sparse_features)`` is
exactly the plain KJT of the same samples.

Example::

    from torch.utils.data import DataLoader
    reader = DedupReader("/data/ml100k-recd", batch_size=1024, rank=r, world_size=w,
                         shuffle=True, seed=0)
    for epoch in range(3):
        reader.set_epoch(epoch)
        for batch in DataLoader(reader, batch_size=None, num_workers=2):
            batch.sparse_features       # IKJT (torchrec KJT with inverse_indices)

Sharding: events files are dealt round-robin to the ``world_size * num_workers`` readers (so
use at least that many files: ``preprocess(rows_per_file=...)``). Batches never cross files
and never split a session shorter than the batch, so a batch may hold fewer than
``batch_size`` samples (sessions are packed greedily in order).
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import IterableDataset, get_worker_info
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recd_plugin.data.batches import TableBatches
from recd_plugin.errors import RecDError, StorageError
from recd_plugin.sparse.plan import offsets_of, segment_positions
from recd_plugin.data.columns import JaggedColumn, dense_column
from recd_plugin.storage.layout import (
    DEFAULT_ROW_GROUP_ROWS, HISTORY_LEN, HISTORY_START, ITEM_REF, SESSION_REF, PathLike, StorageSpec,
    read_data_file, read_manifest, rewrite_fix, write_table,
)


def _shard(n: int, rank: int, world_size: int) -> Tuple[int, int]:
    """(this reader's index, number of readers) over ranks x DataLoader workers."""
    if not 0 <= rank < world_size:
        raise StorageError(f"rank {rank} is not in [0, world_size={world_size})")
    info = get_worker_info()
    workers, wid = (info.num_workers, info.id) if info is not None else (1, 0)
    return rank * workers + wid, world_size * workers


class _Table:
    """Sparse (jagged) and dense columns of one stored table, as numpy."""

    def __init__(self, table: pa.Table, sparse: Sequence[str], dense: Sequence[str]) -> None:
        self.sparse = {f: JaggedColumn.from_arrow(table.column(f), f) for f in sparse}
        self.dense = {f: dense_column(table.column(f), f) for f in dense}


def pack_sessions(lengths: np.ndarray, batch_size: int) -> List[List[Tuple[int, int, int]]]:
    """Greedy packing of sessions (in the given order) into batches of <= ``batch_size``.

    Returns per batch a list of segments (session position, start inside it, length). A
    session is split only when it is longer than the batch: it then fills whole batches and
    its tail opens a batch that later sessions may join.
    """
    batches: List[List[Tuple[int, int, int]]] = []
    current: List[Tuple[int, int, int]] = []
    room = batch_size
    for s, n in enumerate(lengths.tolist()):
        if n <= room:
            current.append((s, 0, n))
            room -= n
            continue
        if current:
            batches.append(current)
        current, room, start = [], batch_size, 0
        while n - start > batch_size:  # longer than a batch: split, whole batches first
            batches.append([(s, start, batch_size)])
            start += batch_size
        current.append((s, start, n - start))
        room = batch_size - (n - start)
    if current:
        batches.append(current)
    return batches


class DedupReader(IterableDataset):
    """IKJT batches from a preprocessed directory (see the module docstring).

    Args:
        path: directory written by :func:`recd_plugin.storage.preprocess`.
        batch_size: maximum samples per batch.
        rank, world_size: this trainer's share of the files.
        shuffle: shuffle file order and session order (per ``seed`` and epoch); samples of a
            session stay together and in order.
        verify_checksums: hash every data file when it is opened and compare with the sha256
            the manifest recorded at preprocess (default). ``False`` skips the hash (one pass
            over the file's bytes) for speed; Parquet page CRCs, row counts and the layout's
            reference checks still run, but a flipped bit outside a data page (page headers,
            footer) may then go unnoticed.

    Every file is checked against the manifest when the reader is built (size, row count,
    columns) and when it is read (checksum, references in range); an inconsistency raises
    StorageError naming the file, never a wrong batch.
    """

    #: Its batches are IKJTs already: ``recd_plugin.apply`` / ``wrap`` pass them on (or expand
    #: them for TorchRec's plain path) instead of deduplicating them again.
    deduplicated = True

    def __init__(self, path: PathLike, batch_size: int, *, rank: int = 0, world_size: int = 1,
                 shuffle: bool = False, seed: int = 0, epoch: int = 0, verify_checksums: bool = True) -> None:
        if batch_size < 1:
            raise StorageError(f"batch_size must be >= 1, got {batch_size}")
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        self.verify_checksums = verify_checksums
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.shuffle, self.seed, self.epoch = shuffle, seed, epoch
        spec = self.manifest.spec
        self.spec = spec
        self.keys = list(spec.sparse_features)
        where = {c: "sessions" for c in spec.session_level}
        where.update({c: "items" for c in spec.item_level})
        self._where = {f: where.get(f, "events") for f in self.keys + list(spec.dense_features)}
        self._items: Optional[_Table] = None
        self._scratch: Optional[np.ndarray] = None
        # History by reference: rebuilt per file from the events' item rows -> item ids.
        self._history_ref = self.manifest.history_mode == "reference" and spec.history in self.keys
        self._item_ids: Optional[np.ndarray] = None

    def batch_groups(self) -> List[List[str]]:
        """The sparse features each batch deduplicates together: the session-level ones (one
        inverse index) and the item-level ones (another); every other feature has one row per
        sample. ``recd_plugin.apply`` checks a flag against this before reading a batch."""
        return [g for g in ([f for f in self.keys if self._where[f] == place] for place in ("sessions", "items")) if g]

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle for ``epoch`` (same seed + epoch -> same batches)."""
        self.epoch = epoch

    def _cols(self, table: str) -> Tuple[List[str], List[str]]:
        pick = lambda names: [f for f in names if self._where[f] == table]  # noqa: E731
        return pick(self.keys), pick(self.spec.dense_features)

    def _read(self, entry: Dict[str, Any], columns: List[str]) -> pa.Table:
        return read_data_file(self.path, entry, columns, self.verify_checksums)

    def _inconsistent(self, rel: str, problem: str) -> StorageError:
        return StorageError(f"{self.path / rel}: inconsistent layout: {problem}; {rewrite_fix(self.path)}")

    @contextmanager
    def _layout_errors(self, rel: str) -> Iterator[None]:
        """Backstop for layouts that pass every explicit check yet do not fit together (a
        damaged file read with ``verify_checksums=False``): the raw numpy / arrow error
        becomes a StorageError naming the file and the fix, never a traceback from inside."""
        try:
            yield
        except RecDError:
            raise
        except (IndexError, KeyError, ValueError, pa.ArrowException) as e:
            raise self._inconsistent(rel, repr(e)) from e

    def _load_items(self) -> _Table:
        if self._items is None:
            sparse, dense = self._cols("items")
            files = self.manifest.files["items"]
            extra = [self.spec.item_key] if self._history_ref and self.spec.item_key not in sparse + dense else []
            with self._layout_errors(files[0]["path"] if files else "items/"):
                table = pa.concat_tables([self._read(f, sparse + dense + extra) for f in files])
                self._items = _Table(table, sparse, dense)
            if self._history_ref:
                key = self.spec.item_key
                self._item_ids = JaggedColumn.from_arrow(table.column(key), key).values
            # Scratch for the first-appearance numbering of item references (see _relabel).
            self._scratch = np.full(max(table.num_rows, 1), np.iinfo(np.int64).max, dtype=np.int64)
        return self._items

    def files(self) -> List[int]:
        """Indices of the event files this reader (rank, DataLoader worker) reads this epoch."""
        n = len(self.manifest.files["events"])
        order = np.random.default_rng([self.seed, self.epoch]).permutation(n) if self.shuffle else np.arange(n)
        me, readers = _shard(n, self.rank, self.world_size)
        return [int(i) for i in order[me::readers]]

    def __iter__(self) -> Iterator[Batch]:
        items = self._load_items()
        for fi in self.files():
            yield from self._file_batches(fi, items)

    def _file_batches(self, fi: int, items: _Table) -> Iterator[Batch]:
        with self._layout_errors(self.manifest.files["events"][fi]["path"]):
            sessions, ev, labels, item_ref, counts = self._open_file(fi)
        # Events are stored session by session: session s owns rows [start[s], start[s + 1]).
        start = np.concatenate([[0], np.cumsum(counts)])
        order = np.arange(counts.size)
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch, fi]).permutation(order)
        for segments in pack_sessions(counts[order], self.batch_size):
            seg = np.asarray(segments, dtype=np.int64)
            sess = order[seg[:, 0]]  # unique session rows of this batch, in batch order
            seg_len = seg[:, 2]
            run = np.repeat(np.arange(len(segments)), seg_len)  # session inverse, from the layout
            rows = segment_positions(start[sess] + seg[:, 1], seg_len)  # event rows, batch order
            yield self._batch(sessions, sess, run, ev, rows, items, item_ref[rows], labels[rows])

    def _open_file(self, fi: int) -> Tuple[_Table, _Table, np.ndarray, np.ndarray, np.ndarray]:
        """Read events file ``fi`` and its sessions file, and check that their references fit
        the layout: (sessions, events, labels float32 [N], item_ref int64 [N], events per
        session int64 [S])."""
        s_meta, e_meta = self.manifest.files["sessions"][fi], self.manifest.files["events"][fi]
        s_sparse, s_dense = self._cols("sessions")
        e_sparse, e_dense = self._cols("events")
        history = self.spec.history if self._history_ref else None
        s_stored = [f for f in s_sparse if f != history]
        refs = [HISTORY_START, HISTORY_LEN] if history else []
        s_table = self._read(s_meta, s_stored + s_dense + refs)
        sessions = _Table(s_table, s_stored, s_dense)
        events = self._read(e_meta, [SESSION_REF, ITEM_REF] + e_sparse + e_dense + [self.spec.label])
        ev = _Table(events, e_sparse, e_dense)
        session_local = events.column(SESSION_REF).to_numpy() - s_meta["first_row"]
        item_ref = events.column(ITEM_REF).to_numpy()
        counts = self._session_counts(e_meta["path"], session_local, s_meta["rows"])
        self._check_range(e_meta["path"], ITEM_REF, item_ref, int(self.manifest.totals["items"]))
        if history:  # rows [history_start, + history_len) of this events file, as item ids
            assert self._item_ids is not None
            h_start = s_table.column(HISTORY_START).to_numpy().astype(np.int64, copy=False)
            h_len = s_table.column(HISTORY_LEN).to_numpy().astype(np.int64, copy=False)
            if ((h_len < 0) | (h_start < 0) | (h_start + h_len > item_ref.size)).any():
                raise self._inconsistent(s_meta["path"], f"a history reference ({HISTORY_START}, {HISTORY_LEN}) "
                                         f"points outside the {item_ref.size} rows of {e_meta['path']}")
            pos = segment_positions(h_start, h_len)
            sessions.sparse[history] = JaggedColumn(self._item_ids[item_ref[pos]], offsets_of(h_len))
        labels = dense_column(events.column(self.spec.label), self.spec.label)
        return sessions, ev, labels, item_ref, counts

    def _check_range(self, rel: str, column: str, values: np.ndarray, end: int) -> None:
        if values.size and (values.min() < 0 or values.max() >= end):
            raise self._inconsistent(rel, f"column {column!r} holds {values.min()}..{values.max()}, outside "
                                     f"[0, {end}) recorded in the manifest")

    def _session_counts(self, rel: str, session_local: np.ndarray, sessions: int) -> np.ndarray:
        """Events per session of one file, int64 [sessions]. The batching relies on events
        being grouped by session in session order, each session owning >= 1 event: checked
        here, since a violation would silently pair samples with another session's features."""
        self._check_range(rel, SESSION_REF, session_local, sessions)
        if (np.diff(session_local) < 0).any():
            raise self._inconsistent(rel, f"events are not stored in session order ({SESSION_REF} decreases)")
        counts = np.bincount(session_local, minlength=sessions)
        if (counts == 0).any():
            raise self._inconsistent(rel, f"{int((counts == 0).sum())} sessions of its sessions file have no events")
        return counts

    def _relabel(self, refs: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """(unique refs in order of first appearance, inverse): the IKJT numbering of unique
        rows. O(B) with a scratch table indexed by item row: no sort, no hashing of contents.
        Not ``sparse.plan.unique_first`` (which sorts arbitrary ids): references are bounded by
        the item table, which makes this about 5x faster at batch 1024."""
        scratch = self._scratch
        assert scratch is not None
        pos = np.arange(refs.size, dtype=np.int64)
        np.minimum.at(scratch, refs, pos)  # scratch[r] = first position of item r in the batch
        first = pos[scratch[refs] == pos]
        uniq = refs[first]
        scratch[uniq] = np.arange(uniq.size)
        inverse = scratch[refs]
        scratch[uniq] = np.iinfo(np.int64).max  # reset only what was touched
        return uniq, inverse

    def _batch(self, sessions: _Table, sess: np.ndarray, sess_inv: np.ndarray, ev: _Table, rows: np.ndarray,
               items: _Table, item_refs: np.ndarray, labels: np.ndarray) -> Batch:
        b = rows.size
        item_uniq, item_inv = self._relabel(item_refs)
        identity = np.arange(b, dtype=np.int64)
        values, lengths, strides, inverse = [], [], [], []
        for f in self.keys:
            place = self._where[f]
            table, idx, inv = ((sessions, sess, sess_inv) if place == "sessions" else
                               (items, item_uniq, item_inv) if place == "items" else (ev, rows, identity))
            v, n = table.sparse[f].gather(idx)
            values.append(v)
            lengths.append(n)
            strides.append([int(idx.size)])
            inverse.append(inv)
        dense = [sessions.dense[f][sess[sess_inv]] if self._where[f] == "sessions" else
                 items.dense[f][item_refs] if self._where[f] == "items" else ev.dense[f][rows]
                 for f in self.spec.dense_features]
        kjt = KeyedJaggedTensor(
            keys=list(self.keys), values=torch.from_numpy(np.concatenate(values)),
            lengths=torch.from_numpy(np.concatenate(lengths)), stride_per_key_per_rank=strides,
            inverse_indices=(list(self.keys), torch.from_numpy(np.stack(inverse).astype(np.int64))))
        dense_np = np.stack(dense, axis=1) if dense else np.zeros((b, 0), np.float32)
        return Batch(dense_features=torch.from_numpy(np.ascontiguousarray(dense_np, dtype=np.float32)),
                     sparse_features=kjt, labels=torch.from_numpy(np.ascontiguousarray(labels)))


def write_flat(table: pa.Table, path: PathLike, row_group_rows: int = DEFAULT_ROW_GROUP_ROWS) -> int:
    """The flat baseline file (one row per sample) with the layout's codec and page checksums;
    returns its bytes."""
    return write_table(table, path, row_group_rows).bytes


class FlatReader(IterableDataset):
    """Plain KJT batches from a flat one-row-per-sample Parquet file (the honest baseline).

    Reads ``batch_size`` rows at a time in stored order and builds each KJT with
    :class:`recd_plugin.data.TableBatches`; row groups are dealt round-robin to ranks and
    DataLoader workers. ``spec``: the column roles (its ``sparse_features``,
    ``dense_features`` and ``label`` are read): the spec the layout of the same data was
    written with, so both sides emit the same batches (``DedupReader(...).spec``).
    """

    def __init__(self, path: PathLike, batch_size: int, spec: StorageSpec, *, rank: int = 0,
                 world_size: int = 1) -> None:
        if not isinstance(spec, StorageSpec):
            raise StorageError(f"FlatReader needs the StorageSpec naming the features to read, got {spec!r}; "
                               "pass the layout's (DedupReader(...).spec) or the one given to preprocess")
        self.path, self.batch_size, self.rank, self.world_size = Path(path), batch_size, rank, world_size
        self.sparse_features, self.dense_features = list(spec.sparse_features), list(spec.dense_features)
        self.label = spec.label
        if not self.path.is_file():
            raise StorageError(f"{self.path}: no such flat Parquet file; write it with write_flat(table, path)")

    def __iter__(self) -> Iterator[Batch]:
        try:
            pf = pq.ParquetFile(str(self.path), page_checksum_verification=True)
            me, readers = _shard(pf.num_row_groups, self.rank, self.world_size)
            groups = list(range(pf.num_row_groups))[me::readers]
            columns = (self.sparse_features + [c for c in self.dense_features if c not in self.sparse_features]
                       + [self.label])
            for rb in pf.iter_batches(batch_size=self.batch_size, row_groups=groups, columns=columns) if groups else []:
                table = pa.Table.from_batches([rb])
                yield TableBatches(table, rb.num_rows, self.sparse_features, self.dense_features, self.label)[0]
        except (pa.ArrowException, OSError) as e:
            raise StorageError(f"{self.path}: cannot read ({e}); the file is corrupt or truncated: rewrite it "
                               "with write_flat(table, path)") from e


def manifest_cardinalities(path: PathLike) -> Dict[str, int]:
    """``{sparse feature: num_embeddings}`` recorded from the preprocessed input's metadata."""
    import json
    meta = read_manifest(path, check_files=False).metadata
    if "recd.cardinalities" not in meta:
        raise StorageError(f"{path}: the input had no recd.cardinalities metadata")
    return {k: int(v) for k, v in json.loads(meta["recd.cardinalities"]).items()}
