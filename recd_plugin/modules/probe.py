"""Never slower: time each group's route on the model's own modules, keep only groups that pay.

``apply`` calls :func:`decide` before it changes anything. It reads the first
``probe_batches`` batches of the loader (a fresh pass: the loader must be re-iterable, as a
``DataLoader`` is) and measures every group's unique fraction u (unique rows / samples, summed
over ranks). A group without repeats (u = 1) is left on TorchRec's plain path at once. For the
others it times, on the first batch and this machine's device, forward and backward of the
parts of the model that deduplication changes, both ways:

* the ``EmbeddingBagCollection`` / ``EmbeddingCollection`` modules outside towers that the
  route changes: on the plain KJT, and on the IKJT of the route the job will take (compact,
  every such module: the plugin's dedup module; aligned, sharded mode, those reading the
  group: TorchRec's module plus the output gather);
* every tower of the group: on B rows, and on its U unique rows plus the expansion of its
  output. A tower that takes the batch's KJT gets the group's rows; an MLP-like tower (first
  parameterized layer an ``nn.Linear``) gets a random [B, in_features] input, whose values do
  not change its time.

When no DataLoader worker will build the IKJTs (a plain iterable, ``num_workers=0`` or
``in_workers = false``), they are built in the training loop: the time to build the group's
IKJT from the first batch is added to the route's. A tower that takes the batch's KJT is timed
on that KJT as the plain model passes it, and on the group's U unique rows.

The group is kept when the dedup route takes at most ``MARGIN`` of the plain time and saves
at least ``MIN_SAVING_MS`` per step (the route's bookkeeping outside the timed modules). Gradients
are computed with ``torch.autograd.grad`` (nothing accumulates into ``.grad``) and towers run
in eval mode (no BatchNorm statistics move, no dropout draws), so the model is left exactly
as it was; the random tower input comes from a private generator (the global RNG, which
dropout and initializers draw from, is not touched). A tower whose input cannot be built here (e.g. a sequence encoder taking
[B, L, D] and a mask) is judged by a rule: its group is also kept when u <=
``TOWER_MAX_UNIQUE`` and at least ``MIN_SAVED_ROWS`` rows per step are saved. A model whose parameters are not materialized
(``meta``) is judged by that rule alone. Under ``torch.distributed`` a group is kept only where
every rank keeps it, so all ranks take one route. One printed line per group says what was
decided and why.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor, KeyedTensor

from recd_plugin._ranks import all_reduce_ints
from recd_plugin.modules.gather import gather_output
from recd_plugin.modules.swap import dedup_class, outside_towers
from recd_plugin.modules.tower import expand_output
from recd_plugin.sparse.ikjt import DedupSpec, FeatureGroup, build_ikjt, expand, group_rows, select_rows
from recd_plugin.transforms.dedup import check_not_deduplicated, measure

#: Kept when the measured dedup route takes at most this share of the plain time ...
MARGIN = 0.95
#: ... and saves at least this much per step: the route's bookkeeping outside the timed modules
#: (hooks, the batch's context, extra autograd nodes) measured 0.2-0.3 ms per step on the CPU
#: benchmarks at batch 32 (`recd-plugin bench models`); twice that, to stay never slower.
MIN_SAVING_MS = 0.5
#: Dense towers (not callable here): kept while u is at most this and ...
TOWER_MAX_UNIQUE = 0.95
#: ... at least this many rows per step are saved (below, hook overheads outweigh a tower's work).
MIN_SAVED_ROWS = 256


@dataclass(frozen=True)
class GroupDecision:
    """What the probe measured for one group and whether the plugin deduplicates it."""

    group: str
    unique_fraction: float
    kept: bool
    plain_ms: float = float("nan")
    dedup_ms: float = float("nan")
    reason: str = ""

    def line(self) -> str:
        verdict = "deduplicated" if self.kept else "left on TorchRec's plain path"
        return f"recd-plugin: group {self.group!r} {verdict}: {self.reason}"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _total(out: Any) -> torch.Tensor:
    """A scalar that depends on every floating tensor of a module output."""
    if isinstance(out, torch.Tensor):
        return out.float().sum() if out.is_floating_point() else out.new_zeros((), dtype=torch.float32)
    if isinstance(out, KeyedTensor):
        return out.values().sum()
    if isinstance(out, JaggedTensor):
        return out.values().sum()
    parts = list(out.values()) if isinstance(out, dict) else list(out) if isinstance(out, (list, tuple)) else []
    total: Optional[torch.Tensor] = None
    for v in parts:
        t = _total(v)
        total = t if total is None else total + t.to(total.device)
    return total if total is not None else torch.zeros(())


def _best_seconds(once: Callable[[], Any], device: torch.device, reps: int = 3) -> float:
    """Best of ``reps`` seconds of ``once()`` (synchronized), after one warm-up call."""
    once()
    _sync(device)
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        once()
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def _fwd_bwd(fn: Callable[[], Any], params: Sequence[nn.Parameter], device: torch.device, reps: int = 3) -> float:
    """Best of ``reps`` (after a warm-up) seconds of ``fn()`` and the gradient of its outputs
    with respect to ``params``, computed without touching ``.grad``."""
    def once() -> None:
        loss = _total(fn())
        if params and loss.requires_grad:
            torch.autograd.grad(loss, list(params), allow_unused=True)

    return _best_seconds(once, device, reps)


def _plain_kjt(kjt: KeyedJaggedTensor) -> KeyedJaggedTensor:
    """The same KJT without inverse indices: what TorchRec's sharded modules see of an aligned one."""
    return KeyedJaggedTensor(keys=kjt.keys(), values=kjt.values(), lengths=kjt.lengths(),
                             weights=kjt.weights_or_none(), stride=kjt.stride())


