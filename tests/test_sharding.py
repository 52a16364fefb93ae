"""recd_plugin.sharding.planner: sharders and planner hints (no process group needed: plans are
built with torchrec.distributed.sharding_plan helpers)."""

from __future__ import annotations

import pytest
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
from torchrec.distributed.sharding_plan import construct_module_sharding_plan, row_wise, table_wise
from torchrec.distributed.planner.types import ParameterConstraints
from torchrec.distributed.types import ShardingPlan

from recd_plugin import RecDConfig, sharding

CONFIG = RecDConfig.from_string("groups.user.key=session_id; groups.user.features=user_id; sharded=true; "
                                "towers.tower=user")


class Tower(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ebc = EmbeddingBagCollection(tables=[EmbeddingBagConfig(name="t_user", embedding_dim=8,
                                                                     num_embeddings=50, feature_names=["user_id"])])


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.tower = Tower()
        self.ebc = EmbeddingBagCollection(tables=[
            EmbeddingBagConfig(name="t_session", embedding_dim=8, num_embeddings=40, feature_names=["session_id"]),
            EmbeddingBagConfig(name="t_item", embedding_dim=8, num_embeddings=30, feature_names=["item_id"])])


def _plan(model: Model, per_table, sharder) -> ShardingPlan:
    return ShardingPlan({"ebc": construct_module_sharding_plan(
        model.ebc, per_param_sharding=per_table, sharder=sharder, local_size=2, world_size=2, device_type="cpu")})


def test_sharders_offer_row_wise_on_cpu() -> None:
    for s in sharding.sharders():
        assert "row_wise" in s.sharding_types("cpu")
        assert "table_row_wise" not in s.sharding_types("cpu")  # weights do not move on CPU (design notes)


def test_constraints_plan_deduplicated_rows_only_for_grouped_tables() -> None:
    cons = sharding.constraints(Model(), CONFIG, batch_size=1000, unique_fraction={"user": 0.031})
    assert cons["t_user"].batch_sizes == [31]          # grouped: the unique rows' ids are looked up
    assert "t_item" not in cons                        # per-sample: left to the planner as it is
    mine = {"t_user": ParameterConstraints(batch_sizes=[7])}
    assert sharding.constraints(Model(), CONFIG, 1000, {"user": 0.031}, base=mine)["t_user"].batch_sizes == [7]


def test_explain_names_each_table_and_the_hint() -> None:
    model, [ebc_sharder, _] = Model(), sharding.sharders()
    plan = _plan(model, {"t_session": table_wise(rank=0), "t_item": row_wise()}, ebc_sharder)
    text = sharding.explain(model, CONFIG, plan, {"t_session": ParameterConstraints(batch_sizes=[12])})
    assert "ebc.t_item: row_wise" in text and "planned for 12 unique rows/step" in text


def test_sharded_mode_keeps_torchrec_modules_including_an_ec_outside_towers() -> None:
    import recd_plugin
    from torchrec import EmbeddingCollection, EmbeddingConfig

    class WithEC(Model):
        def __init__(self) -> None:
            super().__init__()
            self.seq = EmbeddingCollection(tables=[EmbeddingConfig(name="t_hist", embedding_dim=8, num_embeddings=9,
                                                                   feature_names=["history"])])

    model = WithEC()
    config = RecDConfig.from_string("groups.user.key=session_id; groups.user.features=user_id,history; sharded=true")
    recd_plugin.apply(config, model)
    # DMP's default sharders shard exactly these types; their outputs are gathered by hooks
    assert type(model.ebc) is EmbeddingBagCollection and type(model.seq) is EmbeddingCollection
    recd_plugin.remove(model)


def test_measure_unique_fraction_counts_unique_sessions() -> None:
    from recd_plugin.data import TableBatches, generate_sessions

    table = generate_sessions(num_users=60, seed=1)
    batches = TableBatches(table, 256)
    config = RecDConfig.from_string("groups.user.key=session_id; groups.user.features=user_id,history")
    got = sharding.measure_unique_fraction(batches, config, limit=3)
    sessions = table.column("session_id").to_numpy()
    want = sum(len(set(sessions[i * 256:(i + 1) * 256])) for i in range(3)) / (3 * 256)
    assert got == {"user": pytest.approx(want)}
