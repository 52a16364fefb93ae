"""The two kernels of the hot/cold layout: the id remap and a sum-pooled lookup.

* :func:`split_tiers`: global row ids -> which tier holds each id, its slot there, and the
  per-tier bag offsets, through a table-sized remap (fast) or a binary search over the
  sorted hot ids (no table-sized array; see the comment in split_tiers).
* :func:`bag_sum`: ``embedding_bag(mode="sum")`` with a backward that scatters with one
  ``index_add_`` instead of torch's sort-based CPU backward.

Both are written with index_select / index_add / cumsum, which stay on one thread on CPU
(advanced indexing and large sorts wake torch's second thread, which costs milliseconds on
a busy machine; see ``recd_plugin.sparse.ikjt.jagged_index_select``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import numpy as np
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


def build_remap(hot_gids: torch.Tensor, num_rows: int, table: bool) -> torch.Tensor:
    """The remap :func:`split_tiers` reads, from the sorted hot gids [H] of a group of R rows.

    ``table=True``: [R] int32 (int64 past 2^31 rows): hot gid -> its hot slot, cold gid ->
    -(1 + its cold rank). ``table=False``: [H + 1] int64, the hot gids then the sentinel R.
    """
    if not table:
        return torch.cat([hot_gids, torch.tensor([num_rows])])
    dtype = np.int32 if num_rows < 2**31 else np.int64
    hot = hot_gids.numpy()
    below = np.zeros(num_rows, dtype=dtype)  # #hot gids at or below each gid, built in place
    below[hot] = 1
    np.cumsum(below, out=below)
    out = np.arange(num_rows, dtype=dtype)
    out -= below  # cold rank of each cold gid
    np.subtract(-1, out, out=out)
    out[hot] = np.arange(len(hot), dtype=dtype)
    return torch.from_numpy(out)


def split_tiers(gid: torch.Tensor, remap: torch.Tensor, offsets: torch.Tensor, table: bool) -> TierSplit:
    """Split ids between the tiers.

    Args:
        gid: [V] int64 global row ids (table base + row id) in [0, R).
        remap: from :func:`build_remap` (a table-sized remap if ``table``, else the hot gids).
        offsets: [bags + 1] int64 bag offsets into ``gid``.
    """
    # Two remaps, picked per group by HotColdEmbeddingBagCollection: a table-sized one is one
    # gather (0.04 ms for 53k Criteo ids, measured) but costs 4 bytes per row *on the hot
    # tier's device*; a binary search over the sorted hot ids costs nothing but the hot ids,
    # at ~2 ms per 53k ids (~10% of a CPU training step), so it is kept for GPUs where a
    # table-sized remap would eat more HBM than the hot rows themselves.
    if table:
        r = remap.index_select(0, gid).long()
        is_hot = r >= 0
        slot, rank = r, -1 - r
    else:
        pos = torch.searchsorted(remap, gid)  # = #hot gids below gid
        is_hot = remap.index_select(0, pos) == gid
        slot, rank = pos, gid - pos
    hot_cum = complete_cumsum(is_hot)
    hot_offsets = hot_cum.index_select(0, offsets)
    hot_sel = is_hot.nonzero().squeeze(1)
    cold_sel = (~is_hot).nonzero().squeeze(1)
    return TierSplit(hot_sel=hot_sel, cold_sel=cold_sel, hot_slot=slot.index_select(0, hot_sel),
                     cold_rank=rank.index_select(0, cold_sel), hot_offsets=hot_offsets,
                     cold_offsets=offsets - hot_offsets)


def split_counts(split: TierSplit, strides: List[int]) -> List[int]:
    """Cold ids per feature (``strides``: bags per feature, in bag order)."""
    bounds = torch.tensor(np.cumsum([0] + strides), device=split.cold_offsets.device)
    return torch.diff(split.cold_offsets.index_select(0, bounds)).tolist()


def cold_pools(cold_weights: List[torch.Tensor], shifts: List[int], split: TierSplit,
               weights: Optional[torch.Tensor], strides: List[int]) -> Tuple[torch.Tensor, int]:
    """([bags, D] cold partial sums, lookups made). Per feature k: one lookup into its table's
    cold tensor ``cold_weights[k]`` (on that tensor's device) at rows ``cold_rank - shifts[k]``;
    zeros for a feature without cold ids. ``weights``: per-sample weights of all V ids, or None.
    One tensor per table (not one for the group): see HotColdEmbeddingBagCollection."""
    psw = None if weights is None else weights.index_select(0, split.cold_sel)
    parts, c0, b0, lookups = [], 0, 0, 0
    for w, shift, n, bags in zip(cold_weights, shifts, split_counts(split, strides), strides):
        if n == 0:
            parts.append(torch.zeros(bags, w.shape[1], dtype=w.dtype, device=w.device))
        else:
            dev, lookups = w.device, lookups + 1
            parts.append(F.embedding_bag(
                (split.cold_rank[c0:c0 + n] - shift).to(dev), w, (split.cold_offsets[b0:b0 + bags + 1] - c0).to(dev),
                mode="sum", include_last_offset=True,
                per_sample_weights=None if psw is None else psw[c0:c0 + n].to(dev)))
        c0, b0 = c0 + n, b0 + bags
    return torch.cat(parts).to(split.cold_offsets.device), lookups


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
