"""The sides of the DES benchmark, built per rank: DES (fused and sparse), TorchRec table-wise, row-wise.

Every side wraps the *same* example model (examples/criteo/models.py) built with the same
seed, so all start from the same weights:

* ``des``: ``DistributedModelParallel(plan={"sparse": des_plan(...)}, sharders=[DESSharder(fused_params)])``
  with EXACT_SGD fused like TorchRec's sides below (the dim-16 tables are FBGEMM TBEs updated
  in backward; the 1-dim wide tables keep sparse gradients), ``torch.optim.SGD`` on the rest;
* ``des_sparse``: ``DESSharder()`` without fused_params, one ``torch.optim.SGD`` over all
  parameters (embedding gradients are sparse);
* ``table_wise`` / ``row_wise``: TorchRec's ``EmbeddingBagCollectionSharder`` on ``sparse.ebc``
  (a subclass that also offers ROW_WISE on cpu: the stock one offers it for cuda only), FUSED kernel with EXACT_SGD
  applied in backward (the 1-dim wide tables: DENSE kernel, FBGEMM's fused TBE needs a
  dimension divisible by 4), ``torch.optim.SGD`` on the dense parameters; the FM /
  wide / first-layer operators run unsubstituted on the pooled embeddings.

Table-wise placements are the same for DES and TorchRec (``balanced_placement``: largest
tables first onto the least-loaded rank, uneven table counts).
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Tuple

import torch
import torch.distributed as dist

from recd_plugin.bench.report import load_example

SIDES = ("des", "des_sparse", "table_wise", "row_wise")


def example_models() -> Any:
    return load_example("examples/criteo/models.py", "recd_criteo_models")


def _cpu_sharder(lr: float) -> Any:
    """TorchRec's EBC sharder plus ROW_WISE on cpu (the stock one offers it for cuda only)."""
    from fbgemm_gpu.split_embedding_configs import EmbOptimType

    from recd_plugin.sharding.planner import RecDEmbeddingBagCollectionSharder

    return RecDEmbeddingBagCollectionSharder(fused_params={"optimizer": EmbOptimType.EXACT_SGD, "learning_rate": lr})


def build_side(side: str, make_model: Callable[[], torch.nn.Module], placement: Dict[str, Any],
               lr: float) -> Tuple[torch.nn.Module, Callable[[torch.Tensor, Any, torch.Tensor], torch.Tensor]]:
    """(sharded model, train step(dense, kjt, labels) -> loss) for one side on this rank."""
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.sharding_plan import construct_module_sharding_plan, row_wise, table_wise
    from torchrec.distributed.types import ShardingEnv, ShardingPlan
    from torchrec.optim.optimizers import in_backward_optimizer_filter

    from recd_plugin.des import DESSharder, des_plan
    from recd_plugin.bench.comm import count_ddp

    world = dist.get_world_size()
    env = ShardingEnv.from_process_group(dist.group.WORLD)
    model = make_model()
    if side in ("des", "des_sparse"):
        from fbgemm_gpu.split_embedding_configs import EmbOptimType

        fused = {"optimizer": EmbOptimType.EXACT_SGD, "learning_rate": lr} if side == "des" else None
        plan = ShardingPlan({"sparse": des_plan(model.sparse, placement, world_size=world)})
        dmp = DistributedModelParallel(model, env=env, device=torch.device("cpu"), plan=plan,
                                       sharders=[DESSharder(fused_params=fused)])
        opt = torch.optim.SGD([p for _, p in in_backward_optimizer_filter(dmp.named_parameters())], lr=lr)
    else:
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        sharder = _cpu_sharder(lr)
        # FBGEMM's fused TBE needs a dimension divisible by 4: the 1-dim wide tables take
        # TorchRec's DENSE kernel (dense gradient, applied by the dense SGD), its only option
        kernel = {c.name: "fused" if c.embedding_dim % 4 == 0 else "dense" for c in model.sparse.tables}
        gen = {t: (table_wise(rank=placement[t], compute_kernel=kernel[t]) if side == "table_wise"
                   else row_wise(compute_kernel=kernel[t])) for t in placement}
        module_plan = construct_module_sharding_plan(model.sparse.ebc, gen, sharder=sharder, local_size=world,
                                                     world_size=world, device_type="cpu")
        dmp = DistributedModelParallel(model, env=env, device=torch.device("cpu"),
                                       plan=ShardingPlan({"sparse.ebc": module_plan}), sharders=[sharder])
        dmp.load_state_dict(state)  # the sharded tables start from the same weights as DES
        opt = torch.optim.SGD([p for _, p in in_backward_optimizer_filter(dmp.named_parameters())], lr=lr)

    count_ddp(dmp)  # DDP's C++ reducer bypasses torch.distributed's Python functions: make it countable

    def step(dense: torch.Tensor, kjt: Any, labels: torch.Tensor) -> torch.Tensor:
        loss = torch.nn.functional.binary_cross_entropy_with_logits(dmp(dense, kjt), labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return dmp, step


def auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """ROC AUC by the rank statistic (Mann-Whitney U), average ranks for ties."""
    order = torch.argsort(scores.double())
    s = scores.double()[order]
    ranks = torch.empty_like(s)
    ranks[order] = torch.arange(1, len(s) + 1, dtype=torch.double)
    # ties: every member of a group of equal scores gets the group's mean rank
    _, inverse, counts = torch.unique_consecutive(s, return_inverse=True, return_counts=True)
    mean_rank = torch.zeros(len(counts), dtype=torch.double).index_add_(0, inverse, torch.arange(1, len(s) + 1, dtype=torch.double)) / counts
    ranks[order] = mean_rank[inverse]
    pos = labels.bool()
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
