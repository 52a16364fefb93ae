"""Id range checks before a lookup into flattened tables (FAE's hot/cold groups, DES shards).

::

    from recd_plugin.sparse.ids import first_bad_id
    bad = first_bad_id(kjt.values(), kjt.length_per_key(), rows)   # (feature index, id) or None
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np
import torch


def first_bad_id(values: torch.Tensor, counts: Sequence[int], rows: torch.Tensor,
                 exact: bool = True) -> Optional[Tuple[int, int]]:
    """``(k, id)`` of the first id of ``values`` outside its table, or None.

    ``values`` [V] ids in segments (one per feature), segment k holding ``counts[k]`` ids that
    must lie in ``[0, rows[k])``; ``rows`` [K] on ``values``' device, -1 for a segment that is
    never looked up (a KJT feature no table reads: any id passes).

    Why: an id past its table does not fail where the tables are flattened into one weight
    (a hot/cold group, a DES shard's local tables): it reads another table's row. And on CUDA
    an out-of-range gather is a device-side assert that names nothing. With ``exact`` (and
    always for CPU tensors, where it costs no synchronization) the answer is read back (one
    host sync) so the caller can raise an error naming the feature. Otherwise the check is
    queued on the device (``torch._assert_async``): no sync, and a bad id stops the job at the
    next synchronization instead of training on another table's rows.
    """
    if not values.numel():
        return None
    limit = torch.repeat_interleave(rows, torch.tensor(list(counts), device=rows.device), output_size=values.numel())
    bad = ((values < 0) | (values >= limit)) & (limit >= 0)
    if not exact and values.device.type != "cpu":
        torch._assert_async(~bad.any(), "recd-plugin: an embedding id is outside its table; run with id checks "
                                        "on (verify_batches=-1) on a fresh process to name the feature")
        return None
    if not bool(bad.any()):
        return None
    i = int(bad.nonzero()[0])
    return int(np.searchsorted(np.cumsum(counts), i, side="right")), int(values[i])
