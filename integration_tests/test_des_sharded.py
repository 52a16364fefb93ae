"""Sharded DES (DMP + DESSharder, 2 ranks, CPU/gloo) equals the unsharded operators.

Every rank builds the same unsharded ``DESEmbeddingOperators`` (same seed) with FM, wide and
first-dense-layer operators over multi-hot features, shards it with
``DistributedModelParallel(plan={"sparse": des_plan(...)}, sharders=[DESSharder()])`` and
feeds its own local batch (batch sizes differ per rank; the global batch is odd). Checked:

* outputs: each rank's sharded outputs == the unsharded module on that rank's batch;
* gradients: every local parameter's gradient == the gradient of ``(1/W) * sum_r loss_r``
  computed unsharded over both ranks' batches (the DMP + DDP / TorchRec convention), for the
  table slices this rank owns, its W_f blocks and the replicated operator parameters.

Placements: uneven table-wise (rank 0 owns more tables), and a mix with row-wise tables
(multi-hot bags whose ids fall in both row ranges: the FM's ||v_f||^2 must stay exact).
The last test runs ``python -m recd_plugin.bench des --quick`` and checks its JSON keys.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import List

from two_ranks import HANG_GUARD_S, PG_TIMEOUT, WORLD, main, reporting, run
import torch


ROOT = Path(__file__).resolve().parents[1]
FEATURES = ["a", "b", "c", "d"]
ROWS = {"a": 11, "b": 7, "c": 13, "d": 5}
DIM, HIDDEN, DENSE_IN = 4, 3, 2
LR, EPS = 0.1, 1e-8  # fused tables' learning rate and Adagrad epsilon


def build_module():
    from torchrec import EmbeddingBagConfig

    from recd_plugin.des import DESEmbeddingOperators, FactorizationMachine, FirstDenseLayer, WideLinear

    torch.manual_seed(0)
    tables = [EmbeddingBagConfig(name=f"t_{f}", feature_names=[f], num_embeddings=ROWS[f], embedding_dim=DIM) for f in FEATURES]
    tables += [EmbeddingBagConfig(name=f"w_{f}", feature_names=[f], num_embeddings=ROWS[f], embedding_dim=1) for f in FEATURES]
    fm = [f"t_{f}" for f in FEATURES]
    ops = {"fm": FactorizationMachine(fm), "wide": WideLinear([f"w_{f}" for f in FEATURES]),
           "first": FirstDenseLayer(fm, DIM, HIDDEN, dense_in_features=DENSE_IN)}
    module = DESEmbeddingOperators(tables, ops)
    with torch.no_grad():
        ops["wide"].bias.fill_(0.3)
    return module


def make_batch(seed: int, batch: int):
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, 4, (len(FEATURES), batch), generator=g)  # multi-hot, empty bags too
    values = torch.cat([torch.randint(0, ROWS[f], (int(lengths[i].sum()),), generator=g) for i, f in enumerate(FEATURES)])
    kjt = KeyedJaggedTensor(keys=FEATURES, values=values, lengths=lengths.reshape(-1).int())
    return kjt, torch.randn(batch, DENSE_IN, generator=g)


def _loss(out, seed: int):
    g = torch.Generator().manual_seed(seed)
    return sum((v * torch.randn(v.shape, generator=g)).sum() for _, v in sorted(out.items()))


def worker(rank: int, port: int, case: dict, outdir: str) -> None:
    import torch.distributed as dist

    with reporting(rank, outdir) as res:
        os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
        dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=PG_TIMEOUT)
        from torchrec.distributed.model_parallel import DistributedModelParallel
        from torchrec.distributed.types import ShardingEnv, ShardingPlan

        from torchrec.optim.optimizers import in_backward_optimizer_filter

        from recd_plugin.des import DESSharder, des_plan
        from recd_plugin.bench.comm import CommCounter

        class Wrap(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.sparse = build_module()

            def forward(self, kjt, dense):
                return self.sparse(kjt, dense)

        def run_case(placement, fused=None):
            one: dict = {}
            ref = build_module()
            plan = des_plan(ref, placement, world_size=WORLD)
            fused_params = None
            if fused is not None:
                from fbgemm_gpu.split_embedding_configs import EmbOptimType
                fused_params = {"optimizer": getattr(EmbOptimType, fused), "learning_rate": LR, "eps": EPS}
            dmp = DistributedModelParallel(Wrap(), env=ShardingEnv.from_process_group(dist.group.WORLD),
                                           device=torch.device("cpu"), plan=ShardingPlan({"sparse": plan}),
                                           sharders=[DESSharder(fused_params=fused_params)])
            sharded = dmp.module.sparse
            one["sharded_type"] = type(sharded).__name__
            batches = [make_batch(10 + r, case["batch"][r]) for r in range(WORLD)]
            kjt, dense = batches[rank]
            with CommCounter() as comm:
                out = dmp(kjt, dense)
                _loss(out, 100 + rank).backward()
            one["comm"], one["float_comm"] = dict(comm.by_op), dict(comm.float_by_op)
            want = ref(kjt, dense)
            one["out_shape"] = {k: list(v.shape) for k, v in out.items()}
            one["out_maxdiff"] = max(float((out[k] - want[k]).abs().max()) for k in want)
            # reference gradients: of (1/W) * sum_r loss_r, unsharded
            ref.zero_grad()
            sum(_loss(ref(*batches[r]), 100 + r) for r in range(WORLD)).div(WORLD).backward()
            diffs = {}
            momentum = {k.split(".")[-1]: v["momentum1"] for k, v in dmp.fused_optimizer.state_dict()["state"].items()
                        if "momentum1" in v}
            one["fused_state"] = sorted(momentum)
            one["dense_optimizer_params"] = sorted(n for n, _ in in_backward_optimizer_filter(dmp.named_parameters()))
            for table, (lo, hi) in sharded.owned_rows().items():
                got = sharded.local_table(table)
                w0, g = ref.ebc.embedding_bags[table].weight.detach()[lo:hi], ref.ebc.embedding_bags[table].weight.grad[lo:hi]
                if fused is not None and got.shape[1] % 4 == 0:  # updated in backward: compare the new weights
                    if fused == "EXACT_SGD":
                        want = w0 - LR * g
                    else:  # row-wise Adagrad from zero state: m = mean(g^2) per row
                        m = g.pow(2).mean(dim=1)
                        want = w0 - LR * g / (m.sqrt() + EPS).unsqueeze(1)
                        off = sharded._row_offset[table]
                        diffs[f"momentum:{table}"] = float((momentum[f"dim{got.shape[1]}"][off:off + hi - lo] - m).abs().max())
                    diffs[f"updated:{table}"] = float((got.detach() - want).abs().max())
                    continue
                grad = sharded.local_weights[f"dim{got.shape[1]}"].grad.to_dense()
                off = sharded._row_offset[table]
                diffs[f"table:{table}"] = float((grad[off:off + hi - lo] - g).abs().max())
                diffs[f"weight:{table}"] = float((got.detach() - w0).abs().max())
            first = ref.operators["first"].field_weight.grad
            plan_first = sharded._plan["first"]
            if plan_first["tw"]:
                diffs["first_local"] = float((sharded.first_local["first"].grad - first[:, [i for i, _ in plan_first["tw"]]]).abs().max())
            if plan_first["rw"]:
                diffs["first_row_wise"] = float((sharded.first_row_wise["first"].grad - first[:, [i for i, _ in plan_first["rw"]]]).abs().max())
            for name, p in sharded.operators.named_parameters():
                diffs[f"op:{name}"] = float((p.grad - dict(ref.operators.named_parameters())[name].grad).abs().max())
            one["grad_maxdiff"] = diffs
            if momentum:  # loading the fused optimizer's state writes into the TBE (checkpoint resume)
                sd = dmp.fused_optimizer.state_dict()
                dmp.fused_optimizer.load_state_dict({**sd, "state": {k: {n: torch.full_like(t, 7.0) for n, t in v.items()}
                                                                     for k, v in sd["state"].items()}})
                one["momentum_after_load"] = float(sharded._tbes[DIM].momentum1_host.max())
            one["ref_grad_scale"] = float(max(p.grad.abs().max() for p in ref.parameters()))
            return one

        def shard_by_flag(flag: str, root: torch.nn.Module, converted: torch.nn.Module):
            """The user's route: the flag's des section, apply (to ``converted``, in place, inside
            ``root``), for_dmp, TorchRec's planner, DMP over ``root``; (dmp, plan, setup)."""
            import recd_plugin
            from recd_plugin import sharding
            from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology

            config = recd_plugin.RecDConfig.from_string(flag)
            assert recd_plugin.apply(config, converted, None)[0] is converted
            setup = sharding.for_dmp(converted, config, batch_size=max(case["batch"]), compute_device="cpu")
            planner = EmbeddingShardingPlanner(topology=Topology(world_size=WORLD, compute_device="cpu"),
                                               constraints=setup.constraints)
            plan = planner.collective_plan(root, setup.sharders, dist.group.WORLD)
            setup.check(plan)
            dmp = DistributedModelParallel(root, env=ShardingEnv.from_process_group(dist.group.WORLD),
                                           device=torch.device("cpu"), plan=plan, sharders=setup.sharders)
            return dmp, plan, setup

        def flag_case(flag: str) -> dict:
            ref, model = build_module(), Wrap()
            dmp, plan, setup = shard_by_flag(flag, model, model)
            kjt, dense = make_batch(10 + rank, case["batch"][rank])
            with CommCounter() as comm:
                out = dmp(kjt, dense)
            want = ref(kjt, dense)
            return {"sharded_type": type(dmp.module.sparse).__name__, "plan_modules": sorted(plan.plan),
                    "sharding_types": sorted({ps.sharding_type for ps in plan.plan["sparse"].values()}),
                    "out_maxdiff": max(float((out[k] - want[k]).abs().max()) for k in want),
                    "comm": dict(comm.by_op), "explain": setup.explain(plan)}

        def pipeline_case(flag: str) -> dict:
            """The flag route under TorchRec's TrainPipelineSparseDist (input all-to-alls one batch
            ahead), as a user's script trains: the same losses as a plain loop over the same DMP
            model and batches, step by step (both sharded the same way from the same weights)."""
            from torchrec.datasets.utils import Batch
            from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

            class Step(torch.nn.Module):  # forward(batch) -> (loss, output), what the pipeline runs
                def __init__(self) -> None:
                    super().__init__()
                    self.model = Wrap()

                def forward(self, batch):
                    out = self.model(batch.sparse_features, batch.dense_features)
                    pred = out["fm"].sum(dim=1) + out["wide"].sum(dim=1) + out["first"].sum(dim=1)  # fx-traceable
                    loss = ((pred - batch.labels) ** 2).mean()
                    return loss, loss.detach()

            batches = []
            for i in range(4):
                kjt, dense = make_batch(100 + 10 * i + rank, case["batch"][rank])
                batches.append(Batch(dense_features=dense, sparse_features=kjt,
                                     labels=torch.rand(case["batch"][rank], generator=torch.Generator().manual_seed(i))))
            losses = {}
            for route in ("loop", "pipeline"):
                step_model = Step()
                dmp, _, _ = shard_by_flag(flag, step_model, step_model.model)
                opt = torch.optim.SGD(dict(in_backward_optimizer_filter(dmp.named_parameters())).values(), lr=0.05)
                got = []
                if route == "loop":
                    for b in batches:
                        opt.zero_grad()
                        loss, _ = dmp(b)
                        loss.backward()
                        opt.step()
                        got.append(float(loss))
                else:
                    pipeline = TrainPipelineSparseDist(dmp, opt, torch.device("cpu"))
                    it = iter(batches)
                    while True:
                        try:
                            got.append(float(pipeline.progress(it)))
                        except StopIteration:
                            break
                losses[route] = got
                sharded = dmp.module.model.sparse
            # the pipeline swaps the forward of each module it pipelines (its input_dist runs ahead)
            return {"losses": losses, "sharded_type": type(sharded).__name__, "forward": type(sharded.forward).__name__}

        res["cases"] = []
        for placement in case.get("placements", []):
            for fused in case.get("fused", [None]):
                res["cases"].append(run_case(placement, fused))
        res["flag_cases"] = [flag_case(flag) for flag in case.get("flags", [])]
        res["pipeline_cases"] = [pipeline_case(flag) for flag in case.get("pipeline_flags", [])]
        dist.barrier()


