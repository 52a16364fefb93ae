"""Techniques as registered units: dispatch by config type, the flag's des section, and
what DES asks of the planner (``recd_plugin/technique.py``, ``recd_plugin/des/technique.py``).

The 2-rank run of the flag's DES route (TorchRec's planner and DMP) is in
integration_tests/test_des_sharded.py; the registry's order and duplicate refusal in
tests/test_layout.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List

import pytest
import torch
from torch import nn
from torchrec import EmbeddingBagConfig
from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
from torchrec.distributed.planner.types import ParameterConstraints
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

import recd_plugin
from conftest import RecModel, session_batch
from recd_plugin import ConfigError, DESConfig, FAEConfig, RecDConfig, UnsupportedModelError, sharding
from recd_plugin.des import DESEmbeddingOperators, FactorizationMachine, WideLinear
from recd_plugin.fae.hotset import HotSet, TableShape
from recd_plugin.technique import PlannerHints, Technique, build

FEATURES = ["a", "b", "s"]


class DESModel(nn.Module):
    """FM + wide over fields a, b (a DES module) and a plain EBC over s (a session feature)."""

    def __init__(self, device: torch.device = torch.device("cpu")) -> None:
        super().__init__()
        torch.manual_seed(0)
        tables = [EmbeddingBagConfig(name=f"t_{f}", feature_names=[f], num_embeddings=10, embedding_dim=4)
                  for f in ("a", "b")]
        tables += [EmbeddingBagConfig(name=f"w_{f}", feature_names=[f], num_embeddings=10, embedding_dim=1)
                   for f in ("a", "b")]
        self.sparse = DESEmbeddingOperators(tables, {"fm": FactorizationMachine(["t_a", "t_b"]),
                                                     "wide": WideLinear(["w_a", "w_b"])}, device=device)
        self.ebc = EmbeddingBagCollection(tables=[EmbeddingBagConfig(
            name="t_s", feature_names=["s"], num_embeddings=10, embedding_dim=4)], device=device)

    def forward(self, kjt: KeyedJaggedTensor) -> torch.Tensor:
        out = self.sparse(kjt)
        return (out["fm"] + out["wide"]).squeeze(1) + self.ebc(kjt).values().sum(1)


def _kjt(seed: int, batch: int = 6) -> KeyedJaggedTensor:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 3, (len(FEATURES) * batch,), generator=g)
    return KeyedJaggedTensor(keys=FEATURES, values=torch.randint(0, 10, (int(lengths.sum()),), generator=g),
                             lengths=lengths.int())


def _batch(seed: int, batch: int = 6) -> Batch:
    kjt = _kjt(seed, batch)
    return Batch(dense_features=torch.zeros(batch, 1), sparse_features=kjt, labels=torch.zeros(batch))


# -- sections come from the registered techniques ------------------------------------------

def test_a_new_technique_gets_its_flag_section_without_editing_the_flag_code(tmp_path: Path) -> None:
    """Registering a technique makes its name a section of the flag (string, TOML, code,
    ``as_flag``), parsed into its config type; unregistering removes it again."""
    import dataclasses
    import pickle

    from recd_plugin.config import SECTIONS, as_flag
    from recd_plugin.technique import register_technique, unregister_technique

    @dataclasses.dataclass
    class PinConfigX:
        table: str = "t"
        rows: int = 1

    class Pin(Technique):
        config_type, name, order = PinConfigX, "pin", 40

    with pytest.raises(ConfigError, match="unknown key 'pin'"):
        RecDConfig.from_string("pin.table=t_a")
    register_technique(Pin)
    try:
        flag = RecDConfig.from_string("pin.table=t_a; pin.rows=3; des.sharding=row_wise")
        assert flag.enabled and flag.pin == PinConfigX("t_a", 3) and flag.des == DESConfig(sharding="row_wise")
        assert flag.fae is None and flag.parts() == [PinConfigX("t_a", 3), DESConfig(sharding="row_wise")]
        (tmp_path / "f.toml").write_text('[recd.pin]\ntable = "t_b"\n')
        assert RecDConfig.from_toml(tmp_path / "f.toml").pin == PinConfigX("t_b")
        assert RecDConfig(pin=PinConfigX()).parts() == [PinConfigX()] == as_flag(PinConfigX()).parts()
        with pytest.raises(ConfigError, match="recd pin: .*unexpected keyword argument 'colour'"):
            RecDConfig.from_string("pin.colour=red")
        assert dataclasses.replace(flag, sharded=True).pin == PinConfigX("t_a", 3)  # as apply decides sharding
    finally:
        unregister_technique("pin")
    assert "pin" not in SECTIONS
    both = RecDConfig.from_string("des.sharding=row_wise; fae.hot_set=h.npz")
    assert pickle.loads(pickle.dumps(both)) == both and pickle.loads(pickle.dumps(both)).fae.hot_set == "h.npz"  # workers
    with pytest.raises(ConfigError, match="unknown section or field 'pin'"):
        RecDConfig(pin=PinConfigX())


@pytest.mark.parametrize("name, match", [
    ("towers", "shadow the plugin-wide key"), ("parts", "shadow"), ("spec", "shadow"),
    ("route", "shadow"), ("a.b", "identifier"), ("_hidden", "identifier"),
    ("des", "'des' is already registered for DESConfig"),
])
def test_a_section_name_must_be_readable_back_and_unique(name: str, match: str) -> None:
    from recd_plugin.config import SECTIONS, register_section

    with pytest.raises(ConfigError, match=match):
        register_section(name, FAEConfig)
    assert SECTIONS["des"] is DESConfig and SECTIONS["fae"] is FAEConfig


def test_a_section_is_edited_through_its_name() -> None:
    """``config.des = ...`` and ``replace(config, fae=None)`` change what apply runs, as they
    did when sections were fields."""
    import dataclasses

    fae = FAEConfig(hot_set="h.npz")
    config = RecDConfig(fae=fae)
    config.des = DESConfig()
    assert config.sections == {"fae": fae, "des": DESConfig()} and config.parts() == [fae, DESConfig()]
    config.des = None
    assert config.des is None and config.parts() == [fae]
    both = RecDConfig(fae=fae, des=DESConfig())
    assert dataclasses.replace(both, fae=None).parts() == [DESConfig()]
    assert RecDConfig(sections={"fae": fae}, fae=None).enabled is False  # the keyword wins: off
    with pytest.raises(ConfigError, match="keys must be section names"):
        RecDConfig(sections={1: DESConfig()})  # type: ignore[dict-item]


# -- the flag's des section ----------------------------------------------------------------

@pytest.mark.parametrize("flag, config", [
    ("des.sharding=row_wise", DESConfig(sharding="row_wise")),
    ("des=true", DESConfig()),
    ("des.modules=sparse", DESConfig(modules=["sparse"])),
])
def test_the_des_section_parses_and_means_on(flag: str, config: DESConfig) -> None:
    parsed = RecDConfig.from_string(flag)
    assert parsed.enabled and parsed.des == config and parsed.parts() == [config]


def test_the_des_section_in_toml(tmp_path: Path) -> None:
    path = tmp_path / "recd.toml"
    path.write_text('[recd.des]\nsharding = "table_wise"\nmodules = ["sparse"]\n')
    assert RecDConfig.from_toml(path).des == DESConfig(modules=["sparse"])


@pytest.mark.parametrize("flag, match", [
    ("des.sharding=column", "'sharding' must be one of"),
    ("des.sharding=rowwise", "did you mean 'row_wise'"),
    ("des.shards=table_wise", "unknown key 'shards'"),
    ("des=5", "'des' must be a table"),
])
def test_bad_des_sections_are_refused_naming_the_fix(flag: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        RecDConfig.from_string(flag)


def test_a_des_config_built_in_code_is_checked() -> None:
    with pytest.raises(ConfigError, match="non-empty list of module paths"):
        DESConfig(modules=[])
    with pytest.raises(ConfigError, match="must be an instance of DESConfig"):
        RecDConfig(des={"sharding": "table_wise"})  # type: ignore[arg-type]


# -- dispatch by config type ---------------------------------------------------------------

def test_each_part_of_the_flag_builds_its_technique_in_declared_order(tmp_path: Path) -> None:
    HotSet({"t_user": TableShape(20, 8)}, {"t_user": torch.arange(3).numpy()}, budget_bytes=96).save(tmp_path / "h.npz")
    flag = RecDConfig.from_string(f"des=true; groups.user.key=session_id; groups.user.features=user_id; "
                                  f"fae.hot_set={tmp_path / 'h.npz'}; sharded=true")
    built = build(flag)
    assert [t.name for t in built] == ["fae", "recd", "des"]
    assert all(t.sharded for t in built)  # sharding is passed in when built, decided once
    assert [type(t.config) for t in built] == [FAEConfig, RecDConfig, DESConfig]


def test_apply_takes_one_techniques_config_alone(tmp_path: Path) -> None:
    """torchao style: the config's type says which technique; building it means on."""
    model = DESModel()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    kjt = _kjt(0)
    want = model(kjt)
    out, loader = recd_plugin.apply(DESConfig(), model, [kjt])
    assert out is model and type(model.sparse) is DESEmbeddingOperators  # unsharded: DES is its plain math
    assert torch.equal(model(kjt), want) and loader == [kjt]
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    recd_plugin.remove(model)

    HotSet({"t_user": TableShape(20, 8)}, {"t_user": torch.arange(3).numpy()}, budget_bytes=96).save(tmp_path / "h.npz")
    rec = RecModel()
    recd_plugin.apply(FAEConfig(hot_set=str(tmp_path / "h.npz"), force_layout=True), rec, [session_batch(0)])
    assert type(rec.ebc).__name__ == "HotColdEmbeddingBagCollection"
    recd_plugin.remove(rec)
    assert type(rec.ebc) is EmbeddingBagCollection
    with pytest.raises(ConfigError, match="takes a RecDConfig .* got dict"):
        recd_plugin.apply({"des": True}, rec, None)  # type: ignore[arg-type]


