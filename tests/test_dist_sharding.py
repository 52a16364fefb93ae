"""recd_plugin.dist.sharding: sharders, planner constraints and the up-front plan check (no
process group needed: plans are built with torchrec.distributed.sharding_plan helpers)."""

from __future__ import annotations

import pytest
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
from torchrec.distributed.sharding_plan import construct_module_sharding_plan, data_parallel, row_wise, table_wise
from torchrec.distributed.types import ShardingPlan

from recd_plugin import RecDConfig
from recd_plugin.dist import sharding
from recd_plugin.errors import ShardingError

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


def test_ikjt_tables_are_the_ebcs_outside_towers() -> None:
    assert set(sharding.ikjt_tables(Model(), CONFIG)) == {"t_session", "t_item"}


def test_constraints_plan_deduplicated_rows_and_fused_kernel() -> None:
    cons = sharding.constraints(Model(), CONFIG, batch_size=1000, unique_fraction={"user": 0.031})
    assert cons["t_user"].batch_sizes == [31] and cons["t_session"].batch_sizes == [31]
    assert cons["t_item"].batch_sizes is None  # per-sample feature: B rows
    assert cons["t_item"].compute_kernels == ["fused"] and "data_parallel" not in cons["t_item"].sharding_types
    assert cons["t_user"].compute_kernels is None  # inside a tower: plain KJT, any kernel


def test_check_plan_accepts_fused_table_wise_and_row_wise() -> None:
    model, [ebc_sharder, _] = Model(), sharding.sharders({"optimizer": EmbOptimType.EXACT_SGD, "learning_rate": 0.1})
    plan = _plan(model, {"t_session": table_wise(rank=0, compute_kernel="fused"), "t_item": row_wise(compute_kernel="fused")}, ebc_sharder)
    sharding.check_plan(model, CONFIG, plan, [ebc_sharder])
    assert "t_item: row_wise, fused" in sharding.explain(model, CONFIG, plan, {})


@pytest.mark.parametrize("bad,match", [
    ({"t_session": table_wise(rank=0, compute_kernel="dense"), "t_item": table_wise(rank=1, compute_kernel="fused")},
     "compute kernel 'dense'"),
    ({"t_session": data_parallel(), "t_item": table_wise(rank=1, compute_kernel="fused")}, "data_parallel"),
])
def test_check_plan_refuses_what_cannot_take_ikjts(bad, match) -> None:
    model, [ebc_sharder, _] = Model(), sharding.sharders()
    with pytest.raises(ShardingError, match=match) as e:
        sharding.check_plan(model, CONFIG, _plan(model, bad, ebc_sharder), [ebc_sharder])
    assert "t_session" in str(e.value)


def test_check_plan_refuses_an_optimizer_without_variable_batch_support() -> None:
    model, [ebc_sharder, _] = Model(), sharding.sharders({"optimizer": EmbOptimType.EXACT_ADAGRAD, "learning_rate": 0.1})
    fused = {t: table_wise(rank=r, compute_kernel="fused") for r, t in enumerate(["t_session", "t_item"])}
    plan = _plan(model, fused, ebc_sharder)
    with pytest.raises(ShardingError, match="EXACT_ROWWISE_ADAGRAD"):
        sharding.check_plan(model, CONFIG, plan, [ebc_sharder])


def test_vbe_optimizers_are_what_the_installed_fbgemm_takes() -> None:
    cpu, cuda = sharding.vbe_optimizers("cpu"), sharding.vbe_optimizers("cuda")
    assert {EmbOptimType.EXACT_SGD, EmbOptimType.EXACT_ROWWISE_ADAGRAD} <= cpu <= cuda
    assert EmbOptimType.EXACT_ADAGRAD not in cuda  # fbgemm has no variable-batch Adagrad
    assert EmbOptimType.ADAM in cuda and EmbOptimType.ADAM not in cpu  # no CPU Adam in fbgemm
    rmsprop = getattr(EmbOptimType, "ROWWISE_RMSPROP_AR", None)
    if rmsprop is not None:  # fbgemm >= 1.9: the release that added it to its variable-batch set
        assert rmsprop in cuda


def test_sharded_mode_keeps_torchrec_modules_and_refuses_ec_outside_towers() -> None:
    import recd_plugin
    from torchrec import EmbeddingCollection, EmbeddingConfig

    model = Model()
    recd_plugin.apply(CONFIG, model)
    assert type(model.ebc) is EmbeddingBagCollection and type(model.tower.ebc) is EmbeddingBagCollection
    recd_plugin.remove(model)

    class WithEC(Model):
        def __init__(self) -> None:
            super().__init__()
            self.seq = EmbeddingCollection(tables=[EmbeddingConfig(name="t_hist", embedding_dim=8, num_embeddings=9,
                                                                   feature_names=["history"])])

    config = RecDConfig.from_string("groups.user.key=session_id; groups.user.features=user_id,history; sharded=true")
    with pytest.raises(Exception, match="EmbeddingCollection 'seq'"):
        recd_plugin.apply(config, WithEC())


def test_measure_unique_fraction_counts_unique_sessions() -> None:
    from recd_plugin.data import TableBatches, generate_sessions

    table = generate_sessions(num_users=60, seed=1)
    batches = TableBatches(table, 256)
    config = RecDConfig.from_string("groups.user.key=session_id; groups.user.features=user_id,history")
    got = sharding.measure_unique_fraction(batches, config, limit=3)
    sessions = table.column("session_id").to_numpy()
    want = sum(len(set(sessions[i * 256:(i + 1) * 256])) for i in range(3)) / (3 * 256)
    assert got == {"user": pytest.approx(want)}
