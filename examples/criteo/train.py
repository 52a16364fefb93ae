"""Train ``SessionDLRM`` on session-structured Criteo-like data, with RecD, FAE and DES on from
one flag. The training script is plain TorchRec; the lines marked ``# recd-plugin`` are the
plugin's (two calls unsharded, three sharded).

    # FAE needs a hot set: profile the session tables once (1% of their bytes)
    python examples/criteo/train.py --profile out/criteo
    # train with all three techniques (examples/criteo/recd.toml), or compare with plugin off
    python examples/criteo/train.py --recd @examples/criteo/recd.toml
    python examples/criteo/train.py --recd @examples/criteo/recd.toml --compare
    # sharded: DistributedModelParallel over 2 processes (gloo on CPU, nccl on GPU)
    torchrun --nproc_per_node 2 examples/criteo/train.py --recd @examples/criteo/recd.toml
    # ... trained by TorchRec's TrainPipelineSparseDist
    torchrun --nproc_per_node 2 examples/criteo/train.py --recd @examples/criteo/recd.toml --pipeline

What each technique does here (``SessionDLRM`` in models.py): RecD runs the session tower once
per unique session (the group's 13 fields are compared by content: the KJT has no session id;
``apply`` first measures whether that pays on this machine and says what it decided); FAE keeps
the session tables' hot rows in the fast tier (unsharded on a GPU: the hot/cold layout; sharded:
placement hints to the planner on GPUs; on a CPU-only model there is no faster tier and FAE
says so and leaves the tables as they are); DES shards the FM / wide / first-dense module so
that only partial results cross the network (sharded; unsharded it is plain math).
``--compare`` trains plugin off and on from the same weights on the same batches and prints
both losses and speeds.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))
from models import SessionDLRM  # noqa: E402

import recd_plugin  # noqa: E402  # recd-plugin
from recd_plugin.data.criteo import SESSION, CriteoBatches  # noqa: E402


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recd", default=None, help="the plugin flag (default: $RECD_PLUGIN, else off)")  # recd-plugin
    p.add_argument("--steps", type=int, default=40, help="training steps (batches per rank)")
    p.add_argument("--batch-size", type=int, default=1024, help="samples per rank per step")
    p.add_argument("--max-rows", type=int, default=100_000, help="cap on table rows")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=1, help="DataLoader workers (0: batches built in the loop)")
    p.add_argument("--compare", action="store_true", help="train plugin off, then on; print both (1 process)")
    p.add_argument("--profile", type=Path, default=None, metavar="DIR",
                   help="write DIR/hot.npz: the session tables' hot rows (FAE), then exit")
    p.add_argument("--budget", type=float, default=0.01, help="--profile: hot set size, share of the tables' bytes")
    p.add_argument("--losses", type=Path, default=None, help="write the per-step losses here (one per line)")
    p.add_argument("--pipeline", action="store_true",
                   help="sharded: train with TorchRec's TrainPipelineSparseDist (input all-to-alls one batch ahead)")
    args = p.parse_args(argv)
    if args.pipeline and "LOCAL_RANK" not in os.environ:
        p.error("--pipeline trains the sharded model: launch with torchrun (or TorchX)")
    return args


def batches(args: argparse.Namespace, rank: int = 0) -> DataLoader:
    """This rank's batches, as a DataLoader (with workers, the plugin builds the deduplicated
    batches in them)."""
    data = CriteoBatches(args.steps, args.batch_size, seed=args.seed * 1000 + rank, max_rows=args.max_rows,
                         session=SESSION)
    return DataLoader(data, batch_size=None, num_workers=args.workers)


def build_model(args: argparse.Namespace, device: torch.device = torch.device("cpu")) -> SessionDLRM:
    torch.manual_seed(args.seed)
    return SessionDLRM(max_rows=args.max_rows, device=device)


def profile(args: argparse.Namespace) -> Path:
    """FAE's profile of the session tables over 5% of the training batches -> DIR/hot.npz."""
    from recd_plugin.fae import profile_accesses
    from recd_plugin.fae.access import tables_from_configs

    model = build_model(args, torch.device("meta"))
    tables, feature_to_table = tables_from_configs(model.session_tower.ebc.embedding_bag_configs())
    prof = profile_accesses(batches(args).dataset, tables, feature_to_table, sample_fraction=0.05, unit="batch", seed=args.seed)
    total = sum(t.num_embeddings * t.embedding_dim * 4 for t in tables.values())
    hot = prof.hot_set(budget_bytes=max(1, int(args.budget * total)))
    args.profile.mkdir(parents=True, exist_ok=True)
    out = args.profile / "hot.npz"
    hot.save(out)
    print(f"hot set: {sum(hot.num_hot(t) for t in hot.tables):,} rows of {len(hot.tables)} tables -> {out}")
    return out


