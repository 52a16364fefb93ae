"""Fused local lookups for sharded DES: FBGEMM's TBE with the optimizer applied in backward.

Why: with ``DESSharder()`` a rank pools its tables with ``F.embedding_bag(sparse=True)`` and
the user's torch optimizer applies the sparse gradients after backward; on CPU torch's
``dense += sparse`` update alone costs more than FBGEMM's whole fused lookup + backward +
update. TorchRec's FUSED compute kernel does this for its own sharded EBC;
``DESSharder(fused_params=...)`` does the same for DES's local tables, with TorchRec's
``fused_params`` keys (``optimizer``, ``learning_rate``, ``eps``, ... as FBGEMM's
``SplitTableBatchedEmbeddingBagsCodegen`` takes them)::

    from fbgemm_gpu.split_embedding_configs import EmbOptimType
    from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
    from torchrec.optim.optimizers import in_backward_optimizer_filter
    sharder = DESSharder(fused_params={"optimizer": EmbOptimType.EXACT_ROWWISE_ADAGRAD, "learning_rate": 0.05})
    dmp = DistributedModelParallel(model, env=env, device=device, plan=plan, sharders=[sharder])
    dense = KeyedOptimizerWrapper(dict(in_backward_optimizer_filter(dmp.named_parameters())),
                                  lambda ps: torch.optim.SGD(ps, lr=0.05))
    opt = CombinedOptimizer([dmp.fused_optimizer, dense])   # as with TorchRec's fused tables

The table weights stay where ``state_dict`` had them (``local_weights.dim{D}``, now a view of
the TBE's storage, so loading a state_dict writes into the TBE) and the optimizer state is in
``dmp.fused_optimizer.state_dict()`` (``momentum1`` of the Adagrad variants), so checkpoints
keep both. Only dimensions divisible by 4 can be fused (FBGEMM's TBE requires it, like
TorchRec's FUSED kernel); tables of other dimensions keep the sparse-gradient path and the
user's optimizer.
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch
from torch import nn
from torchrec.optim.fused import EmptyFusedOptimizer, FusedOptimizer

from recd_plugin.errors import DESError

#: the fused optimizers whose state DES can expose for checkpoints: name -> momentum1 is per row
SUPPORTED = {"EXACT_SGD": None, "EXACT_ROWWISE_ADAGRAD": True, "EXACT_ADAGRAD": False}


def fusable(dim: int) -> bool:
    """FBGEMM's TBE takes dimensions that are multiples of 4 only."""
    return dim % 4 == 0


def fused_tbe(rows: Sequence[int], dim: int, feature_table_map: List[int], fused_params: Mapping[str, Any],
              device: torch.device) -> nn.Module:
    """One FBGEMM TBE over tables of ``rows[t]`` x ``dim`` rows (sum pooling, fp32) whose
    ``forward(indices, offsets) -> [B, len(feature_table_map) * dim]`` applies the optimizer
    of ``fused_params`` during backward."""
    from fbgemm_gpu.split_embedding_configs import EmbOptimType, SparseType
    from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation, PoolingMode
    from fbgemm_gpu.split_table_batched_embeddings_ops_training import ComputeDevice, SplitTableBatchedEmbeddingBagsCodegen

    params = dict(fused_params)
    optimizer = params.pop("optimizer", None)
    name = getattr(optimizer, "name", str(optimizer))
    if not isinstance(optimizer, EmbOptimType) or name not in SUPPORTED:
        raise DESError(f"DES fused_params: optimizer {optimizer!r} is not supported; give fused_params['optimizer'] "
                       f"one of EmbOptimType.{', EmbOptimType.'.join(SUPPORTED)} (their state is checkpointed), or "
                       "leave fused_params out and use a torch sparse optimizer (SGD / SparseAdam / Adagrad).")
    cuda = device.type == "cuda"
    specs = [(r, dim, EmbeddingLocation.DEVICE if cuda else EmbeddingLocation.HOST,
              ComputeDevice.CUDA if cuda else ComputeDevice.CPU) for r in rows]
    try:
        return SplitTableBatchedEmbeddingBagsCodegen(specs, feature_table_map=feature_table_map, optimizer=optimizer,
                                                     weights_precision=SparseType.FP32, pooling_mode=PoolingMode.SUM,
                                                     device=device, **params)
    except TypeError as e:
        raise DESError(f"DES fused_params: {e}; keys are those of FBGEMM's SplitTableBatchedEmbeddingBagsCodegen "
                       "(optimizer, learning_rate, eps, weight_decay, ...), as in TorchRec's fused_params.") from e


def _flat_view(tbe: nn.Module, dev: torch.Tensor, host: torch.Tensor, offsets: Sequence[int], per_row: int) -> torch.Tensor:
    """The TBE storage of all its tables as one [sum rows, per_row] view (tables back to back,
    in spec order: the layout DES's local weights have)."""
    base = dev if dev.numel() else host
    rows = [spec[0] for spec in tbe.embedding_specs]
    starts = [sum(rows[:t]) * per_row for t in range(len(rows))]
    if [int(o) for o in offsets] != starts:  # FBGEMM places tables back to back; check, do not assume
        raise DESError("DES fused: FBGEMM laid out the tables with gaps; this FBGEMM version is not supported by "
                       "DES's fused path (use DESSharder() without fused_params).")
    return base.view(-1)[: sum(rows) * per_row].view(sum(rows), per_row)


def fused_weight(tbe: nn.Module) -> nn.Parameter:
    """A parameter sharing the TBE's weights ([sum rows, D]); marked as updated in backward so
    ``in_backward_optimizer_filter`` keeps it away from the dense optimizer."""
    dim = tbe.embedding_specs[0][1]
    param = nn.Parameter(_flat_view(tbe, tbe.weights_dev, tbe.weights_host, tbe.weights_physical_offsets, dim))
    param._in_backward_optimizers = [EmptyFusedOptimizer()]  # type: ignore[attr-defined]
    return param


def momentum(tbe: nn.Module) -> Optional[torch.Tensor]:
    """The TBE's ``momentum1`` as one view ([sum rows] row-wise, [sum rows, D] element-wise),
    None for stateless optimizers."""
    per_row = SUPPORTED[tbe.optimizer.name]
    if per_row is None:
        return None
    width = 1 if per_row else tbe.embedding_specs[0][1]
    flat = _flat_view(tbe, tbe.momentum1_dev, tbe.momentum1_host, tbe.momentum1_physical_offsets, width)
    return flat.view(-1) if per_row else flat


class DESFusedOptimizer(FusedOptimizer):
    """The KeyedOptimizer DMP collects for the fused tables: ``step`` only passes learning-rate
    changes (``param_groups[0]["lr"]``) to the TBEs, the update itself ran in backward; state
    is each table group's ``momentum1`` (a view, so ``load_state_dict`` writes into the TBE)."""

    def __init__(self, params: Dict[str, nn.Parameter], tbes: Dict[str, nn.Module], lr: float) -> None:
        state: Dict[Any, Any] = {}
        for key, param in params.items():
            m = momentum(tbes[key])
            state[param] = {"momentum1": m} if m is not None else {}
        self._tbes = list(tbes.values())
        self._lr = lr
        super().__init__(params, state, [{"params": list(params.values()), "lr": lr}])

    def step(self, closure: Any = None) -> None:
        lr = self.param_groups[0]["lr"] if self.param_groups else self._lr
        if lr != self._lr:
            for tbe in self._tbes:
                tbe.set_learning_rate(lr)
            self._lr = lr

    def zero_grad(self, set_to_none: bool = False) -> None:
        pass
