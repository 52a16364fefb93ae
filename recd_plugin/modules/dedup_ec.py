"""Dedup-aware ``EmbeddingCollection`` (sequence features).

TorchRec's ``EmbeddingCollection`` ignores ``inverse_indices``: fed an IKJT it would return
the unique rows as if they were the batch. ``DedupEmbeddingCollection`` looks up only the
unique rows and expands the looked-up rows back to one row per sample, so code downstream
is unchanged; the gradient of a duplicated row is summed over its samples, as in the plain
path. It shares the original module's parameters, so the state_dict is the same both ways::

    ec = DedupEmbeddingCollection.from_module(ec)   # in place of torchrec's EC
    out = ec(ikjt)["history"]                       # JaggedTensor with B rows, as before
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple, Type, TypeVar

import torch
from torchrec.modules.embedding_modules import EmbeddingCollection
from torchrec.sparse.tensor_dict import maybe_td_to_kjt
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor

from recd_plugin.errors import UnsupportedModelError
from recd_plugin.sparse.ikjt import is_identity, jagged_index_select

T = TypeVar("T")


def _inverse_or_none(features: KeyedJaggedTensor) -> Optional[Tuple[List[str], torch.Tensor]]:
    """The IKJT's inverse indices; raise if a variable-batch KJT lost them on the way."""
    inverse = features.inverse_indices_or_none()
    if inverse is None and features.variable_stride_per_key():
        raise UnsupportedModelError(
            "an embedding module got a variable-batch KJT without inverse_indices: code between "
            "the batch and this module dropped them (KeyedJaggedTensor.permute/split do, and so "
            "do feature processors). Pass the batch's KJT to the module as is, or call "
            "recd_plugin.expand(kjt) before such code."
        )
    return inverse


class SharesTables:
    """Mixin: build the dedup module from a TorchRec one, sharing its tables (no copy).

    Parameters, buffers and submodules are the same objects, so the state_dict keys and
    values are identical both ways and the optimizer's parameter references stay valid.
    """

    @classmethod
    def from_module(cls: Type[T], module: torch.nn.Module) -> T:
        new = cls.__new__(cls)
        new.__dict__.update(module.__dict__)
        return new


class DedupEmbeddingCollection(SharesTables, EmbeddingCollection):
    """``EmbeddingCollection`` that runs lookups on the unique rows of an IKJT.

    Input: KJT (plain or IKJT) with keys K and batch B. Output: ``Dict[str, JaggedTensor]``
    with B rows per embedding name, values [sum of lengths, D], exactly as TorchRec's EC.
    """

    def forward(self, features: KeyedJaggedTensor) -> Dict[str, JaggedTensor]:
        features = maybe_td_to_kjt(features, None)
        inverse = _inverse_or_none(features)
        if inverse is None:
            return super().forward(features)
        inverse_of = dict(zip(inverse[0], inverse[1]))
        jt_dict = features.to_dict()
        out: Dict[str, JaggedTensor] = {}
        for i, table in enumerate(self.embeddings.values()):
            for feature, name in zip(self._feature_names[i], self._embedding_names_by_table[i]):
                f = jt_dict[feature]
                lookup = table(input=f.values()).float()  # [sum of unique lengths, D]
                inv: Optional[torch.Tensor] = inverse_of.get(feature)
                values, lengths, ids = lookup, f.lengths(), f.values()
                if inv is not None and not is_identity(inv):
                    values, lengths, positions = jagged_index_select(lookup, f.lengths(), inv)
                    lengths = lengths.to(f.lengths().dtype)
                    ids = f.values().index_select(0, positions)
                out[name] = JaggedTensor(
                    values=values, lengths=lengths, weights=ids if self._need_indices else None
                )
        return out

