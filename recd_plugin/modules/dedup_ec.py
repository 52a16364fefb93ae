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

from typing import Dict, Optional

import torch
from torchrec.modules.embedding_modules import EmbeddingCollection
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor

from recd_plugin.modules.base import DedupModule
from recd_plugin.sparse.ikjt import is_identity, jagged_index_select


class DedupEmbeddingCollection(DedupModule, EmbeddingCollection):
    """``EmbeddingCollection`` that runs lookups on the unique rows of an IKJT.

    Input: KJT (plain or IKJT) with keys K and batch B. Output: ``Dict[str, JaggedTensor]``
    with B rows per embedding name, values [sum of lengths, D], exactly as TorchRec's EC.
    """

    def forward(self, features: KeyedJaggedTensor) -> Dict[str, JaggedTensor]:
        features, inverse_of = self.inverse_of(features)
        if inverse_of is None:
            return super().forward(features)
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

