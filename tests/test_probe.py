"""Never slower: ``apply`` measures each group on the loader's first batches and leaves on the
plain path every group whose dedup would not pay (recd_plugin/transforms/probe.py)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from conftest import RecModel, has_hooks, session_batch
import recd_plugin
from recd_plugin import ConfigError, RecDConfig
from recd_plugin.transforms.probe import GroupDecision, decide, step_costs

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
    out = capsys.readouterr().out
    assert "group 'user' left on TorchRec's plain path" in out and "unique fraction 1.00" in out


def test_a_tower_group_with_repeats_is_kept_and_says_so(capsys: pytest.CaptureFixture) -> None:
    batches = [session_batch(s, batch=24, sessions=4) for s in range(3)]
    config = RecDConfig.from_string(USER + "; towers.user_tower=user")
    model, loader = recd_plugin.apply(config, RecModel(), batches)
    assert [g.name for g in config.groups] == ["user"] and loader is not batches
    assert "group 'user' deduplicated: unique fraction 0.167; a tower reads it" in capsys.readouterr().out
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


def test_decide_weighs_measured_saving_against_measured_gather() -> None:
    spec = RecDConfig.from_string(USER).spec
    dims = {"user_id": 8, "history": 8}
    repeats = [session_batch(s, batch=64, sessions=2) for s in range(2)]
    [d] = decide(spec, repeats, dims, tower_groups=[])
    assert isinstance(d, GroupDecision) and d.unique_fraction == pytest.approx(2 / 64)
    assert d.kept == (d.saved_ms > d.cost_ms) and d.saved_ms > 0 and d.cost_ms > 0
    lookup, gather = step_costs(64, 2.0, 16, torch.device("cpu"))
    assert lookup > 0 and gather > 0
