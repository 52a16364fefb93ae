"""Sharding with the plugin on: sharders and optional planner hints.

In sharded mode the plugin keeps the model's TorchRec modules and feeds them *aligned* IKJTs
(``recd_plugin.sparse.ikjt``): to TorchRec, ordinary KJTs of batch B, so DMP's default
sharders, every sharding type, every compute kernel and every fused optimizer work as they do
without the plugin, and no table takes TorchRec's variable-batch path. What is left here:

* :func:`sharders`: TorchRec's sharders, plus ROW_WISE on cpu (the stock ones offer it for cuda
  only; TABLE_ROW_WISE stays off on cpu: its weights do not move there). Optional: DMP's
  defaults work too.
* :func:`constraints`: optional planner hints. A grouped table looks up only the unique rows'
  ids, so its ``ParameterConstraints.batch_sizes`` become the deduplicated ``ceil(u * B)``
  (u measured, e.g. ``measure_unique_fraction``); :func:`explain` prints what that changed.

Example (each rank, after ``recd_plugin.apply``)::

    from recd_plugin import sharding
    cons = sharding.constraints(model, config, batch_size=1024, unique_fraction={"user": 0.03})
    planner = EmbeddingShardingPlanner(topology=Topology(world_size=2, compute_device="cpu"), constraints=cons)
    plan = planner.collective_plan(model, sharding.sharders(), dist.group.WORLD)
    print(sharding.explain(model, config, plan, cons))
    model = DistributedModelParallel(model, plan=plan, sharders=sharding.sharders(), device=torch.device("cpu"))
"""

from __future__ import annotations

import math
from typing import Any, Dict, Iterable, List, Mapping, Optional

from torch import nn
from torchrec.distributed.embedding import EmbeddingCollectionSharder
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.planner.types import ParameterConstraints
from torchrec.distributed.types import ModuleSharder, ShardingPlan, ShardingType

from recd_plugin.config import RecDConfig
from recd_plugin.modules.swap import embedding_tables
from recd_plugin.sharding import torchrec_fixes
from recd_plugin.transforms.dedup import measure


def _with_cpu_row_wise(types: List[str], compute_device_type: str) -> List[str]:
    if compute_device_type == "cpu" and ShardingType.ROW_WISE.value not in types:
        types = types + [ShardingType.ROW_WISE.value]
    return types


class RecDEmbeddingBagCollectionSharder(EmbeddingBagCollectionSharder):
    """TorchRec's EBC sharder, plus ROW_WISE on cpu (the stock one lists it for cuda only)."""

    def sharding_types(self, compute_device_type: str) -> List[str]:
        return _with_cpu_row_wise(super().sharding_types(compute_device_type), compute_device_type)


class RecDEmbeddingCollectionSharder(EmbeddingCollectionSharder):
    """TorchRec's EC sharder, plus ROW_WISE on cpu."""

    def sharding_types(self, compute_device_type: str) -> List[str]:
        return _with_cpu_row_wise(super().sharding_types(compute_device_type), compute_device_type)


def sharders(fused_params: Optional[Dict[str, Any]] = None) -> List[ModuleSharder[nn.Module]]:
    """The sharders to give both the planner and DistributedModelParallel."""
    torchrec_fixes.install()  # CPU VBE lookups over several TBEs (see torchrec_fixes.py)
    return [RecDEmbeddingBagCollectionSharder(fused_params=fused_params),
            RecDEmbeddingCollectionSharder(fused_params=fused_params)]


def measure_unique_fraction(batches: Iterable[Any], config: RecDConfig, limit: int = 8) -> Dict[str, float]:
    """{group: unique rows / samples} over the first ``limit`` batches (plain torchrec
    ``Batch``es): the measurement ``constraints`` turns into planner batch sizes."""
    stats = measure(batches, config.spec, limit)
    return {g.name: stats.unique_fraction(g.name) for g in config.groups}


def constraints(model: nn.Module, config: RecDConfig, batch_size: int,
                unique_fraction: Optional[Mapping[str, float]] = None,
                base: Optional[Dict[str, ParameterConstraints]] = None) -> Dict[str, ParameterConstraints]:
    """Planner hints: the deduplicated batch of every table that reads only one group's features.

    Args:
        batch_size: samples per rank per step (B).
        unique_fraction: measured unique rows / samples per group (e.g. ``DedupStats``); a
            table whose features all belong to group g is planned with ``ceil(u_g * B)`` rows.
        base: the user's own constraints; kept, with ``batch_sizes`` filled in where unset.
    """
    result = dict(base or {})
    group_of = {f: g.name for g in config.groups for f in g.all_features}
    for table, features in embedding_tables(model).items():
        groups = {group_of.get(f) for f in features}
        if not unique_fraction or len(groups) != 1 or None in groups:
            continue
        u = unique_fraction.get(groups.pop())  # type: ignore[arg-type]
        c = result.get(table) or ParameterConstraints()
        if u is not None and c.batch_sizes is None:
            c.batch_sizes = [max(1, math.ceil(u * batch_size))] * len(features)
            result[table] = c
    return result


def explain(model: nn.Module, config: RecDConfig, plan: ShardingPlan,
            cons: Mapping[str, ParameterConstraints]) -> str:
    """One line per table: sharding type, kernel, ranks, and what the plugin told the planner."""
    lines = ["recd-plugin sharding plan:"]
    for module_path, module_plan in plan.plan.items():
        for table, ps in module_plan.items():  # type: ignore[union-attr]
            c = cons.get(table)
            hint = []
            if c is not None and c.batch_sizes:
                hint.append(f"planned for {c.batch_sizes[0]} unique rows/step")
            lines.append(f"  {module_path or 'model'}.{table}: {ps.sharding_type}, {ps.compute_kernel}, "
                         f"ranks {ps.ranks}" + (f"  ({'; '.join(hint)})" if hint else ""))
    return "\n".join(lines)
