"""recd_plugin.sharding.for_dmp: one object with what DMP and its planner need (sharders,
constraints, plan check, explain), RecD's deduplicated batch sizes and FAE's hot set as hints.

No process group is needed: plans are built with torchrec.distributed.sharding_plan helpers, or
planned on the meta device for a cuda topology (pure Python)."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
from torchrec.distributed.planner.types import ParameterConstraints
from torchrec.distributed.sharding_plan import construct_module_sharding_plan, row_wise, table_wise
from torchrec.distributed.types import ShardingPlan

import recd_plugin
from recd_plugin import RecDConfig, sharding
from recd_plugin.data import TableBatches, generate_sessions
from recd_plugin.errors import ShardingError
from recd_plugin.fae.hints import hot_set_constraints
from recd_plugin.fae.hotset import HotSet, TableShape

ITEMS = 6000  # > the synthetic sessions' item ids
FLAG = "groups.user.key=session_id; groups.user.features=user_id,history; sharded=true"


class Model(nn.Module):
    """Reads the synthetic sessions' features: a grouped table, a shared per-sample one."""

    def __init__(self, device: str = "cpu") -> None:
        super().__init__()
        self.ebc = EmbeddingBagCollection(device=torch.device(device), tables=[
            EmbeddingBagConfig(name="t_user", embedding_dim=8, num_embeddings=1000, feature_names=["user_id"]),
            EmbeddingBagConfig(name="t_hist", embedding_dim=8, num_embeddings=ITEMS, feature_names=["history"]),
            EmbeddingBagConfig(name="t_item", embedding_dim=8, num_embeddings=ITEMS, feature_names=["item_id"])])

    def forward(self, kjt, dense=None):
        return torch.cat(list(self.ebc(kjt).to_dict().values()), dim=1).sum(dim=1)


def _batches(n: int = 6, batch: int = 256):
    return [b for _, b in zip(range(n), TableBatches(generate_sessions(num_users=80, seed=1), batch,
                                                      sparse_features=["session_id", "user_id", "history", "item_id"]))]


def _plan(model: Model, per_table) -> ShardingPlan:
    return ShardingPlan({"ebc": construct_module_sharding_plan(
        model.ebc, per_param_sharding=per_table, sharder=sharding.sharders()[0], local_size=2, world_size=2,
        device_type="cpu")})


def test_constraints_equal_the_separate_calls_for_the_same_inputs() -> None:
    model, config, batches = Model(), RecDConfig.from_string(FLAG), _batches()
    base = {"t_item": ParameterConstraints(sharding_types=["row_wise"]),
            "t_hist": ParameterConstraints(compute_kernels=["fused"])}
    kept = copy.deepcopy(base)
    setup = sharding.for_dmp(model, config, 512, loader=batches, base_constraints=base, compute_device="cpu")
    u = sharding.measure_unique_fraction(batches, config)
    assert setup.constraints == sharding.constraints(model, config, 512, u, base=copy.deepcopy(base))
    assert setup.unique_fraction == u and setup.unique_source == "loader"
    assert setup.constraints["t_user"].batch_sizes == [int(np.ceil(u["user"] * 512))] and u["user"] < 0.5
    assert base == kept  # the caller's constraints are not modified
    assert sorted(setup.recd_tables) == ["t_hist", "t_user"]
    # apply's wrapped loader is measured on the plain batches under it
    from recd_plugin.transforms.dedup import DedupLoader

    wrapped = DedupLoader(batches, config.spec, aligned=True)
    assert sharding.for_dmp(model, config, 512, loader=wrapped, compute_device="cpu").unique_fraction == u


def test_measuring_the_loader_leaves_its_first_epoch_and_the_rng_as_they_were() -> None:
    """for_dmp(loader=...) reads batches: the loader's own generators and the global ones are
    restored, so the job's first epoch is the one it would have had."""
    from torch.utils.data import DataLoader, RandomSampler

    batches = _batches()

    def loader() -> DataLoader:
        sampler = RandomSampler(batches, generator=torch.Generator().manual_seed(3))
        return DataLoader(batches, sampler=sampler, batch_size=None)

    def order(dl: DataLoader) -> list:
        return [int(b.sparse_features.values()[0]) for b in dl]

    model = Model()
    torch.manual_seed(0)
    want = order(loader())
    after = torch.get_rng_state()
    torch.manual_seed(0)
    dl = loader()
    sharding.for_dmp(model, RecDConfig.from_string(FLAG), 512, loader=dl, compute_device="cpu")
    assert order(dl) == want and torch.equal(torch.get_rng_state(), after)


def test_plugin_off_gives_the_plugins_sharders_and_the_base_constraints_only() -> None:
    base = {"t_item": ParameterConstraints(sharding_types=["table_wise"])}
    setup = sharding.for_dmp(Model(), RecDConfig(), 512, base_constraints=base,
                             fused_params={"learning_rate": 0.1}, compute_device="cpu")
    assert setup.constraints == base and not setup.recd_tables and not setup.hints
    assert [type(s) for s in setup.sharders] == [type(s) for s in sharding.sharders()]
    assert all(s.fused_params == {"learning_rate": 0.1} for s in setup.sharders)
    assert all("row_wise" in s.sharding_types("cpu") for s in setup.sharders)


def test_no_measurement_plans_grouped_tables_for_b_rows_and_says_so() -> None:
    config = RecDConfig.from_string(FLAG)
    setup = sharding.for_dmp(Model(), config, 512, compute_device="cpu")
    assert setup.constraints == {} and any("no unique fraction" in n for n in setup.notes)


