"""``python -m recd_plugin.bench des``: DES vs TorchRec table-wise / row-wise, 2 ranks on gloo.

Spawns 2 processes (gloo, CPU, one thread each). For the FM and the DeepFM example models
(examples/criteo/models.py: 26 sum-pooled fields of dimension D plus 26 one-dim wide tables;
DeepFM's first layer H = 32 over [13 dense, 26 x D]) on synthetic Criteo-like data
(``recd_plugin.data.criteo``), the same initial weights are sharded three ways (see
``des_sides``) and trained side by side with SGD on the same batches, the sides alternating
step by step. Reported per model and side:

* bytes per step per rank: everything torch.distributed moves in one training step
  (forward, backward, optimizer; ids, embeddings / partials, DDP all-reduce), counted by
  ``CommCounter`` (bytes a rank sends to other ranks), mean of the two ranks; and its
  embedding traffic alone: the floating-point tensors of the all-to-alls, reduce-scatters
  and all-gathers (pooled embeddings or partial results, forward and backward), the scope of
  the analytic saving below;
* samples/s: global batch / median step time (after warm-up);
* max |output - unsharded| on a held-out batch before training;
* AUC on held-out batches after the short training run.

JSON keys: ``fm_comm_saving`` / ``deepfm_comm_saving`` (1 - DES bytes / TorchRec table-wise
bytes), ``fm_embedding_saving`` / ``deepfm_embedding_saving`` (the same on embedding traffic),
``speed_ratio`` (DES samples/s / best TorchRec side, the lower of FM and DeepFM; DES with its
tables fused like TorchRec's, EXACT_SGD), ``speed_ratio_sparse`` (the same for DES with sparse
gradients and torch's SGD),
``auc_diff`` (largest |AUC_DES - AUC_TorchRec| over models and sides), and ``fm`` / ``deepfm``
details. The analytic saving on the embedding traffic alone is 1 - (D + 2) / (F * D) for
FM and 1 - (D + 2 + H) / (F * D) for DeepFM (ids and dense all-reduces excluded).
Both sides run with MALLOC_ENV (report.py).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from recd_plugin.bench.report import free_port, machine, median, publish
from recd_plugin.bench.comm import EMBEDDING_OPS

WORLD = 2
FIELDS = 26


def _bench_model(name: str, cfg: Dict[str, Any], rank: int) -> Dict[str, Any]:
    import torch.distributed as dist

    from recd_plugin.bench.des_sides import SIDES, auc, build_side, example_models
    from recd_plugin.data.criteo import criteo_arrays, to_batch
    from recd_plugin.des import balanced_placement
    from recd_plugin.bench.comm import CommCounter

    models = example_models()
    d, h, rows, b = cfg["dim"], cfg["hidden"], cfg["max_rows"], cfg["batch_size"]

    def make_model() -> torch.nn.Module:
        torch.manual_seed(cfg["seed"])
        if name == "fm":
            return models.FMModel(embedding_dim=d, max_rows=rows)
        return models.DeepFMModel(embedding_dim=d, hidden=h, max_rows=rows)

    ref = make_model()
    placement = balanced_placement(ref.sparse.tables, WORLD)
    sides = {s: build_side(s, make_model, placement, cfg["lr"]) for s in SIDES}

    def local(seed: int) -> Any:  # rank r's half of a global batch of 2B
        cols = criteo_arrays(WORLD * b, seed, rows)
        return to_batch({k: v[rank * b:(rank + 1) * b] for k, v in cols.items()})

    steps = cfg["warmup"] + cfg["steps"]
    train = [local(cfg["seed"] * 7919 + i) for i in range(steps)]
    evals = [local(10_000_019 + i) for i in range(cfg["eval_batches"])]
    res: Dict[str, Any] = {"sides": {}}
    with torch.no_grad():
        want = ref(evals[0].dense_features, evals[0].sparse_features)
        diff = max(float((dmp(evals[0].dense_features, evals[0].sparse_features) - want).abs().max())
                   for dmp, _ in sides.values())
    times: Dict[str, List[float]] = {s: [] for s in SIDES}
    comm: Dict[str, Dict[str, int]] = {}
    emb: Dict[str, int] = {}
    for i, batch in enumerate(train):
        order = SIDES[i % len(SIDES):] + SIDES[: i % len(SIDES)]  # alternate: the machine's speed drifts
        for s in order:
            dist.barrier()
            counter = CommCounter()
            start = time.perf_counter()
            if i == 0:
                with counter:
                    sides[s][1](batch.dense_features, batch.sparse_features, batch.labels)
                comm[s] = dict(counter.by_op)
                emb[s] = sum(v for op, v in counter.float_by_op.items() if op in EMBEDDING_OPS)
            else:
                sides[s][1](batch.dense_features, batch.sparse_features, batch.labels)
            if i >= cfg["warmup"]:
                times[s].append(time.perf_counter() - start)
    for s in SIDES:
        with torch.no_grad():
            scores = torch.cat([sides[s][0](e.dense_features, e.sparse_features) for e in evals])
        labels = torch.cat([e.labels for e in evals])
        gathered: List[Any] = [None] * WORLD
        dist.all_gather_object(gathered, (scores, labels))
        by_rank = torch.tensor([sum(comm[s].values()), emb[s]], dtype=torch.float64)
        dist.all_reduce(by_rank)
        step_t = torch.tensor([median(times[s])], dtype=torch.float64)
        dist.all_reduce(step_t, op=dist.ReduceOp.MAX)
        ids = torch.tensor([comm[s].get("all_to_all_single", 0)], dtype=torch.float64)
        dist.all_reduce(ids)  # DES's only all-to-all carries the ids
        res["sides"][s] = {
            "bytes_per_step": float(by_rank[0]) / WORLD,
            "embedding_bytes_per_step": float(by_rank[1]) / WORLD,
            "all_to_all_bytes_per_step": float(ids) / WORLD,
            "bytes_by_op_rank0": comm[s] if rank == 0 else None,
            "samples_per_s": WORLD * b / float(step_t),
            "step_ms": 1000 * float(step_t),
            "auc": auc(torch.cat([g[0] for g in gathered]), torch.cat([g[1] for g in gathered])),
        }
    diff_t = torch.tensor([diff])
    dist.all_reduce(diff_t, op=dist.ReduceOp.MAX)
    res["max_output_diff"] = float(diff_t)
    sd = res["sides"]
    res["comm_saving_vs_table_wise"] = 1 - sd["des"]["bytes_per_step"] / sd["table_wise"]["bytes_per_step"]
    res["comm_saving_vs_row_wise"] = 1 - sd["des"]["bytes_per_step"] / sd["row_wise"]["bytes_per_step"]
    res["embedding_saving_vs_table_wise"] = (1 - sd["des"]["embedding_bytes_per_step"]
                                             / sd["table_wise"]["embedding_bytes_per_step"])
    k = d + 2 + (h[0] if name == "deepfm" else 0)
    res["analytic_embedding_saving"] = 1 - k / (FIELDS * d)
    res["speed_ratio"] = sd["des"]["samples_per_s"] / max(sd["table_wise"]["samples_per_s"], sd["row_wise"]["samples_per_s"])
    res["speed_ratio_sparse"] = sd["des_sparse"]["samples_per_s"] / max(sd["table_wise"]["samples_per_s"],
                                                                         sd["row_wise"]["samples_per_s"])
    res["auc_diff"] = max(abs(sd[d]["auc"] - sd[s]["auc"]) for d in ("des", "des_sparse") for s in ("table_wise", "row_wise"))
    res["placement"] = {r: sorted(t for t, p in placement.items() if p == r) for r in range(WORLD)}
    return res


def worker(rank: int, port: int, cfg: Dict[str, Any], out: str) -> None:
    import torch.distributed as dist

    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)  # 2 processes on a 2-core machine
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=120))
    result = {name: _bench_model(name, cfg, rank) for name in ("fm", "deepfm")}
    if rank == 0:
        Path(out).write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


def run(quick: bool = False, json_path: Optional[str] = None, batch_size: int = 1024, seed: int = 0,
        write_docs: bool = True, verbose: bool = False) -> Dict[str, Any]:
    import torch.multiprocessing as mp

    cfg = {"dim": 16, "hidden": [32, 16], "max_rows": 20_000 if quick else 100_000, "batch_size": batch_size,
           "lr": 0.5, "seed": seed, "warmup": 2, "steps": 6 if quick else 60, "eval_batches": 2 if quick else 8}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "des.json"
        mp.spawn(worker, args=(free_port(), cfg, str(out)), nprocs=WORLD, join=True)
        per_model = json.loads(out.read_text())
    fm, deepfm = per_model["fm"], per_model["deepfm"]
    result = {
        "fm_comm_saving": fm["comm_saving_vs_table_wise"],
        "deepfm_comm_saving": deepfm["comm_saving_vs_table_wise"],
        "fm_embedding_saving": fm["embedding_saving_vs_table_wise"],
        "deepfm_embedding_saving": deepfm["embedding_saving_vs_table_wise"],
        "speed_ratio": min(fm["speed_ratio"], deepfm["speed_ratio"]),
        "speed_ratio_sparse": min(fm["speed_ratio_sparse"], deepfm["speed_ratio_sparse"]),
        "auc_diff": max(fm["auc_diff"], deepfm["auc_diff"]),
        "fm": fm, "deepfm": deepfm, "config": cfg, "quick": quick, "machine": machine(),
    }
    if verbose:
        print(json.dumps(result, indent=2))
    md = _markdown(result)
    publish("des", md, result, json_path, write_docs)
    return result


def _markdown(r: Dict[str, Any]) -> str:
    cfg = r["config"]
    lines = [
        "## DES: partial-result aggregation vs TorchRec sharding (2 ranks, gloo)\n",
        f"Command: `python -m recd_plugin.bench des{' --quick' if r['quick'] else ''}`. Synthetic Criteo-like data "
        f"(26 sparse fields capped at {cfg['max_rows']:,} rows, 13 dense), D = {cfg['dim']}, DeepFM MLP "
        f"{cfg['hidden']} (first layer H = {cfg['hidden'][0]}), batch {cfg['batch_size']} per rank, SGD lr {cfg['lr']}, "
        f"{cfg['warmup']} warm-up + {cfg['steps']} timed training steps, sides alternating; table-wise placement "
        "identical for DES and TorchRec. Bytes: all that torch.distributed sends per rank and training step "
        "(`CommCounter`: ids, embeddings or partials, gradients, DDP all-reduce).\n",
        "| model | side | bytes/step/rank | of which embedding traffic | samples/s | AUC |", "|---|---|---|---|---|---|",
    ]
    for m in ("fm", "deepfm"):
        for s, v in r[m]["sides"].items():
            lines.append(f"| {m} | {s} | {v['bytes_per_step']:,.0f} | {v['embedding_bytes_per_step']:,.0f} | "
                         f"{v['samples_per_s']:,.0f} | {v['auc']:.4f} |")
    lines.append("")
    for m, label in (("fm", "FM"), ("deepfm", "DeepFM")):
        x = r[m]
        des = x["sides"]["des"]
        lines += [
            f"- {label}: DES sends {100 * x['comm_saving_vs_table_wise']:.1f}% fewer bytes than TorchRec table-wise "
            f"({100 * x['comm_saving_vs_row_wise']:.1f}% fewer than row-wise). Of DES's bytes, "
            f"{100 * des['all_to_all_bytes_per_step'] / des['bytes_per_step']:.0f}% are ids (they travel to the owning "
            "rank in both designs).",
            f"  - Embedding traffic alone (float tensors of the all-to-alls, reduce-scatters, all-gathers): "
            f"{100 * x['embedding_saving_vs_table_wise']:.1f}% fewer; analytic {100 * x['analytic_embedding_saving']:.1f}% "
            "(at 2 ranks table-wise keeps each owner's fields local, which the analytic F x D does not count).",
            f"  - {x['speed_ratio']:.2f}x the samples/s of the best TorchRec side with DES's tables fused like "
            f"TorchRec's (EXACT_SGD in backward; {x['speed_ratio_sparse']:.2f}x with sparse gradients and torch's SGD); "
            "max output difference vs unsharded "
            f"{x['max_output_diff']:.1e}; |AUC difference| {x['auc_diff']:.1e}.",
        ]
    lines.append(f"\nMachine: {r['machine']} (each rank 1 thread).")
    return "\n".join(lines) + "\n"
