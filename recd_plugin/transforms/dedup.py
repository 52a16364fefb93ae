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

A batch that arrives already deduplicated (an IKJT, e.g. from ``recd_plugin.storage.DedupReader``)
is not deduplicated again: :func:`from_ikjt` checks that each of the flag's groups is one of
the batch's inverse indices and passes it on in the compact layout (or converts it to the
aligned one in sharded mode); features the flag does not group get one row per sample again.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple

import torch
from torch.utils.data import DataLoader
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recd_plugin.config import verify_step
from recd_plugin.errors import MalformedBatchError
from recd_plugin.sparse.dedup_kjt import DedupKJT
from recd_plugin.sparse.ikjt import (
    DedupSpec, build_ikjt, carrier_rows, complete_cumsum, expand, is_identity, jagged_index_select,
    lost_inverse_error, not_constant, unique_count,
)
from recd_plugin.transforms.route import RouteDecider


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
        samples = batch_samples(ikjt)
        self.samples_out += samples
        for g in spec.groups:
            self.rows[g.name] = self.rows.get(g.name, 0) + samples
            self.unique_rows[g.name] = self.unique_rows.get(g.name, 0) + unique_count(ikjt, g.all_features[0])


def batch_samples(kjt: KeyedJaggedTensor) -> int:
    """Samples in a batch's KJT: B for a plain KJT and for an IKJT of either layout (the
    width of its inverse indices; a compact IKJT's own ``stride()`` is not B in every TorchRec)."""
    inv = kjt.inverse_indices_or_none()
    return int(inv[1].shape[-1]) if inv is not None else kjt.stride()


def batch_kjt(batch: Any, name: Optional[str] = None) -> Tuple[str, KeyedJaggedTensor]:
    """(where, the KJT) of a batch: the attribute or key ``name`` (the flag's ``batch_kjt``), else
    ``sparse_features`` (TorchRec's ``Batch``), else the batch's only KJT field (e.g. the
    ``idlist_features`` of TorchRec's ``ModelInput``); a batch that is a KJT: ("", itself)."""
    if isinstance(batch, KeyedJaggedTensor):
        return "", batch
    items = _fields(batch)
    if name is not None:
        if not isinstance(items.get(name), KeyedJaggedTensor):
            raise MalformedBatchError(
                f"the flag's batch_kjt names {name!r}, but this {type(batch).__name__} has "
                f"{'no field ' + repr(name) if name not in items else 'a ' + type(items[name]).__name__ + ' there'}; "
                f"its KeyedJaggedTensor fields: {[k for k, v in items.items() if isinstance(v, KeyedJaggedTensor)]}")
        return name, items[name]
    if isinstance(items.get("sparse_features"), KeyedJaggedTensor):
        return "sparse_features", items["sparse_features"]
    found = [k for k, v in items.items() if isinstance(v, KeyedJaggedTensor)]
    if len(found) == 1:
        return found[0], items[found[0]]
    if found:
        raise MalformedBatchError(
            f"cannot tell which KeyedJaggedTensor of this {type(batch).__name__} to deduplicate: it has several "
            f"({found}); name it in the flag: batch_kjt={found[0]}")
    raise MalformedBatchError(
        f"expected a torchrec Batch (or a dataclass, dict or object with one KeyedJaggedTensor field, or a "
        f"KeyedJaggedTensor), got {type(batch).__name__} with no KeyedJaggedTensor field; wrap a loader that "
        "yields torchrec.datasets.utils.Batch, or name the field in the flag: batch_kjt=<field>")


def _fields(batch: Any) -> Dict[str, Any]:
    if isinstance(batch, dict):
        return batch
    if dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        return {f.name: getattr(batch, f.name) for f in dataclasses.fields(batch)}
    return dict(getattr(batch, "__dict__", {}))


def with_kjt(batch: Any, where: str, kjt: KeyedJaggedTensor) -> Any:
    """A copy of ``batch`` whose KJT at ``where`` (from :func:`batch_kjt`) is ``kjt``; the
    batch's other fields are the same objects."""
    if where == "":
        return kjt
    if isinstance(batch, dict):
        out = copy.copy(batch)
        out[where] = kjt
        return out
    if dataclasses.is_dataclass(batch) and any(f.name == where and f.init for f in dataclasses.fields(batch)):
        return dataclasses.replace(batch, **{where: kjt})
    out = copy.copy(batch)
    setattr(out, where, kjt)
    return out


