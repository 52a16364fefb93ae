"""``recd-plugin bench models``: the plugin on TorchRec's own models, as a user's script runs them.

Models: ``torchrec.models.dlrm.DLRM`` and ``DLRM_DCN`` from the installed TorchRec wheel, each
through ``DLRMTrain`` (26 sparse features C1..C26, C1..C13 session-level, grouped by content);
a two-tower model built like TorchRec's retrieval example (one EBC, query tower = MLP over the
13 session-level embeddings, candidate tower = MLP over the 13 per-sample ones, dot-product
logit); and the project's MovieLens model (``light`` and ``transformer``) on MovieLens-100k.

Data: session-structured synthetic Criteo-like batches (sessions of 16 consecutive samples
share C1..C13: u = 1/16), and a no-duplicates control (sessions of 1: u = 1). MovieLens: its
own sessions, and the control with a session id per sample.

Modes: ``unsharded`` (one process), ``dmp1`` / ``dmp2``: DistributedModelParallel with the
default planner and DMP's default sharders, trained by ``TrainPipelineSparseDist``, on 1 and 2
gloo ranks; ``dmp2_hints``: the same with the plugin's optional planner hints on the plugin
side (``recd_plugin.sharding.planner.constraints``: deduplicated batch sizes of grouped tables). The plugin is switched on with ``recd_plugin.apply`` before DMP, nothing else, as
in a user's script; its probe decides which groups pay (``route`` in the JSON).

Per case: the two sides (same initial weights, same batches, SGD) alternate in blocks of one
pass over the batches, the order flipping every round; samples/s from the median step time
over 36 timed steps per side after a warm-up pass (``--quick``: 8; batches under 256 samples,
whose steps take milliseconds: 4x as many). The u = 1 cases whose
probe chose the plain route run two identical models: their spread around 1.00 is this
machine's measurement noise. ``f`` is measured in each mode: 1 - T_one / T_plain, with T_one
the plugin's step on the same batches with every sample's session features taken from the
batch's first sample (U = 1: all deduplicable work done once, the route's fixed costs still
paid); bound = 1 / ((1 - f) + f u). A DMP step spends part of its time in collectives that
dedup does not shrink, so its f is below the unsharded one.
dmp2 also counts the floating-point bytes of the embedding collectives per step
(``comm_ratio`` plain / plugin) and the dup factor (grouped rows / unique rows).

    recd-plugin bench models              # all cases, writes its section of docs/benchmarks.md
    recd-plugin bench models --quick      # fewer steps, a fast check
    recd-plugin bench models --json out.json --no-docs
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from recd_plugin.bench.report import free_port, machine, median, publish
from recd_plugin.data.criteo import SESSION, SESSION_FIELDS

MODELS = ["dlrm", "dlrm_dcn", "two_tower", "movielens_light", "movielens_transformer", "dlrm_meta", "deepfm_meta",
          "reads_batch"]
#: Built with their tables on ``meta``, as TorchRec's examples build them: DMP materializes them,
#: so they run in the DMP modes only.
META_MODELS = ("dlrm_meta", "deepfm_meta")
#: Passes of the plugin side, at most, for its route decision (the job's first steps).
DECISION_PASSES = 16
MODES = ["unsharded", "dmp1", "dmp2", "dmp2_hints"]
DIM = 16
MAX_ROWS = 20_000
LR = 0.05
LOSS_TOLERANCE = 1e-5
SMALL_BATCH_ROUNDS = 4
SAMPLE_FIELDS = [f"C{i}" for i in range(14, 27)]
DLRM_FLAG = "groups.session.features=" + ",".join(SESSION_FIELDS)


# ---------------------------------------------------------------------------------------------
# Models (built as TorchRec's examples build them) and their step.


def _tables(fields: List[str]) -> List[Any]:
    from torchrec.modules.embedding_configs import EmbeddingBagConfig

    from recd_plugin.data.criteo import criteo_cardinalities

    rows = criteo_cardinalities(MAX_ROWS)
    return [EmbeddingBagConfig(name=f"t_{f}", embedding_dim=DIM, num_embeddings=rows[f], feature_names=[f])
            for f in fields]


class RetrievalTwoTower(nn.Module):
    """Like TorchRec's retrieval example: one EBC; query and candidate MLP towers; dot product."""

    def __init__(self) -> None:
        super().__init__()
        from torchrec import EmbeddingBagCollection
        from torchrec.modules.mlp import MLP

        self.ebc = EmbeddingBagCollection(tables=_tables(SESSION_FIELDS + SAMPLE_FIELDS))
        self.query_proj = MLP(in_size=DIM * len(SESSION_FIELDS), layer_sizes=[64, 32])
        self.candidate_proj = MLP(in_size=DIM * len(SAMPLE_FIELDS), layer_sizes=[64, 32])
        self.loss_fn = nn.BCEWithLogitsLoss()

    def forward(self, batch: Any) -> Tuple[torch.Tensor, Tuple[torch.Tensor, ...]]:
        pooled = self.ebc(batch.sparse_features).to_dict()
        query = self.query_proj(torch.cat([pooled[f] for f in SESSION_FIELDS], dim=1))
        candidate = self.candidate_proj(torch.cat([pooled[f] for f in SAMPLE_FIELDS], dim=1))
        logits = (query * candidate).sum(dim=1)
        loss = self.loss_fn(logits, batch.labels)
        return loss, (loss.detach(), logits.detach(), batch.labels)


