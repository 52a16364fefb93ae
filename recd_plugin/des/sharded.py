"""Sharded DES: the ``ShardedModule`` that ``DESSharder`` (sharder.py) makes of a ``DESEmbeddingOperators``.

Each rank owns some tables (TABLE_WISE, uneven placements fine) or a row range of a table
(ROW_WISE, TorchRec's own row split), plus the first-dense-layer blocks ``W_f`` of the
table-wise fields it owns. Per step, on W ranks with local batches B_0..B_{W-1}:

1. ``input_dist``: the ids of every feature go to the ranks owning their rows (an
   all-to-all of int ids: every owner sees its rows' ids for the whole global batch);
2. ``compute``: the owner pools its fields for the whole (padded) global batch
   ``N = W * max_r B_r`` and computes each operator's partials, [N, K];
3. ``output_dist``: one reduce-scatter of the partials to the ranks owning the samples
   ([B_r, K]; backward: all-gather of the partial gradients), then each operator's
   ``combine`` runs locally.

K per sample: FM ``D + 1`` (plus D per *row-wise* FM field: ``||v_f||^2`` is not additive
over row shards of a multi-hot bag, so those fields travel pooled, as in TorchRec's row-wise
reduce-scatter), wide 1, first layer H. TorchRec's table-wise sharding moves ``F * D`` floats
per sample each way instead.

Usage with ``DistributedModelParallel`` (every rank builds the model on CPU with the same
seed; ``shard`` copies the rank's slices of the unsharded weights)::

    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.types import ShardingEnv, ShardingPlan
    from recd_plugin.des import DESSharder, des_plan
    plan = des_plan(model.sparse, {"t_C1": 0, "t_C2": 1, "t_C3": "row_wise", ...}, world_size=2)
    dmp = DistributedModelParallel(model, env=ShardingEnv.from_process_group(pg), device=torch.device("cpu"),
                                   plan=ShardingPlan({"sparse": plan}), sharders=[DESSharder()])
    opt = torch.optim.SGD(dmp.parameters(), lr=0.05)   # tables have sparse gradients: SGD / SparseAdam / Adagrad

Gradients follow the DMP + DDP convention (see ``collectives``): each parameter's gradient is
that of ``(1/W) * sum_r loss_r``. DMP excludes everything inside a ShardedModule from DDP, so
this module all-reduces its replicated parameters' gradients itself.

Why not the planner: TorchRec's planner estimators assume TorchRec's own lookups and
all-to-alls (bytes of pooled outputs, TBE kernels), so their costs would be wrong for DES; a
plan is given explicitly (``des_plan``, built with TorchRec's ``construct_module_sharding_plan``
and ``table_wise`` / ``row_wise`` generators, so it is an ordinary ``EmbeddingModuleShardingPlan``).
Under TorchRec's ``TrainPipelineSparseDist`` the pipeline runs ``input_dist`` (the id exchange)
for the next batch ahead of this batch's ``compute``, as for TorchRec's own modules: the stages'
inputs and contexts are TorchRec's ``KJTListSplitsAwaitable`` / ``Multistreamable`` types, which
the pipeline's fused splits exchange and CUDA stream bookkeeping require. The id exchange is
issued synchronously, so it does not overlap with compute. Limits: state_dict holds this rank's
local slices (plain tensors, not ShardedTensor); variable-batch
(VBE / IKJT) inputs are refused. Each rank checks its local batch before the id exchange like
the unsharded module (``module.InputCheck``: missing features, ids outside their table).
"""

from __future__ import annotations

import copy
from typing import Any, Dict, List, Mapping, Optional, Tuple, Type

import torch
import torch.nn.functional as F
from torch import nn
from torchrec.distributed.embedding_sharding import KJTListSplitsAwaitable
from torchrec.distributed.embedding_types import KJTList
from torchrec.distributed.types import (EmbeddingModuleShardingPlan, LazyNoWait, NoWait, ParameterSharding, ShardedModule,
                                        ShardingEnv, ShardingType)
from torchrec.optim.fused import FusedOptimizerModule
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from torchrec.streamable import Multistreamable

