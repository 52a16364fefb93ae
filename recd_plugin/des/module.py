"""``DESEmbeddingOperators``: embedding tables + DES operators, the unit DES shards.

Unsharded it is exactly "an ``EmbeddingBagCollection``, then the operators on its pooled
output". Under ``DistributedModelParallel`` with :class:`recd_plugin.des.DESSharder` and a
plan from :func:`recd_plugin.des.des_plan` it becomes ``ShardedDESEmbeddingOperators``:
each rank looks up the whole global batch on the tables it owns and only the operators'
partial results cross the network. Sharded instead with TorchRec's own
``EmbeddingBagCollectionSharder`` on the inner ``ebc`` (plan path ``"<path>.ebc"``), the same
model is the TorchRec baseline: pooled embeddings travel, the operators run unsubstituted.

Operators name **tables**; each feature of a table is one field. A feature shared by
several tables (e.g. ``C1`` in the FM table ``t_C1`` and in the wide table ``w_C1``) yields
the key ``"C1@t_C1"`` like TorchRec's EBC; otherwise the key is the feature name.

Example::

    from torchrec import EmbeddingBagConfig
    from recd_plugin.des import DESEmbeddingOperators, FactorizationMachine, WideLinear
    tables = [EmbeddingBagConfig(name=f"t_{f}", feature_names=[f], num_embeddings=100, embedding_dim=8)
              for f in ("C1", "C2")] + \\
             [EmbeddingBagConfig(name=f"w_{f}", feature_names=[f], num_embeddings=100, embedding_dim=1)
              for f in ("C1", "C2")]
    des = DESEmbeddingOperators(tables, {"fm": FactorizationMachine(["t_C1", "t_C2"]),
                                         "wide": WideLinear(["w_C1", "w_C2"])})
    out = des(kjt)            # {"fm": [B, 1], "wide": [B, 1]}

Errors (:class:`~recd_plugin.errors.DESError`): an operator naming a table that does not
exist, a table with MEAN pooling (the substitution needs sum pooling), an
``EmbeddingCollection`` / ``EmbeddingConfig`` (sequence embeddings are not pooled sums),
fields of one operator with different dimensions, a wide table with dimension != 1.
"""

from __future__ import annotations

from collections import Counter
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from torchrec.distributed.types import Awaitable
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recd_plugin.des.operators import DESOperator, FirstDenseLayer, WideLinear
from recd_plugin.errors import DESError, did_you_mean

Field = Tuple[str, str, str]  # (table, feature, pooled key)


def _check_tables(tables: Sequence[object]) -> List[EmbeddingBagConfig]:
    out = []
    for t in tables:
        if not isinstance(t, EmbeddingBagConfig):
            raise DESError(f"DES: table {getattr(t, 'name', t)!r} is a {type(t).__name__}; DES needs pooled "
                           "tables (EmbeddingBagConfig with PoolingType.SUM). Sequence embeddings "
                           "(EmbeddingConfig / EmbeddingCollection) are not pooled sums.")
        out.append(t)
    return out


def resolve_fields(tables: Sequence[EmbeddingBagConfig], operators: Dict[str, DESOperator]) -> Dict[str, List[Field]]:
    """{operator name: [(table, feature, pooled key)]}: checks names, pooling and dimensions."""
    by_name = {t.name: t for t in tables}
    shared = Counter(f for t in tables for f in t.feature_names)
    fields: Dict[str, List[Field]] = {}
    for op_name, op in operators.items():
        if not isinstance(op, DESOperator):
            raise DESError(f"DES: operator {op_name!r} is a {type(op).__name__}, not a DESOperator "
                           "(FactorizationMachine, WideLinear, FirstDenseLayer).")
        if not op.tables:
            raise DESError(f"DES: operator {op_name!r} names no tables; pass tables=[...] when building it.")
        dup = sorted({t for t in op.tables if op.tables.count(t) > 1})
        if dup:
            raise DESError(f"DES: operator {op_name!r} names table(s) {dup} more than once; name each table once.")
        fields[op_name] = []
        for name in op.tables:
            if name not in by_name:
                raise DESError(f"DES: operator {op_name!r} names table {name!r}, which does not exist"
                               f"{did_you_mean(name, list(by_name))}; tables: {sorted(by_name)}.")
            t = by_name[name]
            if t.pooling != PoolingType.SUM:
                raise DESError(f"DES: table {name!r} (operator {op_name!r}) uses {t.pooling.name} pooling; the "
                               "substitution is exact only for sum pooling (a mean of bags is not the sum of "
                               "per-shard partial bags). Use PoolingType.SUM, or keep this table out of DES.")
            for f in t.feature_names:
                fields[op_name].append((name, f, f"{f}@{name}" if shared[f] > 1 else f))
        dims = {by_name[t].embedding_dim for t in op.tables}
        if len(dims) != 1:
            raise DESError(f"DES: operator {op_name!r} mixes embedding dimensions {sorted(dims)}; give its tables one dimension.")
        dim = dims.pop()
        if isinstance(op, WideLinear) and dim != 1:
            raise DESError(f"DES: wide operator {op_name!r} reads tables of dimension {dim}; wide tables need embedding_dim=1.")
        if isinstance(op, FirstDenseLayer):
            if op.embedding_dim != dim or op.field_weight.shape[1] != len(fields[op_name]):
                raise DESError(f"DES: FirstDenseLayer {op_name!r} was built for {op.field_weight.shape[1]} fields of "
                               f"dimension {op.embedding_dim}; its tables give {len(fields[op_name])} of dimension {dim}.")
    return fields


class DESEmbeddingOperators(nn.Module):
    """Tables (a TorchRec ``EmbeddingBagCollection``, attribute ``ebc``) + named operators.

    ``forward(features: KJT with B samples, dense: [B, dense_in] | None) -> {name: [B, out]}``
    (FM and wide: [B, 1]; FirstDenseLayer: [B, H]).
    """

    def __init__(self, tables: Union[Sequence[EmbeddingBagConfig], EmbeddingBagCollection],
                 operators: Dict[str, DESOperator], device: Optional[torch.device] = None) -> None:
        super().__init__()
        if isinstance(tables, EmbeddingCollection):
            raise DESError("DES: got an EmbeddingCollection (sequence embeddings); DES operators need pooled "
                           "sums: use an EmbeddingBagCollection with PoolingType.SUM.")
        if isinstance(tables, EmbeddingBagCollection):
            self.ebc = tables
            configs = _check_tables(tables.embedding_bag_configs())
        else:
            configs = _check_tables(tables)
            self.ebc = EmbeddingBagCollection(tables=configs, device=device)
        self.fields = resolve_fields(configs, operators)
        self.operators = nn.ModuleDict(operators)

    @property
    def tables(self) -> List[EmbeddingBagConfig]:
        return list(self.ebc.embedding_bag_configs())

    def forward(self, features: KeyedJaggedTensor, dense: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        pooled = self.ebc(features)
        if isinstance(pooled, Awaitable):  # the ebc sharded by TorchRec returns a LazyAwaitable[KeyedTensor]
            pooled = pooled.wait()
        return {name: op(pooled, dense=dense, keys=[k for _, _, k in self.fields[name]])
                for name, op in self.operators.items()}