class MovieLensStep(nn.Module):
    """The MovieLens example model as a pipeline runs it: ``forward(batch) -> (loss, ...)``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: Any) -> Tuple[torch.Tensor, Tuple[torch.Tensor, ...]]:
        logits = self.model(batch.sparse_features, batch.dense_features)
        loss = nn.functional.binary_cross_entropy_with_logits(logits, batch.labels)
        return loss, (loss.detach(), logits.detach(), batch.labels)


class DeepFMTrain(nn.Module):
    """TorchRec's ``SimpleDeepFMNN`` as a pipeline runs it: ``forward(batch) -> (loss, ...)``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = nn.BCEWithLogitsLoss()

    def forward(self, batch: Any) -> Tuple[torch.Tensor, Tuple[torch.Tensor, ...]]:
        logits = self.model(dense_features=batch.dense_features, sparse_features=batch.sparse_features).squeeze(-1)
        loss = self.loss_fn(logits, batch.labels)
        return loss, (loss.detach(), logits.detach(), batch.labels)


def build(name: str, card: Optional[Dict[str, int]] = None) -> Tuple[nn.Module, str]:
    """(model whose forward(batch) returns (loss, ...), the plugin flag for it)."""
    torch.manual_seed(0)
    if name == "deepfm_meta":
        from torchrec import EmbeddingBagCollection
        from torchrec.models.deepfm import SimpleDeepFMNN

        ebc = EmbeddingBagCollection(tables=_tables(SESSION_FIELDS + SAMPLE_FIELDS), device=torch.device("meta"))
        return DeepFMTrain(SimpleDeepFMNN(num_dense_features=13, embedding_bag_collection=ebc, hidden_layer_size=64,
                                          deep_fm_dimension=DIM)), DLRM_FLAG
    if name == "reads_batch":
        from recd_plugin.bench.reads_batch import FLAG, ReadsBatch

        assert card is not None
        return ReadsBatch({"user_id": card["user_id"], "history": card["item_id"], "item_id": card["item_id"],
                           "position": 1024}, dim=DIM), FLAG
    if name in ("dlrm", "dlrm_dcn", "dlrm_meta"):
        from torchrec import EmbeddingBagCollection
        from torchrec.models.dlrm import DLRM, DLRM_DCN, DLRMTrain

        ebc = EmbeddingBagCollection(tables=_tables(SESSION_FIELDS + SAMPLE_FIELDS),
                                     device=torch.device("meta") if name in META_MODELS else None)
        kwargs = dict(embedding_bag_collection=ebc, dense_in_features=13, dense_arch_layer_sizes=[64, DIM],
                      over_arch_layer_sizes=[64, 1])
        dlrm = DLRM_DCN(**kwargs, dcn_num_layers=2, dcn_low_rank_dim=8) if name == "dlrm_dcn" else DLRM(**kwargs)
        return DLRMTrain(dlrm), DLRM_FLAG
    if name == "two_tower":
        return RetrievalTwoTower(), DLRM_FLAG + "; towers.query_proj=session"
    from recd_plugin.bench.dedup import _example

    example = _example()
    return MovieLensStep(example.TwoTower(card, light=name == "movielens_light")), example.RECD_FLAG.replace(
        "towers.user_tower", "towers.model.user_tower")