# -- DES's checks ----------------------------------------------------------------------------

def test_des_on_a_model_without_des_modules_is_refused_before_anything_changes() -> None:
    model = RecModel()
    with pytest.raises(UnsupportedModelError, match="no recd_plugin.des.DESEmbeddingOperators.*docs/des.md"):
        recd_plugin.apply(RecDConfig.from_string("des=true"), model, None)
    assert type(model.ebc) is EmbeddingBagCollection


def test_des_modules_naming_a_missing_module_is_refused() -> None:
    with pytest.raises(UnsupportedModelError, match="des.modules names 'sprase'.*did you mean 'sparse'"):
        recd_plugin.apply(RecDConfig.from_string("des.modules=sprase"), DESModel(), None)


def test_sharded_recd_group_read_by_a_des_module_is_refused() -> None:
    """Sharded, a DES module computes its partials on the batch's ids itself: an aligned IKJT
    would give the duplicates empty rows there. Unsharded, the inner EBC is swapped and exact."""
    flag = "des=true; groups.g.features=a; probe_batches=0; sharded="
    with pytest.raises(UnsupportedModelError, match="feature 'a' is read by DES module 'sparse'"):
        recd_plugin.apply(RecDConfig.from_string(flag + "true"), DESModel(), [_batch(0)])
    model = DESModel()
    batch = _batch(1)
    want = model(batch.sparse_features)
    model, loader = recd_plugin.apply(RecDConfig.from_string(flag + "false"), model, [batch])
    got = model(next(iter(loader)).sparse_features)
    assert torch.allclose(got, want, atol=1e-6)
    recd_plugin.remove(model)


