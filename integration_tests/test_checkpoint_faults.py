"""Checkpoint / resume under fault injection and across world sizes (recd_plugin.sharding.checkpoint).

- A saving process killed at each step of a save (``os._exit`` inside a monkeypatched step,
  in a subprocess): the next resume finds the last complete checkpoint, and the next save
  succeeds.
- DMP on 2 ranks (gloo), fused EXACT_ROWWISE_ADAGRAD tables plus a dense Adam / SGD with
  momentum / Adagrad, as a TorchRec CombinedOptimizer or as a plain torch optimizer: save after
  3 steps, build a fresh model and optimizer, resume, continue: every loss and the final state
  equal an uninterrupted run's exactly. Another fused optimizer type is refused on every rank.
- Saved at world size 2, loaded at 1 and 3: the gathered tables, dense weights and optimizer
  state equal the saved ones (DCP re-shards them).
- The MovieLens example saved at world size 2 and resumed at 1 or 3 trains every global batch
  once: nothing repeated, nothing skipped.

Every multi-process run is a subprocess (``python this_file.py CASE OUTDIR WORLD``) that spawns
WORLD gloo workers (the harness of two_ranks.py, at any world size), bounded by its hang guard.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List, Tuple

import pytest
import torch
from test_sharded_training import COMMON, RECD, torchrun
from two_ranks import HANG_GUARD_S, PG_TIMEOUT, ROOT, free_port, reporting

STEPS = 3  # steps before the save, and after the resume


# ------------------------------------------------------------------------------------------
# Worker side: a DMP model (two row-wise tables, fused optimizer) and its optimizers.


def _build(world: int, seed: int, dense: str, style: str, fused: str = "EXACT_ROWWISE_ADAGRAD"):
    """(DMP model, optimizer): ``style`` "combined" is CombinedOptimizer([dmp.fused_optimizer,
    KeyedOptimizerWrapper(dense)]); "plain" a torch optimizer over the dense parameters only
    (the checkpointer then adds the fused optimizer's state itself)."""
    import torch.distributed as dist
    from fbgemm_gpu.split_embedding_configs import EmbOptimType
    from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
    from torchrec.distributed.planner.types import ParameterConstraints
    from torchrec.distributed.types import ShardingEnv
    from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
    from torchrec.optim.optimizers import in_backward_optimizer_filter

    from recd_plugin import sharding

    class Model(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ebc = EmbeddingBagCollection(tables=[
                EmbeddingBagConfig(name="t0", feature_names=["f0"], num_embeddings=30, embedding_dim=4),
                EmbeddingBagConfig(name="t1", feature_names=["f1"], num_embeddings=20, embedding_dim=4)])
            self.dense = torch.nn.Linear(8, 1)

        def forward(self, kjt):
            return self.dense(self.ebc(kjt).values())

    torch.manual_seed(seed)
    model = Model()
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    sharders = sharding.sharders({"optimizer": getattr(EmbOptimType, fused), "learning_rate": 0.1})
    constraints = {t: ParameterConstraints(sharding_types=["row_wise"], compute_kernels=["fused"])
                   for t in ("t0", "t1")}
    plan = EmbeddingShardingPlanner(topology=Topology(world_size=world, compute_device="cpu"),
                                    constraints=constraints).collective_plan(model, sharders, dist.group.WORLD)
    dmp = DistributedModelParallel(model, env=ShardingEnv.from_process_group(dist.group.WORLD),
                                   device=torch.device("cpu"), plan=plan, sharders=sharders)
    dmp.load_state_dict(initial)  # sharding re-initializes the tables
    make = {"adam": lambda ps: torch.optim.Adam(ps, lr=0.01),
            "sgd_momentum": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
            "adagrad": lambda ps: torch.optim.Adagrad(ps, lr=0.1)}[dense]
    params = dict(in_backward_optimizer_filter(dmp.named_parameters()))
    if style == "plain":
        return dmp, make(list(params.values()))
    return dmp, CombinedOptimizer([dmp.fused_optimizer, KeyedOptimizerWrapper(params, make)])


def _batch(step: int, rank: int):
    """This rank's batch of ``step``: 4 samples, 1-2 ids per feature."""
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    g = torch.Generator().manual_seed(100 * step + rank)
    lengths = torch.randint(1, 3, (8,), generator=g)
    values = torch.cat([torch.randint(0, 30, (int(lengths[:4].sum()),), generator=g),
                        torch.randint(0, 20, (int(lengths[4:].sum()),), generator=g)])
    return KeyedJaggedTensor(keys=["f0", "f1"], values=values, lengths=lengths)


def _train(model, optimizer, steps: range, rank: int) -> List[float]:
    losses = []
    for i in steps:
        optimizer.zero_grad()
        loss = model(_batch(i, rank)).pow(2).mean()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def _full_state(model, optimizer) -> Dict[str, torch.Tensor]:
    """Model and optimizer state as whole tensors (rank 0; sharded ones gathered), by flat key."""
    import torch.distributed as dist
    from torch.distributed._shard.sharded_tensor import ShardedTensor
    from torch.distributed.checkpoint._nested_dict import flatten_state_dict

    from recd_plugin.sharding import ckpt_state

    flat, _ = flatten_state_dict(ckpt_state.state_to_save(model, ckpt_state.optimizers(model, optimizer)))
    out = {}
    for key in sorted(flat):
        value = flat[key]
        if isinstance(value, ShardedTensor):
            whole = torch.empty(value.size(), dtype=value.dtype) if dist.get_rank() == 0 else None
            value.gather(dst=0, out=whole)
            value = whole
        if isinstance(value, torch.Tensor) and dist.get_rank() == 0:
            out[key] = value.detach().clone()
    return out


def _differences(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor]) -> List[str]:
    return sorted(set(a) ^ set(b)) + [k for k in sorted(set(a) & set(b)) if not torch.equal(a[k], b[k])]


def worker(rank: int, port: int, case: dict, outdir: str, world: int) -> None:
    import torch.distributed as dist

    with reporting(rank, outdir) as res:
        os.environ["MASTER_ADDR"] = "127.0.0.1"
        os.environ["MASTER_PORT"] = str(port)
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=PG_TIMEOUT)
        from recd_plugin.sharding.checkpoint import Checkpointer, CheckpointError, Position

        ckpt = Checkpointer(case["dir"], STEPS)
        if case["kind"] == "exact":
            straight_model, straight_optimizer = _build(world, 0, case["dense"], case["style"])
            straight = _train(straight_model, straight_optimizer, range(2 * STEPS), rank)
            model, optimizer = _build(world, 0, case["dense"], case["style"])
            _train(model, optimizer, range(STEPS), rank)
            ckpt.save(STEPS, model, optimizer, Position(samples=STEPS * 4 * world))
            fresh, fresh_optimizer = _build(world, 1, case["dense"], case["style"])  # other weights, no state
            res["position"] = ckpt.resume(fresh, fresh_optimizer).to_json()
            res["resumed"] = _train(fresh, fresh_optimizer, range(STEPS, 2 * STEPS), rank)
            res["straight"] = straight[STEPS:]
            res["differences"] = _differences(_full_state(fresh, fresh_optimizer),
                                              _full_state(straight_model, straight_optimizer))
        elif case["kind"] == "save":
            model, optimizer = _build(world, 0, "adam", "combined")
            _train(model, optimizer, range(STEPS), rank)
            ckpt.save(STEPS, model, optimizer, Position())
            if rank == 0:
                torch.save(_full_state(model, optimizer), Path(case["dir"]) / "full.pt")
            else:
                _full_state(model, optimizer)
        elif case["kind"] == "load":
            model, optimizer = _build(world, 1, "adam", "combined", fused=case.get("fused", "EXACT_ROWWISE_ADAGRAD"))
            before = _full_state(model, optimizer)
            try:
                ckpt.resume(model, optimizer)
            except CheckpointError as e:
                res["error"] = str(e)
            after = _full_state(model, optimizer)
            if rank == 0:
                saved = torch.load(Path(case["dir"]) / "full.pt")
                res["differences"] = _differences(after, before if "error" in res else saved)