def _samples_of(batch: Any) -> Optional[torch.Tensor]:
    """The batch's labels, if it has them under a usual name (checked against the KJT's batch size)."""
    for name in ("labels", "label"):
        labels = _fields(batch).get(name) if not isinstance(batch, KeyedJaggedTensor) else None
        if isinstance(labels, torch.Tensor):
            return labels
    return None


def dedup_batch(batch: Any, spec: DedupSpec, verify: bool = False, aligned: bool = False,
                where: Optional[str] = None, keep_plain: bool = False) -> Any:
    """Same batch with its KJT replaced by the IKJT, as a :class:`DedupKJT` (model code reads it
    as the plain batch; TorchRec's and the plugin's modules read the IKJT).

    Args:
        batch: a torchrec ``Batch`` (dense_features [B, D], sparse_features KJT batch B, labels
            [B]), or any batch :func:`batch_kjt` finds one KJT in. A KJT that is already an IKJT
            (``recd_plugin.storage.DedupReader``'s batches) is checked against ``spec`` and passed
            on, not deduplicated again (:func:`from_ikjt`).
        verify: expand the IKJT and check it equals the input (raises NotDeduplicableError);
            for a batch that arrived deduplicated, check its inverse indices and group keys.
        aligned: the aligned IKJT layout (sharded mode; see ``recd_plugin.sparse.ikjt``).
        where: the batch's KJT field (the flag's ``batch_kjt``; default: found as
            :func:`batch_kjt` says).
        keep_plain: the result also carries the plain KJT (a DataLoader worker's batch: the
            training process may then take either route without rebuilding).
    """
    where, kjt = batch_kjt(batch, where)
    if isinstance(kjt, DedupKJT):
        raise MalformedBatchError("this batch is deduplicated by recd-plugin already (its loader is wrapped twice?)")
    if kjt.inverse_indices_or_none() is None and kjt.variable_stride_per_key():
        raise lost_inverse_error("recd-plugin's loader")  # before its stride is read as a batch size
    labels = _samples_of(batch)
    if labels is not None and labels.dim() > 0 and labels.shape[0] != batch_samples(kjt):
        raise MalformedBatchError(
            f"batch has {labels.shape[0]} labels but its KJT has batch size {batch_samples(kjt)}"
        )
    groups = tuple(g.name for g in spec.groups)
    if kjt.inverse_indices_or_none() is not None or kjt.variable_stride_per_key():
        out = from_ikjt(kjt, spec, verify, aligned)
        plain = expand(kjt) if keep_plain else None
        return with_kjt(batch, where, DedupKJT.of(out, groups, plain=plain) if groups else out)
    ikjt = build_ikjt(kjt, spec, aligned=aligned)
    if verify:
        check_roundtrip(kjt, ikjt, spec)
    return with_kjt(batch, where, DedupKJT.of(ikjt, groups, plain=kjt if keep_plain else None))


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


def measure(batches: Iterable[Any], spec: DedupSpec, limit: int, where: Optional[str] = None) -> DedupStats:
    """Rows and unique rows per group over the first ``limit`` plain batches of ``batches``
    (the planner hints' and the benchmarks' one measurement of u)."""
    stats = DedupStats()
    for i, batch in enumerate(batches):
        if i == limit:
            break
        where_, kjt = batch_kjt(batch, where)
        if not isinstance(kjt, DedupKJT):  # (a DataLoader worker of the plugin's built it already)
            kjt = batch_kjt(dedup_batch(batch, spec, where=where_), where_)[1]
        stats.add(spec, batch_samples(kjt), kjt)
    return stats


# ----------------------------------------------------------------------------------------
# Batches that arrive deduplicated (recd_plugin.storage.DedupReader): check, then pass on.


def _already_error(problem: str, fix: str) -> MalformedBatchError:
    return MalformedBatchError(
        f"this batch arrived already deduplicated (an IKJT with inverse indices, e.g. from "
        f"recd_plugin.storage.DedupReader) and does not match the flag: {problem}. {fix}"
    )


