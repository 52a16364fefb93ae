"""Train the two-tower MovieLens model with TorchRec, optionally with recd-plugin.

An ordinary TorchRec training script; the lines marked ``# recd-plugin`` are all it takes to
enable the plugin. The flag comes from ``--recd``, else from ``$RECD_PLUGIN`` (so a TorchX
launcher can turn it on without touching the script), else the plugin stays off::

    python examples/movielens/train.py                              # plain TorchRec
    python examples/movielens/train.py --recd @examples/movielens/recd.toml
    RECD_PLUGIN=@examples/movielens/recd.toml python examples/movielens/train.py
    python examples/movielens/train.py --recd "groups.user.key=session_id; \\
        groups.user.features=user_id,user_age,user_gender,user_occupation,user_zip,history; \\
        towers.user_tower=user"                                     # the same, inline
    python examples/movielens/train.py --compare                    # off, then on: a table
    python examples/movielens/train.py --data synthetic --light --compare
    torchrun --nproc_per_node 2 examples/movielens/train.py --sharding row_wise --compare
                                                                    # DistributedModelParallel

Prints a progress bar per epoch and the epoch's mean loss and test AUC (torchmetrics).
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Dict, Iterable, Optional

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset
from torchmetrics.classification import BinaryAUROC
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
import distributed  # noqa: E402
from distributed import SHARDING_TYPES  # noqa: E402
from model import RECD_FLAG, TwoTower  # noqa: E402

import recd_plugin  # noqa: E402  # recd-plugin
from recd_plugin.data import TableBatches, cardinalities, generate_sessions, load_movielens_100k, split_by_time  # noqa: E402
from recd_plugin.sharding.checkpoint import Checkpointer, Position, split_batches  # noqa: E402


def parse_args(argv: Optional[list] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", choices=["movielens", "synthetic"], default="movielens")
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--light", action="store_true", help="mean-pool the history (no transformer)")
    p.add_argument("--max-steps", type=int, default=0, help="stop each epoch after N steps (0: all)")
    p.add_argument("--workers", type=int, default=1, help="DataLoader worker processes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--recd", default=None, help="recd-plugin flag (default: $RECD_PLUGIN, else off)")  # recd-plugin
    p.add_argument("--compare", action="store_true", help="train with the plugin off, then on, and compare")
    p.add_argument("--sharding", choices=["none"] + SHARDING_TYPES, default=None,
                   help="shard with DistributedModelParallel (default: auto under torchrun with >1 process)")
    p.add_argument("--optimizer", choices=["adam", "sgd"], default="adam",
                   help="dense optimizer; sharded embeddings use fused EXACT_ROWWISE_ADAGRAD, or EXACT_SGD with sgd")
    p.add_argument("--pipeline", action="store_true",
                   help="sharded: train with TorchRec's TrainPipelineSparseDist (no test AUC, no checkpoints)")
    p.add_argument("--losses", default=None,
                   help="append every step's loss to PATH.plain / PATH.recd (JSON lines; several ranks: .rankN)")
    p.add_argument("--checkpoint-dir", default=None, help="save sharded checkpoints here and resume from the latest")
    p.add_argument("--checkpoint-every", type=int, default=50, help="steps between checkpoints")
    p.add_argument("--fail-at-step", type=int, default=0,
                   help="fault drill: the last rank kills itself (SIGKILL) after this step, on the first attempt only")
    args = p.parse_args(argv)
    if args.sharding is None:
        args.sharding = "auto" if int(os.environ.get("WORLD_SIZE", 1)) > 1 or args.pipeline else "none"
    if args.pipeline and (args.sharding == "none" or args.checkpoint_dir):
        p.error("--pipeline needs sharding and does not take --checkpoint-dir (the pipeline reads batches ahead)")
    return args


def load_data(name: str, seed: int):
    table = load_movielens_100k() if name == "movielens" else generate_sessions(seed=seed)
    train, test = split_by_time(table, test_fraction=0.1)
    return cardinalities(table), train, test


class RankBatches(Dataset):
    """The batches of ``table`` this rank trains on. The epoch's batches are one global
    sequence; from global batch ``start`` (where a resumed epoch picks up, at any world size)
    to ``stop``, rank r takes batches start + r, start + r + world, ... and every rank the same
    number (sharded models run collectives in every step): ``recd_plugin.sharding.split_batches``."""

    def __init__(self, table, batch_size: int, rank: int = 0, world: int = 1) -> None:
        self.batches = TableBatches(table, batch_size)
        self.rank, self.world = rank, world
        self.start, self.stop = 0, len(self.batches)

    def _indices(self) -> range:
        return split_batches(self.start, min(self.stop, len(self.batches)), self.rank, self.world)

    def __len__(self) -> int:
        return len(self._indices())

    def __getitem__(self, i: int):
        return self.batches[self._indices()[i]]


def loader(table, batch_size: int, workers: int, rank: int = 0, world: int = 1) -> DataLoader:
    # Not persistent: workers restart each epoch and see RankBatches.start of a resumed epoch.
    return DataLoader(RankBatches(table, batch_size, rank, world), batch_size=None, num_workers=workers)


def evaluate(model: torch.nn.Module, batches: Iterable) -> float:
    auc = BinaryAUROC()
    model.eval()
    with torch.no_grad():
        for b in batches:
            auc.update(torch.sigmoid(model(b.sparse_features, b.dense_features)), b.labels.long())
    model.train()
    return float(auc.compute())


def train(args: argparse.Namespace, model: torch.nn.Module, data, recd: recd_plugin.RecDConfig) -> Dict[str, float]:
    _, train_table, test_table = data
    rank, world = (dist.get_rank(), dist.get_world_size()) if args.sharding != "none" else (0, 1)
    train_loader = loader(train_table, args.batch_size, args.workers, rank, world)
    train_batches = train_loader.dataset  # its .start is where a resumed epoch picks up
    test_loader = loader(test_table, args.batch_size, args.workers, rank, world)
    model, train_loader = recd_plugin.apply(recd, model, train_loader)  # recd-plugin
    test_loader = recd_plugin.wrap(recd, test_loader, model)  # recd-plugin, optional: deduplicated evaluation (plain batches work too)
    if args.pipeline:
        return train_pipelined(args, model, train_loader, recd, rank, world)
    if args.sharding != "none":  # the planner hints measure u on the loader's first batches (distributed.shard)
        model, optimizer = distributed.shard(model, recd, args.sharding, args.lr, args.optimizer, args.batch_size,
                                             loader=train_loader)
    elif args.optimizer == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)
    else:
        optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    result: Dict[str, float] = {}
    ckpt = Checkpointer(args.checkpoint_dir, args.checkpoint_every) if args.checkpoint_dir else None
    # The position is global (samples all ranks consumed), so a job restarted at another world
    # size re-splits it and trains every batch once.
    position = (ckpt.resume(model, optimizer) if ckpt else None) or Position(seed=args.seed)
    start = position.first_batch(args.batch_size, args.seed)
    if position.step:
        print(f"resumed from step {position.step} (epoch {position.epoch}, global batch {start}, "
              f"{world} ranks from here)")
    log = _loss_log(args, recd, rank, world)
    step = position.step
    # --max-steps N: each epoch stops after N steps of a one-world-size run, i.e. N * world global batches
    train_batches.stop = args.max_steps * world if args.max_steps else len(train_batches.batches)
    for epoch in range(position.epoch, args.epochs):
        first = start if epoch == position.epoch else 0  # global batch index
        train_batches.start = first
        total, steps, samples, t0 = 0.0, 0, 0, time.perf_counter()
        bar = tqdm(train_loader, desc=f"epoch {epoch} ({'recd on' if recd.enabled else 'plain'})",
                   total=len(train_batches), leave=False, disable=None)  # None: bars on a terminal only
        for i, batch in enumerate(bar):
            optimizer.zero_grad()
            loss = loss_fn(model(batch.sparse_features, batch.dense_features), batch.labels)
            loss.backward()
            optimizer.step()
            total, steps, samples, step = total + loss.item(), steps + 1, samples + batch.labels.numel(), step + 1
            bar.set_postfix(loss=f"{total / steps:.4f}")
            if log:
                log.write(json.dumps({"step": step, "loss": loss.item(), "batch": first + i * world + rank}) + "\n")
                log.flush()
            if ckpt:
                done = first + (i + 1) * world  # global batches of this epoch trained by all ranks
                ckpt.maybe_save(step, model, optimizer, Position(epoch=epoch, samples=done * args.batch_size,
                                                                 seed=args.seed))
            first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
            if step == args.fail_at_step and rank == world - 1 and first_attempt:
                print(f"--fail-at-step {step}: killing rank {rank}", flush=True)
                os.kill(os.getpid(), signal.SIGKILL)
        steps = max(steps, 1)
        seconds = time.perf_counter() - t0
        result = {"loss": total / steps, "auc": evaluate(model, test_loader), "samples_per_s": samples / seconds}
        print(f"epoch {epoch}: loss {result['loss']:.4f}  test AUC {result['auc']:.4f}  "
              f"{result['samples_per_s']:.0f} samples/s")
    if log:
        log.write(json.dumps(result) + "\n")
        log.close()
    if isinstance(train_loader, recd_plugin.DedupLoader):  # the flag has groups: batches went through the plugin
        stats = train_loader.stats
        print(f"recd-plugin: {stats.samples_out} samples, unique user rows "
              f"{100 * stats.unique_fraction('user'):.1f}%")
    return result


def train_pipelined(args: argparse.Namespace, model: torch.nn.Module, train_loader, recd: recd_plugin.RecDConfig,
                    rank: int, world: int) -> Dict[str, float]:
    """One epoch with TorchRec's TrainPipelineSparseDist (input all-to-alls one batch ahead)."""
    from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

    step_model, optimizer = distributed.shard(distributed.TrainStep(model), recd, args.sharding, args.lr,
                                              args.optimizer, args.batch_size, loader=train_loader)
    pipeline = TrainPipelineSparseDist(step_model, optimizer, next(step_model.parameters()).device)
    # --max-steps limits the batches fed, not the loop: the pipeline runs input all-to-alls
    # ahead, and stopping it mid-flight would leave collectives of unused batches behind.
    fed = itertools.islice(train_loader, args.max_steps) if args.max_steps else train_loader
    log, batches, total, steps, start = _loss_log(args, recd, rank, world), iter(fed), 0.0, 0, time.perf_counter()
    while True:
        try:
            loss, _, _ = pipeline.progress(batches)  # the model output: (loss, logits, labels)
        except StopIteration:
            break
        total, steps = total + loss.item(), steps + 1
        if log:
            log.write(json.dumps({"step": steps, "loss": loss.item()}) + "\n")
    result = {"loss": total / max(steps, 1), "auc": float("nan"),
              "samples_per_s": steps * args.batch_size / (time.perf_counter() - start)}
    print(f"pipelined: loss {result['loss']:.4f}  {result['samples_per_s']:.0f} samples/s")
    if log:
        log.write(json.dumps(result) + "\n")
        log.close()
    return result