def run_world(case: dict, tmp_path: Path, world: int) -> List[dict]:
    """Run ``case`` on ``world`` gloo processes; every rank's result (``ok`` checked)."""
    out = tmp_path / f"out-{case['kind']}-{world}"
    out.mkdir()
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, __file__, json.dumps(case), str(out), str(world)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=HANG_GUARD_S)
    results = []
    for r in range(world):
        path = out / f"rank{r}.json"
        assert path.exists(), f"rank {r} wrote no result (rc {proc.returncode}):\n{proc.stderr[-4000:]}"
        res = json.loads(path.read_text())
        assert res["ok"], f"rank {r}: {res.get('error')}\n{res.get('traceback', '')}"
        results.append(res)
    return results


# ------------------------------------------------------------------------------------------
# Tests: DMP


@pytest.mark.parametrize("style", ["combined", "plain"])
@pytest.mark.parametrize("dense", ["adam", "sgd_momentum", "adagrad"])
def test_dmp_resume_continues_exactly_like_an_uninterrupted_run(dense: str, style: str, tmp_path: Path) -> None:
    for res in run_world({"kind": "exact", "dense": dense, "style": style, "dir": str(tmp_path / "ckpt")},
                         tmp_path, 2):
        assert json.loads(res["position"])["step"] == STEPS
        assert res["resumed"] == res["straight"], res
        assert res["differences"] == [], res["differences"]


