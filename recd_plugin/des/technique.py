"""DES as a registered technique (``recd_plugin/technique.py``), for the flag's ``des`` section
(``DESConfig``).

DES applies to the model's :class:`~recd_plugin.des.DESEmbeddingOperators` modules: tables
plus the FM / wide / first-dense-layer operators over their pooled output, whose math the
plugin knows. Unsharded they are exactly that math and nothing changes. Under
``DistributedModelParallel`` TorchRec has no sharder for them (DMP would replicate their
tables); the flag's section gives the planner and DMP :class:`~recd_plugin.des.DESSharder` and
constraints (``des.sharding``: table-wise or row-wise, dense kernel), through
``recd_plugin.sharding.for_dmp``: each rank computes the operators' partial results on the
rows it owns and only those partials cross the network.

``des.modules`` narrows it to some of the model's DES modules; the others are then planned
like any module around an ``EmbeddingBagCollection`` (their inner ``ebc`` sharded by TorchRec,
pooled embeddings travel, the operators run unsubstituted).
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

from torch import nn

from recd_plugin.des.config import DESConfig
from recd_plugin.des.module import DESEmbeddingOperators
from recd_plugin.errors import UnsupportedModelError, did_you_mean
from recd_plugin.technique import PlannerHints, Technique, register_technique

FUSED = "fused"  # EmbeddingComputeKernel.FUSED.value, without importing the sharding code here


def _des_modules(model: nn.Module) -> Dict[str, DESEmbeddingOperators]:
    """{path: module} of every DESEmbeddingOperators of ``model``."""
    return {p: m for p, m in model.named_modules() if isinstance(m, DESEmbeddingOperators)}


def _chosen_sharder(chosen: List[nn.Module], fused_params: Optional[Dict[str, Any]]) -> Any:
    """``DESSharder`` for the chosen modules only: the planner plans a module type's every
    instance, so the others offer no shardable parameter and stay TorchRec's to plan (their
    inner ``ebc``). Built per call: the chosen modules are this model's."""
    from recd_plugin.des.sharder import DESSharder

    ids = {id(m) for m in chosen}

    class ChosenDESSharder(DESSharder):
        def shardable_parameters(self, module: DESEmbeddingOperators) -> Dict[str, nn.Parameter]:
            return super().shardable_parameters(module) if id(module) in ids else {}

        def compute_kernels(self, sharding_type: str, compute_device_type: str) -> List[str]:
            # A label for the planner's cost model and plan validation (which allows the DENSE
            # kernel of des_plan for data-parallel tables only): the sharded DES module picks
            # its own kernel from fused_params (FBGEMM TBEs) or keeps sparse gradients.
            return [FUSED]

    return ChosenDESSharder(fused_params)


@register_technique
class DES(Technique):
    """Distributed equivalent substitution of the model's DES operator modules (order 30)."""

    config_type = DESConfig
    name = "des"
    order = 30
    config: DESConfig

    def modules(self, model: nn.Module) -> Dict[str, DESEmbeddingOperators]:
        """{path: module} of the DES modules the flag chose (all of them by default)."""
        found = _des_modules(model)
        if self.config.modules is None:
            return found
        return {p: found[p] for p in self.config.modules if p in found}

    def check(self, model: nn.Module) -> None:
        found = _des_modules(model)
        if not found:
            raise UnsupportedModelError(
                "the flag has a des section, but the model has no recd_plugin.des.DESEmbeddingOperators: DES "
                "substitutes operators whose math it knows. Build the FM / wide / first dense layer over the "
                "embeddings with recd_plugin.des (FactorizationMachine, WideLinear, FirstDenseLayer inside "
                "DESEmbeddingOperators; see docs/des.md), or drop the des section")
        for p in self.config.modules or []:
            if p not in found:
                raise UnsupportedModelError(f"des.modules names {p!r}, which is not a DESEmbeddingOperators of the "
                                            f"model{did_you_mean(p, list(found))}; the model's: {sorted(found)}")
        if self.sharded and self.flag.groups:
            # Sharded, a DES module computes its partials from the batch's ids itself: on an
            # aligned IKJT a duplicate sample's row is empty there, and no gather can fix partials.
            grouped = {f for g in self.flag.groups for f in g.all_features}
            for p, m in self.modules(model).items():
                both = sorted(grouped & {f for t in m.tables for f in t.feature_names})
                if both:
                    raise UnsupportedModelError(
                        f"recd group feature {both[0]!r} is read by DES module {p!r}: sharded, DES computes on every "
                        "sample's ids. Leave that feature out of the recd groups, or the module out of des.modules")

    def planner_hints(self, model: nn.Module, compute_device: str,
                      fused_params: Optional[Dict[str, Any]] = None) -> PlannerHints:
        from torchrec.distributed.planner.types import ParameterConstraints

        chosen = self.modules(model)
        hints = PlannerHints(sharders=[_chosen_sharder(list(chosen.values()), fused_params)])
        for path, m in chosen.items():
            for t in m.tables:
                hints.constraints[t.name] = ParameterConstraints(sharding_types=[self.config.sharding],
                                                                 compute_kernels=[FUSED])
                hints.explain[t.name] = f"des: {self.config.sharding}, partials of {path!r} travel"
                hints.runnable[t.name] = {"sharding_types": ["table_wise", "row_wise"], "compute_kernels": [FUSED]}
        return hints