def _loss_log(args: argparse.Namespace, recd: recd_plugin.RecDConfig, rank: int, world: int):
    """--losses: one JSON line per step ({"step", "loss"}), then one with the epoch result;
    appended to, so a restarted job continues the file."""
    if not args.losses:
        return None
    suffix = (".recd" if recd.enabled else ".plain") + (f".rank{rank}" if world > 1 else "")
    return open(args.losses + suffix, "a")


def main(argv: Optional[list] = None) -> None:
    args = parse_args(argv)
    if args.sharding != "none":
        distributed.init()
    torch.manual_seed(args.seed)
    data = load_data(args.data, args.seed)
    model = TwoTower(data[0], light=args.light)
    if not args.compare:
        train(args, model, data, recd_plugin.RecDConfig.load(args.recd))  # recd-plugin
        distributed.close()
        return
    flag = args.recd or RECD_FLAG
    runs = {}
    for name, config in [("plain TorchRec", recd_plugin.RecDConfig()), ("recd-plugin", recd_plugin.RecDConfig.from_string(flag))]:
        print(f"== {name}")
        runs[name] = train(args, copy.deepcopy(model), data, config)
    plain, plug = runs["plain TorchRec"], runs["recd-plugin"]
    print(f"\n{'':16}{'samples/s':>12}{'loss':>10}{'test AUC':>10}")
    for name, r in runs.items():
        print(f"{name:16}{r['samples_per_s']:12.0f}{r['loss']:10.4f}{r['auc']:10.4f}")
    print(f"speedup {plug['samples_per_s'] / plain['samples_per_s']:.2f}x (wall clock incl. data loading); "
          f"|loss diff| {abs(plug['loss'] - plain['loss']):.2e}; |AUC diff| {abs(plug['auc'] - plain['auc']):.2e}")
    distributed.close()


if __name__ == "__main__":
    main()