def _dense_input(tower: nn.Module, batch: int, device: torch.device) -> Optional[torch.Tensor]:
    """[batch, in_features] for a tower whose first parameterized layer is an ``nn.Linear``
    (an MLP tower); None otherwise (its input shape is not known here)."""
    for m in tower.modules():
        if isinstance(m, nn.Linear):
            gen = torch.Generator(device=device).manual_seed(0)  # the global RNG stays untouched
            return torch.randn(batch, m.in_features, device=device, dtype=m.weight.dtype, generator=gen)
        if any(True for _ in m.parameters(recurse=False)):
            return None
    return None


def _time_build(kjt: KeyedJaggedTensor, spec: DedupSpec, aligned: bool, reps: int = 3) -> float:
    """Best of ``reps`` seconds to build the group's IKJT from ``kjt`` (after a warm-up)."""
    return _best_seconds(lambda: build_ikjt(kjt, spec, aligned=aligned), kjt.values().device, reps)


def _time_group(model: nn.Module, config: Any, g: FeatureGroup, kjt: KeyedJaggedTensor,
                aligned: bool) -> Tuple[float, float, int, List[str]]:
    """(plain seconds, dedup seconds, parts timed, towers timed) of the modules that
    deduplicating ``g`` changes."""
    device = kjt.values().device
    spec = DedupSpec((g,))
    ikjt = build_ikjt(kjt, spec, aligned=aligned)
    group_of = {f: g.name for f in g.all_features}
    features = set(g.all_features)
    towers = [p for p, grp in config.towers.items() if grp == g.name]
    plain = dedup = 0.0
    parts = 0
    for path, m, reads in outside_towers(model, config):
        # compact route: every module outside towers is swapped and reads the IKJT; on the
        # aligned route a module that reads no grouped feature is left as it is
        if aligned and not features & reads:
            continue
        params = [p for p in m.parameters() if p.requires_grad]
        if aligned:
            def route(m: nn.Module = m, path: str = path) -> Any:
                return gather_output(m(_plain_kjt(ikjt)), ikjt, group_of, path)
        else:
            swap_to = dedup_class(m)  # None: a subclass with its own forward stays as it is
            dm = swap_to.from_module(m) if swap_to is not None else m

            def route(dm: nn.Module = dm) -> Any:
                return dm(ikjt)
        plain += _fwd_bwd(lambda m=m: m(kjt), params, device)
        dedup += _fwd_bwd(route, params, device)
        parts += 1
    first, inv = group_rows(ikjt, g.all_features[0])
    timed: List[str] = []
    for path in towers:
        tower = model.get_submodule(path)
        params = [p for p in tower.parameters() if p.requires_grad]
        names = list(g.all_features)
        dense = _dense_input(tower, kjt.stride(), device)
        if dense is not None:  # an MLP-like tower: [B, in_features] as its first Linear reads
            def plain_call(tower: nn.Module = tower, x: torch.Tensor = dense) -> Any:
                return tower(x)

            def dedup_call(tower: nn.Module = tower, x: torch.Tensor = dense) -> Any:
                return expand_output(tower(x.index_select(0, first)), inv, first.numel())
        else:  # a tower that takes the batch's KJT (its own embeddings inside)
            def plain_call(tower: nn.Module = tower) -> Any:
                # the batch's KJT as the plain model passes it: selecting its B rows here would
                # charge the plain side a copy it never makes
                return tower(kjt)

            def dedup_call(tower: nn.Module = tower) -> Any:
                return expand_output(tower(select_rows(kjt, names, first)), inv, first.numel())
        was_training = tower.training
        tower.eval()  # no BatchNorm statistics move, no dropout draws
        try:
            t_plain = _fwd_bwd(plain_call, params, device)
            t_dedup = _fwd_bwd(dedup_call, params, device)
        except Exception:  # noqa: BLE001 - inputs we cannot build: judged by the rule instead
            continue
        finally:
            tower.train(was_training)
        plain, dedup, parts = plain + t_plain, dedup + t_dedup, parts + 1
        timed.append(path)
    return plain, dedup, parts, timed