def test_a_session_group_outside_des_modules_goes_with_des_sharded() -> None:
    config = RecDConfig.from_string("des=true; groups.g.features=s; probe_batches=0; sharded=true")
    model, loader = recd_plugin.apply(config, DESModel(), [_batch(0)])
    assert recd_plugin.is_dedup(next(iter(loader)).sparse_features)  # IKJTs
    recd_plugin.remove(model)


def test_a_group_decided_plain_leaves_the_other_sections_on() -> None:
    """RecD's group goes back to plain batches; DES (and FAE) stay on."""
    from recd_plugin.modules.recd import decider_of

    kjt = KeyedJaggedTensor(keys=FEATURES, values=torch.arange(18) % 10, lengths=torch.ones(18, dtype=torch.int32))
    distinct = Batch(dense_features=torch.zeros(6, 1), sparse_features=kjt, labels=torch.zeros(6))  # s: 2..7
    config = RecDConfig.from_string("des=true; groups.g.features=s; sharded=true")
    model, loader = recd_plugin.apply(config, DESModel(), [distinct, distinct])
    decider_of(model).decided = ()  # as the job's steps would decide for a group without repeats
    assert all(not recd_plugin.is_dedup(b.sparse_features) for b in loader)
    assert config.enabled and config.parts() == [config, DESConfig()]
    setup = sharding.for_dmp(model, config, batch_size=6, compute_device="cpu")
    assert type(setup.sharders[0]).__name__ == "ChosenDESSharder"
    recd_plugin.remove(model)