def _batch_groups(keys: List[str], rows: Dict[str, torch.Tensor], strides: Dict[str, int],
                  batch: int) -> List[List[str]]:
    """The batch's own groups: keys sharing one inverse index, deduplicated ones only."""
    groups: List[List[str]] = []
    for k in keys:
        if strides[k] == batch and is_identity(rows[k]):
            continue  # one row per sample: in no group
        for g in groups:
            if strides[g[0]] == strides[k] and torch.equal(rows[g[0]], rows[k]):
                g.append(k)
                break
        else:
            groups.append([k])
    return groups


def _check_groups(spec: DedupSpec, keys: List[str], rows: Dict[str, torch.Tensor],
                  strides: Dict[str, int], batch: int) -> None:
    """Every feature of a flag group shares its group's inverse index in the batch (else the
    towers and dedup modules, which read one inverse per group, would pair rows wrongly)."""
    for g in spec.groups:
        lead = g.all_features[0]
        for f in g.all_features[1:]:
            if not (strides[f] == strides[lead] and torch.equal(rows[f], rows[lead])):
                raise _groups_differ(g, f, _batch_groups(keys, rows, strides, batch))


def check_stored_groups(spec: DedupSpec, theirs: List[List[str]]) -> None:
    """Before any batch is read: the flag's groups against the groups a deduplicating reader
    declares (``DedupReader.batch_groups()``); the same error as the batch check."""
    of = {k: grp for grp in theirs for k in grp}
    for g in spec.groups:
        lead = g.all_features[0]
        for f in g.all_features[1:]:
            if of.get(f, [f]) is not of.get(lead, [lead]) or f not in of:
                raise _groups_differ(g, f, theirs)


def _groups_differ(g: Any, f: str, theirs: List[List[str]]) -> MalformedBatchError:
    lead = g.all_features[0]
    of = {k: grp for grp in theirs for k in grp}
    together = [x for x in g.all_features if x in of.get(lead, [lead])]
    listed = "; ".join(str(grp) for grp in theirs) or "none: every feature has one row per sample"
    key = f"groups.{g.name}.key={g.key}; " if g.key is not None and g.key in together else ""
    feats = ",".join(x for x in together if x != g.key)
    return _already_error(
        f"flag group {g.name!r} puts {f!r} with {lead!r}, but the batch deduplicates them "
        f"separately ({lead!r} with {of.get(lead, [lead])}, {f!r} with {of.get(f, [f])})",
        f"Name in each flag group only features the batch deduplicates together (the batch's "
        f"groups: {listed}), e.g. '{key}groups.{g.name}.features={feats}'; or feed plain "
        "batches (read the flat data, or recd_plugin.expand the KJT) so that the plugin "
        "deduplicates them as the flag says.",
    )


def _check_keys(spec: DedupSpec, ikjt: KeyedJaggedTensor, rows: Dict[str, torch.Tensor],
                strides: Dict[str, int]) -> None:
    """(verify batches) inverse indices in range, and one id per sample in each group's key."""
    for k, r in rows.items():
        if r.numel() and (int(r.min()) < 0 or int(r.max()) >= strides[k]):
            raise _already_error(f"the inverse index of {k!r} points outside its {strides[k]} rows",
                                 "Rebuild the batch (build_ikjt) or re-run recd-plugin preprocess.")
    if batch_samples(ikjt) == 0:
        return
    plain = expand(ikjt).to_dict()
    for g in spec.groups:
        if g.key is not None and not bool((plain[g.key].lengths() == 1).all()):
            raise _already_error(f"key feature {g.key!r} of group {g.name!r} does not hold exactly one id per sample",
                                 f"Key the group by a per-sample id (groups.{g.name}.key=...) or omit the key.")


