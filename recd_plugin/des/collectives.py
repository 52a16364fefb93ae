"""The three collectives of sharded DES, with exact gradients.

* :func:`exchange_ids` - ids to the ranks that own their rows (two ``all_to_all_single``:
  per-destination counts, then one byte payload of int32 lengths + the ids in the KJT's dtype). Every owner receives
  the ids of the *whole global batch* for its rows.
* :func:`reduce_scatter_partials` - the operators' partials of the global batch, summed over
  ranks and scattered to the ranks that own the samples; backward is the matching
  ``all_gather_single`` of the partial gradients.
* :func:`sync_replicated_grads` - identity forward; backward all-reduces the gradients of
  the small replicated parameters (operator biases, ``W_x``, the ``W_f`` of row-wise tables)
  in one flat all-reduce.

Gradient convention (the one ``DistributedModelParallel`` + DDP gives with TorchRec's
sharded EBC): after ``loss_r.backward()`` on every rank r, every parameter's gradient is the
gradient of ``(1/W) * sum_r loss_r``. DDP averages dense gradients; TorchRec's pooled
all-to-all / reduce-scatter backward divides embedding gradients by W; so do we, in the
all-gather backward (``grad_divisor=W``). Replicated parameters: averaged (divisor W) like
DDP, except the W_f of row-wise tables, whose per-rank gradients are partial sums over that
rank's rows and already carry the 1/W: those are summed (divisor 1).

Uneven batches: gloo's ``allgather`` refuses unequal sizes (``invalid tensor size``), so
every rank's samples occupy a slot of ``B_max = max_r B_r`` rows in the global layout
``[W * B_max, K]``; the padding rows are empty bags (zero partials, zero gradients). gloo
does implement reduce-scatter (checked with torch 2.13 and 2.14), so no all-reduce + slice.
``reduce_scatter_single`` / ``all_gather_single`` are the names both torch releases have
(2.14 deprecates ``reduce_scatter_tensor`` / ``all_gather_into_tensor`` in their favour).
"""

from __future__ import annotations

from typing import Any, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist


class _ReduceScatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, partials: torch.Tensor, group: Optional[dist.ProcessGroup], grad_divisor: float) -> torch.Tensor:
        ctx.group, ctx.grad_divisor = group, grad_divisor
        world = dist.get_world_size(group)
        out = partials.new_empty(partials.shape[0] // world, *partials.shape[1:])
        dist.reduce_scatter_single(out, partials.contiguous(), op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Tuple[Optional[torch.Tensor], None, None]:
        world = dist.get_world_size(ctx.group)
        full = grad.new_empty(grad.shape[0] * world, *grad.shape[1:])
        dist.all_gather_single(full, grad.contiguous(), group=ctx.group)
        return full / ctx.grad_divisor, None, None


def reduce_scatter_partials(partials: torch.Tensor, batch_sizes: Sequence[int], group: Optional[dist.ProcessGroup] = None,
                            grad_divisor: Optional[float] = None) -> torch.Tensor:
    """[W * B_max, K] partials of the padded global batch (rank s's samples at rows
    ``s*B_max : s*B_max + B_s``) -> [B_rank, K], summed over ranks. Backward: all-gather of
    the [B_max, K] gradients, divided by ``grad_divisor`` (default: the world size)."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    divisor = float(world if grad_divisor is None else grad_divisor)
    return _ReduceScatter.apply(partials, group, divisor)[: batch_sizes[rank]]


class _SyncGrads(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, group: Optional[dist.ProcessGroup], divisors: Tuple[float, ...], *params: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        ctx.group, ctx.divisors = group, divisors
        ctx.shapes = [p.shape for p in params]
        ctx.device = params[0].device if params else torch.device("cpu")
        return tuple(p.view_as(p) for p in params)

    @staticmethod
    def backward(ctx: Any, *grads: Optional[torch.Tensor]) -> Tuple[Any, ...]:
        flat = torch.cat([(g if g is not None else torch.zeros(s, device=ctx.device)).reshape(-1) for g, s in zip(grads, ctx.shapes)])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=ctx.group)
        out, i = [], 0
        for s, d in zip(ctx.shapes, ctx.divisors):
            n = s.numel()
            out.append(flat[i:i + n].view(s) / d)
            i += n
        return (None, None, *out)


def sync_replicated_grads(params: Sequence[torch.Tensor], divisors: Sequence[float],
                          group: Optional[dist.ProcessGroup] = None) -> List[torch.Tensor]:
    """Identity on ``params``; in backward their gradients are summed over ranks (one flat
    all-reduce) and divided by ``divisors`` (W: average like DDP; 1: sum of partial grads)."""
    if not params:
        return []
    return list(_SyncGrads.apply(group, tuple(float(d) for d in divisors), *params))


# ------------------------------------------------------------------------------------------
# Ids to the owners of their rows.

#: One slot = (feature index in the KJT, first row, end row): an id stream a destination rank needs.
Slot = Tuple[int, int, int]


def exchange_ids(lengths: torch.Tensor, values: Sequence[torch.Tensor], slots_per_rank: Sequence[Sequence[Slot]],
                 full_range: Sequence[Sequence[bool]], id_dtype: torch.dtype,
                 group: Optional[dist.ProcessGroup] = None) -> Tuple[List[int], List[torch.Tensor], List[List[torch.Tensor]]]:
    """Send each destination the ids of its slots for this rank's B samples.

    ``lengths``: [num_features, B] of the local KJT; ``values[f]``: the ids of feature f.
    A slot keeps ids in ``[lo, hi)`` and re-bases them to ``id - lo`` (row-wise shards);
    ``full_range[s][j]`` says slot j of rank s is a whole table (no filtering needed).
    Returns ``(batch_sizes [W], lengths per local slot per source [[B_s]], values ...)``:
    ``recv_lengths[j][s]`` and ``recv_values[j][s]`` are slot j's bags of source s's samples.
    """
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    batch, device = lengths.shape[1], lengths.device  # every tensor made here on the input's device (NCCL: CUDA)
    send_len: List[List[torch.Tensor]] = []
    send_val: List[List[torch.Tensor]] = []
    for s in range(world):
        ls, vs = [], []
        for (f, lo, hi), whole in zip(slots_per_rank[s], full_range[s]):
            if whole:
                ls.append(lengths[f])
                vs.append(values[f])
            else:  # row-wise: keep the ids of this row range, count them per sample
                v = values[f]
                keep = (v >= lo) & (v < hi)
                sample = torch.repeat_interleave(torch.arange(batch, device=device), lengths[f].long(), output_size=v.numel())
                ls.append(torch.zeros(batch, dtype=torch.long, device=device).index_add_(0, sample, keep.long()))
                vs.append(v[keep] - lo)
        send_len.append(ls)
        send_val.append(vs)
    n_vals = [sum(int(v.numel()) for v in vs) for vs in send_val]
    meta = torch.tensor([[batch, n] for n in n_vals], dtype=torch.long, device=device).reshape(-1)
    recv_meta = torch.empty_like(meta)
    dist.all_to_all_single(recv_meta, meta, group=group)  # per source: (B_s, number of ids for me)
    recv_meta = recv_meta.view(world, 2).tolist()
    batch_sizes = [b for b, _ in recv_meta]
    # one byte payload per destination: lengths as int32 (like TorchRec's input dist), then
    # the ids in the KJT's own dtype (no narrowing, so the id bytes match TorchRec's)
    isz = torch.tensor([], dtype=id_dtype).element_size()

    def as_bytes(xs: List[torch.Tensor], dtype: torch.dtype) -> List[torch.Tensor]:
        return [x.to(dtype).contiguous().view(torch.uint8) for x in xs]

    payload = torch.cat([t for s in range(world) for t in as_bytes(send_len[s], torch.int32) + as_bytes(send_val[s], id_dtype)]
                        or [torch.empty(0, dtype=torch.uint8, device=device)])
    in_splits = [4 * len(slots_per_rank[s]) * batch + isz * n_vals[s] for s in range(world)]
    n_local = len(slots_per_rank[rank])
    out_splits = [4 * n_local * b + isz * n for b, n in recv_meta]
    recv = payload.new_empty(sum(out_splits))
    dist.all_to_all_single(recv, payload, out_splits, in_splits, group=group)
    recv_lengths: List[List[torch.Tensor]] = [[] for _ in range(n_local)]
    recv_values: List[List[torch.Tensor]] = [[] for _ in range(n_local)]
    for s, part in enumerate(recv.split(out_splits)):
        b = batch_sizes[s]
        # clone: a byte slice at an unaligned offset cannot be viewed as a wider dtype
        lens = part[: 4 * n_local * b].clone().view(torch.int32).view(n_local, b)
        vals = part[4 * n_local * b:].clone().view(id_dtype)
        per_slot = vals.split(lens.sum(dim=1).tolist()) if n_local else []
        for j in range(n_local):
            recv_lengths[j].append(lens[j])
            recv_values[j].append(per_slot[j])
    return batch_sizes, recv_lengths, recv_values