def _step(model: nn.Module, opt: torch.optim.Optimizer, batch: Any) -> float:
    opt.zero_grad(set_to_none=True)
    loss, _ = model(batch)
    loss.backward()
    opt.step()
    return float(loss.detach())


# ---------------------------------------------------------------------------------------------
# Data.


def synthetic(batch_size: int, count: int, session: int, seed: int = 0) -> List[Any]:
    from recd_plugin.data.criteo import criteo_batches

    return list(criteo_batches(count, batch_size, seed=seed, max_rows=MAX_ROWS, session=session))


def movielens(batch_size: int, count: int, unique: bool) -> Tuple[Dict[str, int], List[Any]]:
    """MovieLens-100k batches spread over the data; ``unique``: a session id per sample."""
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    from recd_plugin.data import TableBatches, cardinalities, load_movielens_100k

    table = load_movielens_100k()
    ds = TableBatches(table, batch_size, drop_last=True)
    idx = [int(i) % len(ds) for i in np.linspace(0, len(ds) - 1, count)] if count <= len(ds) else \
        [i % len(ds) for i in range(count)]
    batches = [ds[i] for i in idx]
    if unique:
        out = []
        for n, b in enumerate(batches):
            kjt = b.sparse_features
            jt = kjt.to_dict()
            sid = kjt.keys().index("session_id")
            jt_values = [jt[k].values() if i != sid else torch.arange(kjt.stride()) + n * kjt.stride()
                         for i, k in enumerate(kjt.keys())]
            out.append(dataclasses.replace(b, sparse_features=KeyedJaggedTensor(
                keys=kjt.keys(), values=torch.cat(jt_values).to(kjt.values().dtype), lengths=kjt.lengths(),
                stride=kjt.stride())))
        batches = out
    return cardinalities(table), batches


def one_session(batch: Any, spec: Any) -> Any:
    """The batch with every grouped feature of ``spec`` of every sample taken from sample 0 (U = 1)."""
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    from recd_plugin.sparse.ikjt import jagged_index_select

    grouped = set(spec.features)
    kjt = batch.sparse_features
    b, keys = kjt.stride(), kjt.keys()
    select = torch.cat([torch.zeros(b, dtype=torch.long) + k * b if key in grouped else torch.arange(b) + k * b
                        for k, key in enumerate(keys)])
    values, lengths, positions = jagged_index_select(kjt.values(), kjt.lengths(), select)
    weights = kjt.weights_or_none()
    return dataclasses.replace(batch, sparse_features=KeyedJaggedTensor(
        keys=keys, values=values, lengths=lengths.to(kjt.lengths().dtype),
        weights=weights.index_select(0, positions) if weights is not None else None, stride=b))


def case_data(model: str, batch_size: int, count: int, unique: bool) -> Tuple[Optional[Dict[str, int]], List[Any]]:
    if model == "reads_batch":
        from recd_plugin.bench.reads_batch import with_position

        card, batches = movielens(batch_size, count, unique)
        return card, [with_position(b) for b in batches]
    if model.startswith("movielens"):
        return movielens(batch_size, count, unique)
    return None, synthetic(batch_size, count, 1 if unique else SESSION)


# ---------------------------------------------------------------------------------------------
# Sides.


