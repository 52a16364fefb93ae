"""What the dedup route will give: a cost model of the step, with the route's fixed costs.

::

    from recd_plugin.analyze.route import measure_route_costs, predict
    costs = measure_route_costs(sample, group, batch_size=1024)    # timed here, on the real data
    p = predict(f=0.5, u=0.03, costs=costs, step_ms=40.0)
    p.ratio, p.route, p.why              # 1.9, "dedup", "..."

The plugin decides each group on the job's own training steps (``recd_plugin.transforms.route``)
and keeps it only where its steps take at most ``KEEP_BELOW`` (0.97) of the plain steps' time
(``keeps``). ``predict`` applies the same rule to a predicted step:

* plain step T (ms), of which a share f is deduplicable work (the group's embedding lookups
  and the towers over them), which shrinks to the unique fraction u of the rows;
* the route's fixed costs c (ms per step): expanding the deduplicated outputs back to one row
  per sample, forward and backward (``expand_ms``, measured here at the group's width);
* predicted step (1 - f) T + f u T + c; speed-up T / that; when ``keeps`` says no, the plugin
  will leave the group on TorchRec's plain path and the speed-up is 1.0.

What it cannot see (the job decides): a model built on ``meta``, a GPU step, and the cost of the
user's own code around the modules; ``recd-plugin analyze`` says so with its prediction.

Without T the fixed costs cannot be set against the step; the prediction is then the Amdahl
bound 1 / ((1 - f) + f u) and says so. The loader's cost (building the IKJT, ``loader_ms``)
is reported apart: it runs in the data loader, off the training step when the loader has
workers or the pipeline overlaps it.

A benchmark's f measured as 1 - T_one / T_plain (T_one: the plugin's step with U = 1) already
holds the fixed costs; pass ``costs=None`` with such an f.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import List, Optional

import numpy as np
import torch

from recd_plugin.analyze.recd import GroupReport, amdahl_bound
from recd_plugin.analyze.sources import DataSample
from recd_plugin.transforms.route import KEEP_BELOW, keeps

#: Embedding width per grouped feature assumed when the model is not described.
DEFAULT_DIM = 16
_REPEATS = 5


@dataclass
class RouteCosts:
    """The route's fixed costs per step of ``batch_size`` samples, timed on this machine."""

    batch_size: int
    width: int          # floats per sample the expansion copies (grouped features x dim)
    expand_ms: float    # U rows -> B rows, forward index_select + backward index_add
    loader_ms: float    # build_ikjt(aligned=True) of one batch, in the data loader


@dataclass
class Prediction:
    ratio: float        # plugin / plain samples per second
    route: str          # "dedup" or "plain" (what the job's decision would choose: ``keeps``)
    bound: float        # Amdahl bound 1 / ((1 - f) + f u), no fixed costs
    why: str


def _kjt_batches(sample: DataSample, group: GroupReport, batch_size: int, count: int) -> List[object]:
    """Up to ``count`` KJTs of the group's features, consecutive batches of the stored order."""
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    from recd_plugin.data.columns import JaggedColumn

    columns = {f: JaggedColumn.from_arrow(sample.table.column(f), f) for f in group.features}
    out = []
    for start in range(0, sample.rows - batch_size + 1, batch_size)[:count]:
        rows = np.arange(start, start + batch_size)
        parts = [columns[f].gather(rows) for f in group.features]
        out.append(KeyedJaggedTensor(keys=list(group.features),
                                     values=torch.from_numpy(np.concatenate([v for v, _ in parts])),
                                     lengths=torch.from_numpy(np.concatenate([n for _, n in parts]))))
    return out


def _median_ms(fn, repeats: int = _REPEATS) -> float:
    times = []
    for _ in range(repeats + 1):  # the first call warms up
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000.0 * float(np.median(times[1:]))


def measure_route_costs(sample: DataSample, group: GroupReport, batch_size: int, width: Optional[int] = None,
                        batches: int = 4) -> Optional[RouteCosts]:
    """Time the route's pieces on up to ``batches`` batches of the sample; None when the sample
    holds less than one batch. ``width``: floats per sample of the group's embeddings (default
    ``DEFAULT_DIM`` per grouped feature)."""
    from recd_plugin.sparse.ikjt import DedupSpec, FeatureGroup, build_ikjt, group_rows

    kjts = _kjt_batches(sample, group, batch_size, batches)
    if not kjts:
        return None
    spec = DedupSpec((FeatureGroup(group.name, tuple(group.features)),))
    width = width or DEFAULT_DIM * len(group.features)
    loader, expand = [], []
    for kjt in kjts:
        loader.append(_median_ms(lambda: build_ikjt(kjt, spec, aligned=True)))
        first, inv = group_rows(build_ikjt(kjt, spec, aligned=True), group.features[0])
        rows = torch.randn(first.numel(), width, generator=torch.Generator().manual_seed(0), requires_grad=True)

        def expand_step() -> None:
            rows.grad = None
            rows.index_select(0, inv).sum().backward()
        expand.append(_median_ms(expand_step))
    return RouteCosts(batch_size, width, float(np.median(expand)), float(np.median(loader)))


def predict(f: float, u: float, costs: Optional[RouteCosts] = None, step_ms: Optional[float] = None) -> Prediction:
    """The speed-up the plugin will give (module docstring): the job's keep rule (``keeps``)
    applied to a predicted step with deduplicable share ``f`` and unique fraction ``u``."""
    bound = amdahl_bound(f, u)
    if costs is None or step_ms is None:
        rel = 1.0 / bound
        how = "Amdahl bound" + ("" if costs is None else " (no step time: fixed costs not set against it)")
    else:
        rel = 1.0 / bound + costs.expand_ms / step_ms
        how = f"with {costs.expand_ms:.2f} ms fixed costs on a {step_ms:g} ms step"
    if not keeps(rel, 1.0):
        return Prediction(1.0, "plain", bound, f"saves less than {100 * (1 - KEEP_BELOW):.0f}% of the step: the "
                          f"plugin would keep TorchRec's plain path ({how})")
    return Prediction(1.0 / rel, "dedup", bound, how)
