"""Small integer agreements between ranks, for decisions every rank must take alike.

Why not ``torch.distributed`` directly: the plugin also runs without a process group (one
process, no DMP), and nccl reduces only CUDA tensors while gloo takes CPU ones.
"""

from __future__ import annotations

from typing import List

import torch


def distributed() -> bool:
    """Is a process group of more than one rank initialized?"""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def say(line: str) -> None:
    """Print ``line`` once per job: on rank 0 (or the only process)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0:
        print(line, flush=True)


def all_reduce_ints(values: List[int], op: str = "sum") -> List[int]:
    """``values`` reduced over ranks (``op``: "sum", "min" or "max"); as is without a group."""
    if not distributed() or not values:
        return list(values)
    import torch.distributed as dist

    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor(values, dtype=torch.long, device=device)
    dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}[op])
    return t.tolist()
