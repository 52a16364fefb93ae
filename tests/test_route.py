"""Never slower, decided on the job: each group is timed both ways on the first training steps
and kept only where it pays (recd_plugin/transforms/route.py); apply reads nothing from the
loader and moves no random state (recd_plugin/_rng.py).

The decision itself is timing-based, so the tests that check it drive the decider with a fake
clock (deterministic); the tests on real models check what must hold whatever is decided:
equal losses, one line per group, untouched random states."""

from __future__ import annotations

import copy
import dataclasses
import random
from collections import deque
from typing import Callable, Deque, Dict, List, Optional, Tuple

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, RandomSampler
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from conftest import RecModel, session_batch, sgd_losses
import recd_plugin
from recd_plugin import ConfigError, RecDConfig
from recd_plugin.modules.recd import decider_of
from recd_plugin.sparse.dedup_kjt import DedupKJT
from recd_plugin.transforms import route
from recd_plugin.transforms.route import AFTER, BLOCK, KEEP_BELOW, ROUNDS, WARM, RouteDecider, keeps

USER = "groups.user.key=session_id; groups.user.features=user_id,history"
CPU = torch.device("cpu")


class FakeJob:
    """A training loop over a decider: the loader side asks for routes ``lag`` batches ahead of the
    forward (a pipeline reading ahead), each step takes ``step_s(groups)`` on a fake clock."""

    def __init__(self, decider: RouteDecider, step_s: Callable[[Tuple[str, ...]], float], lag: int = 0) -> None:
        self.decider, self.step_s, self.lag = decider, step_s, lag
        self.now = 0.0
        decider.clock = lambda: self.now
        self.syncs = 0

        def sync(device: torch.device) -> None:
            self.syncs += 1
        decider.sync = sync
        self.ahead: Deque[Tuple[Tuple[str, ...], Optional[route.Tag]]] = deque()
        self.routes: List[Tuple[str, ...]] = []

    def run(self, steps: int, evaluate_every: int = 0) -> None:
        for step in range(steps):
            while len(self.ahead) <= self.lag:
                self.ahead.append(self.decider.route())
            groups, tag = self.ahead.popleft()
            self.routes.append(groups)
            if evaluate_every and step % evaluate_every == evaluate_every - 1:
                self.decider.on_forward(None, False, CPU)  # an evaluation forward between steps
                self.now += 1.0
            self.decider.on_forward(tag, True, CPU)
            self.now += self.step_s(groups)


def _times(dedup: float, plain: float) -> Callable[[Tuple[str, ...]], float]:
    return lambda groups: dedup if groups else plain


def test_the_schedule_deduplicates_the_first_batch_and_alternates_rounds() -> None:
    d = RouteDecider(["user"])
    first = [d.route() for _ in range(WARM + 2 * BLOCK)]
    assert first[0][0] == ("user",)  # a feature wrongly declared session-level fails before any step
    assert [g for g, _ in first[:WARM]] == [("user",)] * WARM
    assert [g for g, _ in first[WARM:]] == [("user",)] * BLOCK + [()] * BLOCK  # round 0
    second = [d.route()[0] for _ in range(2 * BLOCK)]
    assert second == [()] * BLOCK + [("user",)] * BLOCK  # round 1: the order reversed


@pytest.mark.parametrize("lag", [0, 1, 2])
def test_a_route_that_pays_is_kept_and_one_that_does_not_is_left_plain(lag: int, capsys) -> None:
    fast = RouteDecider(["user"])
    FakeJob(fast, _times(0.005, 0.010), lag).run(80)
    assert fast.decided == ("user",)
    [d] = fast.decisions
    assert d.kept and d.dedup_ms == pytest.approx(5.0, rel=1e-3) and d.plain_ms == pytest.approx(10.0, rel=1e-3)
    assert d.ratio == pytest.approx(0.5, rel=1e-3)
    slow = RouteDecider(["user"])
    FakeJob(slow, _times(0.012, 0.010), lag).run(80)
    assert slow.decided == () and not slow.decisions[0].kept
    out = capsys.readouterr().out
    assert "group 'user' deduplicated: 5.00 ms per training step deduplicated vs 10.00 ms plain" in out
    assert "group 'user' left on TorchRec's plain path: 12.00 ms" in out and "kept at 0.97x or less" in out


