"""The batch's KJT as the plugin's loader hands it to the model: deduplicated for the embedding
modules, the plain batch for the model's own code.

Why: a model's forward may read grouped features of the batch itself, outside the embedding
modules and towers the plugin changes (an attention mask from ``kjt["history"].to_padded_dense``,
``kjt.lengths()``, a position feature). Handed an IKJT, such code would read unique rows
(compact layout: U rows where it expects B, a raw size error) or carrier rows only (aligned
layout: the duplicates' rows are empty: silently wrong). TorchRec has no KJT that answers
differently to different readers, so this module adds one.

:class:`DedupKJT` is a ``KeyedJaggedTensor`` whose own data is the IKJT (either layout, see
``recd_plugin.sparse.ikjt``). Each public reader (``values()``, ``lengths()``, ``offsets()``,
``kjt[key]``, ``to_dict()``, ``permute()``, ``split()``, ``stride()``, ``str(kjt)``, ...)
answers as the **plain batch** when it is called by the model's code, and as the IKJT when it
is called by TorchRec, FBGEMM, torch or the plugin's runtime (the code that reads IKJTs on
purpose: the embedding modules, their sharded forms and input dists, the plugin's modules and
hooks). The caller is told apart by the module of the calling frame, one dictionary lookup per
call. The plain batch is expanded from the IKJT on the first read by model code and kept
for the rest of the step (``recd_plugin.expand``: one jagged gather on the batch's device)::

    kjt = DedupKJT.of(ikjt, groups=("user",))
    kjt["history"].lengths()       # in your model: B rows, exactly the plain batch's
    kjt.plain()                    # the plain batch itself
    recd_plugin.is_dedup(kjt)      # True

``to()`` and ``pin_memory()`` keep the IKJT (a ``DedupKJT`` comes back, with the plain batch
if one is attached), so a batch moved to its device by TorchRec's ``Batch.to`` or a train
pipeline arrives deduplicated. The loader hands the model deduplicated batches without the
plain batch attached, so moving one copies the IKJT only.

Not covered: code that reads the KJT's private attributes (``kjt._values``) and TorchRec's static
helpers called on the batch by model code (``KeyedJaggedTensor.concat([kjt, ...])``) see the IKJT;
pass them ``kjt.plain()``.
"""

from __future__ import annotations

import functools
import sys
from typing import Any, Callable, Optional, Tuple

from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recd_plugin.sparse.ikjt import expand

#: Callers in these packages read the IKJT itself (they are written to): TorchRec's modules,
#: sharded modules and pipelines, FBGEMM, torch, and the plugin's runtime.
_IKJT_READERS = ("torch.", "torchrec.", "fbgemm_gpu.", "recd_plugin.")
#: ... except the plugin's benchmarks and tooling, whose models are model code like a user's.
_MODEL_CODE = ("recd_plugin.bench.", "recd_plugin.analyze.")

#: The readers that answer as the plain batch to model code (every public method of TorchRec's
#: KJT that exposes its rows, in torchrec 1.8 and 1.9).
READERS = (
    "__getitem__", "__str__", "to_dict", "values", "weights", "weights_or_none", "lengths", "lengths_or_none",
    "offsets", "offsets_or_none", "stride", "stride_per_key", "stride_per_key_per_rank", "variable_stride_per_key",
    "inverse_indices", "inverse_indices_or_none", "length_per_key", "length_per_key_or_none", "offset_per_key",
    "offset_per_key_or_none", "lengths_offset_per_key", "index_per_key", "split", "permute", "flatten_lengths",
    "size_in_bytes",
)


def model_code(frame_name: str) -> bool:
    """True if code in the module named ``frame_name`` is the model's own (reads the plain batch)."""
    return not frame_name.startswith(_IKJT_READERS) or frame_name.startswith(_MODEL_CODE)


class DedupKJT(KeyedJaggedTensor):
    """An IKJT that model code reads as the plain batch (module docstring).

    Attributes (the plugin's; model code never needs them):
        dedup_groups: names of the feature groups deduplicated in this batch (empty: the batch
            is plain, as on TorchRec's plain route).
        route_tag: the plugin's route schedule's mark (``recd_plugin.transforms.route``).
    """

    dedup_groups: Tuple[str, ...]
    route_tag: Any
    _plain_kjt: Optional[KeyedJaggedTensor]

    @classmethod
    def of(cls, kjt: KeyedJaggedTensor, groups: Tuple[str, ...] = (), tag: Any = None,
           plain: Optional[KeyedJaggedTensor] = None) -> "DedupKJT":
        """``kjt`` (an IKJT of either layout, or a plain KJT when ``groups`` is empty) as a
        ``DedupKJT``, sharing its tensors. ``plain``: the plain batch, if the caller has it."""
        if isinstance(kjt, DedupKJT):
            kjt = kjt.ikjt()
        new = cls.__new__(cls)
        new.__dict__.update(kjt.__dict__)
        new.dedup_groups, new.route_tag = tuple(groups), tag
        new._plain_kjt = plain
        return new

    def plain(self) -> KeyedJaggedTensor:
        """The plain batch (batch B, TorchRec's ``KeyedJaggedTensor``), expanded once."""
        if self._plain_kjt is None:
            self._plain_kjt = expand(self.ikjt())
        return self._plain_kjt

    def ikjt(self) -> KeyedJaggedTensor:
        """The IKJT as TorchRec's ``KeyedJaggedTensor`` (the same tensors, no copy)."""
        out = KeyedJaggedTensor.__new__(KeyedJaggedTensor)
        out.__dict__.update({k: v for k, v in self.__dict__.items() if k not in _OWN})
        return out

    def to(self, device: Any, non_blocking: bool = False, dtype: Any = None) -> "DedupKJT":
        plain = self._plain_kjt
        return DedupKJT.of(KeyedJaggedTensor.to(self, device, non_blocking=non_blocking, dtype=dtype),
                           self.dedup_groups, self.route_tag,
                           plain.to(device, non_blocking=non_blocking, dtype=dtype) if plain is not None else None)

    def pin_memory(self) -> "DedupKJT":
        # A DataLoader's pin-memory thread pins what a worker built: the plain KJT the worker
        # attached (so that the plain route costs the training loop nothing) is pinned along.
        plain = self._plain_kjt
        return DedupKJT.of(KeyedJaggedTensor.pin_memory(self), self.dedup_groups, self.route_tag,
                           plain.pin_memory() if plain is not None else None)

    def is_deduplicated(self) -> bool:
        """True if the batch's own data is an IKJT (some group deduplicated)."""
        return self.__dict__.get("_inverse_indices") is not None


#: DedupKJT's own attributes (not TorchRec's KJT state).
_OWN = frozenset({"dedup_groups", "route_tag", "_plain_kjt"})


def _reader(name: str) -> Callable[..., Any]:
    raw = getattr(KeyedJaggedTensor, name)

    @functools.wraps(raw)
    def read(self: DedupKJT, *args: Any, **kwargs: Any) -> Any:
        if self.__dict__.get("_inverse_indices") is not None and model_code(
                sys._getframe(1).f_globals.get("__name__", "")):
            return getattr(self.plain(), name)(*args, **kwargs)
        return raw(self, *args, **kwargs)

    return read


for _name in READERS:
    setattr(DedupKJT, _name, _reader(_name))


def is_dedup(kjt: Any) -> bool:
    """True for a batch KJT that carries deduplicated groups (a ``DedupKJT`` with an IKJT)."""
    return isinstance(kjt, DedupKJT) and kjt.is_deduplicated()
