"""Which feature groups are deduplicated: decided on the job's own training steps.

Why on the job: whether deduplication pays depends on the whole training step of the user's
job: the model as DistributedModelParallel materialized it (models built on ``meta`` have
nothing to time before), inside the user's loop or train pipeline, on the user's device, with
its own loader and loss. No offline probe sees that, and a few milliseconds of one batch are
noise on a busy machine. Both routes compute the same math (the plugin's modules and hooks
take plain and deduplicated batches alike), so the first training steps can run in blocks of
each route and be timed without changing what the model learns.

The schedule, as the loader hands out batches (:meth:`RouteDecider.route`):

* warm-up: ``WARM`` batches per group deduplicated, not timed (the first batch is
  deduplicated, so a feature wrongly declared session-level is reported before the first step);
* up to ``ROUNDS`` rounds; each has a block of ``BLOCK`` batches per arm: every group
  deduplicated alone, and the plain route. The order is reversed every round (drift cancels).

The model's root forward pre-hook reports each training forward (:meth:`RouteDecider.on_forward`);
the time from one training forward to the next is that step's time. It is taken at positions
1 to 3 of a block only: position 0 holds the switch from the previous block, and positions 4
and 5 may hold the next block's work in a pipeline that reads two batches ahead
(TorchRec's ``TrainPipelineSparseDist``). The device is synchronized at those forwards only,
and at none once decided. After each round, every arm's median step time is reduced over
ranks (maximum: the slowest rank sets a synchronous job's pace), so all ranks decide alike at
the same step. An arm slower than ``DROP_ABOVE`` x plain in a round is dropped (plain route for
its group, no more blocks), and so is one whose batches barely repeat (unique fraction at least
``NO_REPEATS``: nothing to save, whatever a noisy clock says); one below ``SETTLE_AT_ONCE`` x
plain in a round (already at the first timed plain step: the plain block then stops), or below
``SETTLE_BELOW`` x in two, is kept without more rounds (each plain step of a large gain costs
many deduplicated ones). Otherwise a group is kept when the
median over rounds of (its arm / plain) is at most :data:`KEEP_BELOW` (:func:`keeps`, the rule
``recd-plugin analyze`` applies to its predictions) and no round saw it slower than plain: on a
busy machine one round can look faster by chance, all of them rarely.

One printed line per group says what was measured and decided. ``route = "dedup"`` in the
flag skips the measurement and keeps every group (its line says so too).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from recd_plugin._ranks import all_reduce_ints, say
from recd_plugin.sparse.dedup_kjt import DedupKJT

#: Kept when the deduplicated steps take at most this share of the plain steps' time.
KEEP_BELOW = 0.97
#: Dropped after one round above this ratio (saves the measurement cost of a clear loss) ...
DROP_ABOVE = 1.3
#: ... and kept after one round below this ratio (no machine's noise makes a 4x gain), or two
#: rounds below the next one.
SETTLE_AT_ONCE = 0.25
SETTLE_BELOW = 0.8
#: A group whose deduplicated batches keep at least this share of their rows has nothing to save
#: (no sample repeats another): dropped after its first block, whatever its timing says.
NO_REPEATS = 0.99
WARM = 2
BLOCK = 6
#: Positions of a block whose step (forward to next forward) is timed.
TIMED = (1, 2, 3)
ROUNDS = 3
#: Batches handed out after the schedule with no timed forward seen: the model never received
#: the loader's batches (see :meth:`RouteDecider.route`).
GIVE_UP_AFTER = 16


def keeps(dedup_s: float, plain_s: float) -> bool:
    """The keep rule: the deduplicated route's step takes at most ``KEEP_BELOW`` of plain's."""
    return dedup_s <= KEEP_BELOW * plain_s


@dataclass(frozen=True)
class Tag:
    """Where a training batch sits in the schedule (``arm`` -1: after it)."""

    round: int
    arm: int
    pos: int


AFTER = Tag(-1, -1, -1)


@dataclass
class GroupDecision:
    """What the job's steps showed for one group, and whether it is deduplicated."""

    group: str
    kept: bool
    reason: str
    dedup_ms: float = float("nan")
    plain_ms: float = float("nan")
    ratio: float = float("nan")
    unique_fraction: float = float("nan")
    #: What measuring cost: seconds spent on the route that lost (its steps times the difference),
    #: and that as a share of 1,000 steps on the decided route.
    cost_s: float = 0.0
    cost_share: float = 0.0

    def line(self) -> str:
        verdict = "deduplicated" if self.kept else "left on TorchRec's plain path"
        return f"recd-plugin: group {self.group!r} {verdict}: {self.reason}"