def from_ikjt(ikjt: KeyedJaggedTensor, spec: DedupSpec, verify: bool = False,
              aligned: bool = False) -> KeyedJaggedTensor:
    """An IKJT that arrived deduplicated -> the IKJT of ``spec`` in the layout asked for, without
    deduplicating anything again.

    Each group of ``spec`` must be deduplicated together in ``ikjt`` (its features share one
    inverse index; checked on every batch, O(K * B)): else ``MalformedBatchError`` naming the
    mismatch and the fix. Features in no group of ``spec`` get one row per sample again (so
    the result is what ``build_ikjt(expand(ikjt), spec, aligned)`` builds whenever the batch's
    groups are the flag's). A compact ``ikjt`` that already is that comes back as is (pass-through).

    Args:
        ikjt: compact or aligned IKJT (``recd_plugin.storage.DedupReader`` yields compact ones).
        verify: also check that inverse indices are in range and each group's key holds one id
            per sample (the first ``verify_batches`` batches).
        aligned: the aligned layout (sharded mode) instead of the compact one.
    """
    inv = ikjt.inverse_indices_or_none()
    if inv is None:
        raise lost_inverse_error("recd-plugin's loader")
    if not spec.groups:
        return expand(ikjt)  # no group kept: TorchRec's plain path takes plain KJTs
    names, tensor = inv
    keys = list(ikjt.keys())
    spec.check_keys(keys)
    if sorted(names) != sorted(keys):
        raise _already_error(f"its inverse indices name {list(names)} but its keys are {keys}",
                             "Give every key one inverse index (build_ikjt does).")
    compact = ikjt.variable_stride_per_key()
    batch = int(tensor.shape[-1])
    strides = dict(zip(keys, ikjt.stride_per_key()))
    rows = {k: tensor[names.index(k)] for k in keys}
    _check_groups(spec, keys, rows, strides, batch)
    if verify:
        _check_keys(spec, ikjt, rows, strides)
    lead_of = {f: g.all_features[0] for g in spec.groups for f in g.all_features}
    ungrouped = [k for k in keys if k not in lead_of]
    if compact and not aligned and all(strides[k] == batch and is_identity(rows[k]) for k in ungrouped):
        return ikjt  # already the flag's compact IKJT: pass-through

    device = tensor.device
    lengths = ikjt.lengths()
    if compact:  # key k holds its unique rows at [base[k], base[k] + stride_k) of the KJT
        base = complete_cumsum(torch.tensor([strides[k] for k in keys], dtype=torch.long)).tolist()
        first_src = {k: torch.arange(strides[k], device=device) + base[i] for i, k in enumerate(keys)}
        inverse = rows
    else:  # aligned: key k's rows are [k * B, (k + 1) * B); a unique row lives at its carrier
        first_src, inverse = {}, {}
        for i, k in enumerate(keys):
            first, inverse[k] = carrier_rows(rows[k])
            first_src[k] = first + i * batch
    identity = torch.arange(batch, device=device)
    select, keep, out_inverse, out_strides = [], [], [], []
    carriers: Dict[str, Any] = {}  # group lead -> (carrier [B], carries its row [B])
    for k in keys:
        grouped = k in lead_of
        inv_k = inverse[lead_of[k]] if grouped else inverse[k]
        if grouped and not aligned:  # compact: the unique rows, as they are
            select.append(first_src[k])
            out_strides.append([int(first_src[k].numel())])
            out_inverse.append(inv_k)
            continue
        select.append(first_src[k].index_select(0, inv_k))  # one row per sample
        out_strides.append([batch])
        if grouped:  # aligned: the row stays only on its carrier, the first sample reading it
            lead = lead_of[k]
            if lead not in carriers:
                first = torch.full((int(first_src[lead].numel()),), batch, dtype=torch.long, device=device)
                first.scatter_reduce_(0, inv_k, identity, reduce="amin")
                carrier = first.index_select(0, inv_k)
                carriers[lead] = carrier, carrier == identity
            keep.append(carriers[lead][1])
            out_inverse.append(carriers[lead][0])
        else:
            keep.append(torch.ones(batch, dtype=torch.bool, device=device))
            out_inverse.append(identity)
    index = torch.cat(select) if select else torch.zeros(0, dtype=torch.long, device=device)
    out_lengths = lengths.long().index_select(0, index)
    if aligned:
        kept = torch.cat(keep) if keep else torch.zeros(0, dtype=torch.bool, device=device)
        out_lengths = out_lengths * kept
        # index_select, not index[kept]: advanced indexing wakes torch's second CPU thread
        # (milliseconds on an idle core; see sparse/ikjt.py jagged_index_select)
        index = index.index_select(0, torch.nonzero(kept).flatten())
    values, _, positions = jagged_index_select(ikjt.values(), lengths, index)
    weights = ikjt.weights_or_none()
    common = dict(
        keys=keys, values=values, weights=weights.index_select(0, positions) if weights is not None else None,
        lengths=out_lengths.to(lengths.dtype),
        inverse_indices=(list(keys), torch.stack(out_inverse) if out_inverse else tensor[:0]),
    )
    if aligned:
        return KeyedJaggedTensor(stride=batch, **common)  # type: ignore[arg-type]
    return KeyedJaggedTensor(stride_per_key_per_rank=out_strides, **common)  # type: ignore[arg-type]


