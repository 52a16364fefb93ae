"""Sharding with the plugin on: one object with what DMP and its planner need.

In sharded mode the plugin keeps the model's TorchRec modules and feeds them *aligned* IKJTs
(``recd_plugin.sparse.ikjt``): to TorchRec, ordinary KJTs of batch B, so DMP's default
sharders, every sharding type, every compute kernel and every fused optimizer work as they do
without the plugin, and no table takes TorchRec's variable-batch path. What is left here:

* :func:`for_dmp` -> :class:`ShardingSetup`: the one call after ``recd_plugin.apply``. Its
  ``.sharders`` go to both the planner and DMP, its ``.constraints`` to the planner,
  ``.check(plan)`` refuses a plan that cannot run, ``.explain(plan)`` says per table what the
  plugin told the planner. The constraints are the user's own (``base_constraints``) plus:

  - RecD: a grouped table looks up only the unique rows' ids, so its
    ``ParameterConstraints.batch_sizes`` become the deduplicated ``ceil(u * B)``; u is the
    one given (e.g. by ``recd-plugin analyze``), or one measured here on ``loader``'s first
    batches (its generators and the global RNG are restored after);
  - FAE (``fae.hot_set`` in the flag; the model stays unconverted when sharded): tables whose
    hot share of rows is at least one half stay whole in HBM (``FUSED``), the others get
    ``FUSED_UVM_CACHING`` at their hot share of rows as cache load factor
    (``recd_plugin.fae.hints.hot_set_constraints``). On a cuda topology only: a cpu one has no
    HBM / host-memory tiers, and says so in ``explain``.

* The pieces it is made of, for scripts that want only one: :func:`sharders` (TorchRec's,
  plus ROW_WISE on cpu; TABLE_ROW_WISE stays off on cpu: its weights do not move there),
  :func:`constraints`, :func:`measure_unique_fraction`, :func:`explain`.

Example (each rank, after ``recd_plugin.apply``)::

    from recd_plugin import sharding
    model, loader = recd_plugin.apply(config, model, loader)
    setup = sharding.for_dmp(model, config, batch_size=1024, fused_params={"learning_rate": 0.01})
    planner = EmbeddingShardingPlanner(topology=Topology(world_size=2, compute_device="cpu"),
                                       constraints=setup.constraints)
    plan = planner.collective_plan(model, setup.sharders, dist.group.WORLD)
    setup.check(plan)
    print(setup.explain(plan))
    model = DistributedModelParallel(model, plan=plan, sharders=setup.sharders, device=torch.device("cpu"))
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple

import torch

from torch import nn
from torchrec.distributed.embedding import EmbeddingCollectionSharder
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.planner.types import ParameterConstraints
from torchrec.distributed.types import ModuleSharder, ShardingPlan, ShardingType

from recd_plugin._rng import random_state_kept
from recd_plugin.config import RecDConfig, as_flag
from recd_plugin.errors import ShardingError
from recd_plugin.modules.swap import embedding_tables
from recd_plugin.sharding import torchrec_fixes
from recd_plugin.technique import PlannerHints, build
from recd_plugin.transforms.dedup import DedupLoader, measure, yields_ikjt


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
    stats = measure(batches, config.spec, limit, config.batch_kjt)
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


#: Sharding types whose weights do not move on cpu (see docs/design/sharded-ikjt.md).
_NOT_ON_CPU = {ShardingType.TABLE_ROW_WISE.value, "grid_shard"}


@dataclass
class ShardingSetup:
    """What ``DistributedModelParallel`` and its planner need for a model the plugin converted
    (:func:`for_dmp` builds it).

    Attributes:
        sharders: for both the planner and DMP (the plugin's: TorchRec's, plus ROW_WISE on cpu).
        constraints: ``{table: ParameterConstraints}`` for ``EmbeddingShardingPlanner``: the
            user's own, with the plugin's hints filled in where the user left a field unset.
        unique_fraction: ``{group: u}`` behind the deduplicated batch sizes, and
            ``unique_source`` where it came from ("loader", "given", "");
            ``recd_tables``: the tables planned for the unique rows.
        hints: ``{table: what the techniques asked of the planner}`` (FAE's placement, DES's
            sharding); ``notes``: hints not given, and why.
        compute_device: the planner topology's device type the hints were made for.
    """

    sharders: List[ModuleSharder[nn.Module]]
    constraints: Dict[str, ParameterConstraints]
    unique_fraction: Dict[str, float] = field(default_factory=dict)
    unique_source: str = ""
    recd_tables: List[str] = field(default_factory=list)
    hints: Dict[str, str] = field(default_factory=dict)
    notes: List[str] = field(default_factory=list)
    compute_device: str = "cpu"
    tables: Dict[str, List[str]] = field(default_factory=dict, repr=False)

    def check(self, plan: ShardingPlan) -> None:
        """Refuse (``ShardingError``, naming the table and the fix) a plan that names a table
        the model lacks, or that puts a table on a sharding type or kernel the compute device
        cannot run (TABLE_ROW_WISE / GRID_SHARD or a UVM kernel on cpu)."""
        for module_path, module_plan in plan.plan.items():
            for table, ps in module_plan.items():  # type: ignore[union-attr]
                where = f"{module_path or 'model'}.{table}"
                if self.tables and table not in self.tables:
                    raise ShardingError(f"the sharding plan names table {where!r}, which the model does not have "
                                        f"(its tables: {sorted(self.tables)}); plan the model given to for_dmp()")
                if self.compute_device == "cpu" and ps.sharding_type in _NOT_ON_CPU:
                    raise ShardingError(f"{where}: {ps.sharding_type} does not work on cpu (its weights do not move "
                                        "there); use row_wise, column_wise or table_wise")
                if self.compute_device == "cpu" and "uvm" in str(ps.compute_kernel):
                    raise ShardingError(f"{where}: compute kernel {ps.compute_kernel} needs cuda (UVM); on cpu use "
                                        "fused or dense")

    def explain(self, plan: ShardingPlan) -> str:
        """One line per table: sharding type, kernel, ranks, and what the plugin told the planner;
        then the hints not given, and why."""
        lines = ["recd-plugin sharding plan:"]
        for module_path, module_plan in plan.plan.items():
            for table, ps in module_plan.items():  # type: ignore[union-attr]
                c = self.constraints.get(table)
                hint = []
                if c is not None and c.batch_sizes and table in self.recd_tables:
                    hint.append(f"planned for {c.batch_sizes[0]} unique rows/step")
                if table in self.hints:
                    hint.append(self.hints[table])
                clf = ps.cache_params.load_factor if ps.cache_params is not None else None
                kernel = f"{ps.compute_kernel}" + (f" (cache load factor {clf:.3f})" if clf else "")
                lines.append(f"  {module_path or 'model'}.{table}: {ps.sharding_type}, {kernel}, "
                             f"ranks {ps.ranks}" + (f"  ({'; '.join(hint)})" if hint else ""))
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def for_dmp(model: nn.Module, config: Any, batch_size: int, loader: Optional[Iterable[Any]] = None,
            base_constraints: Optional[Mapping[str, ParameterConstraints]] = None, *,
            fused_params: Optional[Dict[str, Any]] = None, unique_fraction: Optional[Mapping[str, float]] = None,
            compute_device: Optional[str] = None, probe_batches: int = 8) -> ShardingSetup:
    """Sharders, planner constraints and plan check for ``model`` after ``recd_plugin.apply``.

    Args:
        model: the model ``apply`` converted (unsharded; the one to plan), or a module around it.
        config: the flag ``apply`` was given.
        batch_size: samples per rank per step (B).
        loader: plain torchrec ``Batch``es (the loader as it was *before* ``apply``) to measure
            the unique fractions on, over the first ``probe_batches`` (the loader's generators
            and the global random state are restored after, so its first epoch is unchanged).
        base_constraints: the user's own ``{table: ParameterConstraints}``: kept; a hint only
            fills a field the user left unset (the objects given are not modified).
        fused_params: passed to the sharders (e.g. the fused optimizer and learning rate).
        unique_fraction: ``{group: u}`` to use instead of any measurement.
        compute_device: the planner topology's device type (default: cuda if available, else
            cpu). FAE's placement hints are given on cuda only.
        probe_batches: how many of ``loader``'s batches to measure.

    Returns:
        :class:`ShardingSetup`: ``.sharders``, ``.constraints``, ``.check(plan)``, ``.explain(plan)``.
        With the plugin off: the plugin's sharders and the base constraints, no hints.

    Example::

        model, loader = recd_plugin.apply(config, model, loader)
        setup = recd_plugin.sharding.for_dmp(model, config, batch_size=1024)
        planner = EmbeddingShardingPlanner(topology=topology, constraints=setup.constraints)
        plan = planner.collective_plan(model, setup.sharders, dist.group.WORLD)
        setup.check(plan)
        model = DistributedModelParallel(model, plan=plan, sharders=setup.sharders, device=device)
    """
    config = as_flag(config)
    device = compute_device or ("cuda" if torch.cuda.is_available() else "cpu")
    base = {t: dataclasses.replace(c) for t, c in (base_constraints or {}).items()}  # the caller's stay as given
    setup = ShardingSetup(sharders=sharders(fused_params), constraints=base, compute_device=device,
                          tables=embedding_tables(model))
    if not config.enabled:
        return setup
    if config.groups:
        u, source = _unique_fraction(config, loader, unique_fraction, probe_batches)
        setup.unique_fraction, setup.unique_source = u, source
        before = {t: c.batch_sizes for t, c in base.items()}
        setup.constraints = constraints(model, config, batch_size, u or None, base=base)
        setup.recd_tables = [t for t, c in setup.constraints.items()
                                           if c.batch_sizes is not None and before.get(t) is None]
        if not u:
            setup.notes.append("recd: no unique fraction given: grouped tables are planned for B rows; pass "
                               "unique_fraction= (recd-plugin analyze measures it) or loader= (the plain loader) to "
                               "plan them for the unique rows")
    for technique in build(config):  # FAE's placement, DES's sharder: each technique's own hints
        _merge(setup, technique.planner_hints(model, device, fused_params))
    return setup


def _unique_fraction(config: RecDConfig, loader: Optional[Iterable[Any]], given: Optional[Mapping[str, float]],
                     limit: int) -> Tuple[Dict[str, float], str]:
    if given is not None:
        return dict(given), "given"
    if loader is not None:
        if isinstance(loader, DedupLoader):
            loader = loader.loader  # apply's loader: its batches as they come (plain, or built in workers)
        elif yields_ikjt(loader) and not config.groups:
            raise ShardingError("for_dmp(loader=...) measures the flag's groups, and this flag has none")
        with random_state_kept(loader):  # the job's first epoch draws as if it had not been read
            return measure_unique_fraction(loader, config, limit), "loader"
    return {}, ""


def _merge(setup: ShardingSetup, hints: PlannerHints) -> None:
    """One technique's hints into ``setup``: its sharders first (its module types), and per
    table the constraint fields it sets, where the user's (or an earlier hint's) leave them
    unset; a table where one of those fields is already set otherwise keeps what it has, with
    a note saying the hint was not applied."""
    setup.sharders[:0] = hints.sharders
    setup.notes += hints.notes
    narrowed: Dict[Tuple[str, str, str], List[str]] = {}  # (field, yours, runnable) -> tables
    for table, hint in hints.constraints.items():
        asked = {name: getattr(hint, name) for name in _set_fields(hint)}
        why = hints.explain.get(table, "")
        mine = setup.constraints.get(table)
        if mine is not None and table in hints.runnable:
            setup.constraints[table] = mine = dataclasses.replace(mine)
            _keep_runnable(table, mine, hints.runnable[table], narrowed)
        if mine is None:
            setup.constraints[table] = hint
        else:
            fixed = [name for name in _set_fields(mine) if name in asked and getattr(mine, name) != asked[name]]
            if fixed:
                setup.notes.append(f"{table}: your constraints fix its {fixed[0]} to {getattr(mine, fixed[0])}; "
                                   f"the hint ({why or asked}) is not applied")
                continue
            for name, value in asked.items():
                setattr(mine, name, value)
        if why:
            setup.hints[table] = f"{setup.hints[table]}; {why}" if table in setup.hints else why
    for (name, yours, runnable), tables in narrowed.items():
        setup.notes.append(f"{', '.join(tables)}: your constraints allow {name} {yours}, but their module is "
                           f"sharded by a technique's own sharder, which runs {runnable}; planned with those")


def _keep_runnable(table: str, mine: ParameterConstraints, runnable: Dict[str, List[str]],
                   narrowed: Dict[Tuple[str, str, str], List[str]]) -> None:
    """A user's constraint on a table that a technique's own sharder shards (e.g. DES: written
    for TorchRec's EBC) keeps the values that sharder can run; a field left with none is
    cleared, for the hint to fill."""
    for name, allowed in runnable.items():
        values = getattr(mine, name)
        if values is None:
            continue
        kept = [v for v in values if v in allowed]
        if kept != list(values):
            narrowed.setdefault((name, str(values), str(kept or allowed)), []).append(table)
        setattr(mine, name, kept or None)


def _set_fields(c: ParameterConstraints) -> List[str]:
    """The fields of ``c`` given a value (not None, not the dataclass default)."""
    out = []
    for f in dataclasses.fields(c):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default  # type: ignore[misc]
        value = getattr(c, f.name)
        if value is not None and value != default:
            out.append(f.name)
    return out
