"""The distributed half of the example: what a TorchRec user writes to shard a model.

Process group from torchrun's environment (gloo on CPU, nccl on GPU), a planner-made (or
forced) sharding plan, ``DistributedModelParallel``, the fused embedding optimizer and a
dense optimizer. The lines marked ``# recd-plugin`` are the plugin's: one
``recd_plugin.sharding.for_dmp`` call gives its sharders (ROW_WISE on CPU), its planner
constraints (deduplicated batch sizes measured on the loader's first batches; FAE placement
from the flag's hot set on GPUs) and the up-front plan check.

    torchrun --nproc_per_node 2 examples/movielens/train.py --sharding row_wise --recd @examples/movielens/recd.toml
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Dict, List, Tuple

import torch
import torch.distributed as dist
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
from torchrec.distributed.planner.types import ParameterConstraints
from torchrec.distributed.types import ShardingEnv
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter

import recd_plugin  # recd-plugin
from recd_plugin import sharding as recd_sharding  # recd-plugin

SHARDING_TYPES = ["auto", "table_wise", "column_wise", "row_wise"]


def init() -> Tuple[int, int, torch.device]:
    """(rank, world size, device) from torchrun's environment; a 1-process group without it."""
    cuda = torch.cuda.is_available()
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29512")
        backend = os.environ.get("RECD_DIST_BACKEND") or ("nccl" if cuda else "gloo")  # set by recd.train
        rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        timeout = timedelta(seconds=120)
        if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            # Restarted by torchrun (c10d rendezvous): the agent's store keeps the previous
            # attempt's keys, and a new rank can read its dead peer's address from them
            # ("Gloo connectFullMesh failed ... Connection refused"). One key prefix per attempt.
            store = dist.PrefixStore(f"attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", dist.TCPStore(
                os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False, timeout=timeout))
            dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)
        else:
            dist.init_process_group(backend, rank=rank, world_size=world, timeout=timeout)
    rank = dist.get_rank()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}") if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    return rank, dist.get_world_size(), device


def close() -> None:
    """Destroy the process group after a successful run. Without it, gloo's worker threads can
    outlive the interpreter and abort the process at exit ("terminate called without an active
    exception"), failing a job that trained correctly. The barrier first: gloo's barrier waits
    for every collective still in flight, so none is torn down mid-way. Not called after an
    error: a rank still inside a collective would then hang its peers' teardown."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


class TrainStep(torch.nn.Module):
    """What TrainPipelineSparseDist runs: ``forward(batch) -> (loss, (loss, logits, labels))``."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch):
        logits = self.model(batch.sparse_features, batch.dense_features)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, batch.labels)
        return loss, (loss.detach(), logits.detach(), batch.labels)


def shard(model: torch.nn.Module, recd: "recd_plugin.RecDConfig", sharding: str, lr: float, optimizer: str,
          batch_size: int, loader=None) -> Tuple[DistributedModelParallel, torch.optim.Optimizer]:
    """Plan and shard ``model`` (or a ``TrainStep`` around it); returns (DMP model, combined optimizer).
    ``loader``: the training loader, whose first batches give the planner the unique fraction."""
    inner = model.model if isinstance(model, TrainStep) else model  # what recd_plugin.apply() converted
    world, device = dist.get_world_size(), torch.device("cuda" if torch.cuda.is_available() else "cpu")
    fused = {"optimizer": EmbOptimType.EXACT_SGD if optimizer == "sgd" else EmbOptimType.EXACT_ROWWISE_ADAGRAD,
             "learning_rate": lr}
    constraints: Dict[str, ParameterConstraints] = {}
    if sharding != "auto":
        constraints = {t: ParameterConstraints(sharding_types=[sharding], compute_kernels=["fused"])
                       for t in _table_names(model)}
    # recd-plugin: sharders, planner hints and plan check (stock: EmbeddingBagCollectionSharder(fused), constraints)
    setup = recd_sharding.for_dmp(inner, recd, batch_size, loader=loader, base_constraints=constraints,
                                  fused_params=fused, compute_device=device.type)
    planner = EmbeddingShardingPlanner(topology=Topology(world_size=world, compute_device=device.type),
                                       constraints=setup.constraints)
    plan = planner.collective_plan(model, setup.sharders, dist.group.WORLD)
    setup.check(plan)  # recd-plugin
    if recd.enabled and dist.get_rank() == 0:  # recd-plugin
        print(setup.explain(plan))
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    dmp = DistributedModelParallel(model, env=ShardingEnv.from_process_group(dist.group.WORLD), device=device,
                                   plan=plan, sharders=setup.sharders)
    dmp.load_state_dict(initial)  # sharding re-initializes the tables: keep the model's own weights
    dense = KeyedOptimizerWrapper(
        dict(in_backward_optimizer_filter(dmp.named_parameters())),
        (lambda ps: torch.optim.SGD(ps, lr=lr)) if optimizer == "sgd" else (lambda ps: torch.optim.Adam(ps, lr=lr)))
    return dmp, CombinedOptimizer([dmp.fused_optimizer, dense])


def _table_names(model: torch.nn.Module) -> List[str]:
    from torchrec import EmbeddingBagCollection, EmbeddingCollection

    names = []
    for m in model.modules():
        if isinstance(m, EmbeddingBagCollection):
            names += [c.name for c in m.embedding_bag_configs()]
        elif isinstance(m, EmbeddingCollection):
            names += [c.name for c in m.embedding_configs()]
    return names