from recd_plugin.des.collectives import exchange_ids, reduce_scatter_partials, sync_replicated_grads
from recd_plugin.des.fused import DESFusedOptimizer, fusable, fused_tbe, fused_weight
from recd_plugin.des.module import DESEmbeddingOperators, InputCheck
from recd_plugin.des.operators import FactorizationMachine, FirstDenseLayer
from recd_plugin.errors import DESError


def _owned_rows(ps: ParameterSharding, rows: int, table: str) -> Dict[int, Tuple[int, int]]:
    """{rank: (first row, end row)} from a TorchRec ParameterSharding."""
    if ps.sharding_type == ShardingType.TABLE_WISE.value:
        return {ps.ranks[0]: (0, rows)}
    if ps.sharding_type == ShardingType.ROW_WISE.value:
        out = {}
        for shard in ps.sharding_spec.shards:
            lo, n = shard.shard_offsets[0], shard.shard_sizes[0]
            if n:
                out[shard.placement.rank()] = (lo, lo + n)
        return out
    raise DESError(f"DES: table {table!r} has sharding type {ps.sharding_type!r}; DES supports table_wise and row_wise.")


def _record(value: Any, stream: Any) -> None:
    """``record_stream`` on every tensor inside ``value`` (nested lists, tuples and dicts)."""
    if isinstance(value, torch.Tensor):
        value.record_stream(stream)
    elif isinstance(value, (list, tuple)):
        for v in value:
            _record(v, stream)
    elif isinstance(value, dict):
        for v in value.values():
            _record(v, stream)


class _Context(dict, Multistreamable):
    """The per-batch context of the stages (dense input, batch sizes, synced parameters). A
    ``Multistreamable``: TrainPipelineSparseDist records it on its CUDA streams."""

    def record_stream(self, stream: Any) -> None:
        _record(dict(self), stream)


class _Exchanged(Multistreamable):
    """What ``input_dist`` delivers to ``compute``: ``(batch_sizes, recv_lengths, recv_values)``
    of ``exchange_ids``; a ``Multistreamable`` for the pipeline, like TorchRec's ``KJTList``."""

    def __init__(self, received: Tuple[List[int], List[Any], List[Any]]) -> None:
        self.received = received

    def record_stream(self, stream: Any) -> None:
        _record(self.received[1:], stream)


class _Combine(nn.Module):
    """Runs ``op.combine`` so ``torch.func.functional_call`` can swap in the grad-synced params."""

    def __init__(self, op: nn.Module) -> None:
        super().__init__()
        self.op = op

    def forward(self, partials: torch.Tensor, dense: Optional[torch.Tensor]) -> torch.Tensor:
        return self.op.combine(partials, dense)