@pytest.fixture(scope="module")
def saved_at_two(tmp_path_factory) -> Path:
    """A DMP checkpoint saved at world size 2 (and its whole tensors in full.pt)."""
    tmp = tmp_path_factory.mktemp("saved-at-2")
    run_world({"kind": "save", "dir": str(tmp / "ckpt")}, tmp, 2)
    return tmp / "ckpt"


@pytest.mark.parametrize("world", [1, 3])
def test_dmp_checkpoint_loads_at_another_world_size(world: int, saved_at_two: Path, tmp_path: Path) -> None:
    ckpt = Path(shutil.copytree(saved_at_two, tmp_path / "ckpt"))
    results = run_world({"kind": "load", "dir": str(ckpt)}, tmp_path, world)
    assert "error" not in results[0], results[0]["error"]
    assert results[0]["differences"] == []


def test_dmp_another_fused_optimizer_is_refused_on_every_rank_and_changes_nothing(saved_at_two: Path,
                                                                                 tmp_path: Path) -> None:
    ckpt = Path(shutil.copytree(saved_at_two, tmp_path / "ckpt"))
    results = run_world({"kind": "load", "dir": str(ckpt), "fused": "EXACT_SGD"}, tmp_path, 2)
    for res in results:
        assert ("the checkpoint has optimizer state ['t0.momentum1'] for 'ebc.embedding_bags.t0.weight', which "
                "this optimizer keeps no state for") in res["error"], res["error"]
    assert results[0]["differences"] == []


# ------------------------------------------------------------------------------------------
# Tests: a saving process killed at each step of the save


KILL_POINTS = {
    # point: (what is patched, when it exits)
    "position": "after position.json is written into the temporary directory",
    "shards": "after DCP wrote the shards and its metadata",
    "hashing": "while the files are being hashed",
    "manifest": "after the manifest is written, before the rename",
    "renamed": "after the rename, before latest is replaced",
    "latest": "after latest.tmp is written, before it replaces latest",
}


def _tiny(seed: int) -> Tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 1))
    return model, torch.optim.Adam(model.parameters(), lr=0.01)


def _tiny_steps(model: torch.nn.Module, optimizer: torch.optim.Optimizer, steps: range) -> None:
    for i in steps:
        optimizer.zero_grad()
        model(torch.randn(8, 3, generator=torch.Generator().manual_seed(i))).pow(2).mean().backward()
        optimizer.step()


def kill_during_save(point: str, directory: str) -> None:
    """Subprocess: save step 2, then die at ``point`` while saving step 4."""
    from recd_plugin.sharding import checkpoint, ckpt_files
    from recd_plugin.sharding.checkpoint import Checkpointer, Position

    model, optimizer = _tiny(0)
    ckpt = Checkpointer(directory, 2)
    _tiny_steps(model, optimizer, range(2))
    ckpt.save(2, model, optimizer, Position(samples=16))
    _tiny_steps(model, optimizer, range(2, 4))

    def die(*args: Any, **kwargs: Any) -> None:
        os._exit(17)

    def after(name: str, condition=lambda *a: True) -> None:
        real = getattr(ckpt_files, name)

        def wrapped(*args: Any, **kwargs: Any) -> Any:
            result = real(*args, **kwargs)
            if condition(*args):
                die()
            return result

        setattr(ckpt_files, name, wrapped)

    if point == "position":
        after("write_durably", lambda path, data: path.name == "position.json")
    elif point == "shards":
        real_save = checkpoint.dcp.save
        checkpoint.dcp.save = lambda *a, **k: (real_save(*a, **k), die())
    elif point == "hashing":
        calls = []
        after("file_digest", lambda path: calls.append(path) or len(calls) == 2)
    elif point == "manifest":
        after("write_manifest")
    elif point == "renamed":
        setattr(ckpt_files, "write_latest", die)
    elif point == "latest":
        after("write_durably", lambda path, data: path.name == "latest.tmp")
    ckpt.save(4, model, optimizer, Position(samples=32))
    raise AssertionError(f"kill point {point!r} was not reached")