def test_after_the_decision_every_batch_takes_it_and_nothing_is_synchronized() -> None:
    d = RouteDecider(["user"])
    job = FakeJob(d, _times(0.005, 0.010), lag=2)
    job.run(80)
    syncs = job.syncs
    job.run(100)
    assert job.syncs == syncs  # no measurement point once decided
    assert job.routes[-100:] == [("user",)] * 100
    assert all(tag is None for _, tag in [d.route() for _ in range(5)])


def test_each_step_is_timed_on_its_own_route_whatever_the_pipelines_lag() -> None:
    """A step's time is charged to the route of the batch in that forward: with the loader two
    batches ahead, the measured medians are still exactly each route's own step time."""
    d = RouteDecider(["user"])
    FakeJob(d, _times(0.003, 0.011), lag=2).run(60)
    assert d.arms[0].medians and all(v == pytest.approx(0.003, rel=1e-3) for v in d.arms[0].medians.values())
    assert all(v == pytest.approx(0.011, rel=1e-3) for v in d.arms[1].medians.values())


def test_a_clearly_slower_route_is_dropped_after_one_round_and_costs_little() -> None:
    d = RouteDecider(["user"])
    job = FakeJob(d, _times(0.030, 0.010), lag=2)  # deduplicated: 3x slower
    job.run(60)
    assert d.decided == () and d.arms[0].state == "dropped"
    assert d.arms[0].handed == WARM + BLOCK  # the warm-up and one block, then no more
    # What measuring cost: the dedup batches' extra time, against 1,000 plain steps.
    extra = d.arms[0].handed * (0.030 - 0.010)
    assert extra / (1000 * 0.010) <= 0.02
    assert "measuring cost" in d.decisions[0].reason


@pytest.mark.parametrize("dedup, plain_steps", [(0.002, 2 + 1 + 1), (0.007, 2 * BLOCK)])
def test_a_clearly_faster_route_is_kept_without_more_rounds(dedup: float, plain_steps: int) -> None:
    """At 0.2x plain, the first timed plain step settles it and the plain block stops (two
    steps, the timed one, and the one the loader handed ahead); at 0.7x, two rounds."""
    d = RouteDecider(["user"])
    FakeJob(d, _times(dedup, 0.010), lag=1).run(80)
    assert d.decided == ("user",) and d.arms[0].state == "settled"
    assert d.arms[1].handed == plain_steps
    assert d.decisions[0].ratio == pytest.approx(dedup / 0.010, rel=1e-3)


def test_a_group_without_repeats_is_dropped_whatever_a_noisy_clock_says() -> None:
    """u = 1 (the loader counted as many unique rows as samples): nothing can be saved, so a
    deduplicated block that happened to look faster does not keep it."""
    d = RouteDecider(["user"])
    job = FakeJob(d, _times(0.005, 0.010), lag=1)
    d.count_rows("user", 64, 64)
    job.run(60)
    assert d.decided == () and d.arms[0].state == "dropped"
    assert "barely repeat" in d.decisions[0].reason and "unique fraction 1.000" in d.decisions[0].reason


def test_one_round_slower_than_plain_keeps_the_group_plain() -> None:
    """Two rounds at 0.9x and one at 1.05x: the median says 0.9, but a round saw it slower."""
    d = RouteDecider(["user"])
    job = FakeJob(d, lambda g: (0.0105 if job.decider._open and job.decider._open[0] == 1 else 0.009) if g
                  else 0.010, lag=0)
    job.run(90)
    [dec] = d.decisions
    assert not dec.kept and dec.ratio == pytest.approx(0.9, rel=1e-2), dec.reason
    assert "below 1x in every round" in dec.reason


