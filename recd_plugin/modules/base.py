"""What the dedup-aware embedding modules share: built from TorchRec's, reading an IKJT.

``DedupModule.from_module`` makes the dedup version of a TorchRec module that shares its
tables (the same parameter objects: the state_dict is identical both ways, and optimizers
built before ``apply`` keep working). ``DedupModule.inverse_of`` splits the input into the KJT
and, for an IKJT, each feature's inverse index; a plain KJT takes TorchRec's own path.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple, Type, TypeVar

import torch
import torch.fx
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from torchrec.sparse.tensor_dict import maybe_td_to_kjt

from recd_plugin.errors import UnsupportedModelError

T = TypeVar("T")


class DedupModule:
    """Mixin of DedupEmbeddingCollection / DedupEmbeddingBagCollection."""

    @classmethod
    def from_module(cls: Type[T], module: torch.nn.Module) -> T:
        """The dedup module sharing ``module``'s tables, buffers and submodules (no copy)."""
        new = cls.__new__(cls)
        new.__dict__.update(module.__dict__)
        return new

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
            raise UnsupportedModelError(
                "an embedding module got a variable-batch KJT without inverse_indices: code between "
                "the batch and this module dropped them (KeyedJaggedTensor.permute/split do, and so "
                "do feature processors). Pass the batch's KJT to the module as is, or call "
                "recd_plugin.expand(kjt) before such code."
            )
        return features, None if inverse is None else dict(zip(inverse[0], inverse[1]))