def _run(case: dict, tmp_path: Path) -> List[dict]:
    return run(__file__, case, tmp_path, require_ok=True)


UNEVEN_TW = {"t_a": 0, "t_b": 0, "t_c": 1, "t_d": 0, "w_a": 1, "w_b": 0, "w_c": 0, "w_d": 0}
MIXED_RW = {"t_a": "row_wise", "t_b": 1, "t_c": "row_wise", "t_d": 0, "w_a": "row_wise", "w_b": 0, "w_c": 1, "w_d": 1}


def test_des_sharded_matches_unsharded_outputs_and_gradients(tmp_path) -> None:
    """Both placements in one 2-process run (uneven table-wise; mixed with row-wise)."""
    batch = [4, 3]  # global batch 7: not divisible by the world size, ranks differ
    results = _run({"placements": [UNEVEN_TW, MIXED_RW], "batch": batch}, tmp_path)
    for rank_res in results:
        b = batch[rank_res["rank"]]
        for res in rank_res["cases"]:
            assert res["sharded_type"] == "ShardedDESEmbeddingOperators"
            assert res["out_shape"] == {"fm": [b, 1], "wide": [b, 1], "first": [b, HIDDEN]}
            assert res["out_maxdiff"] < 1e-5, res
            assert res["ref_grad_scale"] > 0.1  # the gradients compared are not trivially zero
            assert all(d < 1e-5 for d in res["grad_maxdiff"].values()), res["grad_maxdiff"]
            # only ids and partials travel: ids all-to-all, one reduce-scatter, its all-gather, one grad all-reduce
            assert set(res["comm"]) == {"all_to_all_single", "reduce_scatter_single", "all_gather_single", "all_reduce"}
            # the counter tells ids (integer) from partials (float): the all-to-all is ids only
            assert res["float_comm"].get("all_to_all_single", 0) == 0 < res["comm"]["all_to_all_single"]
            for op in ("reduce_scatter_single", "all_gather_single"):
                assert res["float_comm"][op] == res["comm"][op] > 0
    # the mixed placement really has row-wise W_f blocks and the uneven one puts more tables on rank 0
    assert any("first_row_wise" in c["grad_maxdiff"] for c in results[0]["cases"])
    assert len([k for k in results[0]["cases"][0]["grad_maxdiff"] if k.startswith("table:")]) == 6


