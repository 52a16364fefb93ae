"""A two-tower MovieLens model, written the way a plain TorchRec user writes it.

User side: user id + profile embeddings (``EmbeddingBagCollection``) and the last 50 items
the user rated before the session (``EmbeddingCollection`` -> padded to the batch's longest
history -> a small transformer encoder), concatenated into an MLP user tower.
Item side: item id, genres and year embeddings plus two dense features, into an MLP.
Score: dot product of the two towers; loss: binary cross-entropy on rating >= 4.

``light=True`` mean-pools the history in the ``EmbeddingBagCollection`` instead (no encoder).
Nothing here knows about recd-plugin: the plugin's config names ``user_tower`` as a tower
that reads only session features.
"""

from __future__ import annotations

from typing import Dict, Tuple

import torch
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, EmbeddingCollection, EmbeddingConfig, KeyedJaggedTensor
from torchrec.modules.embedding_configs import PoolingType

USER_FEATURES = ["user_id", "user_age", "user_gender", "user_occupation", "user_zip"]
ITEM_FEATURES = ["item_id", "item_genres", "item_year"]


def _mlp(sizes: Tuple[int, ...]) -> nn.Sequential:
    layers: list = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


class HistoryEncoder(nn.Module):
    """Transformer over a padded item history.

    Input: x [B, L, D] history embeddings, mask [B, L] True where padding.
    Output: [B, D], the encoding at a learned leading [CLS] position (so an empty history is
    still well defined).
    """

    def __init__(self, dim: int, layers: int = 2, heads: int = 4, max_len: int = 64) -> None:
        super().__init__()
        self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.position = nn.Parameter(torch.randn(1, max_len + 1, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=4 * dim, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, length, _ = x.shape
        x = torch.cat([self.cls.expand(b, -1, -1), x], dim=1) + self.position[:, : length + 1]
        mask = torch.cat([mask.new_zeros(b, 1), mask], dim=1)
        return self.encoder(x, src_key_padding_mask=mask)[:, 0]


def _bag(cardinalities: Dict[str, int], name: str, dim: int, pooling: PoolingType = PoolingType.SUM) -> EmbeddingBagConfig:
    return EmbeddingBagConfig(name=f"t_{name}", embedding_dim=dim, num_embeddings=cardinalities[name],
                              feature_names=[name], pooling=pooling)


class UserTower(nn.Module):
    """forward(sparse KJT batch B) -> user vectors [B, dim], from the session features only."""

    def __init__(self, cardinalities: Dict[str, int], dim: int, small: int, light: bool) -> None:
        super().__init__()
        self.light = light
        bags = [_bag(cardinalities, "user_id", dim)] + [_bag(cardinalities, f, small) for f in USER_FEATURES[1:]]
        if light:
            bags.append(_bag(cardinalities, "history", dim, PoolingType.MEAN))
        else:
            self.sequence = EmbeddingCollection(tables=[EmbeddingConfig(
                name="t_history", embedding_dim=dim, num_embeddings=cardinalities["history"], feature_names=["history"])])
            self.history_encoder = HistoryEncoder(dim)
        self.embeddings = EmbeddingBagCollection(tables=bags)
        self.mlp = _mlp((dim + 4 * small + dim, 256, dim))

    def forward(self, sparse: KeyedJaggedTensor) -> torch.Tensor:
        pooled = self.embeddings(sparse).to_dict()
        if self.light:
            history = pooled["history"]
        else:
            seq = self.sequence(sparse)["history"]
            x = seq.to_padded_dense()  # [B, longest history in batch, D]
            mask = torch.arange(x.shape[1], device=x.device).unsqueeze(0) >= seq.lengths().unsqueeze(1)
            history = self.history_encoder(x, mask)
        return self.mlp(torch.cat([pooled[f] for f in USER_FEATURES] + [history], dim=1))


class ItemTower(nn.Module):
    """forward(sparse KJT batch B, dense [B, 2]) -> item vectors [B, dim]."""

    def __init__(self, cardinalities: Dict[str, int], dim: int, small: int) -> None:
        super().__init__()
        self.embeddings = EmbeddingBagCollection(tables=[
            _bag(cardinalities, "item_id", dim), _bag(cardinalities, "item_genres", small, PoolingType.MEAN),
            _bag(cardinalities, "item_year", small)])
        self.mlp = _mlp((dim + 2 * small + 2, 256, dim))

    def forward(self, sparse: KeyedJaggedTensor, dense: torch.Tensor) -> torch.Tensor:
        pooled = self.embeddings(sparse).to_dict()
        return self.mlp(torch.cat([pooled[f] for f in ITEM_FEATURES] + [dense], dim=1))


class TwoTower(nn.Module):
    """forward(sparse KJT batch B, dense [B, 2]) -> logits [B]: dot product of the towers."""

    def __init__(self, cardinalities: Dict[str, int], dim: int = 64, light: bool = False) -> None:
        super().__init__()
        self.user_tower = UserTower(cardinalities, dim, small=16, light=light)
        self.item_tower = ItemTower(cardinalities, dim, small=16)

    def forward(self, sparse: KeyedJaggedTensor, dense: torch.Tensor) -> torch.Tensor:
        return (self.user_tower(sparse) * self.item_tower(sparse, dense)).sum(dim=1)


#: The plugin flag for this model: user features deduplicated per session; the user tower
#: reads only those, so all of it (embeddings, history encoder, MLP) runs once per session.
RECD_FLAG = (
    "groups.user.key=session_id; "
    "groups.user.features=user_id,user_age,user_gender,user_occupation,user_zip,history; "
    "towers.user_tower=user"
)
