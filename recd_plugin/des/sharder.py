"""``DESSharder`` (a TorchRec ``ModuleSharder``), ``des_plan`` and ``balanced_placement``.

``des_plan`` builds an ordinary TorchRec ``EmbeddingModuleShardingPlan`` with TorchRec's own
``construct_module_sharding_plan`` and ``table_wise`` / ``row_wise`` generators, so DMP treats
the DES module like any sharded embedding module::

    plan = des_plan(model.sparse, balanced_placement(model.sparse.tables, world_size=2), world_size=2)
    dmp = DistributedModelParallel(model, env=env, device=torch.device("cpu"),
                                   plan=ShardingPlan({"sparse": plan}), sharders=[DESSharder()])
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple, Type, Union

import torch
from torch import nn
from torchrec.distributed.embedding_types import EmbeddingComputeKernel
from torchrec.distributed.sharding_plan import construct_module_sharding_plan, row_wise, table_wise
from torchrec.distributed.types import EmbeddingModuleShardingPlan, ModuleSharder, ShardingEnv, ShardingType

from recd_plugin.des.module import DESEmbeddingOperators
from recd_plugin.des.sharded import ShardedDESEmbeddingOperators
from recd_plugin.errors import DESError, did_you_mean


class DESSharder(ModuleSharder[DESEmbeddingOperators]):
    """TorchRec sharder for :class:`DESEmbeddingOperators` (TABLE_WISE and ROW_WISE, cpu/cuda).

    ``fused_params`` (TorchRec's keys: ``optimizer``, ``learning_rate``, ...): the local tables
    become FBGEMM TBEs updated in backward (see ``recd_plugin.des.fused``); without it they
    get sparse gradients for a torch optimizer."""

    def __init__(self, fused_params: Optional[Dict[str, Any]] = None) -> None:
        super().__init__()
        self._fused_params = fused_params

    @property
    def fused_params(self) -> Optional[Dict[str, Any]]:
        """The ``fused_params`` given (None: sparse gradients, no fused tables)."""
        return self._fused_params

    def shard(self, module: DESEmbeddingOperators, params: EmbeddingModuleShardingPlan, env: ShardingEnv,
              device: Optional[torch.device] = None, module_fqn: Optional[str] = None) -> ShardedDESEmbeddingOperators:
        return ShardedDESEmbeddingOperators(module, params, env, device, fused_params=self._fused_params)

    @property
    def module_type(self) -> Type[DESEmbeddingOperators]:
        return DESEmbeddingOperators

    def shardable_parameters(self, module: DESEmbeddingOperators) -> Dict[str, nn.Parameter]:
        return {t.name: module.ebc.embedding_bags[t.name].weight for t in module.tables}

    def sharding_types(self, compute_device_type: str) -> List[str]:
        return [ShardingType.TABLE_WISE.value, ShardingType.ROW_WISE.value]

    def compute_kernels(self, sharding_type: str, compute_device_type: str) -> List[str]:
        return [EmbeddingComputeKernel.DENSE.value]


def des_plan(module: DESEmbeddingOperators, placement: Dict[str, Union[int, str]], world_size: int,
             local_size: Optional[int] = None, device_type: str = "cpu") -> EmbeddingModuleShardingPlan:
    """A TorchRec plan for ``module``: ``placement[table]`` is a rank (table-wise) or ``"row_wise"``."""
    names = [t.name for t in module.tables]
    for t in placement:
        if t not in names:
            raise DESError(f"DES: placement names table {t!r}, which does not exist{did_you_mean(t, names)}; tables: {names}.")
    missing = [t for t in names if t not in placement]
    if missing:
        raise DESError(f"DES: placement misses table(s) {missing}; give each a rank or 'row_wise'.")
    gens = {}
    for t, where in placement.items():
        if where == "row_wise":
            gens[t] = row_wise(compute_kernel=EmbeddingComputeKernel.DENSE.value)
        elif isinstance(where, int) and 0 <= where < world_size:
            gens[t] = table_wise(rank=where, compute_kernel=EmbeddingComputeKernel.DENSE.value)
        else:
            raise DESError(f"DES: placement of {t!r} is {where!r}; use a rank in [0, {world_size}) or 'row_wise'.")
    return construct_module_sharding_plan(module, gens, sharder=DESSharder(), local_size=local_size or world_size,
                                          world_size=world_size, device_type=device_type)


def balanced_placement(tables: Sequence[Any], world_size: int, row_wise_above: Optional[int] = None) -> Dict[str, Union[int, str]]:
    """Greedy table-wise placement balancing the per-sample work: uneven table counts per rank.

    Tables reading the same features (e.g. the FM table and the wide table of one field) form
    a group and are placed together, so their ids travel once. Groups go, most fields first
    (then largest), onto the rank with the fewest fields so far (then fewest bytes): lookups
    and DES partials cost per field and sample, whatever the table's size. Tables with more
    than ``row_wise_above`` rows go row-wise. Used for DES and for the TorchRec table-wise
    baseline alike."""
    load = [(0, 0)] * world_size  # (fields, bytes) per rank
    out: Dict[str, Union[int, str]] = {}
    groups: Dict[Tuple[str, ...], List[Any]] = {}
    for t in tables:
        if row_wise_above is not None and t.num_embeddings > row_wise_above:
            out[t.name] = "row_wise"
        else:
            groups.setdefault(tuple(sorted(t.feature_names)), []).append(t)

    def size(g: List[Any]) -> Tuple[int, int]:
        return len(g[0].feature_names) * len(g), sum(t.num_embeddings * t.embedding_dim for t in g)

    for group in sorted(groups.values(), key=lambda g: tuple(-x for x in size(g))):
        r = min(range(world_size), key=lambda i: load[i])
        for t in group:
            out[t.name] = r
        load[r] = (load[r][0] + size(group)[0], load[r][1] + size(group)[1])
    return out