def test_des_fused_tables_update_in_backward_like_unsharded_sgd_and_rowwise_adagrad(tmp_path) -> None:
    """DESSharder(fused_params=...): the dim-4 tables are FBGEMM TBEs updated in backward (new
    weights == unsharded weights after one SGD / row-wise Adagrad step on the gradient of
    (1/W) sum_r loss_r), the dim-1 wide tables keep sparse gradients, the fused weights stay
    out of the dense optimizer and Adagrad's momentum is in the fused optimizer's state."""
    batch = [4, 3]
    results = _run({"placements": [UNEVEN_TW, MIXED_RW], "batch": batch, "fused": ["EXACT_SGD", "EXACT_ROWWISE_ADAGRAD"]},
                   tmp_path)
    for rank_res in results:
        cases = rank_res["cases"]
        assert len(cases) == 4
        for res, fused in zip(cases, ["EXACT_SGD", "EXACT_ROWWISE_ADAGRAD"] * 2):
            assert res["out_maxdiff"] < 1e-5, res
            assert all(d < 1e-5 for d in res["grad_maxdiff"].values()), (fused, res["grad_maxdiff"])
            assert any(k.startswith("updated:") for k in res["grad_maxdiff"])  # fused tables were checked
            assert any(k.startswith("table:w_") for k in res["grad_maxdiff"])  # and the sparse ones too
            assert not any("local_weights.dim4" in n for n in res["dense_optimizer_params"])
            assert any("local_weights.dim1" in n for n in res["dense_optimizer_params"])
            assert res["fused_state"] == (["dim4"] if fused == "EXACT_ROWWISE_ADAGRAD" else [])
            if fused == "EXACT_ROWWISE_ADAGRAD":
                assert any(k.startswith("momentum:") for k in res["grad_maxdiff"])
                assert res["momentum_after_load"] == 7.0