class DedupCollate:
    """Picklable ``collate_fn``: the user's collate, then ``dedup_batch`` (runs in workers). The
    batch carries the plain KJT too (``keep_plain``): the training process then takes either
    route (``recd_plugin.transforms.route``) without building anything."""

    def __init__(self, collate_fn: Optional[Callable[[Any], Any]], spec: DedupSpec, verify_batches: int = 1,
                 aligned: bool = False, where: Optional[str] = None) -> None:
        self.collate_fn = collate_fn
        self.spec = spec
        self.aligned = aligned
        self.where = where
        self.verify_left = verify_batches  # per worker process: each checks its first batches

    def __call__(self, samples: Any) -> Any:
        batch = self.collate_fn(samples) if self.collate_fn is not None else samples
        verify, self.verify_left = verify_step(self.verify_left)
        return dedup_batch(batch, self.spec, verify, self.aligned, self.where, keep_plain=True)


def check_not_deduplicated(loader: Any) -> None:
    """MalformedBatchError if ``loader`` already yields the plugin's IKJTs (wrapped twice)."""
    if isinstance(loader, DedupLoader) or isinstance(getattr(loader, "collate_fn", None), DedupCollate):
        raise MalformedBatchError("this DataLoader is already deduplicated by recd-plugin")


def yields_ikjt(loader: Any) -> bool:
    """True for a loader whose batches arrive deduplicated: it, or a DataLoader's ``dataset``,
    has a true ``deduplicated`` attribute (``recd_plugin.storage.DedupReader`` has)."""
    return bool(getattr(loader, "deduplicated", False) or getattr(getattr(loader, "dataset", None), "deduplicated", False))


def stored_groups(loader: Any) -> Optional[List[List[str]]]:
    """The feature groups a deduplicating reader's batches come in (``batch_groups()`` of the
    loader or of a DataLoader's ``dataset``), known without reading a batch; None if unknown."""
    for obj in (loader, getattr(loader, "dataset", None)):
        if yields_ikjt(obj) and callable(getattr(obj, "batch_groups", None)):
            return obj.batch_groups()
    return None


def plain_loader(loader: Any) -> Any:
    """``loader`` for TorchRec's plain path (no group deduplicated): itself, or for a loader
    whose batches arrive deduplicated (:func:`yields_ikjt`), a ``DedupLoader`` that expands
    them back to plain KJTs in this process (the DataLoader's ``collate_fn`` is left alone)."""
    if loader is None or not yields_ikjt(loader):
        return loader
    return DedupLoader(loader, DedupSpec(()), verify_batches=0, in_workers=False)


def builds_in_workers(loader: Any, in_workers: bool = True) -> bool:
    """Whether ``DedupLoader`` builds the IKJTs inside the loader's worker processes (a
    ``DataLoader`` with workers, ``in_workers`` on), off the training loop; otherwise every
    batch is deduplicated in the loop, a cost the probe counts against the route."""
    return in_workers and isinstance(loader, DataLoader) and loader.num_workers > 0