@pytest.mark.parametrize("point", sorted(KILL_POINTS))
def test_a_save_killed_at_any_point_leaves_the_previous_checkpoint(point: str, tmp_path: Path) -> None:
    from recd_plugin.sharding.checkpoint import Checkpointer, Position

    directory = tmp_path / "ckpt"
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, __file__, "kill", point, str(directory)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert proc.returncode == 17, (point, proc.stdout[-2000:], proc.stderr[-4000:])

    reference, reference_optimizer = _tiny(0)
    _tiny_steps(reference, reference_optimizer, range(2))
    model, optimizer = _tiny(1)
    ckpt = Checkpointer(directory, 2)
    assert ckpt.resume(model, optimizer) == Position(step=2, samples=16), KILL_POINTS[point]
    for key, value in reference.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), (point, key)
    # The job goes on: it saves step 4 again over what the killed save left, and resumes from it.
    _tiny_steps(model, optimizer, range(2, 4))
    ckpt.save(4, model, optimizer, Position(samples=32))
    assert sorted(p.name for p in directory.iterdir()) == ["latest", "step-00000002", "step-00000004"]
    assert ckpt.resume(*_tiny(2)) == Position(step=4, samples=32)


# ------------------------------------------------------------------------------------------
# Tests: the example, resumed at another world size


def _batches(path: Path) -> List[Tuple[int, int]]:
    """(step, global batch) of every training step in a --losses file."""
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    return [(d["step"], d["batch"]) for d in lines if "step" in d]


@pytest.fixture(scope="module")
def example_killed_at_two(tmp_path_factory) -> Path:
    """The example at world size 2, checkpoints every 2 steps, rank 1 killed after step 3."""
    tmp = tmp_path_factory.mktemp("example-at-2")
    out = torchrun(COMMON + RECD + ["--losses", str(tmp / "first"), "--checkpoint-dir", str(tmp / "ckpt"),
                                    "--checkpoint-every", "2", "--fail-at-step", "3"], tmp, ok=False)
    assert "killing rank 1" in out, out[-4000:]
    return tmp


@pytest.mark.parametrize("world", [1, 3])
def test_the_example_resumed_at_another_world_size_trains_every_batch_once(world: int, example_killed_at_two: Path,
                                                                         tmp_path: Path) -> None:
    ckpt = shutil.copytree(example_killed_at_two / "ckpt", tmp_path / "ckpt")
    out = torchrun(COMMON + RECD + ["--losses", str(tmp_path / "resumed"), "--checkpoint-dir", str(ckpt)],
                   tmp_path, nproc=world)
    assert f"resumed from step 2 (epoch 0, global batch 4, {world} ranks from here)" in out, out[-4000:]
    before = [b for r in range(2) for s, b in _batches(example_killed_at_two / f"first.recd.rank{r}") if s <= 2]
    after = [b for r in range(world)
             for _, b in _batches(tmp_path / ("resumed.recd" + (f".rank{r}" if world > 1 else "")))]
    assert sorted(before) == [0, 1, 2, 3]
    # --max-steps 6: 6 steps' worth of global batches at this world size, from batch 4 on
    assert sorted(before + after) == list(range(4 + (6 * world - 4) // world * world))


if __name__ == "__main__":
    if sys.argv[1] == "kill":
        kill_during_save(sys.argv[2], sys.argv[3])
    else:
        import torch.multiprocessing as mp

        world = int(sys.argv[3])
        mp.spawn(worker, args=(free_port(), json.loads(sys.argv[1]), sys.argv[2], world), nprocs=world, join=True)
