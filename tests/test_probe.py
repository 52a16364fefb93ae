"""Never slower: ``apply`` measures each group on the loader's first batches and leaves on the
plain path every group whose dedup would not pay (recd_plugin/modules/probe.py)."""

from __future__ import annotations

import dataclasses

from typing import List

import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from conftest import DIM, RecModel, has_hooks, session_batch
import recd_plugin
from recd_plugin import ConfigError, RecDConfig
from recd_plugin.modules.probe import MARGIN, MIN_SAVING_MS, GroupDecision, decide

USER = "groups.user.key=session_id; groups.user.features=user_id,history"


def _unique_sessions(seed: int, batch: int = 16):
    """A batch in which every sample has a session of its own (u = 1)."""
    b = session_batch(seed, batch=batch, sessions=4)
    kjt = b.sparse_features
    sid = kjt.keys().index("session_id")
    values = kjt.values().clone()
    offsets = kjt.offsets()
    values[offsets[sid * batch]:offsets[(sid + 1) * batch]] = torch.arange(batch)
    return dataclasses.replace(b, sparse_features=KeyedJaggedTensor(
        keys=kjt.keys(), values=values, lengths=kjt.lengths(), stride=batch))


def test_no_duplicates_leaves_the_model_and_loader_untouched(capsys: pytest.CaptureFixture) -> None:
    model = RecModel()
    batches = [_unique_sessions(s) for s in range(3)]
    config = RecDConfig.from_string(USER + "; towers.user_tower=user")
    got_model, got_loader = recd_plugin.apply(config, model, batches)
    assert got_model is model and got_loader is batches
    assert not has_hooks(model) and config.groups == [] and config.towers == {}
    evaluation = [_unique_sessions(9)]
    assert recd_plugin.wrap(config, evaluation) is evaluation  # the same decision for other loaders
    out = capsys.readouterr().out
    assert "group 'user' left on TorchRec's plain path" in out and "unique fraction 1.00" in out


def _heavy_tower_model() -> RecModel:
    model = RecModel()
    model.user_tower = torch.nn.Sequential(torch.nn.Linear(DIM, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 1024),
                                           torch.nn.ReLU(), torch.nn.Linear(1024, DIM))
    return model


def test_a_heavy_tower_group_is_kept(capsys: pytest.CaptureFixture) -> None:
    """Its tower saves tens of ms per step at U = 4 of 600 rows: far above the route's costs,
    whatever the machine's load (the decision itself is timing-based)."""
    batches = [session_batch(s, batch=600, sessions=4) for s in range(2)]
    config = RecDConfig.from_string(USER + "; towers.user_tower=user")
    model, loader = recd_plugin.apply(config, _heavy_tower_model(), batches)
    assert [g.name for g in config.groups] == ["user"] and loader is not batches
    assert "group 'user' deduplicated" in capsys.readouterr().out
    recd_plugin.remove(model)


def test_a_one_shot_iterator_is_not_consumed_by_the_probe(capsys: pytest.CaptureFixture) -> None:
    batches = [session_batch(s, batch=24, sessions=4) for s in range(3)]
    model, loader = recd_plugin.apply(RecDConfig.from_string(USER), RecModel(), iter(batches))
    assert len(list(loader)) == 3  # every batch still reaches training
    assert "unmeasured: the loader is a one-shot iterator" in capsys.readouterr().out
    recd_plugin.remove(model)


def test_probe_batches_zero_keeps_every_group_without_measuring(capsys: pytest.CaptureFixture) -> None:
    batches = [_unique_sessions(s) for s in range(2)]
    config = RecDConfig.from_string(USER + "; probe_batches=0")
    model, _ = recd_plugin.apply(config, RecModel(), batches)
    assert [g.name for g in config.groups] == ["user"] and capsys.readouterr().out == ""
    recd_plugin.remove(model)


@pytest.mark.parametrize("bad", ["-1", "x", "true"])
def test_bad_probe_batches_is_a_config_error(bad: str) -> None:
    with pytest.raises(ConfigError, match="probe_batches"):
        RecDConfig.from_string(USER + f"; probe_batches={bad}")