def decide(model: nn.Module, config: Any, batches: Iterable[Any], limit: int, aligned: bool,
           build_in_loop: bool = False) -> List[GroupDecision]:
    """Measure every group of ``config`` on the first ``limit`` plain ``Batch``es of ``batches``.

    ``build_in_loop``: the IKJTs will be built in the training loop (no DataLoader workers to
    build them in), so the time to build the group's IKJT counts against its route."""
    spec: DedupSpec = config.spec
    sample = list(itertools.islice(batches, limit))
    stats = measure(sample, spec, limit)
    counts = all_reduce_ints([stats.samples_in] + [stats.unique_rows.get(g.name, 0) for g in spec.groups])
    samples, unique = counts[0], counts[1:]
    params = list(model.parameters())
    materialized = bool(params) and not any(p.is_meta for p in params)
    # The loader may yield host batches for a model on a GPU (moved inside the training loop),
    # and already deduplicated ones (storage.DedupReader): time on the plain KJT.
    kjt = expand(sample[0].sparse_features).to(params[0].device) if sample and materialized else None
    out = [_decide_group(model, config, g, unique[i] / samples if samples else 1.0, kjt, aligned, build_in_loop)
           for i, g in enumerate(spec.groups)]
    agreed = all_reduce_ints([int(d.kept) for d in out], "min")  # one route on every rank
    return [d if d.kept == bool(k) else dataclasses.replace(
        d, kept=False, reason=d.reason + "; another rank measured that it would not pay") for d, k in zip(out, agreed)]


def _decide_group(model: nn.Module, config: Any, g: FeatureGroup, u: float, kjt: Optional[KeyedJaggedTensor],
                  aligned: bool, build_in_loop: bool = False) -> GroupDecision:
    if u >= 1.0:
        return GroupDecision(g.name, u, False, reason="no sample repeats another in the first batches (unique "
                             "fraction 1.00), so deduplication would save nothing")
    batch = kjt.stride() if kjt is not None else 0
    plain = dedup = 0.0
    parts, timed = 0, []
    failed, build = "", 0.0
    if kjt is not None:
        try:
            plain, dedup, parts, timed = _time_group(model, config, g, kjt, aligned)
            if parts and build_in_loop:
                build = _time_build(kjt, DedupSpec((g,)), aligned)
                dedup += build
        except Exception as e:  # noqa: BLE001 - never block training on a measurement: use the rule
            failed = f"; its modules could not be timed ({type(e).__name__}: {e})"
            plain = dedup = 0.0
            parts, timed = 0, []
    dense_towers = [p for p, grp in config.towers.items() if grp == g.name and p not in timed]
    rule = bool(dense_towers) and u <= TOWER_MAX_UNIQUE and (kjt is None or batch * (1 - u) >= MIN_SAVED_ROWS)
    route = "aligned" if aligned else "compact"
    if parts:
        measured = dedup <= MARGIN * plain and plain - dedup >= MIN_SAVING_MS / 1e3
        built = f", {1e3 * build:.2f} ms of it building the IKJT in the training loop" if build else ""
        why = (f"unique fraction {u:.3f}; the modules it changes take {1e3 * dedup:.2f} ms deduplicated "
               f"({route} IKJT{built}) vs {1e3 * plain:.2f} ms plain, forward and backward on batch {batch}")
        if not measured and rule:
            why += f"; kept for its tower(s) {dense_towers}, which run on {u:.1%} of the rows"
        elif not measured:
            why += f" (kept only below {MARGIN:.0%} and at least {MIN_SAVING_MS} ms saved per step)"
        return GroupDecision(g.name, u, measured or rule, 1e3 * plain, 1e3 * dedup, why)
    if rule:
        return GroupDecision(g.name, u, True, reason=f"unique fraction {u:.3f}; its tower(s) {dense_towers} run on "
                             f"{u:.1%} of the rows{failed}")
    why = (f"unique fraction {u:.3f}, nothing of the model to time" if kjt is None else
           f"unique fraction {u:.3f}; no module that deduplication changes could be timed{failed}")
    if dense_towers:
        why += f", and too few rows saved per step for its tower(s) (< {MIN_SAVED_ROWS} or u > {TOWER_MAX_UNIQUE})"
    return GroupDecision(g.name, u, False, reason=why)


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
    groups = [g for g in config.groups if g.name in kept]
    return dataclasses.replace(
        config,
        enabled=config.enabled and bool(groups or config.sections),  # no group and no other technique: off
        groups=groups,
        towers={m: g for m, g in config.towers.items() if g in kept},
    )
