"""Distributed benchmark: plain KJT vs the plugin's aligned IKJT under DMP, 2 ranks on gloo.

``python -m recd_plugin.bench dist [--quick] [--json PATH] [--no-docs]``

Model: the example's user side (``examples/movielens/model.py`` ``UserTower``, light: user id,
profile and mean-pooled history embeddings into an MLP) plus a linear head over its output
and the two dense features, on MovieLens-100k in session order, batch 1024 per rank. Every
sharded table reads a deduplicated feature, so the embedding communication is that of the
deduplicated features. Plugin config: the example's (user features grouped by session, the
user tower as a dedup tower), so the tower's sharded EBC receives a plain KJT of the batch's
unique sessions (padded to the maximum count over ranks) and only the head runs on the
expanded batch.

Each rank builds two ``DistributedModelParallel`` copies of the same weights (TABLE_WISE,
fused EXACT_SGD; dense SGD), one fed plain KJTs and one fed the plugin's aligned IKJTs (built
before timing, as DataLoader workers would; the towers' row-count all_reduce runs inside the
step).
Sides alternate in blocks; samples/s is both ranks' samples over the slower rank's time.
Bytes are counted by ``recd_plugin.bench.comm.CommCounter`` on every collective of a step
(embedding all-to-all / reduce-scatter / all-gather; DDP's gradient all_reduce is the same on
both sides and reported apart; the towers' all_reduce is counted on the plugin side). The
losses of both sides must agree step by step. ``single_process_ratio`` is the same model and
batch in one process with one thread like a rank: plain vs the plugin (unsharded, so with
its ``DedupEmbeddingBagCollection``), on rank 0's batches.
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any, Dict, List

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from recd_plugin.bench.dedup import _example
from recd_plugin.bench.report import free_port, machine, median, publish
from recd_plugin.bench.comm import EMBEDDING_OPS

WORLD = 2
LR = 0.05
LOSS_TOLERANCE = 1e-5
FLAG = ("groups.user.key=session_id; "
        "groups.user.features=user_id,user_age,user_gender,user_occupation,user_zip,history; "
        "towers.user_tower=user")


class UserSide(nn.Module):
    """forward(sparse KJT batch B, dense [B, 2]) -> logits [B]."""

    def __init__(self, card: Dict[str, int], light: bool = True) -> None:
        super().__init__()
        self.user_tower = _example().UserTower(card, 64, small=16, light=light)
        self.head = nn.Linear(64 + 2, 1)

    def forward(self, sparse: Any, dense: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat([self.user_tower(sparse), dense], dim=1)).squeeze(1)


def _data(batch_size: int, steps: int) -> Any:
    from recd_plugin.data import TableBatches, cardinalities, load_movielens_100k

    table = load_movielens_100k()
    batches = TableBatches(table, batch_size)
    return cardinalities(table), [batches[i] for i in range(min(len(batches), steps * WORLD))]


def _step(model: nn.Module, opt: Any, batch: Any) -> float:
    opt.zero_grad()
    loss = nn.functional.binary_cross_entropy_with_logits(model(batch.sparse_features, batch.dense_features),
                                                          batch.labels)
    loss.backward()
    opt.step()
    return loss.item()


def _worker(rank: int, port: int, cfg: Dict[str, Any], outdir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=120))
    from fbgemm_gpu.split_embedding_configs import EmbOptimType
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.sharding_plan import construct_module_sharding_plan, table_wise
    from torchrec.distributed.types import ShardingEnv, ShardingPlan
    from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
    from torchrec.optim.optimizers import in_backward_optimizer_filter

    import recd_plugin
    from recd_plugin import sharding
    from recd_plugin.bench.comm import CommCounter
    from recd_plugin.sparse.ikjt import unique_count
    from recd_plugin.modules.swap import embedding_tables
    from recd_plugin.transforms.dedup import dedup_batch

    card, batches = _data(cfg["batch_size"], cfg["steps"])
    mine = batches[rank::WORLD][: cfg["steps"]]
    torch.manual_seed(0)
    base = UserSide(card, cfg["light"])
    config = recd_plugin.RecDConfig.from_string(FLAG + "; sharded=true")
    shard = sharding.sharders({"optimizer": EmbOptimType.EXACT_SGD, "learning_rate": LR})
    modules = {"user_tower.embeddings": (base.user_tower.embeddings, shard[0])}
    if not cfg["light"]:
        modules["user_tower.sequence"] = (base.user_tower.sequence, shard[1])
    plan = ShardingPlan({path: construct_module_sharding_plan(
        m, per_param_sharding={t: table_wise(rank=i % WORLD, compute_kernel="fused") for i, t in enumerate(embedding_tables(m))},
        sharder=sharder, local_size=WORLD, world_size=WORLD, device_type="cpu") for path, (m, sharder) in modules.items()})

    sides: Dict[str, Any] = {}
    for name in ("plain", "recd"):
        model = copy.deepcopy(base)
        if name == "recd":
            recd_plugin.apply(config, model)
        initial = model.state_dict()
        dmp = DistributedModelParallel(model, env=ShardingEnv.from_process_group(dist.group.WORLD),
                                       device=torch.device("cpu"), plan=plan, sharders=shard)
        dmp.load_state_dict(initial)
        dense = KeyedOptimizerWrapper(dict(in_backward_optimizer_filter(dmp.named_parameters())),
                                      lambda ps: torch.optim.SGD(ps, lr=LR))
        sides[name] = (dmp, CombinedOptimizer([dmp.fused_optimizer, dense]))
    ikjts = [dedup_batch(b, config.spec, aligned=True) for b in mine]  # built off the clock, as in DataLoader workers
    dedup_rows = {f for g in config.groups for f in g.features}  # the features the model reads
    rows = sum(b.sparse_features.stride() * len(dedup_rows) for b in mine)
    unique = sum(unique_count(b.sparse_features, k) for b in ikjts for k in b.sparse_features.keys() if k in dedup_rows)

    def run(name: str, batch: Any) -> float:
        model, opt = sides[name]
        return _step(model, opt, batch)

    res: Dict[str, Any] = {"losses": {"plain": [], "recd": []}, "seconds": {"plain": [], "recd": []},
                           "comm": {}, "samples": sum(b.labels.numel() for b in mine), "dup_factor": rows / unique}
    for name, feed in (("plain", mine), ("recd", ikjts)):  # one counted pass = first training pass
        with CommCounter(record=True) as comm:
            for b in feed:
                res["losses"][name].append(run(name, b))
        res["comm"][name] = {op: n / len(feed) for op, n in comm.by_op.items()}
        res.setdefault("calls_first_step", {})[name] = comm.records[: len(comm.records) // len(feed)]
    for _ in range(cfg["rounds"]):  # timed passes, sides alternating
        for name, feed in (("plain", mine), ("recd", ikjts)):
            dist.barrier()
            t0 = time.perf_counter()
            for b in feed:
                run(name, b)
            dist.barrier()
            res["seconds"][name].append(time.perf_counter() - t0)
    Path(outdir, f"rank{rank}.json").write_text(json.dumps(res))
    dist.destroy_process_group()


def _single_process_ratio(batch_size: int, steps: int, rounds: int, light: bool) -> float:
    import recd_plugin
    from recd_plugin.transforms.dedup import dedup_batch

    card, batches = _data(batch_size, steps)
    batches = batches[::WORLD][:steps]  # rank 0's batches
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as one rank
    torch.manual_seed(0)
    base = UserSide(card, light)
    plain, plug = copy.deepcopy(base), copy.deepcopy(base)
    config = recd_plugin.RecDConfig.from_string(FLAG + "; sharded=false")
    recd_plugin.apply(config, plug)
    ikjts = [dedup_batch(b, config.spec) for b in batches]
    opts = {"plain": torch.optim.SGD(plain.parameters(), lr=LR), "recd": torch.optim.SGD(plug.parameters(), lr=LR)}
    times: Dict[str, List[float]] = {"plain": [], "recd": []}
    for r in range(rounds + 1):
        for name, model, feed in (("plain", plain, batches), ("recd", plug, ikjts)):
            t0 = time.perf_counter()
            for b in feed:
                _step(model, opts[name], b)
            if r:  # the first round warms up
                times[name].append(time.perf_counter() - t0)
    torch.set_num_threads(threads)
    return median(times["plain"]) / median(times["recd"])


#: (variant, light, steps per rank per pass, timed passes): the light model first (its
#: top-level JSON keys), then the transformer over the history (heavier user side).
VARIANTS = {"light": (True, 40, 5), "transformer": (False, 10, 3)}


def run(quick: bool = False, json_path: str | None = None, batch_size: int = 1024, write_docs: bool = True,
        verbose: bool = False) -> Dict[str, Any]:
    _data(batch_size, 1)  # fetch MovieLens once, before the workers start
    variants = {}
    for name, (light, steps, rounds) in VARIANTS.items():
        if quick and not light:
            continue
        cfg = {"batch_size": batch_size, "light": light, "steps": 8 if quick else steps, "rounds": 2 if quick else rounds}
        variants[name] = _variant(cfg, verbose)
    result = {**variants["light"], "variants": variants, "machine": machine()}
    publish("dist", _markdown(result), result, json_path, write_docs)
    return result


def _variant(cfg: Dict[str, Any], verbose: bool) -> Dict[str, Any]:
    port = free_port()
    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(_worker, args=(port, cfg, out), nprocs=WORLD, start_method="spawn")
        ranks = [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(WORLD)]
    worst = max(abs(a - b) for r in ranks for a, b in zip(r["losses"]["plain"], r["losses"]["recd"]))
    if worst > LOSS_TOLERANCE:
        raise SystemExit(f"dist bench: plain and plugin losses differ by {worst:.2e} (> {LOSS_TOLERANCE})")
    samples = sum(r["samples"] for r in ranks)
    # Each pass ends at a barrier: a side's time is the slowest rank's, the same on all ranks.
    sps = {n: samples / median([max(r["seconds"][n][i] for r in ranks) for i in range(cfg["rounds"])])
           for n in ("plain", "recd")}

    def emb_bytes(side: str) -> float:
        return sum(v for r in ranks for op, v in r["comm"][side].items() if op in EMBEDDING_OPS) / WORLD

    other = {n: sum(v for r in ranks for op, v in r["comm"][n].items() if op not in EMBEDDING_OPS) / WORLD
             for n in ("plain", "recd")}
    if verbose:
        print(json.dumps(ranks, indent=1)[:4000])
    return {
        "world_size": WORLD, "batch_size": cfg["batch_size"], "steps_per_rank": cfg["steps"],
        "plain_samples_per_s": sps["plain"], "recd_samples_per_s": sps["recd"], "ratio": sps["recd"] / sps["plain"],
        "single_process_ratio": _single_process_ratio(cfg["batch_size"], cfg["steps"], cfg["rounds"], cfg["light"]),
        "plain_embedding_bytes_per_step": emb_bytes("plain"), "recd_embedding_bytes_per_step": emb_bytes("recd"),
        "comm_ratio": emb_bytes("plain") / emb_bytes("recd"),
        "other_bytes_per_step": other,
        "dup_factor": sum(r["dup_factor"] for r in ranks) / WORLD,
        "max_loss_diff": worst,
    }


def _markdown(result: Dict[str, Any]) -> str:
    rows = []
    for name, r in result["variants"].items():
        rows.append(
            f"| {name} | {r['plain_samples_per_s']:,.0f} | {r['recd_samples_per_s']:,.0f} | {r['ratio']:.2f}x | "
            f"{r['single_process_ratio']:.2f}x | {r['ratio'] / r['single_process_ratio']:.0%} | "
            f"{r['plain_embedding_bytes_per_step']:,.0f} | {r['recd_embedding_bytes_per_step']:,.0f} | "
            f"{r['comm_ratio']:.2f}x | {r['dup_factor']:.1f} | {r['comm_ratio'] / r['dup_factor']:.2f} | "
            f"{r['max_loss_diff']:.1e} |")
    light = result["variants"]["light"]
    return (
        "## Distributed: plain KJT vs the plugin under DistributedModelParallel (`python -m recd_plugin.bench dist`)\n\n"
        f"{WORLD} ranks on gloo (CPU, 1 thread each), TABLE_WISE, fused EXACT_SGD + dense SGD, batch "
        f"{light['batch_size']} per rank, median pass (light: {VARIANTS['light'][1]} steps per rank per pass; "
        f"transformer: {VARIANTS['transformer'][1]}). Model: the example's user side (`UserTower`, light: "
        "mean-pooled history; transformer: the 2-layer encoder over it) plus a linear head, on MovieLens-100k "
        "in session order; every sharded table reads a deduplicated feature. Plugin: the example's flag "
        "(the user tower runs on the batch's unique sessions). Single-process ratio: the same model and "
        "batch in one process with one thread.\n\n"
        "| variant | plain samples/s | plugin samples/s | ratio | single-process ratio | ratio / single "
        "(target >= 80%) | plain emb. bytes/step/rank | plugin emb. bytes/step/rank | comm ratio | dup factor | "
        "comm ratio / dup factor (target >= 0.9) | max loss diff |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n"
        + "\n".join(rows) + "\n\n"
        "Bytes are counted collective by collective (`recd_plugin.bench.comm.CommCounter`): the embedding "
        "all-to-alls (ids, lengths, pooled rows and their gradients). Ids and sequence rows shrink less than "
        "the row count (dup factor = rows / unique rows): a MovieLens user's first session is usually the "
        "longest and has an empty history, so per sample the histories are shorter than per unique session "
        "(`--verbose` lists every collective). Fixed "
        "per-step costs (TorchRec's 5 all-to-alls, the plugin's row-count all_reduce of "
        f"{light['other_bytes_per_step']['recd']:,.0f} B, DDP's gradient all_reduce, not counted here as it "
        "runs in DDP's C++ reducer) do not shrink with deduplication, so the lighter the user side, the "
        f"less of the single-process gain survives at 2 ranks. Machine: {result['machine']}.\n"
    )
