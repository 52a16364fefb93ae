"""Never slower: measure each group on the loader's first batches, keep only groups that pay.

``apply`` calls :func:`decide` before it changes anything. It reads the first
``probe_batches`` batches of the loader (a fresh pass: the loader must be re-iterable, as a
``DataLoader`` is), measures every group's unique fraction u (unique rows / samples), and
compares, on this machine and device, what deduplicating the group saves with what it costs:

* saved per step: the share (1 - u) of the group's embedding work, timed as one
  ``EmbeddingBag`` lookup, forward and backward, of B bags of the group's mean ids per sample
  at the group's total embedding dim D_g;
* cost per step: gathering the group's pooled rows back to the batch, timed as an
  ``index_select`` of [B, D_g] and its backward ``index_add``.

A group whose saving does not exceed its cost is left on TorchRec's plain path (no IKJT rows,
no gather, towers reading it run on all rows), and one line says so. A group that a tower
reads is kept whenever u <= ``TOWER_MAX_UNIQUE``: a tower's dense work, saved in proportion,
dwarfs the gather. With no duplicates at all (u = 1) nothing is saved, so every group is
dropped and the job runs exactly plain. Timings use the first batch's device and dims, a
few milliseconds in all.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import torch
from torch import nn

from recd_plugin._ranks import all_reduce_ints
from recd_plugin.sparse.ikjt import DedupSpec, FeatureGroup, build_ikjt, unique_count
from recd_plugin.transforms.dedup import check_not_deduplicated

#: A group that a tower reads is kept while its unique fraction is at most this: the tower's
#: dense work shrinks in proportion to 1 - u, and a few percent of it outweighs the gather.
TOWER_MAX_UNIQUE = 0.95


@dataclass(frozen=True)
class GroupDecision:
    """What the probe measured for one group and whether the plugin deduplicates it."""

    group: str
    unique_fraction: float
    kept: bool
    saved_ms: float = float("nan")
    cost_ms: float = float("nan")
    reason: str = ""

    def line(self) -> str:
        verdict = "deduplicated" if self.kept else "left on TorchRec's plain path"
        return f"recd-plugin: group {self.group!r} {verdict}: {self.reason}"


def _timed(fn: Callable[[], Any], reps: int = 3) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_costs(batch: int, ids_per_sample: float, dim: int, device: torch.device) -> Tuple[float, float]:
    """(lookup, gather) seconds on ``device``: one EmbeddingBag forward+backward of ``batch``
    bags of ``ids_per_sample`` ids at ``dim``; one index_select of [batch, dim] + backward."""
    dim, batch = max(dim, 1), max(batch, 1)
    per_bag = max(1, round(ids_per_sample))
    # sparse: time only the work that scales with the ids (the part deduplication removes);
    # a dense table gradient's fixed cost is paid with or without the plugin.
    bag = nn.EmbeddingBag(4096, dim, mode="sum", sparse=True).to(device)
    ids = torch.randint(0, 4096, (batch * per_bag,), device=device)
    offsets = torch.arange(0, batch * per_bag, per_bag, device=device)
    rows = torch.randn(batch, dim, device=device, requires_grad=True)
    index = torch.randint(0, batch, (batch,), device=device)

    def lookup() -> None:
        bag(ids, offsets).sum().backward()
        _sync(device)

    def gather() -> None:
        rows.index_select(0, index).sum().backward()
        _sync(device)

    return _timed(lookup), _timed(gather)


def decide(spec: DedupSpec, batches: Iterable[Any], dims: Dict[str, int], tower_groups: Iterable[str],
           limit: int = 4) -> List[GroupDecision]:
    """Measure every group of ``spec`` on the first ``limit`` plain ``Batch``es of ``batches``.

    Args:
        dims: {feature: embedding dim} of the model's tables (features it does not embed: 0).
        tower_groups: the groups some tower reads.
    """
    samples, unique, ids = 0, {g.name: 0 for g in spec.groups}, {g.name: 0 for g in spec.groups}
    device = torch.device("cpu")
    first_batch = 0
    for i, b in enumerate(batches):
        if i == limit:
            break
        kjt = b.sparse_features
        device, first_batch = kjt.values().device, first_batch or kjt.stride()
        ikjt = build_ikjt(kjt, spec)
        samples += kjt.stride()
        lengths = dict(zip(kjt.keys(), kjt.length_per_key()))
        for g in spec.groups:
            unique[g.name] += unique_count(ikjt, g.all_features[0])
            ids[g.name] += sum(lengths[f] for f in g.features if dims.get(f))
    names = [g.name for g in spec.groups]
    counts = all_reduce_ints([samples] + [unique[n] for n in names] + [ids[n] for n in names])
    samples, unique = counts[0], dict(zip(names, counts[1:1 + len(names)]))
    ids = dict(zip(names, counts[1 + len(names):]))
    towers = set(tower_groups)
    out = [_decide_group(g, unique[g.name] / samples if samples else 1.0, ids[g.name] / max(samples, 1),
                         sum(dims.get(f, 0) for f in g.features), first_batch, device, g.name in towers)
           for g in spec.groups]
    # Every rank must take the same route: a group is kept only where every rank keeps it.
    agreed = all_reduce_ints([int(d.kept) for d in out], "min")
    return [d if d.kept == bool(k) else dataclasses.replace(
        d, kept=False, reason=d.reason + "; another rank measured that it would not pay") for d, k in zip(out, agreed)]


def _decide_group(g: FeatureGroup, u: float, ids_per_sample: float, dim: int, batch: int,
                  device: torch.device, tower: bool) -> GroupDecision:
    if u >= 1.0:
        return GroupDecision(g.name, u, False, reason="no sample repeats another in the first batches (unique "
                             "fraction 1.00), so deduplication would save nothing")
    if tower:
        kept = u <= TOWER_MAX_UNIQUE
        why = (f"unique fraction {u:.3f}; a tower reads it and runs on {u:.1%} of the rows" if kept else
               f"unique fraction {u:.3f} > {TOWER_MAX_UNIQUE}: too few repeats to pay for the tower's gather")
        return GroupDecision(g.name, u, kept, reason=why)
    if dim == 0:
        return GroupDecision(g.name, u, False, reason="no embedding table of the model reads its features")
    lookup, gather = step_costs(batch, ids_per_sample, dim, device)
    saved = (1.0 - u) * lookup
    kept = saved > gather
    why = (f"unique fraction {u:.3f}: saves ~{1e3 * saved:.2f} ms of embedding work per step, costs "
           f"~{1e3 * gather:.2f} ms of gathering (measured on {device.type}, batch {batch}, dim {dim})")
    return GroupDecision(g.name, u, kept, 1e3 * saved, 1e3 * gather, why)


def probe_batches(loader: Optional[Iterable[Any]], limit: int) -> Tuple[Optional[Iterable[Any]], str]:
    """(batches to probe, why not): a fresh pass over ``loader`` if it can be read again."""
    check_not_deduplicated(loader)
    if loader is None or limit <= 0:
        return None, "no loader given to apply()" if loader is None else "probe_batches = 0"
    if iter(loader) is loader:  # a one-shot iterator: probing would consume training batches
        return None, "the loader is a one-shot iterator (pass a re-iterable loader, e.g. a DataLoader)"
    return loader, ""


def keep_groups(config: Any, decisions: List[GroupDecision]) -> Any:
    """``config`` with only the kept groups, and only towers that read a kept group."""
    kept = {d.group for d in decisions if d.kept}
    return dataclasses.replace(
        config,
        groups=[g for g in config.groups if g.name in kept],
        towers={m: g for m, g in config.towers.items() if g in kept},
    )
