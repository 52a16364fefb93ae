"""``DESSharder`` (a TorchRec ``ModuleSharder``), ``des_plan`` and ``balanced_placement``.

``des_plan`` builds an ordinary TorchRec ``EmbeddingModuleShardingPlan`` with TorchRec's own
``construct_module_sharding_plan`` and ``table_wise`` / ``row_wise`` generators, so DMP treats
the DES module like any sharded embedding module::

    plan = des_plan(model.sparse, balanced_placement(model.sparse.tables, world_size=2), world_size=2)
    dmp = DistributedModelParallel(model, env=env, device=torch.device("cpu"),
                                   plan=ShardingPlan({"sparse": plan}), sharders=[DESSharder()])
"""

from __future__ import annotations

import numbers
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


def _check_world_size(world_size: Any, who: str) -> int:
    """``world_size`` as an int >= 1, else DESError (0 left balanced_placement with no rank to pick)."""
    if not isinstance(world_size, numbers.Integral) or isinstance(world_size, bool) or world_size < 1:
        raise DESError(f"DES: {who} got world_size={world_size!r}; pass the number of ranks, an integer >= 1 "
                       "(e.g. dist.get_world_size()).")
    return int(world_size)


def _rank_of(table: str, where: Any, world_size: int) -> Optional[int]:
    """The rank of a table-wise placement, None for ``"row_wise"``, else DESError. A bool is
    refused: ``True`` is an ``int`` to Python and would silently mean rank 1."""
    if isinstance(where, str) and where == "row_wise":
        return None
    if isinstance(where, numbers.Integral) and not isinstance(where, bool) and 0 <= where < world_size:
        return int(where)
    kind = " (a bool, not a rank)" if isinstance(where, bool) else ""
    raise DESError(f"DES: placement of {table!r} is {where!r}{kind}; use a rank in [0, {world_size}) or 'row_wise'.")


def des_plan(module: DESEmbeddingOperators, placement: Dict[str, Union[int, str]], world_size: int,
             local_size: Optional[int] = None, device_type: str = "cpu") -> EmbeddingModuleShardingPlan:
    """A TorchRec plan for ``module``: ``placement[table]`` is a rank (table-wise) or ``"row_wise"``."""
    world_size = _check_world_size(world_size, "des_plan")
    names = [t.name for t in module.tables]
    for t in placement:
        if t not in names:
            raise DESError(f"DES: placement names table {t!r}, which does not exist{did_you_mean(t, names)}; tables: {names}.")
    missing = [t for t in names if t not in placement]
    if missing:
        raise DESError(f"DES: placement misses table(s) {missing}; give each a rank or 'row_wise'.")
    gens = {}
    for t, where in placement.items():
        rank = _rank_of(t, where, world_size)
        gens[t] = (row_wise(compute_kernel=EmbeddingComputeKernel.DENSE.value) if rank is None
                   else table_wise(rank=rank, compute_kernel=EmbeddingComputeKernel.DENSE.value))
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
    world_size = _check_world_size(world_size, "balanced_placement")
    if row_wise_above is not None and (not isinstance(row_wise_above, int) or isinstance(row_wise_above, bool)
                                       or row_wise_above < 0):
        raise DESError(f"DES: balanced_placement got row_wise_above={row_wise_above!r}; pass a row count >= 0, or "
                       "None to place every table whole.")
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