def test_equal_routes_stay_plain() -> None:
    """Both routes equally fast, within noise: the plain path (never slower)."""
    gen = random.Random(0)
    d = RouteDecider(["user"])
    FakeJob(d, lambda groups: 0.010 * (1 + 0.02 * gen.random()), lag=2).run(80)
    assert d.decided == () and 0.95 < d.decisions[0].ratio < 1.05


def test_evaluation_forwards_between_steps_are_not_timed() -> None:
    """An evaluation forward (model.eval()) between two steps would inflate the step: no timed
    step spans one, and the decision is the same."""
    d = RouteDecider(["user"])
    FakeJob(d, _times(0.005, 0.010), lag=0).run(120, evaluate_every=5)
    assert d.decided == ("user",)
    assert all(v == pytest.approx(0.005, rel=1e-3) for v in d.arms[0].medians.values())


def test_a_step_with_two_forwards_of_its_batch_is_timed_as_one_step() -> None:
    d = RouteDecider(["user"])
    job = FakeJob(d, _times(0.005, 0.010), lag=1)
    real = d.on_forward

    def twice(tag, training, device):  # a second forward of the same batch (e.g. a contrastive loss)
        real(tag, training, device)
        real(tag, training, device)
    d.on_forward = twice  # type: ignore[method-assign]
    job.run(80)
    assert d.decided == ("user",) and d.decisions[0].dedup_ms == pytest.approx(5.0, rel=1e-3)


def test_two_groups_are_decided_each_on_its_own() -> None:
    d = RouteDecider(["user", "item"])
    FakeJob(d, lambda g: 0.010 - (0.004 if "user" in g else 0) + (0.003 if "item" in g else 0), lag=2).run(120)
    assert d.decided == ("user",)
    assert [x.group for x in d.decisions] == ["user", "item"] and [x.kept for x in d.decisions] == [True, False]


def test_a_model_that_never_sees_the_loaders_batches_is_left_plain_and_told_why(capsys) -> None:
    d = RouteDecider(["user"])
    for _ in range(WARM + 2 * ROUNDS * BLOCK + route.GIVE_UP_AFTER + 1):
        d.route()
        d.on_forward(None, True, CPU)  # the batch reached the forward rebuilt: no tag
    assert d.decided == ()
    assert "no training forward of the model received the batches" in capsys.readouterr().out
    assert "route=dedup" in d.decisions[0].reason


def test_keep_rule() -> None:
    assert keeps(KEEP_BELOW * 1.0, 1.0) and not keeps(0.98, 1.0) and AFTER.arm == -1


# ---------------------------------------------------------------------------------------------
# apply on real models: whatever is decided, the same math; random states untouched.


def test_training_through_the_decision_equals_plugin_off(capsys) -> None:
    torch.manual_seed(0)
    base = RecModel()
    batches = [session_batch(s, batch=64, sessions=4) for s in range(60)]
    plain = sgd_losses(copy.deepcopy(base), batches)
    model, loader = recd_plugin.apply(RecDConfig.from_string(USER + "; towers.user_tower=user"),
                                      copy.deepcopy(base), batches)
    mine = sgd_losses(model, loader)
    torch.testing.assert_close(torch.tensor(mine), torch.tensor(plain), rtol=0, atol=1e-5)
    out = capsys.readouterr().out
    assert "will be decided on the first training steps" in out
    decider = decider_of(model)
    assert decider is not None and decider.decided is not None  # decided within 60 steps
    assert out.count("recd-plugin: group 'user'") == 1 and "per training step deduplicated vs" in out
    assert decider.decisions[0].unique_fraction == pytest.approx(4 / 64, abs=0.02)


