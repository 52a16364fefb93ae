"""IKJT: RecD's InverseKeyedJaggedTensor, built on TorchRec's variable-batch KJT.

An IKJT keeps, per *feature group*, only the unique rows of a batch plus one inverse index
per sample. TorchRec 1.8 can already *carry* that (a KJT with ``stride_per_key_per_rank``
and ``inverse_indices``, "VBE") and its ``EmbeddingBagCollection`` pools the unique rows and
expands the pooled output, but it has no CPU builder (``fbgemm.jagged_unique_indices`` is
CUDA-only) and nothing that groups features under one session key. This module fills that
gap; its output is a plain ``KeyedJaggedTensor`` that TorchRec consumes unchanged::

    spec = DedupSpec([FeatureGroup("user", ["user_id", "history"], key="session_id")])
    ikjt = build_ikjt(kjt, spec)           # VBE KJT: user features hold unique rows only
    ikjt.stride_per_key()                  # e.g. [31, 31, 31, 1024, ...]
    inverse_index(ikjt, "history")         # [B] sample -> unique row
    unique_rows(ikjt, ["history"])         # KJT of the 31 unique history rows
    expand(ikjt)                           # == kjt, exactly

Features in no group get the identity inverse, and every batch is emitted as an IKJT even
when nothing repeats, so a module never sees a mix of variable-batch and plain batches.

Two layouts, one meaning (``expand`` restores the plain KJT from either):

* **compact** (default): a grouped key holds its U unique rows (a TorchRec variable-batch
  KJT); ``inverse_indices`` map each sample to a row in [0, U). The dedup modules of
  ``recd_plugin.modules`` read it, unsharded.
* **aligned** (``build_ikjt(kjt, spec, aligned=True)``): an ordinary KJT of batch B; a grouped
  key keeps its ids only on the first sample of each unique row, the duplicates' rows are
  empty, and ``inverse_indices`` map each sample to the sample in [0, B) that carries its row
  (identity for ungrouped keys). Why: a variable-batch KJT sends *every* table of a sharded
  TorchRec module down its variable-batch path (fbgemm's VBE metadata and kernels), which on
  the per-sample tables costs more than deduplication saves. An aligned IKJT is a plain KJT to
  TorchRec: per-sample features take the plain path untouched, grouped tables look up and
  send only the unique rows' ids, and the pooled rows are gathered from the first samples
  (``recd_plugin.modules.gather``) only where the output is used.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recd_plugin.errors import DedupSpecError, MalformedBatchError, NotDeduplicableError, did_you_mean
from recd_plugin.sparse import plan


@dataclass(frozen=True)
class FeatureGroup:
    """Features deduplicated together: they share one inverse index.

    Args:
        name: group name, used by the config to point towers at this group.
        features: the sparse features of the group.
        key: a feature holding one id per sample (a session or user id). Samples with the
            same key are treated as duplicates of each other (RecD's session features). The
            key is deduplicated with the group. ``None`` compares the rows' content instead.
    """

    name: str
    features: Tuple[str, ...]
    key: Optional[str] = None

    def __post_init__(self) -> None:
        if isinstance(self.features, str):
            raise DedupSpecError(
                f"feature group {self.name!r}: features must be a list of names, got the string "
                f"{self.features!r}; write [{self.features!r}]"
            )
        if not self.name or not isinstance(self.name, str):
            raise DedupSpecError(f"feature group name must be a non-empty string, got {self.name!r}")
        try:
            features = tuple(self.features)
        except TypeError:
            features = (self.features,)  # not a list at all: named by the check below
        bad = [f for f in features + ((self.key,) if self.key is not None else ()) if not (isinstance(f, str) and f)]
        if bad:
            raise DedupSpecError(f"feature group {self.name!r}: features and key are feature names "
                                 f"(non-empty strings), got {bad[0]!r}; e.g. FeatureGroup('user', ['user_id'], key='session_id')")
        object.__setattr__(self, "features", features)
        if not self.features and self.key is None:
            raise DedupSpecError(f"feature group {self.name!r} has no features and no key")
        if len(set(self.features)) != len(self.features):
            raise DedupSpecError(f"feature group {self.name!r} lists a feature twice: {list(self.features)}")

    @property
    def all_features(self) -> Tuple[str, ...]:
        """The group's features with its key first (the key is deduplicated with the group)."""
        if self.key is None or self.key in self.features:
            return self.features
        return (self.key,) + self.features


@dataclass(frozen=True)
class DedupSpec:
    """A list of disjoint feature groups."""

    groups: Tuple[FeatureGroup, ...]
    _group_of: Dict[str, str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "groups", tuple(self.groups))
        group_of: Dict[str, str] = {}
        for g in self.groups:
            if not isinstance(g, FeatureGroup):
                raise DedupSpecError(f"DedupSpec takes FeatureGroup objects, got {g!r}; e.g. "
                                     "DedupSpec([FeatureGroup('user', ['user_id'], key='session_id')])")
            if any(g.name == other for other in group_of.values()):
                raise DedupSpecError(f"two feature groups are named {g.name!r}; give each a unique name")
            for f in g.all_features:
                if f in group_of:
                    raise DedupSpecError(
                        f"feature {f!r} is in groups {group_of[f]!r} and {g.name!r}; "
                        "a feature can belong to one group only"
                    )
                group_of[f] = g.name
        object.__setattr__(self, "_group_of", group_of)

    @property
    def features(self) -> List[str]:
        return list(self._group_of)

    def group(self, name: str) -> FeatureGroup:
        for g in self.groups:
            if g.name == name:
                return g
        raise DedupSpecError(f"no feature group named {name!r}{did_you_mean(name, [g.name for g in self.groups])}")

    def check_keys(self, keys: Sequence[str]) -> None:
        """Raise if the spec names a feature the batch does not have."""
        missing = [f for f in self._group_of if f not in keys]
        if missing:
            f = missing[0]
            raise DedupSpecError(
                f"feature {f!r} of group {self._group_of[f]!r} is not in the batch"
                f"{did_you_mean(f, keys)}; batch features are {list(keys)}"
            )


# ----------------------------------------------------------------------------------------
# Jagged primitives (vectorized, device-agnostic, differentiable through ``values``).


def complete_cumsum(lengths: torch.Tensor) -> torch.Tensor:
    """[N] lengths -> [N + 1] int64 offsets starting at 0."""
    offsets = torch.zeros(lengths.numel() + 1, dtype=torch.long, device=lengths.device)
    torch.cumsum(lengths, 0, out=offsets[1:])
    return offsets


def jagged_index_select(
    values: torch.Tensor, lengths: torch.Tensor, index: torch.Tensor, offsets: Optional[torch.Tensor] = None
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Select rows of a jagged tensor.

    Args:
        values: [sum(lengths), *] row contents, concatenated.
        lengths: [N] row lengths.
        index: [M] rows to take, in output order (repeats allowed).
        offsets: [N + 1] ``complete_cumsum(lengths)``, if the caller has it already.
    Returns:
        (values [sum(lengths[index]), *], lengths [M] int64, positions [sum(lengths[index])]:
        where each output element was read from in ``values``; apply it to weights too).
    """
    # index_select / index_add / cumsum only: on CPU, advanced indexing and repeat_interleave
    # go through parallel kernels that wake torch's second thread, which costs milliseconds
    # on an idle core (measured: 8 ms median vs 4 us for index_select at batch 1024).
    lengths = lengths.long()
    offsets = complete_cumsum(lengths) if offsets is None else offsets
    out_lengths = lengths.index_select(0, index)
    out_offsets = complete_cumsum(out_lengths)
    total = int(out_offsets[-1])
    # Each output element reads values[position]; position - output position is constant per
    # row (shift_i). Put shift_i - shift_{i-1} at each row start and cumsum (empty rows add up).
    shift = offsets.index_select(0, index) - out_offsets[:-1]
    step = torch.empty_like(shift)
    step[:1] = shift[:1]
    torch.sub(shift[1:], shift[:-1], out=step[1:])
    starts = torch.zeros(total + 1, dtype=torch.long, device=values.device)
    starts.index_add_(0, out_offsets[:-1], step)
    positions = torch.arange(total, device=values.device) + torch.cumsum(starts[:total], 0)
    return values.index_select(0, positions), out_lengths, positions


def unique_first(ids: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Unique ids in order of first appearance.

    Args:
        ids: [B] int64, or [B, C] rows compared as a whole.
    Returns:
        (first [U]: sample index of each unique row's first appearance, increasing;
        inverse [B]: unique row of each sample). No repeats -> identity inverse.
    """
    first, inverse = plan.unique_first(ids.detach().cpu().numpy())
    return torch.from_numpy(first).to(ids.device), torch.from_numpy(inverse).to(ids.device)


def is_identity(index: torch.Tensor) -> bool:
    """True if ``index`` [N] is 0, 1, ..., N-1 (a batch with no repeats)."""
    return bool(torch.equal(index, torch.arange(index.numel(), device=index.device)))


def expand_rows(rows: torch.Tensor, inverse: Optional[torch.Tensor]) -> torch.Tensor:
    """[U, *] unique rows -> [B, *] one per sample (``rows[inverse]``); no copy if identity."""
    if inverse is None or (rows.shape[0] == inverse.numel() and is_identity(inverse)):
        return rows
    return rows.index_select(0, inverse)


# ----------------------------------------------------------------------------------------
# Build, inspect, expand.


def _host(t: torch.Tensor, dtype: Optional[torch.dtype] = None) -> np.ndarray:
    """A CPU tensor's numpy view (no copy); other devices are copied to the host. ``dtype``
    casts on the way (numpy has no bfloat16: weights are compared as float64, which holds
    every bf16 / fp16 / fp32 value exactly)."""
    return t.detach().to(device="cpu", dtype=dtype).numpy()


def _is_integer(dtype: torch.dtype) -> bool:
    return not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)


def _check_integer_ids(kjt: KeyedJaggedTensor, offsets: np.ndarray) -> None:
    """Refuse non-integer ids: the key path casts them to int64 (1.5 and 1.2 both become 1,
    merging different sessions) and the content path compares truncated ids. The message
    names the feature of the first value that is not a whole number (else of the first value)."""
    values = kjt.values().detach()
    if _is_integer(values.dtype):
        return
    at, example = 0, ""
    if values.dtype.is_floating_point and values.numel():
        fractional = torch.nonzero(values != torch.trunc(values)).flatten()
        at = int(fractional[0]) if fractional.numel() else 0
        example = f", e.g. {values[at].item()!r}"
    keys = kjt.keys()
    row = int(np.searchsorted(offsets, at, side="right")) - 1  # the bag holding value `at`
    feature = repr(keys[row // kjt.stride()]) if values.numel() else f"of {list(keys)}"
    raise MalformedBatchError(
        f"feature {feature} holds {values.dtype} ids{example}: ids must be an integer tensor, "
        "else deduplication would truncate them and merge different rows. Build the KJT with "
        "integer values (torch.long or torch.int32); map non-integer categories to integer ids "
        "first, e.g. torch.unique(values, return_inverse=True)[1]"
    )


def lost_inverse_error(what: str) -> MalformedBatchError:
    """The error for a variable-batch KJT whose inverse indices were dropped on the way
    (TorchRec's ``permute``, ``split``, ``flatten_lengths``, ``from_jt_dict`` and feature
    processors rebuild the KJT without them): its rows are unique rows, not samples, and
    nothing can map them back to the batch any more."""
    return MalformedBatchError(
        f"{what} got a variable-batch KJT without inverse_indices: code between the batch and "
        "here dropped them (KeyedJaggedTensor.permute / split / flatten_lengths / from_jt_dict "
        "and feature processors do), so its rows are unique rows that can no longer be mapped "
        "back to samples. Pass the batch's KJT on as is, or call recd_plugin.expand(kjt) "
        "before such code."
    )


def _inverse_or_none(kjt: KeyedJaggedTensor, what: str) -> Optional[Tuple[List[str], torch.Tensor]]:
    """``kjt.inverse_indices_or_none()``, refusing a variable-batch KJT that lost them: read
    as a plain KJT, its unique rows would silently pass for the batch."""
    inv = kjt.inverse_indices_or_none()
    if inv is None and kjt.variable_stride_per_key():
        raise lost_inverse_error(what)
    return inv


def _check_kjt(kjt: KeyedJaggedTensor) -> Tuple[np.ndarray, np.ndarray]:
    """Raise on a KJT the builder cannot take; return its lengths and offsets (int64, host)."""
    if not isinstance(kjt, KeyedJaggedTensor):
        raise MalformedBatchError(f"expected a torchrec KeyedJaggedTensor, got {type(kjt).__name__}")
    if kjt.inverse_indices_or_none() is not None or kjt.variable_stride_per_key():
        raise MalformedBatchError(
            "this KJT is already variable-batch (has inverse_indices); deduplicate the plain "
            "batch once, or call expand() first"
        )
    lengths = _host(kjt.lengths()).astype(np.int64, copy=False)
    if lengths.size != len(kjt.keys()) * kjt.stride():
        raise MalformedBatchError(
            f"malformed KJT: {lengths.size} lengths for {len(kjt.keys())} keys x batch "
            f"{kjt.stride()}; lengths must have keys * batch_size entries"
        )
    if lengths.size and int(lengths.min()) < 0:
        raise MalformedBatchError("malformed KJT: negative lengths")
    offsets = plan.offsets_of(lengths)
    if int(offsets[-1]) != kjt.values().numel():
        raise MalformedBatchError(
            f"malformed KJT: lengths sum to {int(offsets[-1])} but there are "
            f"{kjt.values().numel()} values"
        )
    _check_integer_ids(kjt, offsets)
    return lengths, offsets


def not_constant(feature: str, group: FeatureGroup) -> NotDeduplicableError:
    """The error for a feature whose rows differ between samples of one group key."""
    how = f"keyed by {group.key!r}" if group.key else "keyed by content"
    return NotDeduplicableError(
        f"feature {feature!r} is not constant within group {group.name!r} ({how}): two samples "
        f"with the same key have different {feature!r} rows (ids or weights). Remove {feature!r} "
        "from the group, or key the group by content (omit 'key')."
    )


def _check_constant_lengths(lengths: np.ndarray, group: FeatureGroup, index_of: Dict[str, int],
                            first: np.ndarray, inverse: np.ndarray) -> None:
    """Every batch, almost free: each grouped feature's row lengths [K, B] are constant per key.

    Catches most features wrongly declared session-level (a row that grows within a session);
    ``verify_batches`` compares the ids too, on the first batches (or every batch with -1).
    """
    if group.key is None:
        return  # keyed by content: equal rows by construction
    ks = [index_of[f] for f in group.all_features]
    rows = lengths[ks]
    bad = np.flatnonzero((rows[:, first][:, inverse] != rows).any(axis=1))
    if bad.size:
        raise not_constant(group.all_features[int(bad[0])], group)


def build_ikjt(kjt: KeyedJaggedTensor, spec: DedupSpec, aligned: bool = False) -> KeyedJaggedTensor:
    """Deduplicate a plain KJT into an IKJT.

    Args:
        kjt: plain KJT, keys K, batch B (``lengths`` [K * B]).
        spec: feature groups to deduplicate.
        aligned: the aligned layout (see the module docstring) instead of the compact one.
    Returns:
        compact: KJT with the same keys in the same order; a grouped key holds U_g unique rows
        (``stride_per_key_per_rank[k] == [U_g]``), an ungrouped one its B rows;
        ``inverse_indices == (keys, [K, B] int64)`` into [0, U_g).
        aligned: KJT of batch B, same keys; a grouped key's duplicate rows have length 0;
        ``inverse_indices == (keys, [K, B] int64)`` into [0, B), each sample's carrier.
    """
    lengths, offsets = _check_kjt(kjt)
    keys = kjt.keys()
    spec.check_keys(keys)
    batch = kjt.stride()
    values, weights = kjt.values(), kjt.weights_or_none()
    index_of = {k: i for i, k in enumerate(keys)}

    # The plan (host, numpy): per key, which rows to keep (first appearances) and the inverse.
    keep = np.ones((len(keys), batch), dtype=bool)
    inverse = np.empty((len(keys), batch), dtype=np.int64)
    inverse[:] = np.arange(batch)
    strides = [[batch] for _ in keys]
    host_values = _host(values)
    for g in spec.groups:
        if g.key is not None:
            k = index_of[g.key]
            start, end = offsets[k * batch], offsets[(k + 1) * batch]
            key_lengths = lengths[k * batch:(k + 1) * batch]
            if batch and (end - start != batch or int(key_lengths.min()) < 1):  # one id per sample
                bad = int(np.flatnonzero(key_lengths != 1)[0])
                raise MalformedBatchError(
                    f"key feature {g.key!r} of group {g.name!r} must hold exactly one id per "
                    f"sample; sample {bad} has {int(key_lengths[bad])}"
                )
            first, inv = plan.unique_first(host_values[start:end].astype(np.int64, copy=False))
        else:
            host_weights = _host(weights, torch.float64) if weights is not None else None
            rows = plan.content_rows(lengths, offsets, host_values, host_weights,
                                     [index_of[f] for f in g.all_features], batch)
            first, inv = plan.unique_first(rows)
        _check_constant_lengths(lengths.reshape(len(keys), batch), g, index_of, first, inv)
        for f in g.all_features:
            k = index_of[f]
            keep[k] = False
            keep[k, first] = True
            inverse[k] = inv
            strides[k] = [int(first.size)]

    # Kept rows in key order, increasing; then one gather of the values on their device.
    out_lengths, positions = plan.jagged_positions(lengths, offsets, np.flatnonzero(keep))
    at = torch.from_numpy(positions).to(values.device)
    if aligned:
        # Same values; duplicates become empty rows, and each sample points at its carrier
        # (the first sample of its unique row): first[inverse] per grouped key.
        carrier = np.empty_like(inverse)
        carrier[:] = np.arange(batch)
        for g in spec.groups:
            k0 = index_of[g.all_features[0]]
            first = np.flatnonzero(keep[k0])
            for f in g.all_features:
                carrier[index_of[f]] = first[inverse[index_of[f]]]
        return KeyedJaggedTensor(
            keys=keys,
            values=values.index_select(0, at),
            weights=weights.index_select(0, at) if weights is not None else None,
            lengths=torch.from_numpy(lengths * keep.reshape(-1)).to(device=values.device, dtype=kjt.lengths().dtype),
            stride=batch,
            inverse_indices=(list(keys), torch.from_numpy(carrier).to(values.device)),
        )
    return KeyedJaggedTensor(
        keys=keys,
        values=values.index_select(0, at),
        weights=weights.index_select(0, at) if weights is not None else None,
        lengths=torch.from_numpy(out_lengths).to(device=values.device, dtype=kjt.lengths().dtype),
        stride_per_key_per_rank=strides,
        inverse_indices=(list(keys), torch.from_numpy(inverse).to(values.device)),
    )


def is_ikjt(kjt: KeyedJaggedTensor) -> bool:
    return kjt.inverse_indices_or_none() is not None


def is_aligned(kjt: KeyedJaggedTensor) -> bool:
    """True for an IKJT in the aligned layout (inverse indices on a KJT of one batch size)."""
    return kjt.inverse_indices_or_none() is not None and not kjt.variable_stride_per_key()


def _carries(carrier: torch.Tensor) -> torch.Tensor:
    """[B] bool: the samples that carry their own row (their carrier is themselves)."""
    return carrier == torch.arange(carrier.numel(), device=carrier.device)


def carrier_rows(carrier: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Aligned inverse [B] (each sample's carrier sample) -> (first [U]: the carriers,
    increasing; inverse [B]: each sample's unique row in [0, U)). Device-agnostic."""
    is_first = _carries(carrier)
    first = torch.nonzero(is_first).flatten()
    rank = torch.cumsum(is_first.long(), 0) - 1
    return first, rank.index_select(0, carrier)


def group_rows(ikjt: KeyedJaggedTensor, feature: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """(first [U], inverse [B]) of ``feature``'s group in either layout: the sample that first
    carries each unique row, and each sample's unique row in [0, U). Unique rows no sample reads
    (empty bags padded in for equal per-rank counts) get sample 0 as their ``first``."""
    names, tensor = ikjt.inverse_indices()
    inv = tensor[names.index(feature)]
    if not ikjt.variable_stride_per_key():
        return carrier_rows(inv)
    num_unique = ikjt.stride_per_key()[ikjt.keys().index(feature)]
    first = torch.full((num_unique,), inv.numel(), dtype=torch.long, device=inv.device)
    first.scatter_reduce_(0, inv, torch.arange(inv.numel(), device=inv.device), reduce="amin")
    first.masked_fill_(first == inv.numel(), 0)
    return first, inv


def unique_count(ikjt: KeyedJaggedTensor, feature: str) -> int:
    """Number of unique rows of ``feature`` in an IKJT of either layout (B for a plain KJT)."""
    if _inverse_or_none(ikjt, "unique_count()") is None:
        return ikjt.stride()
    if ikjt.variable_stride_per_key():
        return ikjt.stride_per_key()[ikjt.keys().index(feature)]
    names, tensor = ikjt.inverse_indices()
    return int(_carries(tensor[names.index(feature)]).sum())


def inverse_index(ikjt: KeyedJaggedTensor, feature: str) -> torch.Tensor:
    """[B] int64: for each sample, the row of ``feature`` in the IKJT (identity for a plain KJT)."""
    inv = _inverse_or_none(ikjt, "inverse_index()")
    if inv is None:
        return torch.arange(ikjt.stride(), device=ikjt.values().device)
    names, tensor = inv
    if feature not in names:
        raise DedupSpecError(f"feature {feature!r} is not in this IKJT{did_you_mean(feature, names)}")
    return tensor[names.index(feature)]


def unique_rows(ikjt: KeyedJaggedTensor, features: Sequence[str], check: bool = True) -> KeyedJaggedTensor:
    """Plain KJT (batch U) of the unique rows of ``features``, which must share one group
    (either layout).

    ``check=False`` skips verifying that the features share one inverse index (for callers
    that take ``features`` from one ``FeatureGroup`` of the spec the IKJT was built with).
    """
    strides = dict(zip(ikjt.keys(), ikjt.stride_per_key()))
    missing = [f for f in features if f not in strides]
    if missing:
        raise DedupSpecError(f"feature {missing[0]!r} is not in this IKJT{did_you_mean(missing[0], list(strides))}")
    if check and (len({strides[f] for f in features}) > 1 or not all(
            torch.equal(inverse_index(ikjt, f), inverse_index(ikjt, features[0])) for f in features)):
        raise DedupSpecError(f"features {list(features)} are in different groups (their inverse indices differ)")
    if is_aligned(ikjt):
        return select_rows(ikjt, features, group_rows(ikjt, features[0])[0])
    jts = ikjt.to_dict()
    weights = [jts[f].weights_or_none() for f in features]
    return KeyedJaggedTensor(
        keys=list(features),
        values=torch.cat([jts[f].values() for f in features]),
        lengths=torch.cat([jts[f].lengths() for f in features]),
        weights=torch.cat(weights) if all(w is not None for w in weights) else None,  # type: ignore[arg-type]
        stride=strides[features[0]],
    )


def select_rows(kjt: KeyedJaggedTensor, features: Sequence[str], rows: torch.Tensor) -> KeyedJaggedTensor:
    """Plain KJT (batch M) of samples ``rows`` [M] of ``features``, from a KJT of one batch size
    (plain or aligned): one jagged gather over the whole KJT."""
    batch, keys = kjt.stride(), kjt.keys()
    select = torch.cat([rows + keys.index(f) * batch for f in features])
    values, lengths, positions = jagged_index_select(kjt.values(), kjt.lengths(), select)
    weights = kjt.weights_or_none()
    return KeyedJaggedTensor(
        keys=list(features), values=values, lengths=lengths.to(kjt.lengths().dtype),
        weights=weights.index_select(0, positions) if weights is not None else None, stride=rows.numel(),
    )


def expand(ikjt: KeyedJaggedTensor) -> KeyedJaggedTensor:
    """IKJT -> the plain KJT (batch B) it was built from. A plain KJT is returned as is; a
    variable-batch KJT that lost its inverse indices is refused (``lost_inverse_error``)."""
    inv = _inverse_or_none(ikjt, "expand()")
    if inv is None:
        return ikjt
    names, tensor = inv
    keys = ikjt.keys()
    strides = ikjt.stride_per_key()
    base = complete_cumsum(torch.tensor(strides, dtype=torch.long))
    order = [names.index(k) for k in keys]
    select = (tensor[order] + base[:-1].to(tensor.device).unsqueeze(1)).reshape(-1)
    values, lengths, positions = jagged_index_select(ikjt.values(), ikjt.lengths(), select)
    weights = ikjt.weights_or_none()
    return KeyedJaggedTensor(
        keys=keys,
        values=values,
        weights=weights.index_select(0, positions) if weights is not None else None,
        lengths=lengths.to(ikjt.lengths().dtype),
        stride=tensor.shape[1],
    )