def train(args: argparse.Namespace, flag: Optional[str], device: torch.device = torch.device("cpu"),
          sharded: bool = False) -> Tuple[List[float], float]:
    """Train ``args.steps`` steps; returns (losses, samples/s)."""
    rank = dist.get_rank() if sharded else 0
    model, loader = build_model(args, device), batches(args, rank)
    config = recd_plugin.RecDConfig.load(flag)  # recd-plugin
    model, loader = recd_plugin.apply(config, model, loader)  # recd-plugin
    if sharded and args.pipeline:
        return train_pipelined(args, model, loader, config, device)
    if sharded:
        model, optimizer = shard(model, config, args)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)
    losses: List[float] = []
    start, timed = time.perf_counter(), 0
    for step, batch in enumerate(loader):
        if step == 2:  # after warm-up
            start, timed = time.perf_counter(), 0
        batch = batch.to(device)
        logits = model(batch.dense_features, batch.sparse_features)
        loss = nn.functional.binary_cross_entropy_with_logits(logits, batch.labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        timed += args.batch_size
    speed = timed / (time.perf_counter() - start)
    recd_plugin.remove(model.module if sharded else model)  # recd-plugin: plain modules again (optional)
    return losses, speed


class TrainStep(nn.Module):
    """What TrainPipelineSparseDist runs: ``forward(batch) -> (loss, output)``; the pipeline's
    ``progress`` returns the output: here (loss, logits), detached."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch):
        logits = self.model(batch.dense_features, batch.sparse_features)
        loss = nn.functional.binary_cross_entropy_with_logits(logits, batch.labels)
        return loss, (loss.detach(), logits.detach())


def train_pipelined(args: argparse.Namespace, model: nn.Module, loader, config: "recd_plugin.RecDConfig",
                    device: torch.device) -> Tuple[List[float], float]:
    """``args.steps`` steps with TorchRec's TrainPipelineSparseDist; returns (losses, samples/s)."""
    from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

    step_model, optimizer = shard(TrainStep(model), config, args, inner=model)
    pipeline = TrainPipelineSparseDist(step_model, optimizer, device)
    batches, losses, start = iter(loader), [], time.perf_counter()
    while True:
        try:
            loss, _ = pipeline.progress(batches)
        except StopIteration:
            break
        losses.append(float(loss))
        if len(losses) == 2:  # after warm-up and the pipeline's fill, as the loop measures
            start = time.perf_counter()
    speed = max(len(losses) - 2, 0) * args.batch_size / (time.perf_counter() - start)
    return losses, speed


def shard(model: nn.Module, config: "recd_plugin.RecDConfig", args: argparse.Namespace,
          inner: Optional[nn.Module] = None) -> Tuple[nn.Module, torch.optim.Optimizer]:
    """DistributedModelParallel with TorchRec's planner; the plugin's sharders and hints."""
    from fbgemm_gpu.split_embedding_configs import EmbOptimType
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
    from torchrec.distributed.planner.types import ParameterConstraints
    from torchrec.modules.embedding_modules import EmbeddingBagCollection
    from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
    from torchrec.optim.optimizers import in_backward_optimizer_filter

    from recd_plugin import sharding  # recd-plugin

    cuda = torch.cuda.is_available()
    fused = {"optimizer": EmbOptimType.EXACT_SGD, "learning_rate": args.lr}
    # FBGEMM's fused kernels need dimensions divisible by 4: TorchRec keeps the 1-dim wide
    # tables data-parallel (dense kernel). DES's sharder runs them sharded; the plugin says so.
    base = {c.name: ParameterConstraints(sharding_types=["data_parallel"], compute_kernels=["dense"])
            for m in model.modules() if isinstance(m, EmbeddingBagCollection)
            for c in m.embedding_bag_configs() if c.embedding_dim % 4}
    # recd-plugin: for_dmp takes the model apply() converted (inside the pipeline's TrainStep)
    setup = sharding.for_dmp(inner or model, config, args.batch_size, base_constraints=base, fused_params=fused)
    planner = EmbeddingShardingPlanner(topology=Topology(world_size=dist.get_world_size(),
                                                         compute_device="cuda" if cuda else "cpu"),
                                       constraints=setup.constraints)
    plan = planner.collective_plan(model, setup.sharders, dist.group.WORLD)
    setup.check(plan)
    if dist.get_rank() == 0:
        print(setup.explain(plan))
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu")
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    dmp = DistributedModelParallel(model, plan=plan, sharders=setup.sharders, device=device)
    # TorchRec's sharding re-initializes its tables: load the model's own weights back (a DES
    # module copied its slices of them when sharded; its state_dict holds only those slices).
    mine = dmp.state_dict()
    dmp.load_state_dict({k: v for k, v in initial.items() if k in mine and mine[k].shape == v.shape}, strict=False)
    dense = KeyedOptimizerWrapper(dict(in_backward_optimizer_filter(dmp.named_parameters())),
                                  lambda params: torch.optim.SGD(params, lr=args.lr))
    return dmp, CombinedOptimizer([dmp.fused_optimizer, dense])


def main(argv: Optional[List[str]] = None) -> None:
    args = parse_args(argv)
    if args.profile is not None:
        profile(args)
        return
    flag = args.recd if args.recd is not None else os.environ.get(recd_plugin.ENV_VAR)
    if "LOCAL_RANK" in os.environ:  # torchrun / TorchX: sharded
        cuda = torch.cuda.is_available()
        dist.init_process_group("nccl" if cuda else "gloo")
        device = torch.device(f"cuda:{int(os.environ['LOCAL_RANK'])}" if cuda else "cpu")
        if cuda:
            torch.cuda.set_device(device)
        losses, speed = train(args, flag, device, sharded=True)
        if dist.get_rank() == 0:
            print(f"rank 0: {len(losses)} steps, loss {losses[0]:.4f} -> {losses[-1]:.4f}, {speed:,.0f} samples/s")
        _write(args.losses, losses, dist.get_rank())
        dist.barrier()  # gloo's barrier waits for collectives in flight: none is torn down mid-way
        dist.destroy_process_group()
        return
    if args.compare:
        plain, plain_speed = train(args, "off")
        on, on_speed = train(args, flag)
        diff = max(abs(a - b) for a, b in zip(plain, on))
        print(f"{'':8} {'samples/s':>10} {'first loss':>11} {'last loss':>10}")
        print(f"{'plain':8} {plain_speed:10,.0f} {plain[0]:11.5f} {plain[-1]:10.5f}")
        print(f"{'plugin':8} {on_speed:10,.0f} {on[0]:11.5f} {on[-1]:10.5f}")
        print(f"speed-up {on_speed / plain_speed:.2f}x, max |loss difference| {diff:.2e}")
        _write(args.losses, on, 0)
        return
    losses, speed = train(args, flag)
    print(f"{len(losses)} steps, loss {losses[0]:.4f} -> {losses[-1]:.4f}, {speed:,.0f} samples/s")
    _write(args.losses, losses, 0)


def _write(path: Optional[Path], losses: List[float], rank: int) -> None:
    if path is not None:
        out = path if rank == 0 else path.with_name(f"{path.name}.rank{rank}")
        out.write_text("".join(f"{v!r}\n" for v in losses))


if __name__ == "__main__":
    main()