@dataclass
class _Arm:
    groups: Tuple[str, ...]  # () : the plain route
    state: str = "open"      # open | dropped | settled
    handed: int = 0          # batches handed out on this arm while measuring
    samples: Dict[int, List[float]] = field(default_factory=dict)  # round -> step seconds
    medians: Dict[int, float] = field(default_factory=dict)        # round -> seconds, max over ranks


class RouteDecider:
    """The route of each training batch, and the decision taken from their step times.

    Args:
        groups: the flag's feature groups (names), the candidates.
        measure: False: every group is deduplicated without measuring (``route = "dedup"``).
        clock, sync: seconds and device synchronization (tests pass fakes).
    """

    def __init__(self, groups: Sequence[str], measure: bool = True, *,
                 clock: Callable[[], float] = time.perf_counter,
                 sync: Optional[Callable[[torch.device], None]] = None) -> None:
        self.groups = tuple(groups)
        self.clock, self.sync = clock, sync or _sync
        self.arms = [_Arm((g,)) for g in self.groups] + [_Arm(())]
        self.decided: Optional[Tuple[str, ...]] = None if measure and self.groups else self.groups
        self.decisions: List[GroupDecision] = []
        self.why_not_measured = "" if measure else 'route = "dedup" in the flag'
        self._slots = self._schedule()
        self._next = 0
        self._open: Optional[List[int]] = None  # the block being handed out
        self._after = 0             # batches handed out after the schedule
        self._closed = -1           # last round whose medians are reduced
        self._last: Optional[Tuple[Tag, float]] = None  # the previous timed training forward
        self._timed = 0
        self._rows: Dict[str, List[int]] = {g: [0, 0] for g in self.groups}  # samples, unique rows

    # -- the schedule (loader side) --------------------------------------------------------

    def _schedule(self) -> List[Tuple[int, int]]:
        """(round, arm) of every block: warm-up as round -1 (WARM batches per group), then the rounds."""
        blocks = [(-1, a) for a in range(len(self.arms) - 1)]
        for r in range(ROUNDS):
            order = range(len(self.arms)) if r % 2 == 0 else reversed(range(len(self.arms)))
            blocks += [(r, a) for a in order]
        return blocks

    def _block(self) -> Optional[List[int]]:
        """[round, arm, next position, length] of the block the next batch opens; arms no longer
        open get no block, and once every group is settled or dropped nothing is left to time."""
        while self._next < len(self._slots):
            r, a = self._slots[self._next]
            self._next += 1
            if r < 0 or self._worth(a):
                return [r, a, 0, WARM if r < 0 else BLOCK]
            if not any(x.state == "open" for x in self.arms[:-1]):
                break
        self._next = len(self._slots)
        return None

    def _worth(self, arm: int) -> bool:
        """Is a block of ``arm`` still worth timing? Not once its group is settled or dropped,
        nor the plain route's once every group is."""
        states = [self.arms[arm].state] if arm < len(self.arms) - 1 else [x.state for x in self.arms[:-1]]
        return "open" in states

    def route(self) -> Tuple[Tuple[str, ...], Optional[Tag]]:
        """(groups to deduplicate in the next training batch, its tag; None once decided)."""
        if self.decided is not None:
            return self.decided, None
        if self._open is not None and self._open[0] >= 0 and not self._worth(self._open[1]):
            self._open = None  # its arm was settled or dropped meanwhile: stop the block here
        if self._open is None:
            self._open = self._block()
        if self._open is None:
            self._after += 1
            if self._after > GIVE_UP_AFTER and self._timed == 0:
                self._finish("not measured: no training forward of the model received the batches this loader "
                             "handed out (were they copied or rebuilt on the way to the model, or is the model "
                             "only evaluated?)")
                return self.best_guess(), None
            return self.best_guess(), AFTER
        r, a, pos, length = self._open
        self._open[2] += 1
        if self._open[2] == length:
            self._open = None
        self.arms[a].handed += 1
        return self.arms[a].groups, Tag(r, a, pos)

    def best_guess(self) -> Tuple[str, ...]:
        """The groups deduplicated for batches outside the schedule (other loaders, evaluation):
        the decision, or every group not dropped while it is pending (both compute the same)."""
        if self.decided is not None:
            return self.decided
        return tuple(a.groups[0] for a in self.arms[:-1] if a.state != "dropped")

    def count_rows(self, group: str, samples: int, unique: int) -> None:
        """The loader's count of a deduplicated batch: its samples and the group's unique rows."""
        if group in self._rows:
            self._rows[group][0] += samples
            self._rows[group][1] += unique

    # -- the steps (model side) ------------------------------------------------------------

    def observe(self, kjt: Any, training: bool) -> None:
        """The model's root forward pre-hook (``DedupContext`` observer): its batch's KJT and mode."""
        if self.decided is None:
            tag = kjt.route_tag if isinstance(kjt, DedupKJT) else None
            self.on_forward(tag, training, kjt.values().device if tag is not None else torch.device("cpu"))

    def on_forward(self, tag: Optional[Tag], training: bool, device: torch.device) -> None:
        """The model's root forward started on a batch with ``tag`` (None: not one of the
        schedule's). Times the steps at the schedule's timed positions."""
        if self.decided is not None:
            return
        if not training or tag is None:
            self._last = None  # an evaluation forward or a foreign batch: no timed step spans it
            return
        if tag is AFTER:
            self._close_rounds(ROUNDS - 1)
            self._finish()
            return
        if tag.round > self._closed + 1:  # round r begins: the rounds before it are complete
            self._close_rounds(tag.round - 1)
        last = self._last
        if last is not None and last[0] == tag:
            return  # the same batch forwarded again within its step (e.g. two forwards per step)
        follows = last is not None and (last[0].round, last[0].arm, last[0].pos + 1) == (tag.round, tag.arm, tag.pos)
        ends_timed = follows and last is not None and last[0].pos in TIMED
        if tag.round < 0 or not (tag.pos in TIMED or ends_timed):
            self._last = None
            return
        self.sync(device)  # a measurement point: the step before it is over on the device too
        now = self.clock()
        if ends_timed and last is not None:
            samples = self.arms[tag.arm].samples.setdefault(tag.round, [])
            samples.append(now - last[1])
            self._timed += 1
            if tag.round == 0 and tag.arm == len(self.arms) - 1 and len(samples) == 1:
                self._settle_early()
            if self._round_complete(tag.round):  # close it now, so the next blocks see the result
                self._close_rounds(tag.round)
        self._last = (tag, now)

    def _settle_early(self) -> None:
        """At the first timed plain step: a group whose round-0 steps already take under
        ``SETTLE_AT_ONCE`` of it is kept now, and the plain block stops (each plain step of a
        large gain costs many deduplicated ones). Reduced over ranks, at the same step on each."""
        plain = self.arms[-1]
        local = [round(1e6 * statistics.median(a.samples[0])) if a.samples.get(0) else -1 for a in self.arms[:-1]]
        reduced = all_reduce_ints(local + [round(1e6 * plain.samples[0][0])], "max")
        for a, us in zip(self.arms[:-1], reduced[:-1]):
            if a.state == "open" and 0 < us < SETTLE_AT_ONCE * reduced[-1]:
                a.state, a.medians[0], plain.medians[0] = "settled", us / 1e6, reduced[-1] / 1e6

    def _round_complete(self, r: int) -> bool:
        """Every arm still timed in round ``r`` has all its steps of the round."""
        arms = [a for i, a in enumerate(self.arms) if self._worth(i)]
        return bool(arms) and all(len(a.samples.get(r, ())) >= len(TIMED) for a in arms)

    def _close_rounds(self, last: int) -> None:
        """Reduce the medians of rounds up to ``last`` over ranks and drop / settle arms."""
        for r in range(self._closed + 1, min(last, ROUNDS - 1) + 1):
            local = [round(1e6 * statistics.median(a.samples[r])) if a.samples.get(r) else -1 for a in self.arms]
            reduced = all_reduce_ints(local, "max")
            plain = reduced[-1]
            for a, us in zip(self.arms, reduced):
                if us > 0:
                    a.medians[r] = us / 1e6
            unique = self._unique()
            for a in self.arms[:-1]:
                if a.state != "open" or plain <= 0 or r not in a.medians:
                    continue  # nothing new about this arm in round r
                ratios = _ratios(a, self.arms[-1])
                if ratios[-1] > DROP_ABOVE or unique[a.groups[0]] >= NO_REPEATS:
                    a.state = "dropped"
                elif ratios[-1] < SETTLE_AT_ONCE or (len(ratios) >= 2 and all(x < SETTLE_BELOW for x in ratios[-2:])):
                    a.state = "settled"
            self._closed = r

    def _unique(self) -> Dict[str, float]:
        """u per group over the deduplicated batches so far, summed over ranks (NaN: none yet)."""
        rows = all_reduce_ints([n for g in self.groups for n in self._rows[g]])
        return {g: rows[2 * i + 1] / rows[2 * i] if rows[2 * i] else float("nan") for i, g in enumerate(self.groups)}

    def _finish(self, not_measured: str = "") -> None:
        unique = self._unique()
        plain = self.arms[-1]
        decisions = []
        for a in self.arms[:-1]:
            g = a.groups[0]
            ratios = _ratios(a, plain)
            if not ratios:
                why = not_measured or ("not measured: no two consecutive training steps of a block reached the "
                                       "model (evaluation forwards or foreign batches between every two)")
                decisions.append(GroupDecision(g, False, f"{why}. To deduplicate it without measuring, set "
                                                  f'route=dedup in the flag.', unique_fraction=unique[g]))
                continue
            both = [r for r in sorted(a.medians) if r in plain.medians]
            ratio = statistics.median(ratios)
            dedup_s = statistics.median(a.medians[r] for r in both)
            plain_s = statistics.median(plain.medians[r] for r in both)
            # Kept: settled, or the median round at KEEP_BELOW or less and no round slower (a noisy
            # machine can make one round look faster; all of them rarely).
            kept = a.state == "settled" or (a.state == "open" and keeps(ratio, 1.0) and max(ratios) < 1.0)
            how = {"dropped": (f"; above {DROP_ABOVE}x in a round" if max(ratios) > DROP_ABOVE else
                               "; its batches barely repeat") + ", so it was not measured further",
                   "settled": "; clearly faster, so kept without more rounds"}.get(a.state, "")
            rule = "" if kept else f" (kept at {KEEP_BELOW}x or less in the median round and below 1x in every round)"
            cost_s, share = self._cost(a, dedup_s, plain_s, kept)
            cost = f"; measuring cost {cost_s:.2f} s ({100 * share:.1f}% of 1,000 steps)" if cost_s > 0 else ""
            rounds = ", ".join(f"{x:.2f}" for x in ratios)
            why = (f"{1e3 * dedup_s:.2f} ms per training step deduplicated vs {1e3 * plain_s:.2f} ms plain, "
                   f"{ratio:.2f}x the time{rule}, measured on this job's own steps ({len(ratios)} round(s) of "
                   f"{len(TIMED)} steps each way, per round {rounds}{_spread(plain)}){how}{_unique(unique[g])}{cost}")
            decisions.append(GroupDecision(g, kept, why, 1e3 * dedup_s, 1e3 * plain_s, ratio, unique[g], cost_s, share))
        self.decisions = decisions
        self.decided = tuple(d.group for d in decisions if d.kept)
        for d in decisions:
            say(d.line())

    def _cost(self, arm: _Arm, dedup_s: float, plain_s: float, kept: bool) -> Tuple[float, float]:
        """(seconds, share of 1,000 decided steps) measuring cost: the steps run on the route that
        lost, times the difference."""
        lost = (self.arms[-1].handed * (plain_s - dedup_s)) if kept else arm.handed * (dedup_s - plain_s)
        lost = max(lost, 0.0)
        return lost, lost / (1000 * (dedup_s if kept else plain_s))

    def announce(self) -> None:
        """The line printed by ``apply``: what will be measured, or that nothing will."""
        if self.decided is None:
            say(f"recd-plugin: groups {list(self.groups)} will be decided on the first training steps: blocks of "
                f"deduplicated and plain batches (the same math), timed; one line per group follows")
        elif self.groups:
            for g in self.groups:
                say(GroupDecision(g, True, f"not measured ({self.why_not_measured}): every group is "
                                           "deduplicated").line())


def _ratios(arm: _Arm, plain: _Arm) -> List[float]:
    return [arm.medians[r] / plain.medians[r] for r in sorted(arm.medians) if plain.medians.get(r, 0) > 0]


def _unique(u: float) -> str:
    return "" if u != u else f"; unique fraction {u:.3f}"  # NaN: no deduplicated batch counted


def _spread(plain: _Arm) -> str:
    """The plain route's spread between rounds: an A/A measure of the machine's noise."""
    values = list(plain.medians.values())
    if len(values) < 2:
        return ""
    return f"; the plain route's spread between rounds {100 * (max(values) - min(values)) / min(values):.1f}%"


def _sync(device: torch.device) -> None:
    """Wait for the device's queued work: on CUDA (and other accelerators), at measurement points only."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type != "cpu":
        backend = getattr(torch, device.type, None)
        if backend is not None and hasattr(backend, "synchronize"):
            backend.synchronize()