class _Side:
    """One side of a case: a model, its optimizer and its batches (any re-iterable loader: the
    plugin side's is the loader ``recd_plugin.apply`` returned, read afresh each pass, as a
    training script does), stepped directly or under DMP, by TorchRec's TrainPipelineSparseDist
    (``pipeline``) or by a plain loop."""

    def __init__(self, model: nn.Module, batches: Any, dmp: bool, constraints: Optional[Dict[str, Any]] = None,
                 pipeline: bool = True) -> None:
        self.batches = batches
        if not dmp:
            self.model, self.opt, self.pipeline = model, torch.optim.SGD(model.parameters(), lr=LR), None
            return
        import torch.distributed as dist
        from torchrec.distributed.model_parallel import DistributedModelParallel
        from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
        from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
        from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
        from torchrec.optim.optimizers import in_backward_optimizer_filter

        device = torch.device("cpu")
        # Tables built on meta (TorchRec's examples) are materialized by DMP from the RNG: the
        # caller seeds both sides alike. Materialized ones keep their weights through sharding.
        meta = any(p.is_meta for p in model.parameters())
        initial = None if meta else {k: v.detach().clone() for k, v in model.state_dict().items()}
        planner = EmbeddingShardingPlanner(topology=Topology(world_size=dist.get_world_size(), compute_device="cpu"),
                                           constraints=constraints)
        from fbgemm_gpu.split_embedding_configs import EmbOptimType
        from torchrec.distributed.embedding import EmbeddingCollectionSharder
        from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder

        # TorchRec's stock sharders (DMP's defaults), with SGD at our learning rate in the fused tables.
        fused = {"optimizer": EmbOptimType.EXACT_SGD, "learning_rate": LR}
        sharders = [EmbeddingBagCollectionSharder(fused_params=fused), EmbeddingCollectionSharder(fused_params=fused)]
        plan = planner.collective_plan(model, sharders, dist.group.WORLD)
        if meta:
            torch.manual_seed(0)  # DMP draws the tables' initial weights: alike on both sides
        self.model = DistributedModelParallel(model, device=device, plan=plan, sharders=sharders)
        if initial is not None:
            self.model.load_state_dict(initial)  # sharding re-initializes tables: keep the same weights
        dense = KeyedOptimizerWrapper(dict(in_backward_optimizer_filter(self.model.named_parameters())),
                                      lambda ps: torch.optim.SGD(ps, lr=LR))
        self.opt = CombinedOptimizer([self.model.fused_optimizer, dense])
        self.pipeline = TrainPipelineSparseDist(self.model, self.opt, device) if pipeline else None

    def run_pass(self, timings: Optional[List[float]], losses: Optional[List[float]]) -> None:
        if self.pipeline is None:
            for b in self.batches:
                start = time.perf_counter()
                loss = _step(self.model, self.opt, b)
                if timings is not None:
                    timings.append(time.perf_counter() - start)
                if losses is not None:
                    losses.append(loss)
            return
        # A new iterator object every pass: the pipeline remembers an exhausted one by identity, and
        # iter() of a DataLoader with persistent workers returns the same object each epoch.
        it = (b for b in self.batches)
        while True:
            start = time.perf_counter()
            try:
                loss, _, _ = self.pipeline.progress(it)
            except StopIteration:
                break
            if timings is not None:
                timings.append(time.perf_counter() - start)
            if losses is not None:
                losses.append(float(loss))


class Replay:
    """Batches a loader yielded, yielded again each pass as the loader would: a deduplicated
    batch's KJT is re-wrapped, so the plain view model code reads is expanded every pass, not
    cached from the first."""

    def __init__(self, batches: List[Any]) -> None:
        self.batches = batches

    def __iter__(self) -> Any:
        from recd_plugin.sparse.dedup_kjt import DedupKJT

        for b in self.batches:
            kjt = b.sparse_features
            yield dataclasses.replace(b, sparse_features=DedupKJT.of(kjt.ikjt(), kjt.dedup_groups)) \
                if isinstance(kjt, DedupKJT) else b


def _loader(batches: List[Any]) -> Any:
    """A user's DataLoader over ready batches: one persistent worker (the plugin builds its
    IKJTs there, off the training loop), the same on both sides."""
    from torch.utils.data import DataLoader

    return DataLoader(batches, batch_size=None, num_workers=1, persistent_workers=True)


