"""The two kernels of the hot/cold layout: the id remap and a sum-pooled lookup.

* :func:`split_tiers`: global row ids -> which tier holds each id, its slot there, and the
  per-tier bag offsets. It needs only the sorted hot ids (binary search), never a
  table-sized remap array.
* :func:`bag_sum`: ``embedding_bag(mode="sum")`` with a backward that scatters with one
  ``index_add_`` instead of torch's sort-based CPU backward.

Both are written with index_select / index_add / cumsum, which stay on one thread on CPU
(advanced indexing and large sorts wake torch's second thread, which costs milliseconds on
a busy machine; see ``recd_plugin.sparse.ikjt.jagged_index_select``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from recd_plugin.sparse.ikjt import complete_cumsum


@dataclass
class TierSplit:
    """Where the ids of a jagged batch live. V ids in ``bags`` bags, in bag order.

    ``hot_sel`` [n_hot] / ``cold_sel`` [n_cold]: positions (in [0, V)) of the ids held by each
    tier, in order. ``hot_slot`` [n_hot]: their rows in the hot tensor. ``cold_rank`` [n_cold]:
    gid - (#hot gids below it), i.e. the row in a tensor of all cold rows of the group in gid
    order. ``hot_offsets`` / ``cold_offsets`` [bags + 1]: each tier's bag offsets.
    """

    hot_sel: torch.Tensor
    cold_sel: torch.Tensor
    hot_slot: torch.Tensor
    cold_rank: torch.Tensor
    hot_offsets: torch.Tensor
    cold_offsets: torch.Tensor

    @property
    def n_hot(self) -> int:
        return self.hot_sel.numel()

    @property
    def n_cold(self) -> int:
        return self.cold_sel.numel()


def split_tiers(gid: torch.Tensor, hot_gids: torch.Tensor, offsets: torch.Tensor) -> TierSplit:
    """Split ids between the tiers.

    Args:
        gid: [V] int64 global row ids (table base + row id) in [0, R).
        hot_gids: [H + 1] int64: the sorted hot gids, then the sentinel R.
        offsets: [bags + 1] int64 bag offsets into ``gid``.
    """
    # Binary search instead of a table-sized remap: memory is the hot set only (an int32 remap
    # costs 4 bytes x every row: 400 MB for a 10^8-row table, 6% more memory on dim-16 tables),
    # and the search over a cache-resident [H] array (~17 steps per id at H = 10^5) costs about
    # what one cache miss per id into a table-sized remap does at these batch sizes.
    pos = torch.searchsorted(hot_gids, gid)  # = #hot gids below gid
    is_hot = hot_gids.index_select(0, pos) == gid
    hot_cum = complete_cumsum(is_hot)
    hot_offsets = hot_cum.index_select(0, offsets)
    hot_sel = is_hot.nonzero().squeeze(1)
    cold_sel = (~is_hot).nonzero().squeeze(1)
    return TierSplit(hot_sel=hot_sel, cold_sel=cold_sel, hot_slot=pos.index_select(0, hot_sel),
                     cold_rank=(gid - pos).index_select(0, cold_sel), hot_offsets=hot_offsets,
                     cold_offsets=offsets - hot_offsets)


class _BagSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight: torch.Tensor, idx: torch.Tensor, offsets: torch.Tensor,
                psw: Optional[torch.Tensor]) -> torch.Tensor:
        ctx.save_for_backward(idx, offsets, psw)
        ctx.shape = weight.shape
        return F.embedding_bag(idx, weight, offsets, mode="sum", include_last_offset=True, per_sample_weights=psw)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        idx, offsets, psw = ctx.saved_tensors
        n = idx.numel()
        # The bag of each id = number of bag ends at or before its position (empty bags too).
        ends = torch.zeros(n + 1, dtype=torch.long, device=idx.device)
        ends.index_add_(0, offsets[1:], torch.ones_like(offsets[1:]))
        rows = grad.index_select(0, ends.cumsum(0)[:n])
        if psw is not None:
            rows = rows * psw.unsqueeze(1)
        out = torch.zeros(ctx.shape, dtype=grad.dtype, device=grad.device)
        return out.index_add_(0, idx, rows), None, None, None


def bag_sum(weight: torch.Tensor, idx: torch.Tensor, offsets: torch.Tensor,
            per_sample_weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """[bags, D]: per bag, the sum of ``weight[idx]`` rows (times ``per_sample_weights``).

    ``offsets`` [bags + 1] (last = len(idx)). Gradient: weight only, dense [N, D].
    Why not plain ``F.embedding_bag``: its CPU backward sorts the ids; one lookup over all
    tables (~50k ids) crosses the parallel-sort threshold and cost 10-150 ms per step on a
    busy 2-core machine, where TorchRec's per-table lookups sort serially.
    """
    return _BagSum.apply(weight, idx, offsets, per_sample_weights)
