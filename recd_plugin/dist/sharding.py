"""Sharding with the plugin on: sharders, planner constraints, and the plan check.

The plugin's IKJTs are TorchRec variable-batch (VBE) KJTs, and TorchRec's sharded
``EmbeddingBagCollection`` pools them natively, sending only unique rows through its
all-to-all. What TorchRec leaves to us (see docs/design/sharded-ikjt.md for the evidence):

* the stock sharders offer ROW_WISE only for cuda; :func:`sharders` returns subclasses that
  also offer it for cpu (TABLE_ROW_WISE stays off on cpu: its weights do not move there);
* VBE needs the FUSED compute kernel and one of a few fused optimizers; a DENSE kernel or a
  data-parallel table fails deep inside fbgemm with an index error, so :func:`check_plan`
  refuses such a plan up front, naming the table and the fix;
* the planner estimates cost from ``batch_size`` rows per table; :func:`constraints` passes
  it the deduplicated rows (``ParameterConstraints.batch_sizes``) and keeps IKJT tables on
  the FUSED kernel, and :func:`explain` prints what that changed.

Example (each rank, after ``recd_plugin.apply``)::

    from recd_plugin.dist import sharding
    shard = sharding.sharders(fused_params={"optimizer": EmbOptimType.EXACT_SGD, "learning_rate": 0.1})
    cons = sharding.constraints(model, config, batch_size=1024, unique_fraction={"user": 0.03})
    planner = EmbeddingShardingPlanner(topology=Topology(world_size=2, compute_device="cpu"), constraints=cons)
    plan = planner.collective_plan(model, shard, dist.group.WORLD)
    sharding.check_plan(model, config, plan, shard)      # ShardingError before any training
    print(sharding.explain(model, config, plan, cons))
    model = DistributedModelParallel(model, plan=plan, sharders=shard, device=torch.device("cpu"))
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Any, Dict, FrozenSet, Iterable, List, Mapping, Optional, Set

import torch

from fbgemm_gpu.split_embedding_configs import EmbOptimType
from torch import nn
from torchrec.distributed.embedding import EmbeddingCollectionSharder
from torchrec.distributed.embedding_types import EmbeddingComputeKernel
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.planner.types import ParameterConstraints
from torchrec.distributed.types import ModuleSharder, ShardingPlan, ShardingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from recd_plugin.config import RecDConfig
from recd_plugin.dist import torchrec_fixes
from recd_plugin.errors import ShardingError
from recd_plugin.modules.swap import embedding_tables


@functools.lru_cache(maxsize=None)
def vbe_optimizers(device_type: str = "cpu") -> FrozenSet[EmbOptimType]:
    """The fused optimizers whose TBE takes variable-batch (IKJT) inputs on ``device_type``,
    asked of the installed fbgemm rather than copied from it (the set grows between releases:
    fbgemm 1.9 added ROWWISE_RMSPROP_AR).

    cpu: every optimizer for which a 4-row CPU TBE builds and runs a variable-batch forward and
    backward (fbgemm's CPU mode takes fewer optimizers than cuda). cuda: fbgemm's own
    variable-batch check (``_generate_vbe_metadata``) on each optimizer, which runs before any
    kernel, so it is answered without a GPU. A fraction of a millisecond per optimizer, once.
    """
    from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation
    from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
        ComputeDevice, SplitTableBatchedEmbeddingBagsCodegen as TBE)

    ids, offsets, vbe = torch.tensor([0, 1, 2]), torch.tensor([0, 1, 3]), [[2]]  # 2 bags, 1 feature
    spec = [(4, 4, EmbeddingLocation.HOST, ComputeDevice.CPU)]
    ok = set()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if device_type == "cpu":
            for opt in EmbOptimType:
                try:
                    TBE(spec, optimizer=opt)(ids, offsets, batch_size_per_feature_per_rank=vbe).sum().backward()
                except (AssertionError, RuntimeError, NotImplementedError, ValueError):
                    continue
                ok.add(opt)
            return frozenset(ok)
        probe = TBE(spec, optimizer=EmbOptimType.EXACT_SGD)
        for opt in EmbOptimType:
            probe.optimizer = opt
            try:
                probe._generate_vbe_metadata(offsets, vbe)
            except AssertionError:
                continue
            ok.add(opt)
    return frozenset(ok)

#: Sharding types that take IKJTs (verified on CPU/gloo; ROW_WISE with padding, dist/pad.py).
VBE_SHARDING_TYPES = [ShardingType.TABLE_WISE.value, ShardingType.COLUMN_WISE.value,
                      ShardingType.TABLE_COLUMN_WISE.value, ShardingType.ROW_WISE.value]
_FUSED = {EmbeddingComputeKernel.FUSED.value, EmbeddingComputeKernel.FUSED_UVM.value,
          EmbeddingComputeKernel.FUSED_UVM_CACHING.value}


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


def ikjt_tables(model: nn.Module, config: RecDConfig) -> Dict[str, Set[str]]:
    """{table name: features} of the tables that receive IKJTs (VBE): every EBC outside the
    configured towers (towers hand their modules a plain KJT of unique rows)."""
    towers = tuple(p + "." for p in config.towers)
    out: Dict[str, Set[str]] = {}
    for path, m in model.named_modules():
        if isinstance(m, EmbeddingBagCollection) and not (path + ".").startswith(towers):
            for c in m.embedding_bag_configs():
                out[c.name] = set(c.feature_names)
    return out


def measure_unique_fraction(batches: Iterable[Any], config: RecDConfig, limit: int = 8) -> Dict[str, float]:
    """{group: unique rows / samples} over the first ``limit`` batches (plain torchrec
    ``Batch``es): the measurement ``constraints`` turns into planner batch sizes."""
    from recd_plugin.transforms.dedup import DedupStats, dedup_batch

    stats = DedupStats()
    for i, batch in enumerate(batches):
        if i == limit:
            break
        stats.add(config.spec, batch.sparse_features.stride(), dedup_batch(batch, config.spec).sparse_features)
    return {g.name: stats.unique_fraction(g.name) for g in config.groups}


def constraints(model: nn.Module, config: RecDConfig, batch_size: int,
                unique_fraction: Optional[Mapping[str, float]] = None,
                base: Optional[Dict[str, ParameterConstraints]] = None) -> Dict[str, ParameterConstraints]:
    """Planner constraints: IKJT tables on the FUSED kernel with VBE-capable sharding types,
    and the deduplicated batch of every table that reads only one group's features.

    Args:
        batch_size: samples per rank per step (B).
        unique_fraction: measured unique rows / samples per group (e.g. ``DedupStats``); a
            table whose features all belong to group g is planned with ``ceil(u_g * B)`` rows.
        base: the user's own constraints; kept, with our fields filled in where unset.
    """
    result = dict(base or {})
    vbe = ikjt_tables(model, config)
    group_of = {f: g.name for g in config.groups for f in g.all_features}
    for table, features in embedding_tables(model).items():
        c = result.get(table) or ParameterConstraints()
        if table in vbe:
            c.compute_kernels = c.compute_kernels or [EmbeddingComputeKernel.FUSED.value]
            c.sharding_types = c.sharding_types or list(VBE_SHARDING_TYPES)
        groups = {group_of.get(f) for f in features}
        if unique_fraction and len(groups) == 1 and None not in groups:
            u = unique_fraction.get(groups.pop())  # type: ignore[arg-type]
            if u is not None and c.batch_sizes is None:
                c.batch_sizes = [max(1, math.ceil(u * batch_size))] * len(features)
        result[table] = c
    return result


def check_plan(model: nn.Module, config: RecDConfig, plan: ShardingPlan,
               sharder_list: Iterable[ModuleSharder[nn.Module]], device_type: str = "cpu") -> None:
    """ShardingError unless every table that receives IKJTs can take them under ``plan``."""
    vbe = ikjt_tables(model, config)
    allowed = vbe_optimizers(device_type)
    for module_path, module_plan in plan.plan.items():
        for table, ps in module_plan.items():  # type: ignore[union-attr]
            if table not in vbe:
                continue
            where = f"table {table!r} (module {module_path!r})"
            if ps.sharding_type not in VBE_SHARDING_TYPES:
                raise ShardingError(
                    f"{where} is planned {ps.sharding_type}, which cannot take the plugin's variable-batch "
                    f"(IKJT) inputs; allow only {VBE_SHARDING_TYPES} for it, e.g. "
                    "recd_plugin.dist.sharding.constraints(...) passed to the planner")
            if ps.compute_kernel not in _FUSED:
                raise ShardingError(
                    f"{where} uses compute kernel {ps.compute_kernel!r}; IKJT inputs need the FUSED kernel "
                    "(the dense kernel misreads variable-batch inputs). Pass "
                    "ParameterConstraints(compute_kernels=['fused']) or recd_plugin.dist.sharding.constraints(...)")
    for sharder in sharder_list:
        fused = getattr(sharder, "fused_params", None) or {}
        opt = fused.get("optimizer")
        if opt is not None and opt not in allowed:
            raise ShardingError(
                f"fused optimizer {opt} cannot take variable-batch (IKJT) inputs on {device_type}; use one of "
                f"{sorted(o.name for o in allowed)} in the sharder's fused_params (EXACT_ROWWISE_ADAGRAD is "
                "the usual choice), or switch the plugin off")


def explain(model: nn.Module, config: RecDConfig, plan: ShardingPlan,
            cons: Mapping[str, ParameterConstraints]) -> str:
    """One line per table: sharding type, kernel, ranks, and what the plugin told the planner."""
    vbe = ikjt_tables(model, config)
    lines = ["recd-plugin sharding plan:"]
    for module_path, module_plan in plan.plan.items():
        for table, ps in module_plan.items():  # type: ignore[union-attr]
            c = cons.get(table)
            hint = []
            if c is not None and c.batch_sizes:
                hint.append(f"planned for {c.batch_sizes[0]} unique rows/step")
            if table in vbe:
                hint.append("receives IKJTs: FUSED kernel, VBE sharding types")
            lines.append(f"  {module_path or 'model'}.{table}: {ps.sharding_type}, {ps.compute_kernel}, "
                         f"ranks {ps.ranks}" + (f"  ({'; '.join(hint)})" if hint else ""))
    return "\n".join(lines)
