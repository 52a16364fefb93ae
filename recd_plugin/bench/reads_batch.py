"""A sequence model whose forward reads the batch's KJT itself, as TorchRec's sequence examples do.

Besides its embedding modules, the forward reads grouped features of the batch directly, outside
any embedding module: an attention key-padding mask from the history ids
(``kjt["history"].to_padded_dense(...)``), the number of user ids per sample from the whole
KJT's ``lengths()``, and the per-sample ``position`` feature's ids. With the
plugin on, these reads must see the plain batch (``recd_plugin.sparse.dedup_kjt``), in every
mode: unsharded, under DistributedModelParallel, with and without TorchRec's train pipeline.

``tower=True`` puts the attention over the history in a submodule of its own (``seq``: it reads
only the user group's features, so it can be declared a tower: ``towers.seq=user``), with
``dropout`` inside it (the randomness the plugin reports for towers).

Batches: keys ``session_id`` (the group key), ``user_id`` and ``history`` (the session-level
group), ``item_id`` and ``position`` (per sample); :func:`with_position` adds the position to
the MovieLens batches of ``recd_plugin.data`` and the tests' session batches. ``forward(batch)`` returns
``(loss, (loss, logits, labels))``, as ``TrainPipelineSparseDist`` wants.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch
from torch import nn

#: The plugin flag for this model: the session-level group, keyed by the session id.
FLAG = "groups.user.key=session_id; groups.user.features=user_id,history"


class _Attention(nn.Module):
    """The item attends over the history (batch first): (item [B, D], history [B, L, D], padding
    mask [B, L]) -> [B, D]."""

    def __init__(self, dim: int, dropout: float) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, num_heads=2, batch_first=True)
        self.drop = nn.Dropout(dropout)

    def forward(self, query: torch.Tensor, history: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        out, _ = self.attn(query.unsqueeze(1), history, history, key_padding_mask=padding, need_weights=False)
        return self.drop(out.squeeze(1))


class _UserSequence(nn.Module):
    """The user side as a tower: (history [B, L, D], padding [B, L]) -> [B, D], a learned query
    attending over the history (reads the user group only)."""

    def __init__(self, dim: int, dropout: float) -> None:
        super().__init__()
        self.query = nn.Parameter(torch.randn(dim) / dim ** 0.5)
        self.attend = _Attention(dim, dropout)

    def forward(self, history: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        return self.attend(self.query.expand(history.shape[0], -1), history, padding)


class ReadsBatch(nn.Module):
    """Module docstring. ``num_embeddings``: rows per table (``user_id``, ``history`` (its ids are
    items), ``item_id``, ``position``). ``embedding_device``: where the embedding tables are
    built (``meta``, as TorchRec's examples build them: DistributedModelParallel materializes
    them); the dense part is built on the default device."""

    def __init__(self, num_embeddings: Dict[str, int], dim: int = 16, max_len: int = 8, tower: bool = False,
                 dropout: float = 0.0, embedding_device: Optional[torch.device] = None) -> None:
        super().__init__()
        from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, EmbeddingCollection, EmbeddingConfig

        self.max_len = max_len
        items = max(num_embeddings["history"], num_embeddings["item_id"])
        self.ec = EmbeddingCollection(tables=[
            EmbeddingConfig(name="t_items", embedding_dim=dim, num_embeddings=items,
                            feature_names=["history", "item_id"]),
        ], device=embedding_device)
        self.ebc = EmbeddingBagCollection(tables=[
            EmbeddingBagConfig(name="t_user", embedding_dim=dim, num_embeddings=num_embeddings["user_id"],
                               feature_names=["user_id"]),
            EmbeddingBagConfig(name="t_position", embedding_dim=dim, num_embeddings=num_embeddings.get("position", 64),
                               feature_names=["position"]),
        ], device=embedding_device)
        self.seq: Optional[nn.Module] = _UserSequence(dim, dropout) if tower else None
        self.attend = None if tower else _Attention(dim, dropout)
        self.head = nn.Linear(2 * dim + 1, 1)
        self.loss_fn = nn.BCEWithLogitsLoss()

    def logits(self, batch: Any) -> torch.Tensor:
        kjt = batch.sparse_features
        seq = self.ec(kjt)
        history = seq["history"].to_padded_dense(self.max_len)            # [B, L, D]
        item = seq["item_id"].to_padded_dense(1).squeeze(1)                # [B, D]
        # Read straight from the batch: the history ids (-1 pads), the mask from them.
        ids = kjt["history"].to_padded_dense(self.max_len, padding_value=-1)  # [B, L]
        # An empty history attends to its (zero) first slot; no in-place writes (the pipeline traces this).
        padding = torch.cat([torch.zeros_like(ids[:, :1], dtype=torch.bool), ids[:, 1:] < 0], dim=1)
        if self.seq is not None:
            user_seq = self.seq(history, padding)
        else:
            user_seq = self.attend(item, history, padding)
        n_user = user_id_counts(kjt).to(history.dtype)  # [B]
        pooled = self.ebc(kjt)
        position = kjt["position"].values().to(history.dtype)  # per sample (one id each), read directly
        z = torch.cat([user_seq * item + pooled["position"], pooled["user_id"] * position.unsqueeze(1) / 16,
                       n_user.unsqueeze(1)], dim=1)
        return self.head(z).squeeze(-1)

    def forward(self, batch: Any) -> Tuple[torch.Tensor, Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        logits = self.logits(batch)
        loss = self.loss_fn(logits, batch.labels)
        return loss, (loss.detach(), logits.detach(), batch.labels)


@torch.fx.wrap
def user_id_counts(kjt: Any) -> torch.Tensor:
    """[B] user ids per sample, read from the whole KJT's ``lengths()`` (laid out key-major).
    ``torch.fx.wrap``: TorchRec's train pipeline traces the model, and ``len()`` of a traced
    KJT's keys cannot be traced; the call is kept as one node and runs as written."""
    keys = kjt.keys()
    return kjt.lengths().view(len(keys), -1)[keys.index("user_id")]


def with_position(batch: Any) -> Any:
    """``batch`` with a per-sample ``position`` feature appended: each sample's index within its
    run of equal session ids (a position in the session, as a ranking log has it)."""
    import dataclasses

    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    kjt = batch.sparse_features
    b = kjt.stride()
    session = kjt["session_id"].values()
    start = torch.ones(b, dtype=torch.bool)
    start[1:] = session[1:] != session[:-1]
    run_start = torch.cummax(torch.where(start, torch.arange(b), torch.zeros(b, dtype=torch.long)), 0).values
    position = torch.arange(b) - run_start
    out = KeyedJaggedTensor(keys=kjt.keys() + ["position"], values=torch.cat([kjt.values(), position.to(kjt.values().dtype)]),
                            lengths=torch.cat([kjt.lengths(), torch.ones(b, dtype=kjt.lengths().dtype)]), stride=b)
    return dataclasses.replace(batch, sparse_features=out)