class ShardedDESEmbeddingOperators(ShardedModule[Any, Any, Dict[str, torch.Tensor], Dict[str, Any]], FusedOptimizerModule):
    """The sharded form; ``forward(features [B_r samples], dense [B_r, ...] | None) -> {name: [B_r, out]}``.
    With ``fused_params`` the local tables of dimensions divisible by 4 are FBGEMM TBEs that
    update in backward (fused.py); ``fused_optimizer`` is what DMP collects for them."""

    def __init__(self, module: DESEmbeddingOperators, params: EmbeddingModuleShardingPlan, env: ShardingEnv,
                 device: Optional[torch.device] = None, fused_params: Optional[Mapping[str, Any]] = None) -> None:
        super().__init__()
        self._group, self._world, self._rank = env.process_group, env.world_size, env.rank
        # Every tensor this module makes goes on the sharding device (DMP's `device`), never
        # the CPU default: NCCL refuses CPU tensors, and embedding_bag needs indices and
        # offsets on its weight's device.
        self._device = device or torch.device("cpu")
        configs = {t.name: t for t in module.tables}
        self._input_check = InputCheck(module.tables, module.input_check.verify_batches)
        missing = [t for t in configs if t not in params]
        if missing:
            raise DESError(f"DES: the plan places no shard of table(s) {missing}; give every table a placement "
                           "(des_plan(module, {table: rank | 'row_wise'}, world_size)).")
        self._owners = {t: _owned_rows(params[t], configs[t].num_embeddings, t) for t in configs}
        self._row_wise = {t for t in configs if params[t].sharding_type == ShardingType.ROW_WISE.value}
        # slots: the (feature, lo, hi) id streams each rank receives, once even when several
        # of its tables read the same feature (e.g. an FM table and a wide table of one field)
        self._slots: List[List[Tuple[str, int, int]]] = []
        for r in range(self._world):
            wanted = [(f, *self._owners[t][r]) for t, c in configs.items() if r in self._owners[t] for f in c.feature_names]
            self._slots.append(list(dict.fromkeys(wanted)))
        # a slot covering every row of every table reading its feature needs no filtering
        rows_of = {f: max(c.num_embeddings for c in configs.values() if f in c.feature_names)
                   for c in configs.values() for f in c.feature_names}
        self._full = [[lo == 0 and hi >= rows_of[f] for f, lo, hi in s] for s in self._slots]
        # local fields: (table, feature, slot) pooled here
        mine = {(f, lo, hi): j for j, (f, lo, hi) in enumerate(self._slots[self._rank])}
        self._local_fields = [(t, f, mine[(f, *self._owners[t][self._rank])]) for t, c in configs.items()
                              if self._rank in self._owners[t] for f in c.feature_names]
        local_tables = [t for t in configs if self._rank in self._owners[t]]
        self._dims = sorted({configs[t].embedding_dim for t in local_tables})
        self._row_offset: Dict[str, int] = {}
        self.local_weights = nn.ParameterDict()
        self._tbes: Dict[int, nn.Module] = {}  # dim -> fused TBE (a plain dict: not a submodule, state_dict unchanged)
        for d in self._dims:
            blocks, off, order = [], 0, []
            for t in local_tables:
                if configs[t].embedding_dim == d:
                    lo, hi = self._owners[t][self._rank]
                    self._row_offset[t] = off
                    off += hi - lo
                    order.append(t)
                    blocks.append(module.ebc.embedding_bags[t].weight.detach()[lo:hi])
            if fused_params is not None and fusable(d):
                fields = [t for t, _, _ in self._local_fields if configs[t].embedding_dim == d]
                self._tbes[d] = fused_tbe([b.shape[0] for b in blocks], d, [order.index(t) for t in fields],
                                          fused_params, self._device)
                self.local_weights[f"dim{d}"] = fused_weight(self._tbes[d])
                with torch.no_grad():
                    self.local_weights[f"dim{d}"].copy_(torch.cat(blocks))
            else:
                self.local_weights[f"dim{d}"] = nn.Parameter(torch.cat(blocks).to(self._device, copy=True))
        lr = float((fused_params or {}).get("learning_rate", 0.01))
        self._fused_optimizer = DESFusedOptimizer({f"local_weights.dim{d}": self.local_weights[f"dim{d}"] for d in self._tbes},
                                                  {f"local_weights.dim{d}": tbe for d, tbe in self._tbes.items()}, lr)
        slot_of = {(t, f): j for j, (t, f, _) in enumerate(self._local_fields)}
        self._field_dim = [configs[t].embedding_dim for t, _, _ in self._local_fields]
        # operators: replicated copies; the W_f of owned table-wise fields become local blocks
        self.operators = nn.ModuleDict({k: copy.deepcopy(op).to(self._device) for k, op in module.operators.items()})
        self.first_local, self.first_row_wise = nn.ParameterDict(), nn.ParameterDict()
        self._plan: Dict[str, Dict[str, Any]] = {}
        for name, op in self.operators.items():
            fields = module.fields[name]
            tw = [(i, slot_of[(t, f)]) for i, (t, f, _) in enumerate(fields) if t not in self._row_wise and (t, f) in slot_of]
            rw = [(i, slot_of.get((t, f))) for i, (t, f, _) in enumerate(fields) if t in self._row_wise]
            dim = configs[op.tables[0]].embedding_dim
            self._plan[name] = {"tw": tw, "rw": rw, "dim": dim}
            if isinstance(op, FirstDenseLayer):
                w = op.field_weight.detach()
                self.first_local[name] = nn.Parameter(w[:, [i for i, _ in tw]].clone())
                self.first_row_wise[name] = nn.Parameter(w[:, [i for i, _ in rw]].clone())
                op.register_parameter("field_weight", None)  # lives in first_local / first_row_wise
        self._combiners = {k: _Combine(op) for k, op in self.operators.items()}
        self._replicated = [(f"operators.{k}.{p}", t, float(self._world)) for k, op in self.operators.items()
                            for p, t in op.named_parameters()]
        self._replicated += [(f"first_row_wise.{k}", t, 1.0) for k, t in self.first_row_wise.items() if t.numel()]
        self._feature_index: Dict[Tuple[str, ...], List[List[Tuple[int, int, int]]]] = {}

    # ---- ShardedModule stages ----------------------------------------------------------

    def create_context(self) -> _Context:
        return _Context()

    def input_dist(self, ctx: Dict[str, Any], features: KeyedJaggedTensor, dense: Optional[torch.Tensor] = None) -> Any:
        if features.variable_stride_per_key():
            raise DESError("DES: variable-batch (VBE / IKJT) inputs are not supported by the DES sharded module; "
                           "feed a plain KeyedJaggedTensor.")
        # before the exchange: a local table-wise id past its table would read the next table's
        # rows of the flat local weight, and a row-wise one would be dropped by every owner
        self._input_check(features)
        keys = tuple(features.keys())
        if keys not in self._feature_index:
            index = {k: i for i, k in enumerate(keys)}
            self._feature_index[keys] = [[(index[f], lo, hi) for f, lo, hi in s] for s in self._slots]
        batch = features.stride()
        lengths = features.lengths().view(len(keys), batch)
        values = features.values().split(features.length_per_key())
        ctx["dense"] = dense
        got = exchange_ids(lengths, values, self._feature_index[keys], self._full, features.values().dtype, self._group)
        # TorchRec's type for this stage: TrainPipelineSparseDist fuses the splits exchanges of
        # every pipelined module's request and waits each of its awaitables (it requires .awaitables).
        return KJTListSplitsAwaitable([NoWait(NoWait(_Exchanged(got)))], ctx)

    def compute(self, ctx: Dict[str, Any], dist_input: KJTList) -> torch.Tensor:
        """Pool the local fields for the padded global batch and compute every operator's partials."""
        batch_sizes, recv_lengths, recv_values = dist_input[0].received
        ctx["batch_sizes"] = batch_sizes
        b_max, world = max(batch_sizes), self._world
        n = world * b_max
        groups: Dict[int, torch.Tensor] = {}  # dim -> [fields of that dim, N, dim]
        where: Dict[int, Tuple[int, int]] = {}  # local field -> (dim, position in its group)
        for d in self._dims:
            js = [j for j, dj in enumerate(self._field_dim) if dj == d]
            lens = torch.zeros(len(js), world, b_max, dtype=torch.long, device=self._device)
            idx = []
            fused = self._tbes.get(d)
            for k, j in enumerate(js):
                table, _, slot = self._local_fields[j]
                where[j] = (d, k)
                for s in range(world):
                    lens[k, s, : batch_sizes[s]] = recv_lengths[slot][s]
                    # the TBE adds its own per-table offsets; the flat weight needs ours
                    idx.append(recv_values[slot][s].long() + (0 if fused is not None else self._row_offset[table]))
            offsets = torch.cat([lens.new_zeros(1), lens.reshape(-1).cumsum(0)])
            if fused is not None:  # [N, fields * d], field-major bags like the embedding_bag below
                groups[d] = fused(torch.cat(idx), offsets).view(n, len(js), d).permute(1, 0, 2)
            else:
                groups[d] = F.embedding_bag(torch.cat(idx), self.local_weights[f"dim{d}"], offsets, mode="sum",
                                            sparse=True, include_last_offset=True).view(len(js), n, d)

        def fields(js: List[Optional[int]], dim: int) -> Optional[torch.Tensor]:
            """[N, len(js), dim] pooled fields (zeros for None); one gather, not one select per
            field: a select's backward would materialise the whole group once per field."""
            if not js:
                return None
            if any(j is None for j in js):
                return torch.stack([groups[dim][where[j][1]] if j is not None else torch.zeros(n, dim, device=self._device)
                                    for j in js], dim=1)
            d, pos = where[js[0]][0], [where[j][1] for j in js]
            g = groups[d] if pos == list(range(groups[d].shape[0])) else groups[d][torch.tensor(pos, device=self._device)]
            return g.permute(1, 0, 2)

        synced = dict(zip([name for name, _, _ in self._replicated],
                          sync_replicated_grads([t for _, t, _ in self._replicated], [d for _, _, d in self._replicated],
                                                self._group)))
        ctx["synced"] = synced
        parts = []
        for name, op in self.operators.items():
            plan, dim = self._plan[name], self._plan[name]["dim"]
            v = fields([j for _, j in plan["tw"]], dim)
            rw = fields([j for _, j in plan["rw"]], dim)
            if isinstance(op, FirstDenseLayer):
                p = op.partials(v, weight=self.first_local[name]) if v is not None else torch.zeros(n, op.out_features, device=self._device)
                parts.append(p + op.partials(rw, weight=synced[f"first_row_wise.{name}"]) if rw is not None else p)
            else:
                parts.append(op.partials(v) if v is not None else torch.zeros(n, op.partial_size(dim), device=self._device))
                if rw is not None:
                    if isinstance(op, FactorizationMachine):  # pooled row-wise fields travel whole (see module doc)
                        parts.append(rw.reshape(n, -1))
                    else:  # linear operators: partial sums over row shards add up
                        parts[-1] = parts[-1] + op.partials(rw)
        return torch.cat(parts, dim=1)

    def output_dist(self, ctx: Dict[str, Any], output: torch.Tensor) -> Any:
        """Reduce-scatter [N, K] -> [B_r, K]; each operator's combine on the local samples."""
        mine = reduce_scatter_partials(output, ctx["batch_sizes"], self._group)
        out, i = {}, 0
        for name, op in self.operators.items():
            plan, dim = self._plan[name], self._plan[name]["dim"]
            k = op.partial_size(dim)
            p = mine[:, i:i + k]
            i += k
            if isinstance(op, FactorizationMachine) and plan["rw"]:
                rw = mine[:, i:i + dim * len(plan["rw"])].reshape(mine.shape[0], len(plan["rw"]), dim)
                i += dim * len(plan["rw"])
                p = p + op.partials(rw)
            params = {f"op.{p_name}": ctx["synced"][f"operators.{name}.{p_name}"] for p_name, _ in op.named_parameters()}
            out[name] = torch.func.functional_call(self._combiners[name], params, (p, ctx["dense"]))
        return LazyNoWait(out)

    def forward(self, features: KeyedJaggedTensor, dense: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        ctx = self.create_context()
        dist_input = self.input_dist(ctx, features, dense).wait().wait()
        return self.output_dist(ctx, self.compute(ctx, dist_input)).wait()

    # ---- helpers -------------------------------------------------------------------------

    @property
    def unsharded_module_type(self) -> Type[DESEmbeddingOperators]:
        return DESEmbeddingOperators

    @property
    def fused_optimizer(self) -> DESFusedOptimizer:
        """The fused tables' optimizer (no parameters without ``fused_params``)."""
        return self._fused_optimizer

    def owned_rows(self) -> Dict[str, Tuple[int, int]]:
        """{table: (first row, end row)} this rank holds."""
        return {t: o[self._rank] for t, o in self._owners.items() if self._rank in o}

    def local_table(self, table: str) -> torch.Tensor:
        """This rank's rows of ``table`` (a view of the local weights; [hi - lo, D])."""
        lo, hi = self._owners[table][self._rank]
        d = next(dj for (t, _, _), dj in zip(self._local_fields, self._field_dim) if t == table)
        off = self._row_offset[table]
        return self.local_weights[f"dim{d}"][off: off + hi - lo]
