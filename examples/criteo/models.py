"""FM, DeepFM and a session DLRM for Criteo-like click data, built on the DES operators.

Both models keep their embeddings in a plain TorchRec ``EmbeddingBagCollection`` (inside
``DESEmbeddingOperators``, attribute ``sparse.ebc``): one D-dim table ``t_Ci`` and one 1-dim
wide table ``w_Ci`` per sparse field, both reading feature ``Ci``. So the same model runs

* unsharded (plain math),
* sharded by TorchRec (``plan={"sparse.ebc": ...}`` with ``EmbeddingBagCollectionSharder``):
  pooled embeddings travel, operators run on the sample's rank (the baseline),
* sharded by DES (``plan={"sparse": des_plan(...)}`` with ``DESSharder``): only partials travel.

Example::

    from examples.criteo.models import DeepFMModel, FMModel
    model = FMModel(embedding_dim=16, max_rows=100_000)
    logits = model(batch.dense_features, batch.sparse_features)      # [B]

``FMModel``:     logit = FM(e_1..e_26) + wide(ids) + w_x . x + b
``DeepFMModel``: logit = FM + wide + MLP(relu(FirstDenseLayer([x, e_1..e_26]))), the first
                 layer being the DES-substituted one (W_x x + sum_f W_f e_f + b).
``SessionDLRM``: DeepFM over the per-sample fields C14..C26, plus a session tower over the
                 session-level fields C1..C13: the model of ``train.py``, where RecD, FAE and
                 DES are all on from one flag (``recd.toml``).
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recd_plugin.data.criteo import DENSE_FIELDS, SPARSE_FIELDS, criteo_cardinalities
from recd_plugin.des import DESEmbeddingOperators, FactorizationMachine, FirstDenseLayer, WideLinear


def criteo_tables(embedding_dim: int = 16, max_rows: Optional[int] = 100_000,
                  fields: Sequence[str] = SPARSE_FIELDS) -> Tuple[List[EmbeddingBagConfig], List[str], List[str]]:
    """(tables, FM table names ``t_Ci``, wide table names ``w_Ci``), sum pooling, capped rows."""
    rows = criteo_cardinalities(max_rows)
    fm = [EmbeddingBagConfig(name=f"t_{f}", feature_names=[f], num_embeddings=rows[f], embedding_dim=embedding_dim,
                             pooling=PoolingType.SUM) for f in fields]
    wide = [EmbeddingBagConfig(name=f"w_{f}", feature_names=[f], num_embeddings=rows[f], embedding_dim=1,
                               pooling=PoolingType.SUM) for f in fields]
    return fm + wide, [t.name for t in fm], [t.name for t in wide]


class FMModel(nn.Module):
    """FM + wide + dense linear term; ``forward(dense [B, 13], sparse KJT) -> logits [B]``."""

    def __init__(self, embedding_dim: int = 16, max_rows: Optional[int] = 100_000,
                 device: Optional[torch.device] = None) -> None:
        super().__init__()
        tables, fm, wide = criteo_tables(embedding_dim, max_rows)
        self.sparse = DESEmbeddingOperators(tables, {"fm": FactorizationMachine(fm), "wide": WideLinear(wide)}, device=device)
        self.dense = nn.Linear(len(DENSE_FIELDS), 1)

    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> torch.Tensor:
        out = self.sparse(sparse, dense)
        return (out["fm"] + out["wide"] + self.dense(dense)).squeeze(1)


class DeepFMModel(nn.Module):
    """FM + wide + MLP whose first layer is :class:`FirstDenseLayer` over [dense, embeddings];
    ``forward(dense [B, 13], sparse KJT) -> logits [B]``."""

    def __init__(self, embedding_dim: int = 16, hidden: Sequence[int] = (32, 16), max_rows: Optional[int] = 100_000,
                 device: Optional[torch.device] = None) -> None:
        super().__init__()
        tables, fm, wide = criteo_tables(embedding_dim, max_rows)
        ops = {"fm": FactorizationMachine(fm), "wide": WideLinear(wide),
               "first": FirstDenseLayer(fm, embedding_dim, hidden[0], dense_in_features=len(DENSE_FIELDS))}
        self.sparse = DESEmbeddingOperators(tables, ops, device=device)
        layers: List[nn.Module] = []
        for a, b in zip(hidden, list(hidden[1:]) + [1]):
            layers += [nn.ReLU(), nn.Linear(a, b)]
        self.top = nn.Sequential(*layers)

    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> torch.Tensor:
        out = self.sparse(sparse, dense)
        return (out["fm"] + out["wide"] + self.top(out["first"])).squeeze(1)


class SessionTower(nn.Module):
    """The session side: one D-dim table per session-level field, then an MLP;
    ``forward(sparse KJT) -> [B, hidden]``. It reads only ``session_fields``, so RecD can run
    it once per unique session (``towers.session_tower = <group>`` in the flag)."""

    def __init__(self, session_fields: Sequence[str], embedding_dim: int, hidden: int,
                 max_rows: Optional[int], device: Optional[torch.device] = None) -> None:
        super().__init__()
        rows = criteo_cardinalities(max_rows)
        self.ebc = EmbeddingBagCollection(tables=[
            EmbeddingBagConfig(name=f"s_{f}", feature_names=[f], num_embeddings=rows[f], embedding_dim=embedding_dim,
                               pooling=PoolingType.SUM) for f in session_fields], device=device)
        self.mlp = nn.Sequential(nn.Linear(len(session_fields) * embedding_dim, hidden, device=device), nn.ReLU(),
                                 nn.Linear(hidden, hidden, device=device), nn.ReLU())

    def forward(self, sparse: KeyedJaggedTensor) -> torch.Tensor:
        return self.mlp(self.ebc(sparse).values())


class SessionDLRM(nn.Module):
    """A DLRM-style click model for session-structured Criteo-like data, with a part for each
    technique (none of them needs code in the model for the plugin):

    * session tower (``C1..C13``, constant within a session): RecD runs it on unique rows;
    * its tables hold skewed ids: FAE's hot set keeps their hot rows in fast memory;
    * per-sample fields (``C14..C26``): FM + wide + first dense layer over [dense, embeddings]
      as a ``DESEmbeddingOperators`` (attribute ``sparse``), which DES shards;
    * top MLP over [relu(first layer), session tower] plus the FM and wide logits.

    ``forward(dense [B, 13], sparse KJT with keys C1..C26) -> logits [B]``.
    """

    def __init__(self, embedding_dim: int = 16, hidden: int = 32, max_rows: Optional[int] = 100_000,
                 session_fields: Sequence[str] = tuple(SPARSE_FIELDS[:13]),
                 device: Optional[torch.device] = None) -> None:
        super().__init__()
        sample_fields = [f for f in SPARSE_FIELDS if f not in session_fields]
        tables, fm, wide = criteo_tables(embedding_dim, max_rows, sample_fields)
        ops = {"fm": FactorizationMachine(fm), "wide": WideLinear(wide),
               "first": FirstDenseLayer(fm, embedding_dim, hidden, dense_in_features=len(DENSE_FIELDS))}
        self.sparse = DESEmbeddingOperators(tables, ops, device=device)
        self.session_tower = SessionTower(session_fields, embedding_dim, hidden, max_rows, device)
        self.top = nn.Sequential(nn.Linear(2 * hidden, hidden, device=device), nn.ReLU(),
                                 nn.Linear(hidden, 1, device=device))

    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> torch.Tensor:
        out = self.sparse(sparse, dense)
        deep = torch.cat([torch.relu(out["first"]), self.session_tower(sparse)], dim=1)
        return (self.top(deep) + out["fm"] + out["wide"]).squeeze(1)