class DedupLoader:
    """Iterable wrapper that yields IKJT batches (``DedupKJT``) and counts what passes through.

    With a ``router`` (``recd_plugin.transforms.route.RouteDecider``), each batch takes the route
    it names: some groups deduplicated, or none (the plain batch, as TorchRec's plain path has
    it). ``follow``: this loader only follows the router's decision (another loader of the same
    model, e.g. evaluation) and never takes part in the schedule.

    Re-iterable when the wrapped loader is (one pass per epoch); ``len()`` is the wrapped
    loader's. ``stats`` accumulates over all epochs.
    """

    def __init__(self, loader: Iterable[Any], spec: DedupSpec, verify_batches: int = 1, in_workers: bool = True,
                 aligned: bool = False, router: Optional[RouteDecider] = None, follow: bool = False,
                 where: Optional[str] = None) -> None:
        self.loader = loader
        self.spec = spec
        #: sharded mode: aligned IKJTs (plain KJTs of batch B to TorchRec; see sparse/ikjt.py)
        self.aligned = aligned
        self.router, self.follow, self.where = router, follow, where
        self.stats = DedupStats()
        self._verify_left = verify_batches
        self._specs: Dict[Tuple[str, ...], DedupSpec] = {tuple(g.name for g in spec.groups): spec}
        self.in_workers = False
        check_not_deduplicated(loader)
        stored = stored_groups(loader)
        if stored is not None and spec.groups:  # a deduplicating reader: its groups are known up front
            check_stored_groups(spec, stored)
        if builds_in_workers(loader, in_workers):
            collate = loader.collate_fn  # type: ignore[attr-defined]
            loader.collate_fn = DedupCollate(collate, spec, verify_batches, aligned, where)
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

    def _spec(self, groups: Tuple[str, ...]) -> DedupSpec:
        if groups not in self._specs:
            self._specs[groups] = DedupSpec(tuple(g for g in self.spec.groups if g.name in groups))
        return self._specs[groups]

    def _route(self) -> Tuple[Tuple[str, ...], Any]:
        if self.router is None:
            return tuple(g.name for g in self.spec.groups), None
        if self.follow:
            return self.router.best_guess(), None
        return self.router.route()

    def __iter__(self) -> Iterator[Any]:
        for batch in self.loader:
            groups, tag = self._route()
            where, kjt = batch_kjt(batch, self.where)
            if isinstance(kjt, DedupKJT):  # built in a worker, for every group, with the plain KJT
                out = self._from_worker(batch, where, kjt, groups, tag)
            elif not groups:  # TorchRec's plain route: the batch as it is (expanded if it came deduplicated)
                out = _plain_route(batch, where, expand(kjt) if kjt.inverse_indices_or_none() is not None else kjt, tag)
            else:
                # Also taken when workers were started before the wrap (persistent_workers
                # keeps the old collate_fn): deduplicate here rather than pass plain batches.
                verify, self._verify_left = verify_step(self._verify_left)
                out = dedup_batch(batch, self._spec(groups), verify, self.aligned, where)
            out_kjt = batch_kjt(out, where)[1]
            if isinstance(out_kjt, DedupKJT):
                out_kjt.route_tag = tag
            spec = self._spec(groups)
            self.stats.add(spec, batch_samples(kjt), out_kjt)
            if self.router is not None and not self.follow and groups and self.router.decided is None:
                for g in spec.groups:  # the decision's count of u (it drops a group without repeats)
                    self.router.count_rows(g.name, batch_samples(kjt), unique_count(out_kjt, g.all_features[0]))
            yield out

    def _from_worker(self, batch: Any, where: str, kjt: DedupKJT, groups: Tuple[str, ...], tag: Any) -> Any:
        """A worker's batch (an IKJT of every group, plus the plain KJT) on the route asked for."""
        if not groups:
            return _plain_route(batch, where, kjt.plain(), tag)
        if groups == kjt.dedup_groups:
            return with_kjt(batch, where, DedupKJT.of(kjt.ikjt(), groups, tag))  # the plain KJT stays behind
        return with_kjt(batch, where, DedupKJT.of(from_ikjt(kjt.ikjt(), self._spec(groups), aligned=self.aligned),
                                                  groups, tag))


def _plain_route(batch: Any, where: str, plain: KeyedJaggedTensor, tag: Any) -> Any:
    """``batch`` with its plain KJT: as it is once decided; while the route is measured, in a
    ``DedupKJT`` without groups that carries the schedule's tag to the model's forward."""
    return with_kjt(batch, where, plain if tag is None else DedupKJT.of(plain, (), tag))