def test_check_refuses_what_cannot_run_and_explain_names_the_hints() -> None:
    model, config = Model(), RecDConfig.from_string(FLAG)
    setup = sharding.for_dmp(model, config, 1000, unique_fraction={"user": 0.031}, compute_device="cpu")
    plan = _plan(model, {"t_user": table_wise(rank=0), "t_hist": row_wise(), "t_item": table_wise(rank=1)})
    setup.check(plan)
    text = setup.explain(plan)
    assert "ebc.t_user: table_wise, dense, ranks [0]" in text and "planned for 31 unique rows/step" in text
    assert "ebc.t_item: table_wise" in text and text.count("unique rows/step") == 2
    bad = copy.deepcopy(plan)  # as a hand-made plan could say (the plugin's sharders do not offer it on cpu)
    bad.plan["ebc"]["t_user"].sharding_type = "table_row_wise"
    with pytest.raises(ShardingError, match="does not work on cpu"):
        setup.check(bad)
    other = sharding.for_dmp(nn.Sequential(EmbeddingBagCollection(tables=[EmbeddingBagConfig(
        name="t_other", embedding_dim=8, num_embeddings=10, feature_names=["x"])])), config, 1000, compute_device="cpu")
    with pytest.raises(ShardingError, match="does not have"):
        other.check(plan)


# -- FAE under sharding: the flag gives planner hints, the model stays as it is --------------

ROWS = {"t_user": 1000, "t_hist": ITEMS, "t_item": ITEMS}


@pytest.fixture()
def hot_path(tmp_path: Path) -> Path:
    # t_user: 60% of its rows hot (stays in HBM); t_hist: 5% (cached); t_item: none hot
    hot = HotSet({t: TableShape(n, 8) for t, n in ROWS.items()},
                 {"t_user": np.arange(600), "t_hist": np.arange(0, ITEMS, 20)}, budget_bytes=700 * 32)
    path = tmp_path / "hot.npz"
    hot.save(path)
    return path


def test_fae_flag_under_sharding_leaves_the_model_and_gives_hints(hot_path: Path) -> None:
    torch.manual_seed(0)
    model = Model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = RecDConfig.from_string(f"fae.hot_set={hot_path}; sharded=true")
    out, loader = recd_plugin.apply(config, model, _batches(2))  # used to refuse: "works on unsharded models"
    assert out is model and type(model.ebc) is EmbeddingBagCollection
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())

    setup = sharding.for_dmp(model, config, 512, compute_device="cuda")
    cons = setup.constraints
    assert cons["t_user"].compute_kernels == ["fused"] and cons["t_user"].cache_params is None
    assert cons["t_hist"].compute_kernels == ["fused_uvm_caching"]
    assert cons["t_hist"].cache_params.load_factor == pytest.approx(0.05)
    assert cons["t_item"].cache_params.load_factor == pytest.approx(0.01)  # no hot row: the minimum
    assert cons == hot_set_constraints(HotSet.load(hot_path))
    assert "whole in HBM" in setup.hints["t_user"] and "load factor 0.050" in setup.hints["t_hist"]

    # the planner takes them (cuda topology, meta-device model: pure Python)
    plan = EmbeddingShardingPlanner(topology=Topology(world_size=2, compute_device="cuda"),
                                    constraints=cons).plan(Model("meta"), setup.sharders)
    setup.check(plan)
    kernels = {t: ps.compute_kernel for t, ps in plan.plan["ebc"].items()}
    assert kernels == {"t_user": "fused", "t_hist": "fused_uvm_caching", "t_item": "fused_uvm_caching"}
    assert "load factor 0.050" in setup.explain(plan)

    # on cpu there are no HBM / host tiers: no hint, and a note why
    on_cpu = sharding.for_dmp(model, config, 512, compute_device="cpu")
    assert on_cpu.constraints == {} and any("fae: no placement hints on cpu" in n for n in on_cpu.notes)
    recd_plugin.remove(model)


def test_fae_hints_fill_only_what_the_users_constraints_leave_unset(hot_path: Path) -> None:
    config = RecDConfig.from_string(f"fae.hot_set={hot_path}; fae.tables=t_hist,t_user; sharded=true")
    base = {"t_hist": ParameterConstraints(sharding_types=["row_wise"]),
            "t_user": ParameterConstraints(compute_kernels=["dense"])}
    setup = sharding.for_dmp(Model(), config, 512, base_constraints=base, compute_device="cuda")
    assert setup.constraints["t_hist"].sharding_types == ["row_wise"]
    assert setup.constraints["t_hist"].compute_kernels == ["fused_uvm_caching"]
    assert setup.constraints["t_user"].compute_kernels == ["dense"]  # the user's choice wins, with a note
    assert any("t_user" in n and "not applied" in n for n in setup.notes)
    assert "t_item" not in setup.constraints  # fae.tables limits the hints
    assert base["t_hist"].compute_kernels is None


def test_fae_and_recd_hints_together(hot_path: Path) -> None:
    config = RecDConfig.from_string(FLAG + f"; fae.hot_set={hot_path}")
    setup = sharding.for_dmp(Model(), config, 1000, unique_fraction={"user": 0.031}, compute_device="cuda")
    assert setup.constraints["t_user"].batch_sizes == [31]
    assert setup.constraints["t_user"].compute_kernels == ["fused"]
    assert setup.constraints["t_hist"].cache_params.load_factor == pytest.approx(0.05)