def _sides(name: str, batch_size: int, count: int, unique: bool, dmp: bool, rank: int = 0,
           world: int = 1, flag_suffix: str = "", hints: bool = False) -> Tuple[Dict[str, _Side], Dict[str, Any]]:
    """Plain and plugin sides of one case, plus what the plugin will decide on and the data."""
    import recd_plugin
    from recd_plugin.transforms.dedup import measure

    card, batches = case_data(name, batch_size, count * world, unique)
    mine = batches[rank::world]
    base, flag = build(name, card)
    config = recd_plugin.RecDConfig.from_string(flag + flag_suffix)
    spec = config.spec
    u = measure(mine, spec, len(mine)).unique_fraction(spec.groups[0].name)
    # The plugin side as a user's script has it: apply on its model and DataLoader, then the
    # loader apply returned, read afresh every pass; its first steps decide the route.
    plugin_model, loader = recd_plugin.apply(config, copy.deepcopy(base), _loader(mine))
    cons = None
    if hints and config.groups:  # the plugin's optional planner hints: deduplicated batch sizes
        from recd_plugin.sharding.planner import constraints

        cons = constraints(plugin_model, config, batch_size, {g.name: u for g in config.groups})
    sides = {"plain": _Side(base, _loader(mine), dmp), "plugin": _Side(plugin_model, loader, dmp, cons)}
    info = {"unique_fraction": u, "dup_factor": 1 / u, "model": plugin_model,
            "config": config, "spec": spec, "plain_batches": mine, "card": card}
    return sides, info


def run_case(name: str, batch_size: int, unique: bool, steps: int, rounds: int, dmp: bool,
             rank: int = 0, world: int = 1, count_comm: bool = False, flag_suffix: str = "",
             hints: bool = False) -> Dict[str, Any]:
    """Both sides of one case: first the plugin side's own route decision (its first training
    steps, consecutive, as in a job: at most ``DECISION_PASSES`` passes), the plain side the
    same passes; then the two alternating in blocks of one pass, ``rounds`` timed passes after
    one warm-up pass. Every untimed pass's losses are compared. ``flag_suffix`` is appended to
    the model's plugin flag (tests: ``"; route=dedup"`` keeps the group unmeasured)."""
    import recd_plugin
    from recd_plugin.bench.comm import EMBEDDING_OPS, CommCounter

    # Small batches step in milliseconds, where scheduler jitter dominates one reading: time
    # SMALL_BATCH_ROUNDS x as many passes (still well under a second per side).
    rounds *= SMALL_BATCH_ROUNDS if batch_size < 256 else 1
    sides, info = _sides(name, batch_size, steps, unique, dmp, rank, world, flag_suffix, hints)
    losses: Dict[str, List[float]] = {"plain": [], "plugin": []}
    times: Dict[str, List[float]] = {"plain": [], "plugin": []}
    comm: Dict[str, float] = {}
    decision_passes = 0
    while recd_plugin.decisions(info["model"]) is None and decision_passes < DECISION_PASSES:
        sides["plugin"].run_pass(None, losses["plugin"])
        decision_passes += 1
    for _ in range(decision_passes):
        sides["plain"].run_pass(None, losses["plain"])
    for side in ("plain", "plugin"):  # warm-up pass (and counted bytes)
        if count_comm:
            with CommCounter() as counter:
                per_pass: List[float] = []
                sides[side].run_pass(None, per_pass)
            losses[side] += per_pass
            comm[side] = sum(counter.float_by_op.get(op, 0) for op in EMBEDDING_OPS) / max(len(per_pass), 1)
        else:
            sides[side].run_pass(None, losses[side])
    # Timed: the batches each side's loader yields now (the plugin's on the decided route), taken
    # once, so that no DataLoader worker competes with the timed steps for this machine's cores.
    for side in sides.values():
        side.batches = Replay(list(side.batches))
    for r in range(rounds):  # the order flips every round: neither side always runs first
        for side in (("plain", "plugin") if r % 2 == 0 else ("plugin", "plain")):
            sides[side].run_pass(times[side], None)
    decided = recd_plugin.decisions(info["model"]) or []
    kept = [d for d in decided if d.kept]
    t_plain, t_plugin = median(times["plain"]), median(times["plugin"])
    out = {"model": name, "batch": batch_size, "unique_fraction": info["unique_fraction"],
           "dup_factor": info["dup_factor"], "route": "dedup" if kept else "plain",
           "decided_in_steps": decision_passes * steps if decided else None,
           "decision": [{"group": d.group, "kept": d.kept, "dedup_ms": d.dedup_ms, "plain_ms": d.plain_ms,
                         "ratio": d.ratio, "cost_share": d.cost_share, "why": d.reason} for d in decided],
           "ratio": t_plain / t_plugin, "samples_per_s_plain": batch_size / t_plain,
           "samples_per_s_plugin": batch_size / t_plugin, "timed_steps": len(times["plain"]),
           "max_loss_diff": max((abs(a - b) for a, b in zip(losses["plain"], losses["plugin"])), default=0.0),
           "compared_steps": min(len(losses["plain"]), len(losses["plugin"]))}
    if count_comm:
        out["embedding_bytes_plain"], out["embedding_bytes_plugin"] = comm["plain"], comm["plugin"]
        out["comm_ratio"] = comm["plain"] / comm["plugin"] if comm["plugin"] else float("nan")
    # f, in this mode: the plugin's step with all deduplicable work done once (U = 1), after the
    # timing. The plain route has no deduplicable work (f = 0, bound 1).
    out["step_s_one"] = t_plain
    if kept:
        fixed = sides["plugin"]
        fixed.batches = _through_plugin([one_session(b, info["spec"]) for b in info["plain_batches"]], info["config"])
        t_one: List[float] = []
        for _ in range(rounds):
            fixed.run_pass(t_one, None)
        out["step_s_one"] = median(t_one)
    return with_bound(out)


