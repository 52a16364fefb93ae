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
fields of one operator with different dimensions, a wide table with dimension != 1; and at
``forward``, before any lookup, a batch that lacks a feature the tables read or an id outside
its table (:class:`InputCheck`, shared with the sharded module, where such an id would
otherwise read another table's row of the shard's flattened weight).
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from torchrec.distributed.types import Awaitable
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recd_plugin.config import verify_step
from recd_plugin.des.operators import DESOperator, FirstDenseLayer, WideLinear
from recd_plugin.errors import DESError, did_you_mean
from recd_plugin.sparse.ids import first_bad_id

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


class InputCheck:
    """The checks on a DES batch before any lookup: every feature the tables read is present
    and every id lies in its table (``[0, rows)``, the smallest table reading the feature).

    ``verify_batches``: the first N calls read the id check back to the host (one sync each)
    and raise a DESError naming the feature; later calls queue it on the device without a
    sync (on CUDA a bad id then fails as a device-side assert); -1: every call. On CPU every
    call is exact: there is no sync to save. Why a budget: the unsharded EBC on CUDA, and a
    DES shard's flattened weight on any device, would otherwise fail without a name or read
    another table's row.
    """

    def __init__(self, tables: Sequence[EmbeddingBagConfig], verify_batches: int = 1) -> None:
        if not isinstance(verify_batches, int) or isinstance(verify_batches, bool) or verify_batches < -1:
            raise DESError(f"DES: verify_batches must be an integer >= 0 (checked batches), or -1 for every batch; "
                           f"got {verify_batches!r}")
        self.verify_batches = verify_batches
        self._left = verify_batches
        self._limit: Dict[str, Tuple[str, int]] = {}  # feature -> (table, rows): its smallest table
        for t in tables:
            for f in t.feature_names:
                if f not in self._limit or t.num_embeddings < self._limit[f][1]:
                    self._limit[f] = (t.name, t.num_embeddings)
        self._rows: Dict[Tuple[Tuple[str, ...], torch.device], torch.Tensor] = {}  # [K] per key order

    def __call__(self, features: KeyedJaggedTensor) -> None:
        if isinstance(features, torch.fx.Proxy):  # traced by a TorchRec pipeline: nothing to check yet
            return
        keys = list(features.keys())
        missing = [f for f in self._limit if f not in keys]
        if missing:
            raise DESError(f"DES: the batch has no feature(s) {missing}{did_you_mean(missing[0], keys)}; keys: {keys}. "
                           "Feed every feature the DES tables read (or drop the table from the DES module).")
        values = features.values()
        rows = self._rows.get((tuple(keys), values.device))
        if rows is None:
            # -1: a feature no table reads is never looked up, whatever its ids
            rows = torch.tensor([self._limit[k][1] if k in self._limit else -1 for k in keys], device=values.device)
            self._rows[(tuple(keys), values.device)] = rows
        exact, left = verify_step(self._left)
        bad = first_bad_id(values, features.length_per_key(), rows, exact)
        if bad is not None:
            f = keys[bad[0]]
            table, n = self._limit[f]
            raise DESError(f"DES: feature {f!r}: id {bad[1]} is outside table {table!r} (rows 0..{n - 1}); fix the "
                           "input ids or the table's num_embeddings (sharded, DES would read another table's row).")
        self._left = left


class _Operators(nn.ModuleDict):
    """The named operators, applied together: ``forward(pooled, dense, keys) -> {name: [B, out]}``.

    One module call, not one per operator, because of TorchRec's TrainPipelineSparseDist: when
    TorchRec shards the inner ``ebc``, the pipeline fx-traces this module to reach it and treats
    its other direct children as leaves; called as one leaf, the operators are not traced
    into (their shape checks cannot run on symbolic values). A ``ModuleDict``, so parameter
    names stay ``operators.<name>.<param>``."""

    def forward(self, pooled: Any, dense: Optional[torch.Tensor], keys: Dict[str, List[str]]) -> Dict[str, torch.Tensor]:
        return {name: op(pooled, dense=dense, keys=keys[name]) for name, op in self.items()}


class DESEmbeddingOperators(nn.Module):
    """Tables (a TorchRec ``EmbeddingBagCollection``, attribute ``ebc``) + named operators.

    ``forward(features: KJT with B samples, dense: [B, dense_in] | None) -> {name: [B, out]}``
    (FM and wide: [B, 1]; FirstDenseLayer: [B, H]). ``verify_batches``: see :class:`InputCheck`
    (the sharded module takes it over).
    """

    def __init__(self, tables: Union[Sequence[EmbeddingBagConfig], EmbeddingBagCollection],
                 operators: Dict[str, DESOperator], device: Optional[torch.device] = None,
                 verify_batches: int = 1) -> None:
        super().__init__()
        if isinstance(tables, EmbeddingCollection):
            raise DESError("DES: got an EmbeddingCollection (sequence embeddings); DES operators need pooled "
                           "sums: use an EmbeddingBagCollection with PoolingType.SUM.")
        configs = _check_tables(tables.embedding_bag_configs() if isinstance(tables, EmbeddingBagCollection) else tables)
        self.fields = resolve_fields(configs, operators)
        self.input_check = InputCheck(configs, verify_batches)
        self.ebc = (tables if isinstance(tables, EmbeddingBagCollection)
                    else EmbeddingBagCollection(tables=configs, device=device))
        self.operators = _Operators(operators)
        self._keys = {name: [k for _, _, k in f] for name, f in self.fields.items()}

    @property
    def tables(self) -> List[EmbeddingBagConfig]:
        return list(self.ebc.embedding_bag_configs())

    def forward(self, features: KeyedJaggedTensor, dense: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        self.input_check(features)
        pooled = self.ebc(features)
        if isinstance(pooled, Awaitable):  # the ebc sharded by TorchRec returns a LazyAwaitable[KeyedTensor]
            pooled = pooled.wait()
        return self.operators(pooled, dense, self._keys)
