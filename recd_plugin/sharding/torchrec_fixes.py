"""A targeted fix for TorchRec 1.8's variable-batch (VBE) lookups on CPU.

Gap: when one rank's shard of a sharded EmbeddingBagCollection holds tables that land in
more than one TBE (different dims or pooling types, e.g. a 64-dim SUM table next to a 16-dim
MEAN one), ``GroupedPooledEmbeddingsLookup`` merges their VBE outputs into a pre-allocated
tensor, which fbgemm's CPU TBE refuses: ``AssertionError: [TBE API v2] Using pre-allocated
vbe_output is not supported on CPU``. TorchRec already has the split-and-concat merge for
devices without that support (MTIA); :func:`install` routes CPU there too. Nothing changes on
cuda, and a TorchRec without this code path is left alone.
"""

from __future__ import annotations

from typing import Any, List

import torch

_INSTALLED = False


def install() -> None:
    """Idempotent: make CPU VBE lookups with several TBEs use TorchRec's concat merge."""
    global _INSTALLED
    if _INSTALLED:
        return
    try:
        from torchrec.distributed.embedding_lookup import GroupedPooledEmbeddingsLookup as Lookup
    except ImportError:  # a TorchRec without this class: nothing to fix
        return
    original = getattr(Lookup, "_forward_with_vbe_merging", None)
    if original is None or not hasattr(Lookup, "_merge_variable_batch_embeddings"):
        return

    def forward_with_vbe_merging(self: Any, features_by_group: List[Any], device: torch.device) -> torch.Tensor:
        if device.type == "cpu":
            return self._merge_variable_batch_embeddings(self._forward(features_by_group),
                                                         self._vbe_splits(features_by_group))
        return original(self, features_by_group, device)

    Lookup._forward_with_vbe_merging = forward_with_vbe_merging
    _INSTALLED = True
