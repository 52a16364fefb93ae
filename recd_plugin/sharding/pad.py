"""Equal per-rank row counts for IKJTs: pad every key to the maximum over ranks with empty bags.

Why: TorchRec's ROW_WISE sharding reduce-scatters pooled embeddings; with variable-batch
(IKJT) inputs its backward all-gathers per-rank pieces whose sizes follow each rank's row
count per key, and gloo (like nccl's all_gather_into_tensor) needs equal sizes on every rank:
``ProcessGroupGloo::allgather: invalid tensor size``. Each rank deduplicates its own batch, so
its unique counts differ. Padding every key's rows to the maximum over ranks with empty bags
(zero length, pooled to rows no sample reads; ``inverse_indices`` unchanged) makes the sizes
equal. The cost is one all_reduce of K int64 per batch (K = number of keys). TABLE_WISE and
COLUMN_WISE take unequal counts, but padding does them no harm, so sharded mode always pads
(the plan is not known where the loader is wrapped).

Example::

    from recd_plugin.sharding.pad import pad_to_max_over_ranks
    ikjt = pad_to_max_over_ranks(batch.sparse_features)   # inside torch.distributed, each rank
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recd_plugin.sparse.plan import segment_positions


def pad_to_max_over_ranks(kjt: KeyedJaggedTensor, group: Optional[dist.ProcessGroup] = None) -> KeyedJaggedTensor:
    """IKJT [key k: U_k rows] -> IKJT [key k: max over ranks of U_k rows], same values and
    inverse indices; extra rows are empty bags. A KJT without inverse indices is returned as
    is (only variable-batch inputs need this)."""
    if kjt.inverse_indices_or_none() is None or not dist.is_initialized():
        return kjt
    strides = torch.tensor(kjt.stride_per_key(), dtype=torch.long)
    target = strides.clone()
    dist.all_reduce(target, op=dist.ReduceOp.MAX, group=group)
    if torch.equal(target, strides):
        return kjt
    # Each key's lengths segment gets (target - stride) zeros appended: key k's rows move to
    # [start_k, start_k + stride_k) of a zero tensor of the padded size (one index_copy
    # instead of K small concatenations).
    lengths = kjt.lengths()
    starts = (torch.cumsum(target, 0) - target).numpy()
    where = torch.from_numpy(segment_positions(starts, strides.numpy())).to(lengths.device)
    padded = lengths.new_zeros(int(target.sum()))
    padded.index_copy_(0, where, lengths)
    return KeyedJaggedTensor(
        keys=kjt.keys(), values=kjt.values(), weights=kjt.weights_or_none(), lengths=padded,
        stride_per_key_per_rank=[[int(t)] for t in target.tolist()], inverse_indices=kjt.inverse_indices(),
    )
