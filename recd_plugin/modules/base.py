"""What the dedup-aware embedding modules share: built from TorchRec's, reading an IKJT.

``DedupModule.from_module`` makes the dedup version of a TorchRec module that shares its
tables (the same parameter objects: the state_dict is identical both ways, and optimizers
built before ``apply`` keep working). ``DedupModule.inverse_of`` splits the input into the KJT
and, for an IKJT, each feature's inverse index; a plain KJT takes TorchRec's own path.

A user subclass of TorchRec's module (extra methods, attributes, a custom ``__init__``) that
keeps TorchRec's ``forward`` gets a dedup class deriving from both (``dedup_type``): it stays
an instance of the user's class, and its dedup ``forward`` is the only one that changes. A
subclass that overrides ``forward`` cannot be swapped (the dedup forward would skip the
user's), and ``replaces`` says so; ``recd_plugin.apply`` refuses it when it would read an IKJT.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple, Type, TypeVar

import torch
import torch.fx
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from torchrec.sparse.tensor_dict import maybe_td_to_kjt

from recd_plugin.errors import UnsupportedModelError
from recd_plugin.sparse.ikjt import lost_inverse_error

T = TypeVar("T", bound="DedupModule")

#: (dedup class, user subclass) -> the class deriving from both; one per pair, so that
#: ``type(a) is type(b)`` holds for two swapped modules of one user class.
_SUBCLASS_TYPES: Dict[Tuple[type, type], type] = {}


class DedupModule:
    """Mixin of DedupEmbeddingCollection / DedupEmbeddingBagCollection."""

    @classmethod
    def torchrec_type(cls) -> type:
        """The TorchRec class this dedup class stands in for (its non-dedup base)."""
        return next(b for b in cls.__mro__ if b is not cls and not issubclass(b, DedupModule))

    @classmethod
    def replaces(cls, module: torch.nn.Module) -> bool:
        """True if ``module`` is TorchRec's class or a subclass that keeps TorchRec's
        ``forward`` (on the class and on the instance): only then does the dedup forward
        compute what the module's own forward would."""
        base = cls.torchrec_type()
        return (isinstance(module, base) and not isinstance(module, DedupModule)
                and type(module).forward is base.forward and "forward" not in vars(module))

    @classmethod
    def dedup_type(cls, module_type: type) -> type:
        """``cls`` for TorchRec's exact class; for a user subclass, a class deriving from
        ``cls`` and the subclass (the dedup forward first, the user's methods kept)."""
        if module_type is cls.torchrec_type():
            return cls
        key = (cls, module_type)
        if key not in _SUBCLASS_TYPES:
            _SUBCLASS_TYPES[key] = type(f"{cls.__name__}[{module_type.__qualname__}]", (cls, module_type),
                                        {"__module__": module_type.__module__, "_made_from": key})
        return _SUBCLASS_TYPES[key]

    @classmethod
    def from_module(cls: Type[T], module: torch.nn.Module) -> T:
        """The dedup module sharing ``module``'s tables, buffers and submodules (no copy); of
        a dedup module, another one of its type."""
        if isinstance(module, cls):
            new = cls.__new__(type(module))
            new.__dict__.update(module.__dict__)
            return new
        if not cls.replaces(module):
            raise UnsupportedModelError(
                f"{type(module).__name__} cannot be replaced by {cls.__name__}: it is not a "
                f"{cls.torchrec_type().__name__}, or it overrides forward() (which the dedup "
                "forward would skip); keep extra logic in a wrapper module around TorchRec's class"
            )
        new_type = cls.dedup_type(type(module))
        new = new_type.__new__(new_type)
        new.__dict__.update(module.__dict__)
        return new

    def __reduce_ex__(self, protocol: Any) -> Tuple[Any, ...]:
        # A class made by dedup_type cannot be pickled by name (pickle, torch.save, deepcopy):
        # rebuild it from the two importable classes it derives from.
        reduced = object.__reduce_ex__(self, max(int(protocol), 2))
        made_from = type(self).__dict__.get("_made_from")
        return reduced if made_from is None else (_new_subclass_module, made_from, *reduced[2:])

    @staticmethod
    def inverse_of(features: KeyedJaggedTensor) -> Tuple[KeyedJaggedTensor, Optional[Dict[str, torch.Tensor]]]:
        """(the input as a KJT, {feature: inverse [B]}); None for a plain KJT.

        TensorDict input is converted as TorchRec does. A variable-batch KJT that lost its
        inverse indices on the way (``KeyedJaggedTensor.permute``/``split``, feature
        processors) is refused: TorchRec's path would misread it.
        """
        if isinstance(features, torch.fx.Proxy):
            # Traced (TorchRec's TrainPipelineSparseDist traces the model to find its sharded
            # modules): trace TorchRec's own forward, which is written to be traceable.
            return features, None
        features = maybe_td_to_kjt(features, None)
        inverse = features.inverse_indices_or_none()
        if inverse is None and features.variable_stride_per_key():
            raise lost_inverse_error("an embedding module")
        return features, None if inverse is None else dict(zip(inverse[0], inverse[1]))


def _new_subclass_module(dedup: type, user: type) -> DedupModule:
    """Unpickling: an empty instance of ``dedup.dedup_type(user)`` (its state comes next)."""
    new_type = dedup.dedup_type(user)
    return new_type.__new__(new_type)
