"""The plugin's IKJT through TorchRec's sharded EmbeddingBagCollection (DMP, 2 ranks, CPU/gloo).

Groundwork for issue 4. Each rank holds its own local batch (different per rank, different
batch sizes and different unique counts). The DMP-sharded EBC fed the IKJT that
``recd_plugin.build_ikjt`` makes must give the pooled outputs that the unsharded EBC gives
on the plain KJT of the same local batch, and one fused EXACT_SGD step must move the
sharded weights exactly as SGD on the sum of both ranks' reference gradients divided by the
world size (TorchRec's pooled-embedding comm backward divides the gradients by the world size).

The passing configurations: TABLE_WISE, COLUMN_WISE (unequal per-rank unique counts are
fine), ROW_WISE (needs a sharder that lists it for "cpu" when the planner is used, and equal
per-rank strides per key on gloo: ``recd_plugin.sharding.pad.pad_to_max_over_ranks`` pads with empty bags). The last tests pin
down what TorchRec 1.8 refuses, with its own error messages, so a change shows up here.

Every multi-process run is a subprocess (``python this_file.py CASE OUTDIR``) that
``mp.spawn``s 2 gloo workers, bounded by the hang guard of two_ranks.py (no speed limit).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, List

import pytest
from two_ranks import PG_TIMEOUT, WORLD, main, reporting, run
import torch


ROOT = Path(__file__).resolve().parents[1]
LR = 0.1
# name, features, rows. t_user is shared by two features of the deduplicated group.
TABLES = [("t_session", ["session_id"], 40), ("t_user", ["user_id", "history"], 60), ("t_item", ["item_id"], 50)]
KEYS = ["session_id", "user_id", "history", "item_id"]


# ------------------------------------------------------------------------------------------
# Worker side (runs in the spawned processes).


def make_batch(seed: int, batch: int, n_sessions: int):
    """Plain KJT: ``n_sessions`` distinct sessions over ``batch`` samples; user features
    (user_id, history) are constant per session, item_id is per sample."""
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    g = torch.Generator().manual_seed(seed)
    pool = torch.randperm(40, generator=g)[:n_sessions]
    idx = torch.cat([torch.arange(n_sessions), torch.randint(0, n_sessions, (batch - n_sessions,), generator=g)])
    sessions = pool[idx[torch.randperm(batch, generator=g)]].tolist()
    vals: Dict[str, List[int]] = {k: [] for k in KEYS}
    lens: Dict[str, List[int]] = {k: [] for k in KEYS}
    for s in sessions:
        gs = torch.Generator().manual_seed(1000 + s)
        user = int(torch.randint(0, 60, (1,), generator=gs))
        hist = torch.randint(0, 60, (int(torch.randint(0, 4, (1,), generator=gs)),), generator=gs).tolist()
        items = torch.randint(0, 50, (int(torch.randint(1, 3, (1,), generator=g)),), generator=g).tolist()
        for k, v in (("session_id", [s]), ("user_id", [user]), ("history", hist), ("item_id", items)):
            vals[k] += v
            lens[k].append(len(v))
    return KeyedJaggedTensor(keys=KEYS, values=torch.tensor(sum((vals[k] for k in KEYS), []), dtype=torch.long),
                             lengths=torch.tensor(sum((lens[k] for k in KEYS), []), dtype=torch.int32))


def _ebc(device: str):
    from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, PoolingType

    class Model(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ebc = EmbeddingBagCollection(device=torch.device(device), tables=[
                EmbeddingBagConfig(name=n, feature_names=f, num_embeddings=r, embedding_dim=8, pooling=PoolingType.SUM)
                for n, f, r in TABLES])

        def forward(self, kjt):
            return self.ebc(kjt)

    return Model()


def _local_shards(value):
    """[(row offset, col offset, tensor)] of this rank's part of a sharded state_dict entry."""
    if hasattr(value, "local_shards"):
        return [(s.metadata.shard_offsets[0], s.metadata.shard_offsets[1], s.tensor) for s in value.local_shards()]
    if hasattr(value, "to_local"):  # DTensor (not produced in these configurations so far)
        raise NotImplementedError("DTensor state_dict entries")
    return [(0, 0, value)]