def with_bound(case: Dict[str, Any]) -> Dict[str, Any]:
    """``case`` with f = 1 - T_one / T_plain and the Amdahl bound 1 / ((1 - f) + f u)."""
    f = max(0.0, 1.0 - case["step_s_one"] * case["samples_per_s_plain"] / case["batch"])
    return dict(case, f=f, bound=1.0 / ((1.0 - f) + f * case["unique_fraction"]))


def _through_plugin(batches: List[Any], config: Any) -> List[Any]:
    from recd_plugin.transforms.dedup import dedup_batch

    if not config.groups:
        return batches
    return [dedup_batch(b, config.spec, aligned=config.is_sharded()) for b in batches]


# ---------------------------------------------------------------------------------------------
# Driver.


def _grid(batch_sizes: List[int]) -> List[Tuple[str, int, bool]]:
    return [(m, b, u) for m in MODELS for b in batch_sizes for u in (False, True)]


def _worker(rank: int, port: int, world: int, grid: List[Tuple[str, int, bool]], steps: int, rounds: int,
            outdir: str, flag_suffix: str = "", hints: bool = False) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=600))
    results = []
    for name, batch, unique in tqdm(grid, desc=f"models, dmp{world} (cases)", disable=rank != 0 or None, leave=False):
        r = run_case(name, batch, unique, steps, rounds, True, rank, world, world > 1, flag_suffix, hints)
        results.append(_reduce(r, world))
    Path(outdir, f"rank{rank}.json").write_text(json.dumps(results))
    dist.destroy_process_group()


