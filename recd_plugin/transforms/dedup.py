"""Dataloader transform: plain ``Batch`` in, ``Batch`` with an IKJT out.

Wraps any iterable of ``torchrec.datasets.utils.Batch`` (or any dataclass with a
``sparse_features`` KJT); dense features and labels pass through untouched::

    loader = DedupLoader(loader, spec)          # deduplicate in the training process
    for batch in loader: ...                    # batch.sparse_features is an IKJT
    loader.stats.unique_fraction("user")        # e.g. 0.03

With a ``torch.utils.data.DataLoader`` that has workers, ``DedupLoader.wrap`` moves the work
into them (``collate_fn`` becomes ``DedupCollate(collate_fn, spec)``), so building IKJTs
costs the training loop nothing. The first ``verify_batches`` batches are expanded back and
compared with the input, so a feature that is *not* constant within a session is reported
(``NotDeduplicableError``) before the model has taken a step.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, Iterator, Optional

import torch
from torch.utils.data import DataLoader
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recd_plugin.config import verify_step
from recd_plugin.errors import MalformedBatchError
from recd_plugin.sparse.ikjt import DedupSpec, build_ikjt, expand, not_constant, unique_count


@dataclass
class DedupStats:
    """Counts over everything the transform produced: samples and rows per group."""

    batches: int = 0
    samples_in: int = 0
    samples_out: int = 0
    rows: Dict[str, int] = field(default_factory=dict)
    unique_rows: Dict[str, int] = field(default_factory=dict)

    def unique_fraction(self, group: str) -> float:
        return self.unique_rows.get(group, 0) / max(self.rows.get(group, 0), 1)

    def add(self, spec: DedupSpec, batch_in: int, ikjt: KeyedJaggedTensor) -> None:
        self.batches += 1
        self.samples_in += batch_in
        self.samples_out += ikjt.stride()
        for g in spec.groups:
            self.rows[g.name] = self.rows.get(g.name, 0) + ikjt.stride()
            self.unique_rows[g.name] = self.unique_rows.get(g.name, 0) + unique_count(ikjt, g.all_features[0])


def dedup_batch(batch: Any, spec: DedupSpec, verify: bool = False, aligned: bool = False) -> Any:
    """Same batch with ``sparse_features`` replaced by its IKJT.

    Args:
        batch: ``Batch`` (dense_features [B, D], sparse_features KJT batch B, labels [B]).
        verify: expand the IKJT and check it equals the input (raises NotDeduplicableError).
        aligned: the aligned IKJT layout (sharded mode; see ``recd_plugin.sparse.ikjt``).
    """
    kjt = getattr(batch, "sparse_features", None)
    if not dataclasses.is_dataclass(batch) or not isinstance(kjt, KeyedJaggedTensor):
        raise MalformedBatchError(
            f"expected a torchrec Batch (a dataclass with a KeyedJaggedTensor sparse_features), "
            f"got {type(batch).__name__}; wrap a loader that yields torchrec.datasets.utils.Batch"
        )
    labels = getattr(batch, "labels", None)
    if isinstance(labels, torch.Tensor) and labels.shape[0] != kjt.stride():
        raise MalformedBatchError(
            f"batch has {labels.shape[0]} labels but its KJT has batch size {kjt.stride()}"
        )
    ikjt = build_ikjt(kjt, spec, aligned=aligned)
    if verify:
        check_roundtrip(kjt, ikjt, spec)
    return dataclasses.replace(batch, sparse_features=ikjt)


def check_roundtrip(kjt: KeyedJaggedTensor, ikjt: KeyedJaggedTensor, spec: DedupSpec) -> None:
    """Raise NotDeduplicableError naming the first feature that expand() does not restore."""
    if kjt.stride() == 0:
        return  # nothing to compare (and TorchRec's to_dict fails on an empty batch)
    back = expand(ikjt).to_dict()
    for name, jt in kjt.to_dict().items():
        restored = back[name]
        if (
            torch.equal(jt.lengths(), restored.lengths())
            and torch.equal(jt.values(), restored.values())
            and (jt.weights_or_none() is None or torch.equal(jt.weights(), restored.weights()))
        ):
            continue
        raise not_constant(name, next(g for g in spec.groups if name in g.all_features))


def measure(batches: Iterable[Any], spec: DedupSpec, limit: int) -> DedupStats:
    """Rows and unique rows per group over the first ``limit`` plain ``Batch``es of ``batches``
    (the probe's, the planner hints' and the benchmarks' one measurement of u)."""
    stats = DedupStats()
    for i, batch in enumerate(batches):
        if i == limit:
            break
        stats.add(spec, batch.sparse_features.stride(), dedup_batch(batch, spec).sparse_features)
    return stats


class DedupCollate:
    """Picklable ``collate_fn``: the user's collate, then ``dedup_batch`` (runs in workers)."""

    def __init__(self, collate_fn: Optional[Callable[[Any], Any]], spec: DedupSpec, verify_batches: int = 1,
                 aligned: bool = False) -> None:
        self.collate_fn = collate_fn
        self.spec = spec
        self.aligned = aligned
        self.verify_left = verify_batches  # per worker process: each checks its first batches

    def __call__(self, samples: Any) -> Any:
        batch = self.collate_fn(samples) if self.collate_fn is not None else samples
        verify, self.verify_left = verify_step(self.verify_left)
        return dedup_batch(batch, self.spec, verify, self.aligned)


def check_not_deduplicated(loader: Any) -> None:
    """MalformedBatchError if ``loader`` already yields the plugin's IKJTs (wrapped twice)."""
    if isinstance(loader, DedupLoader) or isinstance(getattr(loader, "collate_fn", None), DedupCollate):
        raise MalformedBatchError("this DataLoader is already deduplicated by recd-plugin")


class DedupLoader:
    """Iterable wrapper that yields IKJT batches and counts what passes through.

    Re-iterable when the wrapped loader is (one pass per epoch); ``len()`` is the wrapped
    loader's. ``stats`` accumulates over all epochs.
    """

    def __init__(self, loader: Iterable[Any], spec: DedupSpec, verify_batches: int = 1, in_workers: bool = True,
                 aligned: bool = False) -> None:
        self.loader = loader
        self.spec = spec
        #: sharded mode: aligned IKJTs (plain KJTs of batch B to TorchRec; see sparse/ikjt.py)
        self.aligned = aligned
        self.stats = DedupStats()
        self._verify_left = verify_batches
        self.in_workers = False
        check_not_deduplicated(loader)
        if in_workers and isinstance(loader, DataLoader) and loader.num_workers > 0:
            collate = loader.collate_fn
            loader.collate_fn = DedupCollate(collate, spec, verify_batches, aligned)
            self.in_workers = True
            self._original_collate = collate

    def unwrap(self) -> Iterable[Any]:
        """The wrapped loader, with its own ``collate_fn`` back."""
        if self.in_workers:
            self.loader.collate_fn = self._original_collate  # type: ignore[attr-defined]
            # Persistent workers hold a copy of DedupCollate: stop them, so the next epoch
            # starts workers with the user's collate_fn again.
            iterator = getattr(self.loader, "_iterator", None)
            if iterator is not None and hasattr(iterator, "_shutdown_workers"):
                iterator._shutdown_workers()
                self.loader._iterator = None  # type: ignore[attr-defined]
            self.in_workers = False
        return self.loader

    def __len__(self) -> int:
        return len(self.loader)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[Any]:
        for batch in self.loader:
            sparse = getattr(batch, "sparse_features", None)
            if self.in_workers and isinstance(sparse, KeyedJaggedTensor) and sparse.inverse_indices_or_none() is not None:
                out, batch_in = batch, sparse.stride()
            else:
                # Also taken when workers were started before the wrap (persistent_workers
                # keeps the old collate_fn): deduplicate here rather than pass plain batches.
                verify, self._verify_left = verify_step(self._verify_left)
                out = dedup_batch(batch, self.spec, verify, self.aligned)
                batch_in = batch.sparse_features.stride()
            self.stats.add(self.spec, batch_in, out.sparse_features)
            yield out