def worker(rank: int, port: int, case: dict, outdir: str) -> None:
    import torch.distributed as dist

    with reporting(rank, outdir) as res:
        os.environ["MASTER_ADDR"] = "127.0.0.1"
        os.environ["MASTER_PORT"] = str(port)
        dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=PG_TIMEOUT)
        from fbgemm_gpu.split_embedding_configs import EmbOptimType
        from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
        from torchrec.distributed.model_parallel import DistributedModelParallel
        from torchrec.distributed.sharding_plan import column_wise, construct_module_sharding_plan, row_wise, table_wise
        from torchrec.distributed.types import ShardingEnv, ShardingPlan, ShardingType

        from recd_plugin import DedupSpec, FeatureGroup, build_ikjt
        from recd_plugin.sharding.pad import pad_to_max_over_ranks

        class CPURowWiseSharder(EmbeddingBagCollectionSharder):
            """The stock sharder offers ROW_WISE / TABLE_ROW_WISE only for cuda; this test adds both on cpu."""

            def sharding_types(self, compute_device_type: str) -> List[str]:
                types = super().sharding_types(compute_device_type)
                if compute_device_type == "cpu":
                    types = types + [ShardingType.ROW_WISE.value, ShardingType.TABLE_ROW_WISE.value]
                return types

        torch.manual_seed(0)
        ref = _ebc("cpu")  # same seed on every rank -> same weights
        sharder = CPURowWiseSharder(fused_params={"optimizer": getattr(EmbOptimType, case.get("optimizer", "EXACT_SGD")),
                                                  "learning_rate": LR})
        kernel = case.get("kernel", "fused")
        per_table = {
            "table_wise": lambda i: table_wise(rank=i % WORLD, compute_kernel=kernel),
            "column_wise": lambda i: column_wise(ranks=list(range(WORLD)), compute_kernel=kernel),
            "row_wise": lambda i: row_wise(compute_kernel=kernel),
        }[case["sharding"]]
        module_plan = construct_module_sharding_plan(
            ref.ebc, per_param_sharding={name: per_table(i) for i, (name, _, _) in enumerate(TABLES)},
            sharder=sharder, local_size=WORLD, world_size=WORLD, device_type="cpu")
        dmp = DistributedModelParallel(_ebc("meta"), env=ShardingEnv.from_process_group(dist.group.WORLD),
                                       device=torch.device("cpu"), plan=ShardingPlan({"ebc": module_plan}),
                                       sharders=[sharder])
        dmp.load_state_dict(ref.state_dict())
        res["sharding_types"] = sorted({ps.sharding_type for ps in module_plan.values()})
        spec = DedupSpec([FeatureGroup("user", ["user_id", "history"], key="session_id")])

        res["steps"] = []
        for step, mode in enumerate(case["modes"]):
            batches = [make_batch(100 + 10 * step + r, case["batch"][r], case["unique"][r]) for r in range(WORLD)]
            local = batches[rank]
            inp = local if mode == "plain" else build_ikjt(local, spec)
            if mode == "ikjt_pad":
                inp = pad_to_max_over_ranks(inp)
            info = {"mode": mode, "stride_per_key": inp.stride_per_key()}
            res["steps"].append(info)
            out = dmp(inp)
            got = out.to_dict()
            info["out_keys"] = list(out.keys())
            want = {k: v.detach() for k, v in ref(local).to_dict().items()}
            info["out_shape"] = {k: list(v.shape) for k, v in got.items()}
            info["out_maxdiff"] = max(float((got[k].detach() - want[k]).abs().max()) for k in want)
            sum(v.sum() for v in got.values()).backward()  # fused EXACT_SGD step in backward
            # Reference: SGD on the average of both ranks' gradients of the same sum loss.
            ref.zero_grad()
            for b in batches:
                sum(v.sum() for v in ref(b).to_dict().values()).backward()
            with torch.no_grad():
                info["sgd_update_max"] = max(float((LR * p.grad / WORLD).abs().max()) for p in ref.parameters())
                for p in ref.parameters():
                    p -= LR * p.grad / WORLD
            ref_sd = ref.state_dict()
            worst = 0.0
            for key, value in dmp.state_dict().items():
                full = ref_sd[key]
                for r0, c0, t in _local_shards(value):
                    expect = full[r0:r0 + t.shape[0], c0:c0 + t.shape[1]]
                    worst = max(worst, float((t - expect).abs().max()))
            info["weight_maxdiff"] = worst
        dist.barrier()