# -- what DES asks of the planner -------------------------------------------------------------

def test_for_dmp_gives_des_sharder_and_constraints_and_the_planner_takes_them() -> None:
    model = DESModel(torch.device("meta"))
    config = RecDConfig.from_string("des.sharding=row_wise; sharded=true")
    recd_plugin.apply(config, model, None)
    setup = sharding.for_dmp(model, config, batch_size=64, compute_device="cpu")
    assert type(setup.sharders[0]).__name__ == "ChosenDESSharder"
    assert setup.constraints["t_a"].sharding_types == ["row_wise"]
    assert "t_s" not in setup.constraints  # a plain EBC's table: TorchRec's planner decides
    plan = EmbeddingShardingPlanner(topology=Topology(world_size=2, compute_device="cpu"),
                                    constraints=setup.constraints).plan(model, setup.sharders)
    setup.check(plan)
    assert sorted(plan.plan) == ["ebc", "sparse"]
    assert {ps.sharding_type for ps in plan.plan["sparse"].values()} == {"row_wise"}
    assert "des: row_wise" in setup.explain(plan)
    recd_plugin.remove(model)


def test_a_des_hint_never_overrides_the_users_constraints() -> None:
    model = DESModel(torch.device("meta"))
    config = RecDConfig.from_string("des=true; sharded=true")
    base = {"t_a": ParameterConstraints(sharding_types=["row_wise"]), "t_b": ParameterConstraints(min_partition=4)}
    setup = sharding.for_dmp(model, config, 64, base_constraints=base, compute_device="cpu")
    assert setup.constraints["t_a"].sharding_types == ["row_wise"]  # the user's choice, with a note
    assert any("t_a" in n and "not applied" in n for n in setup.notes)
    assert setup.constraints["t_b"].sharding_types == ["table_wise"] and setup.constraints["t_b"].min_partition == 4
    assert base["t_b"].sharding_types is None  # the caller's objects are not modified


def test_a_registered_technique_reaches_the_planner_without_touching_the_others() -> None:
    """A new technique: a config type, a class, registered; ``for_dmp`` merges its hints."""
    from dataclasses import dataclass

    from recd_plugin.technique import register_technique, unregister_technique

    @dataclass
    class PinConfig:
        table: str

    calls: List[str] = []

    class Pin(Technique):
        config_type, name, order = PinConfig, "pin", 50

        def check(self, model: nn.Module) -> None:
            calls.append("check")

        def planner_hints(self, model: nn.Module, compute_device: str,
                          fused_params: Dict[str, Any] = None) -> PlannerHints:  # type: ignore[assignment]
            return PlannerHints(constraints={self.config.table: ParameterConstraints(sharding_types=["table_wise"])},
                                explain={self.config.table: "pin: table-wise"})

    register_technique(Pin)
    try:
        flag = RecDConfig(des=DESConfig())
        flag.parts = lambda: [flag.des, PinConfig("t_s")]  # type: ignore[method-assign]
        model = DESModel(torch.device("meta"))
        assert [t.name for t in build(flag, sharded=True)] == ["des", "pin"]
        setup = sharding.for_dmp(model, flag, 64, compute_device="cpu")
        assert setup.constraints["t_s"].sharding_types == ["table_wise"] and setup.hints["t_s"] == "pin: table-wise"
    finally:
        unregister_technique("pin")