def test_des_from_the_flag_is_planned_by_torchrec_and_matches_unsharded(tmp_path) -> None:
    """The one-flag route: ``des.sharding=...`` in the flag, ``apply`` then ``for_dmp``; TorchRec's
    own planner (no des_plan by hand) plans the DES module with DES's sharder, DMP shards it,
    and the outputs equal the unsharded operators' on each rank's batch."""
    batch = [4, 3]
    results = _run({"flags": ["des.sharding=table_wise", "des.sharding=row_wise; des.modules=sparse"],
                    "batch": batch}, tmp_path)
    for rank_res in results:
        tw, rw = rank_res["flag_cases"]
        for res in (tw, rw):
            assert res["sharded_type"] == "ShardedDESEmbeddingOperators"
            assert res["plan_modules"] == ["sparse"]  # the DES module, not its inner ebc
            assert res["out_maxdiff"] < 1e-5, res
            assert "reduce_scatter_single" in res["comm"]  # partials travel
            assert "des: " in res["explain"]
        assert tw["sharding_types"] == ["table_wise"] and rw["sharding_types"] == ["row_wise"]


def test_des_from_the_flag_trains_under_train_pipeline_sparse_dist(tmp_path) -> None:
    """DMP + TrainPipelineSparseDist as a user's script has them: the pipeline finds the sharded
    DES module in the traced model, runs its input distribution one batch ahead, and every
    step's loss equals a plain loop's over the same sharded model and batches."""
    batch = [4, 3]
    results = _run({"pipeline_flags": ["des.sharding=table_wise", "des.sharding=row_wise"], "batch": batch}, tmp_path)
    for rank_res in results:
        for res in rank_res["pipeline_cases"]:
            assert res["sharded_type"] == "ShardedDESEmbeddingOperators"
            assert res["forward"] == "PipelinedForward"  # pipelined, not run whole in the model's forward
            loop, pipe = res["losses"]["loop"], res["losses"]["pipeline"]
            assert len(loop) == len(pipe) == 4 and loop[0] != loop[-1]  # it trained
            for a, b in zip(loop, pipe):
                assert abs(a - b) <= 1e-5 * max(1.0, abs(a)), (loop, pipe)


def test_bench_des_quick_runs_and_reports_keys(tmp_path) -> None:
    out = tmp_path / "des.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "recd_plugin.bench", "des", "--quick", "--json", str(out), "--no-docs"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(out.read_text())
    for key in ("fm_comm_saving", "deepfm_comm_saving", "speed_ratio", "auc_diff"):
        assert isinstance(result[key], float), key
    assert result["fm"]["max_output_diff"] < 1e-4 and result["deepfm"]["max_output_diff"] < 1e-4


if __name__ == "__main__":
    main(worker)