# ------------------------------------------------------------------------------------------
# Test side.


def _run(case: dict, tmp_path: Path) -> List[dict]:
    return run(__file__, case, tmp_path, require_ok=False)


def _ok(results: List[dict]) -> List[dict]:
    for res in results:
        assert res["ok"], f"rank {res['rank']}: {res.get('error')}\n{res.get('traceback', '')}"
    return results


# Local batch sizes and unique session counts differ per rank on purpose.
BATCH, UNIQUE = [8, 6], [2, 5]


@pytest.mark.parametrize("sharding,mode", [
    ("table_wise", "ikjt"),
    ("column_wise", "ikjt"),
    ("row_wise", "ikjt_pad"),  # gloo: equal per-rank strides per key needed (see below)
])
def test_sharded_ikjt_matches_unsharded_plain_outputs_and_sgd_steps(sharding, mode, tmp_path) -> None:
    results = _ok(_run({"sharding": sharding, "modes": [mode, mode], "batch": BATCH, "unique": UNIQUE}, tmp_path))
    for res in results:
        assert res["sharding_types"] == [sharding]
        b, u = BATCH[res["rank"]], UNIQUE[res["rank"]]
        for step in res["steps"]:
            strides = dict(zip(KEYS, step["stride_per_key"]))
            if mode == "ikjt":  # the IKJT really carries only the unique rows of the user group
                assert strides == {"session_id": u, "user_id": u, "history": u, "item_id": b}, strides
            else:  # padded to the maximum over ranks
                assert strides == {"session_id": max(UNIQUE), "user_id": max(UNIQUE), "history": max(UNIQUE),
                                   "item_id": max(BATCH)}, strides
            # the sharded module expands to the local batch; key order may differ -> by key
            assert sorted(step["out_keys"]) == sorted(KEYS)
            assert step["out_shape"] == {k: [b, 8] for k in step["out_keys"]}
            assert step["out_maxdiff"] < 1e-5, step
            assert step["weight_maxdiff"] < 1e-5, step
            assert step["sgd_update_max"] > 0.05, step  # the step really moved the weights


def test_row_wise_unpadded_ikjt_forward_matches(tmp_path) -> None:
    """ROW_WISE with equal per-rank unique counts and batch sizes needs no padding."""
    results = _ok(_run({"sharding": "row_wise", "modes": ["ikjt"], "batch": [8, 8], "unique": [3, 3]}, tmp_path))
    for res in results:
        step = res["steps"][0]
        assert step["stride_per_key"] == [3, 3, 3, 8]
        assert step["out_maxdiff"] < 1e-5 and step["weight_maxdiff"] < 1e-5, step


# ---- What TorchRec 1.8 refuses (the plugin must avoid or check these up front). ----------


def _errors(results: List[dict]) -> List[str]:
    assert not any(res["ok"] for res in results), results
    return [res["error"] for res in results]


def test_row_wise_unequal_per_rank_unique_counts_fail_on_gloo(tmp_path) -> None:
    errors = _errors(_run({"sharding": "row_wise", "modes": ["ikjt"], "batch": BATCH, "unique": UNIQUE}, tmp_path))
    # forward works; the reduce-scatter's backward all_gathers unequal sizes
    assert all("ProcessGroupGloo::allgather: invalid tensor size" in e for e in errors), errors


def test_plain_batch_then_ikjt_fails(tmp_path) -> None:
    errors = _errors(_run({"sharding": "table_wise", "modes": ["plain", "ikjt"], "batch": [8, 8], "unique": [3, 3]},
                          tmp_path))
    assert all("variable batch dist is not initialized" in e for e in errors), errors


def test_non_vbe_optimizer_fails_on_first_ikjt(tmp_path) -> None:
    errors = _errors(_run({"sharding": "table_wise", "optimizer": "EXACT_ADAGRAD", "modes": ["ikjt"],
                           "batch": [8, 8], "unique": [3, 3]}, tmp_path))
    assert all("Variable batch size TBE support is enabled for" in e for e in errors), errors


if __name__ == "__main__":
    main(worker)