def _reduce(r: Dict[str, Any], world: int) -> Dict[str, Any]:
    """Agree over ranks: the slowest rank's step times set the pace; loss diff is the worst."""
    import torch.distributed as dist

    t = torch.tensor([1.0 / r["samples_per_s_plain"], 1.0 / r["samples_per_s_plugin"], r["max_loss_diff"],
                      r["step_s_one"]], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    r = dict(r, samples_per_s_plain=1.0 / float(t[0]), samples_per_s_plugin=1.0 / float(t[1]),
             max_loss_diff=float(t[2]), step_s_one=float(t[3]))
    r["ratio"] = r["samples_per_s_plugin"] / r["samples_per_s_plain"]
    return with_bound(r)


def run_dmp(world: int, grid: List[Tuple[str, int, bool]], steps: int, rounds: int,
            flag_suffix: str = "", hints: bool = False) -> List[Dict[str, Any]]:
    """``grid`` of (model, batch, unique) cases on ``world`` spawned gloo ranks; rank 0's results."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_worker, args=(free_port(), world, grid, steps, rounds, out, flag_suffix, hints), nprocs=world,
                 join=True)
        return json.loads(Path(out, "rank0.json").read_text())


def run(quick: bool = False, json_path: Optional[str] = None, batch_sizes: Optional[List[int]] = None,
        write_docs: bool = True, verbose: bool = False, models: Optional[List[str]] = None,
        modes: Optional[List[str]] = None) -> Dict[str, Any]:
    steps, rounds = (4, 2) if quick else (6, 6)  # timed steps: 8 or 36 per side
    grid = [c for c in _grid(batch_sizes or [1024, 32]) if models is None or c[0] in models]
    cases: List[Dict[str, Any]] = []
    for mode in modes or MODES:
        if mode == "unsharded":
            threads = torch.get_num_threads()
            torch.set_num_threads(1)  # as one rank of the DMP modes
            try:
                unsharded = [c for c in grid if c[0] not in META_MODELS]  # meta tables need DMP
                for name, batch, unique in tqdm(unsharded, desc="models, unsharded (cases)", leave=False, disable=None):
                    cases.append(dict(run_case(name, batch, unique, steps, rounds, False), mode=mode))
            finally:
                torch.set_num_threads(threads)
        else:
            world = int(mode[3])  # dmp1, dmp2, dmp2_hints
            hints = mode.endswith("_hints")
            # A hint can change the plan, and DMP initializes a meta-built table per shard: the
            # two sides would start from other weights (docs/distributed.md). Not a hints case.
            mode_grid = [c for c in grid if not (hints and c[0] in META_MODELS)]
            cases += [dict(c, mode=mode) for c in run_dmp(world, mode_grid, steps, rounds, hints=hints)]
    noise = aa_noise(cases)
    for c in cases:
        c["aa_noise"] = noise.get(c["mode"], float("nan"))
        c["never_slower"] = c["ratio"] >= 1.0 - c["aa_noise"]
    result = {"machine": machine(), "quick": quick, "timed_steps": steps * rounds, "cases": cases,
              "aa_noise": noise}
    _print(result)
    publish("models", _markdown(result), result, json_path, write_docs)
    bad = [c for c in cases if c["max_loss_diff"] > LOSS_TOLERANCE]
    if bad:
        raise SystemExit(f"models benchmark: plugin and plain diverged ({bad[0]['model']}, {bad[0]['mode']}, "
                         f"batch {bad[0]['batch']}: max loss diff {bad[0]['max_loss_diff']:.1e}): a bug, please report it")
    return result


def aa_noise(cases: List[Dict[str, Any]]) -> Dict[str, float]:
    """Per mode, this machine's measurement noise: the largest |1 - ratio| of the cases whose
    decision left every group plain (both sides then run the same model: an A/A comparison)."""
    out: Dict[str, float] = {}
    for c in cases:
        if c["route"] == "plain":
            out[c["mode"]] = max(out.get(c["mode"], 0.0), abs(1.0 - c["ratio"]))
    return out


def _print(result: Dict[str, Any]) -> None:
    print(f"recd-plugin on TorchRec's models, {result['machine']}")
    print(f"{'model':22}{'mode':10}{'batch':>6}{'u':>7}{'route':>7}{'decided':>16}{'ratio':>7}{'A/A':>6}"
          f"{'bound':>7}{'f':>6}{'comm':>7}{'dloss':>9}")
    for c in result["cases"]:
        print(f"{c['model']:22}{c['mode']:10}{c['batch']:6d}{c['unique_fraction']:7.3f}{c['route']:>7}"
              f"{_decided(c):>16}{c['ratio']:7.2f}{c.get('aa_noise', float('nan')):6.2f}"
              f"{c.get('bound', float('nan')):7.2f}{c.get('f', float('nan')):6.2f}"
              f"{c.get('comm_ratio', float('nan')):7.2f}{c['max_loss_diff']:9.1e}")


def _cost(c: Dict[str, Any]) -> float:
    """The measurement's cost share of the case's decision (NaN when it was not measured)."""
    d = c.get("decision") or []
    return d[0].get("cost_share", float("nan")) if d and d[0]["dedup_ms"] == d[0]["dedup_ms"] else float("nan")


def _decided(c: Dict[str, Any]) -> str:
    """The decision's own measurement: 'dedup/plain ms' per step, or why there is none."""
    d = c.get("decision") or []
    if not d:
        return "unmeasured"
    return f"{d[0]['dedup_ms']:.1f}/{d[0]['plain_ms']:.1f}" if d[0]["dedup_ms"] == d[0]["dedup_ms"] else "unmeasured"


def _markdown(result: Dict[str, Any]) -> str:
    cases = result["cases"]
    slower = [c for c in cases if not c["never_slower"]]
    noise = ", ".join(f"{m} {100 * v:.0f}%" for m, v in result["aa_noise"].items())
    missed = ", ".join(f"{c['model']} {c['mode']} {c['batch']} ({c['ratio']:.2f})" for c in slower)
    costs = [_cost(c) for c in cases if _cost(c) == _cost(c)]
    lines = [
        "## TorchRec's models (`recd-plugin bench models" + (" --quick" if result["quick"] else "") + "`)",
        "",
        f"Machine: {result['machine']}. The plugin side is switched on by `recd_plugin.apply` alone, with "
        "a DataLoader (one worker, both sides), and decides its route on its own first training steps "
        "(`recd_plugin.transforms.route`: blocks of deduplicated and plain batches, timed): `decided` is "
        "that measurement, deduplicated / plain ms per step, and `route` what it kept. Then median of "
        f"{result['timed_steps']} timed steps per side ({SMALL_BATCH_ROUNDS * result['timed_steps']} for "
        "batches under 256) after a warm-up pass, sides alternating on the same batches, SGD; every untimed "
        "step's losses compared (`max loss diff`). DMP modes: default planner and sharders, "
        "TrainPipelineSparseDist, gloo, one thread per rank; `dlrm_meta` and `deepfm_meta` are built with "
        "their tables on `meta` (DMP materializes them; DMP modes only, and not `dmp2_hints`: a hint can "
        "change the plan, and so a meta-built table's initial weights); `reads_batch` reads grouped "
        "features of the batch in its own forward (recd_plugin/bench/reads_batch.py). `A/A`: the mode's "
        "measurement noise, the largest |1 - ratio| of its cases left plain (both sides then run the same "
        f"model): {noise or 'no plain case'}. Never slower means ratio >= 1 - A/A: "
        f"{len(cases) - len(slower)} of {len(cases)} cases"
        + (f" (missed: {missed})" if slower else "") + ". "
        "`cost`: what the decision's measurement cost, the steps run on the route that lost times the "
        "difference, as a share of 1,000 steps on the decided route"
        + (f" (at most 2% in {sum(x <= 0.02 for x in costs)} of {len(costs)} measured cases, largest "
           f"{100 * max(costs):.1f}%)" if costs else "") + ". "
        "`f`: 1 - T_one / T_plain measured in each mode (T_one: the plugin's step with every sample's session "
        "features taken from the batch's first sample, U = 1; the route's fixed costs are in it); bound = "
        "1 / ((1 - f) + f u). `comm`: floating-point bytes of the embedding collectives per step, plain / "
        "plugin (dmp2; per-sample tables included, so it stays below the dup factor).",
        "",
        "| model | mode | batch | u | decided (ms) | route | cost | plain samples/s | plugin samples/s | ratio | A/A | f | "
        "bound | ratio / bound | comm | dup factor | max loss diff |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in cases:
        bound = c.get("bound", float("nan"))
        lines.append(
            f"| {c['model']} | {c['mode']} | {c['batch']} | {c['unique_fraction']:.3f} | {_decided(c)} | "
            f"{c['route']} | {100 * _cost(c):.1f}% | {c['samples_per_s_plain']:.0f} | {c['samples_per_s_plugin']:.0f} | {c['ratio']:.2f} | "
            f"{100 * c.get('aa_noise', float('nan')):.0f}% | {c.get('f', float('nan')):.2f} | {bound:.2f} | "
            f"{100 * c['ratio'] / bound:.0f}% | {c.get('comm_ratio', float('nan')):.2f} | {c['dup_factor']:.1f} | "
            f"{c['max_loss_diff']:.1e} |")
    return "\n".join(lines)