@pytest.mark.parametrize("flag", ["route=dedup", "probe_batches=0"])
def test_route_dedup_keeps_every_group_unmeasured_and_says_so(flag: str, capsys) -> None:
    model, loader = recd_plugin.apply(RecDConfig.from_string(f"{USER}; {flag}"), RecModel(),
                                      [session_batch(s) for s in range(3)])
    assert decider_of(model).decided == ("user",)
    kjts = [b.sparse_features for b in loader]
    assert all(isinstance(k, DedupKJT) and k.dedup_groups == ("user",) for k in kjts)
    assert "group 'user' deduplicated: not measured" in capsys.readouterr().out


@pytest.mark.parametrize("bad", ["sometimes", "plain", "1"])
def test_a_bad_route_is_a_config_error(bad: str) -> None:
    with pytest.raises(ConfigError, match="'route' must be one of"):
        RecDConfig.from_string(f"{USER}; route={bad}")


@pytest.mark.parametrize("bad", ["-1", "x", "true"])
def test_bad_probe_batches_is_a_config_error(bad: str) -> None:
    with pytest.raises(ConfigError, match="probe_batches"):
        RecDConfig.from_string(USER + f"; probe_batches={bad}")


class _Unreadable:
    """A loader that must not be read by apply."""

    def __iter__(self):
        raise AssertionError("apply read the loader")


def test_apply_reads_nothing_from_the_loader() -> None:
    model, loader = recd_plugin.apply(RecDConfig.from_string(USER), RecModel(), _Unreadable())
    assert loader is not None
    recd_plugin.remove(model)


def _states() -> Dict[str, object]:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state()[1].copy(), "python": random.getstate()}


class _Samples(torch.utils.data.Dataset):
    def __init__(self, batches):
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int):
        return self.batches[i]


def _order(loader) -> List[int]:
    return [int(b.sparse_features.plain().values()[0]) if isinstance(b.sparse_features, DedupKJT)
            else int(b.sparse_features.values()[0]) for b in loader]


@pytest.mark.parametrize("flag", [USER, USER + "; route=dedup", USER + "; towers.user_tower=user"])
@pytest.mark.parametrize("workers", [0, 1])
def test_apply_leaves_every_random_state_and_the_sample_order_as_it_found_them(flag: str, workers: int) -> None:
    """Groups measured, kept unmeasured, with a tower; in-loop and in-worker builds: the global
    generators, and the order a DataLoader with its own seeded sampler yields, are plugin-off's."""
    batches = [session_batch(s, batch=16, sessions=4) for s in range(8)]

    def loader() -> DataLoader:
        sampler = RandomSampler(_Samples(batches), generator=torch.Generator().manual_seed(5))
        return DataLoader(_Samples(batches), sampler=sampler, batch_size=None, num_workers=workers)

    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    off_loader, _ = loader(), RecModel()
    before = _states()
    off_order = _order(off_loader)
    after_off = _states()

    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    on_loader, model = loader(), RecModel()
    states = _states()
    model, wrapped = recd_plugin.apply(RecDConfig.from_string(flag), model, on_loader)
    assert all(_equal(states[k], v) for k, v in _states().items())  # apply itself moved nothing
    assert all(_equal(before[k], v) for k, v in states.items())
    assert _order(wrapped) == off_order
    assert all(_equal(after_off[k], v) for k, v in _states().items())  # the epoch drew what plugin-off drew
    recd_plugin.remove(model)


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return bool((a == b).all())
    return a == b


def test_an_evaluation_loader_follows_the_decision() -> None:
    batches = [session_batch(s, batch=32, sessions=4) for s in range(4)]
    config = RecDConfig.from_string(USER)
    model, train_loader = recd_plugin.apply(config, RecModel(), batches)
    decider = decider_of(model)
    evaluation = recd_plugin.wrap(config, batches, model)
    assert all(b.sparse_features.dedup_groups == ("user",) for b in evaluation)  # pending: every group
    assert decider._next == 0  # evaluation batches take no part in the schedule
    decider.decided = ()
    assert all(not isinstance(b.sparse_features, DedupKJT) for b in evaluation)  # decided plain: plain batches
    recd_plugin.remove(model)