@pytest.mark.parametrize("aligned", [False, True])
def test_decide_times_the_models_own_modules_and_leaves_them_untouched(aligned: bool) -> None:
    torch.manual_seed(0)
    model = RecModel()
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    config = RecDConfig.from_string(USER + "; towers.user_tower=user")
    [d] = decide(model, config, [session_batch(s, batch=64, sessions=2) for s in range(2)], limit=2, aligned=aligned)
    assert isinstance(d, GroupDecision) and d.unique_fraction == pytest.approx(2 / 64)
    assert d.plain_ms > 0 and d.dedup_ms > 0
    assert d.kept == (d.dedup_ms <= MARGIN * d.plain_ms and d.plain_ms - d.dedup_ms >= MIN_SAVING_MS)
    assert ("aligned IKJT" if aligned else "compact IKJT") in d.reason
    # Nothing moved: weights, gradients, hooks, train mode, the global RNG.
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in model.parameters())
    assert not has_hooks(model) and model.training and model.user_tower.training
    assert torch.equal(torch.get_rng_state(), rng)


def test_a_tower_that_takes_the_kjt_is_timed_in_eval_mode_and_restored() -> None:
    """The KJT-taking tower of test_modules (user side with its own embeddings) is timed."""
    from test_modules import _KJTTowerModel

    torch.manual_seed(0)
    model = _KJTTowerModel()
    config = RecDConfig.from_string(USER + "; towers.user_side=user")
    batches = [session_batch(s, batch=64, sessions=2) for s in range(2)]
    [d] = decide(model, config, batches, limit=2, aligned=False)
    assert d.plain_ms > 0 and d.dedup_ms > 0 and model.user_side.training


def test_building_the_ikjt_in_the_loop_counts_against_the_route(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without DataLoader workers the IKJT is built in the training loop: its build time is
    added to the route's (and named in the line); with workers it is not."""
    from recd_plugin.modules import probe

    monkeypatch.setattr(probe, "_time_group", lambda *a, **k: (0.010, 0.006, 1, []))  # 4 ms saved by the modules
    monkeypatch.setattr(probe, "_time_build", lambda *a, **k: 0.005)                 # 5 ms to build the IKJT
    config = RecDConfig.from_string(USER)
    batches = [session_batch(s, batch=64, sessions=2) for s in range(2)]
    [in_workers] = decide(RecModel(), config, batches, limit=2, aligned=False, build_in_loop=False)
    [in_loop] = decide(RecModel(), config, batches, limit=2, aligned=False, build_in_loop=True)
    assert in_workers.kept and in_workers.dedup_ms == pytest.approx(6.0)
    assert not in_loop.kept and in_loop.dedup_ms == pytest.approx(11.0)
    assert "5.00 ms of it building the IKJT in the training loop" in in_loop.reason


def test_apply_tells_the_probe_where_the_ikjt_is_built(monkeypatch: pytest.MonkeyPatch) -> None:
    from torch.utils.data import DataLoader

    from recd_plugin import plugin

    seen: List[bool] = []
    real = plugin.decide
    monkeypatch.setattr(plugin, "decide", lambda *a, **k: seen.append(k["build_in_loop"]) or real(*a, **k))
    batches = [session_batch(s, batch=64, sessions=2) for s in range(2)]
    for loader in (batches, DataLoader(batches, batch_size=None, num_workers=1)):
        model, _ = recd_plugin.apply(RecDConfig.from_string(USER), RecModel(), loader)
        recd_plugin.remove(model)
    assert seen == [True, False]


def test_a_module_that_cannot_be_timed_does_not_block_apply(monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture) -> None:
    from recd_plugin.modules import probe

    def broken(*args, **kwargs):
        raise RuntimeError("device mismatch")

    monkeypatch.setattr(probe, "_time_group", broken)
    batches = [session_batch(s, batch=64, sessions=2) for s in range(2)]
    config = RecDConfig.from_string(USER)
    model, loader = recd_plugin.apply(config, RecModel(), batches)
    out = capsys.readouterr().out
    assert "could not be timed (RuntimeError: device mismatch)" in out and loader is batches
