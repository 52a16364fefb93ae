"""Count the bytes every torch.distributed collective moves: measured, not estimated.

Benchmark tooling, not runtime API: it patches ``torch.distributed`` attributes while it is
active, which no training job should have done to it by a library.

TorchRec's sharded modules (input KJT all-to-all, pooled-embedding all-to-all and
reduce-scatter, their backward passes) and our own DES operators all call the
``torch.distributed`` functions through the module attribute (``dist.all_to_all_single(...)``),
so wrapping those attributes sees every tensor they move. Nothing in TorchRec reports
communication volume per step; the benchmarks need it to compare plain KJT vs IKJT and DES vs
TorchRec sharding.

What is counted, per call, is the bytes this rank *sends to other ranks*, algorithm
independent: for all-to-all, every split except the one it keeps; for reduce-scatter, every
chunk except its own ((W-1)/W of the input: its own chunk never leaves the rank, exactly like
the all-to-all split it keeps); for all-gather, its input once per other rank ((W-1) x); for
all-reduce, 2 (W-1)/W of the input (reduce-scatter + all-gather, the ring optimum); for
broadcast, (W-1) x on the source and 0 elsewhere; send/isend, the tensor. ``by_op`` breaks the
total down by function name, ``calls`` counts calls, ``float_by_op`` keeps the floating-point
part (embeddings, partial results, gradients) apart from the integer part (ids, lengths,
splits), which is how the benchmarks tell embedding traffic from id traffic.

DDP's gradient all-reduce runs in its C++ reducer, not through these functions: call
:func:`count_ddp` on the model (it installs PyTorch's stock ``allreduce_hook``, which calls
``dist.all_reduce`` and so is counted; same math as DDP's default).

Example::

    from recd_plugin.bench.comm import CommCounter
    with CommCounter() as comm:
        loss = model(batch).sum(); loss.backward()
    comm.bytes, comm.by_op       # e.g. 81920, {"all_to_all_single": 65536, "reduce_scatter_single": 16384}
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

#: The wrapped functions and how to count what one call sends.
#: ``*_single`` are torch 2.13+'s names for ``reduce_scatter_tensor`` / ``all_gather_into_tensor``
#: (deprecated in 2.14, where they call the ``*_single`` functions of ``distributed_c10d``
#: directly, not through these attributes: one call is never counted twice). A name the
#: installed torch lacks is skipped.
_OPS = (
    "all_to_all_single", "all_to_all", "reduce_scatter_single", "reduce_scatter_tensor", "reduce_scatter",
    "all_gather_single", "all_gather_into_tensor", "all_gather", "all_reduce", "broadcast", "send", "isend",
)


def _nbytes(t: Any) -> int:
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


#: where each op's outgoing data is: (position, keyword) of its input tensor (or tensor list)
_DATA = {"all_to_all_single": (1, "input"), "all_to_all": (1, "input_tensor_list"), "reduce_scatter": (1, "input_list"),
         "reduce_scatter_single": (1, "input"), "reduce_scatter_tensor": (1, "input"), "all_gather": (1, "tensor"),
         "all_gather_single": (1, "input_tensor"), "all_gather_into_tensor": (1, "input_tensor")}
#: the collectives that carry embeddings (pooled rows, partial results, their gradients) and
#: ids, as opposed to all-reduce (DDP's dense gradients) and point-to-point
EMBEDDING_OPS = tuple(_DATA)


def _arg(args: Sequence[Any], kwargs: Dict[str, Any], i: int, name: str) -> Any:
    return kwargs[name] if name in kwargs else (args[i] if len(args) > i else None)


def _is_float(op: str, args: Sequence[Any], kwargs: Dict[str, Any]) -> bool:
    """Whether the tensor(s) one call of ``op`` sends are floating point."""
    t = _arg(args, kwargs, *_DATA.get(op, (0, "tensor")))
    if isinstance(t, (list, tuple)):
        t = t[0] if t else None
    return isinstance(t, torch.Tensor) and t.is_floating_point()


def _sent(op: str, args: Sequence[Any], kwargs: Dict[str, Any]) -> int:
    """Bytes this rank sends in one call of ``op``."""
    def arg(i: int, name: str) -> Any:
        return _arg(args, kwargs, i, name)

    group = kwargs.get("group")
    if op == "all_to_all_single":
        inp, splits = arg(1, "input"), arg(3, "input_split_sizes")
        total = _nbytes(inp)
        if not total:
            return 0
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        row = total // max(inp.shape[0], 1) if inp.dim() else total
        kept = (splits[rank] * row) if splits else total // world
        return total - kept
    if op == "all_to_all":
        inputs: List[torch.Tensor] = arg(1, "input_tensor_list") or []
        rank = dist.get_rank(group)
        return sum(_nbytes(t) for i, t in enumerate(inputs) if i != rank)
    world = dist.get_world_size(group)
    if op == "reduce_scatter":
        inputs = arg(1, "input_list") or []
        rank = dist.get_rank(group)
        return sum(_nbytes(t) for i, t in enumerate(inputs) if i != rank)
    if op in ("reduce_scatter_single", "reduce_scatter_tensor"):
        return _nbytes(arg(1, "input")) * (world - 1) // world
    if op in ("all_gather", "all_gather_single", "all_gather_into_tensor"):
        return _nbytes(arg(*_DATA[op])) * (world - 1)
    if op == "all_reduce":
        return 2 * _nbytes(arg(0, "tensor")) * (world - 1) // world
    if op == "broadcast":
        src = arg(1, "src")
        return _nbytes(arg(0, "tensor")) * (world - 1) if src == dist.get_rank() else 0
    return _nbytes(arg(0, "tensor"))  # send, isend


class CommCounter:
    """Context manager: while active, every listed collective is counted (all threads)."""

    def __init__(self, ops: Sequence[str] = _OPS, record: bool = False) -> None:
        self.ops = tuple(ops)
        self.by_op: Dict[str, int] = {}
        self.calls: Dict[str, int] = {}
        #: the floating-point share of ``by_op`` (ids and lengths are integer tensors)
        self.float_by_op: Dict[str, int] = {}
        #: with ``record``: every call as (op, bytes sent), in call order
        self.records: Optional[List[Tuple[str, int]]] = [] if record else None
        self._saved: Dict[str, Callable[..., Any]] = {}

    @property
    def bytes(self) -> int:
        return sum(self.by_op.values())

    def reset(self) -> None:
        self.by_op.clear()
        self.calls.clear()
        self.float_by_op.clear()
        if self.records is not None:
            self.records.clear()

    def _wrap(self, op: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def counted(*args: Any, **kwargs: Any) -> Any:
            sent = _sent(op, args, kwargs)
            self.by_op[op] = self.by_op.get(op, 0) + sent
            self.calls[op] = self.calls.get(op, 0) + 1
            if _is_float(op, args, kwargs):
                self.float_by_op[op] = self.float_by_op.get(op, 0) + sent
            if self.records is not None:
                self.records.append((op, sent))
            return fn(*args, **kwargs)
        return counted

    def __enter__(self) -> "CommCounter":
        if self._saved:
            raise RuntimeError("CommCounter is already active")
        for op in self.ops:
            if not hasattr(dist, op):
                continue
            self._saved[op] = getattr(dist, op)
            setattr(dist, op, self._wrap(op, self._saved[op]))
        return self

    def __exit__(self, *exc: Optional[BaseException]) -> None:
        for op, fn in self._saved.items():
            setattr(dist, op, fn)
        self._saved.clear()


def count_ddp(module: torch.nn.Module) -> int:
    """Route every ``DistributedDataParallel`` inside ``module`` (e.g. the one DMP wraps the
    dense part in) through PyTorch's stock ``allreduce_hook`` so that CommCounter sees its
    gradient all-reduce. Same result as DDP's built-in reducer (sum / world size). Returns the
    number of DDP modules hooked; call once, before the first backward."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
    from torch.nn.parallel import DistributedDataParallel

    hooked = 0
    for m in module.modules():
        if isinstance(m, DistributedDataParallel):
            m.register_comm_hook(None, allreduce_hook)
            hooked += 1
    return hooked

