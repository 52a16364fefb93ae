"""DES operators unsharded: the standard math, partials that add up, and clear errors.

Each operator is checked against a direct formula written independently of its
partials/combine split (FM: the O(F^2) pairwise sum of Rendle's definition; first layer:
``nn.functional.linear`` over the concatenation), and the split is checked by property:
the partials of any partition of the fields, summed, combine to the same output.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, EmbeddingCollection, EmbeddingConfig, KeyedJaggedTensor, PoolingType

from recd_plugin.des import DESEmbeddingOperators, FactorizationMachine, FirstDenseLayer, WideLinear, des_plan
from recd_plugin.errors import DESError, RecDError


def _fm_pairwise(v: torch.Tensor) -> torch.Tensor:
    """Rendle's definition: sum over field pairs i < j of <v_i, v_j>, [B, 1]."""
    out = torch.zeros(v.shape[0], 1, dtype=v.dtype)
    for i, j in itertools.combinations(range(v.shape[1]), 2):
        out[:, 0] += (v[:, i] * v[:, j]).sum(dim=1)
    return out


def test_fm_matches_pairwise_definition_and_halves_formula() -> None:
    v = torch.randn(5, 7, 4, dtype=torch.float64)
    fm = FactorizationMachine(["t"])
    assert fm(v).shape == (5, 1)
    torch.testing.assert_close(fm(v), _fm_pairwise(v))
    direct = 0.5 * ((v.sum(1)) ** 2 - (v ** 2).sum(1)).sum(1, keepdim=True)
    torch.testing.assert_close(fm(v), direct)
    assert fm.partials(v).shape == (5, 4 + 1) and fm.partial_size(4) == 5


def test_wide_is_sum_of_one_dim_embeddings_plus_bias() -> None:
    w = torch.randn(6, 9, 1)
    wide = WideLinear(["w"])
    with torch.no_grad():
        wide.bias.fill_(0.25)
    torch.testing.assert_close(wide(w), w.sum(dim=(1, 2)).unsqueeze(1) + 0.25)


def test_first_dense_layer_equals_linear_over_concatenation() -> None:
    v, x = torch.randn(3, 5, 4), torch.randn(3, 2)
    first = FirstDenseLayer(["a"] * 5, embedding_dim=4, out_features=6, dense_in_features=2)
    want = torch.nn.functional.linear(torch.cat([x, v.flatten(1)], dim=1), first.linear_weight(), first.bias)
    torch.testing.assert_close(first(v, dense=x), want)
    no_dense = FirstDenseLayer(["a"] * 5, embedding_dim=4, out_features=6)
    torch.testing.assert_close(no_dense(v), v.flatten(1) @ no_dense.linear_weight().t() + no_dense.bias)


@settings(max_examples=40, deadline=None)
@given(b=st.integers(1, 6), f=st.integers(1, 8), d=st.integers(1, 5), h=st.integers(1, 4),
       cut=st.lists(st.booleans(), min_size=8, max_size=8), seed=st.integers(0, 2**16))
def test_partials_of_any_field_partition_add_up(b, f, d, h, cut, seed) -> None:
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(b, f, d, generator=g, dtype=torch.float64)
    mine = [i for i in range(f) if cut[i]]
    other = [i for i in range(f) if not cut[i]]
    fm, wide = FactorizationMachine(["t"]), WideLinear(["w"])
    first = FirstDenseLayer(["t"] * f, d, h).double()

    def part(op, idx, x):
        if not idx:
            return torch.zeros(b, op.partial_size(d), dtype=torch.float64)
        if isinstance(op, FirstDenseLayer):
            return op.partials(x[:, idx], weight=op.field_weight[:, idx])
        return op.partials(x[:, idx])

    for op, x in ((fm, v), (wide.double(), v[..., :1]), (first, v)):
        summed = part(op, mine, x) + part(op, other, x)
        torch.testing.assert_close(op.combine(summed), op(x))


def test_keyed_tensor_input_by_keys_and_gradients_flow() -> None:
    ebc = EmbeddingBagCollection(tables=[
        EmbeddingBagConfig(name=f"t{i}", feature_names=[f"f{i}"], num_embeddings=10, embedding_dim=3) for i in range(3)])
    kjt = KeyedJaggedTensor(keys=["f0", "f1", "f2"], values=torch.tensor([1, 2, 3, 4, 5, 6, 7]),
                            lengths=torch.tensor([1, 2, 1, 0, 2, 1], dtype=torch.int32))
    kt = ebc(kjt)
    fm = FactorizationMachine(["t0", "t1", "t2"])
    stacked = torch.stack([kt["f0"], kt["f1"], kt["f2"]], dim=1)
    torch.testing.assert_close(fm(kt), fm(stacked))
    torch.testing.assert_close(fm(kt, keys=["f2", "f0"]), fm(stacked[:, [2, 0]]))
    fm(kt).sum().backward()
    assert all(p.grad is not None for p in ebc.parameters())


def _tables(pooling: PoolingType = PoolingType.SUM):
    return [EmbeddingBagConfig(name="t_a", feature_names=["a"], num_embeddings=10, embedding_dim=4, pooling=pooling),
            EmbeddingBagConfig(name="t_b", feature_names=["b"], num_embeddings=10, embedding_dim=4),
            EmbeddingBagConfig(name="w_a", feature_names=["a"], num_embeddings=10, embedding_dim=1)]


def test_des_module_unsharded_is_ebc_then_operators_with_shared_feature_keys() -> None:
    torch.manual_seed(0)
    des = DESEmbeddingOperators(_tables(), {"fm": FactorizationMachine(["t_a", "t_b"]), "wide": WideLinear(["w_a"]),
                                            "first": FirstDenseLayer(["t_a", "t_b"], 4, 3, dense_in_features=2)})
    # "a" is read by t_a and w_a: TorchRec names those pooled outputs a@t_a and a@w_a
    assert des.fields["fm"] == [("t_a", "a", "a@t_a"), ("t_b", "b", "b")]
    kjt = KeyedJaggedTensor(keys=["a", "b"], values=torch.tensor([1, 2, 3, 4, 5]),
                            lengths=torch.tensor([2, 1, 1, 1], dtype=torch.int32))
    x = torch.randn(2, 2)
    out = des(kjt, x)
    kt = des.ebc(kjt)
    v = torch.stack([kt["a@t_a"], kt["b"]], dim=1)
    torch.testing.assert_close(out["fm"], _fm_pairwise(v))
    torch.testing.assert_close(out["wide"], kt["a@w_a"] + des.operators["wide"].bias)
    torch.testing.assert_close(out["first"], des.operators["first"](v, dense=x))


def test_unknown_table_is_named_with_a_suggestion() -> None:
    with pytest.raises(DESError, match=r"table 't_c'.*does not exist.*did you mean"):
        DESEmbeddingOperators(_tables(), {"fm": FactorizationMachine(["t_a", "t_c"])})
    des = DESEmbeddingOperators(_tables(), {"fm": FactorizationMachine(["t_a", "t_b"])})
    with pytest.raises(DESError, match=r"placement names table 't_x'"):
        des_plan(des, {"t_x": 0, "t_a": 0, "t_b": 1, "w_a": 1}, world_size=2)
    with pytest.raises(DESError, match=r"misses table"):
        des_plan(des, {"t_a": 0}, world_size=2)
    with pytest.raises(DESError, match=r"use a rank in"):
        des_plan(des, {"t_a": 5, "t_b": 0, "w_a": 0}, world_size=2)


def test_inputs_that_are_not_pooled_sums_are_refused() -> None:
    with pytest.raises(DESError, match=r"MEAN pooling.*sum pooling"):
        DESEmbeddingOperators(_tables(PoolingType.MEAN), {"fm": FactorizationMachine(["t_a", "t_b"])})
    ec = EmbeddingCollection(tables=[EmbeddingConfig(name="s", feature_names=["s"], num_embeddings=10, embedding_dim=4)])
    with pytest.raises(DESError, match=r"EmbeddingCollection"):
        DESEmbeddingOperators(ec, {"fm": FactorizationMachine(["s"])})
    with pytest.raises(DESError, match=r"EmbeddingConfig"):
        DESEmbeddingOperators(ec.embedding_configs(), {"fm": FactorizationMachine(["s"])})
    seq = ec(KeyedJaggedTensor(keys=["s"], values=torch.tensor([1, 2, 3]), lengths=torch.tensor([2, 1], dtype=torch.int32)))
    with pytest.raises(DESError, match=r"sum-pooled"):
        FactorizationMachine(["s"])(seq)  # a dict of JaggedTensor: per-position, not pooled
    with pytest.raises(DESError, match=r"\[B, F, D\]"):
        FactorizationMachine(["s"])(torch.randn(3, 4))


def test_shape_and_configuration_mismatches_are_clear() -> None:
    with pytest.raises(DESError, match=r"mixes embedding dimensions"):
        DESEmbeddingOperators(_tables(), {"fm": FactorizationMachine(["t_a", "w_a"])})
    with pytest.raises(DESError, match=r"wide tables need embedding_dim=1"):
        DESEmbeddingOperators(_tables(), {"wide": WideLinear(["t_a"])})
    with pytest.raises(DESError, match=r"built for 2 fields of dimension 8"):
        DESEmbeddingOperators(_tables(), {"first": FirstDenseLayer(["t_a", "t_b"], 8, 2)})
    with pytest.raises(DESError, match=r"more than once"):
        DESEmbeddingOperators(_tables(), {"fm": FactorizationMachine(["t_a", "t_b", "t_a"])})
    with pytest.raises(DESError, match=r"needs dense features"):
        FirstDenseLayer(["t"], 4, 2, dense_in_features=3)(torch.randn(2, 1, 4))
    with pytest.raises(DESError, match=r"names no tables"):
        DESEmbeddingOperators(_tables(), {"fm": FactorizationMachine()})
    assert issubclass(DESError, RecDError) and issubclass(DESError, ValueError)


def test_pipeline_stage_inputs_record_every_tensor_on_the_pipelines_stream(monkeypatch) -> None:
    """TrainPipelineSparseDist calls record_stream on a pipelined module's context and
    input-dist result when it moves them across CUDA streams (not on CPU, so the 2-rank gloo
    tests never reach it): every tensor inside must be recorded, or the allocator could reuse
    its memory while the compute stream still reads it."""
    from recd_plugin.des.sharded import _Context, _Exchanged

    recorded = []
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda t, stream: recorded.append((id(t), stream)))
    lengths = [[torch.tensor([1, 2]), torch.tensor([0])], [torch.tensor([3])]]
    values = [[torch.tensor([5, 6, 7]), torch.tensor([], dtype=torch.long)], [torch.tensor([1, 2, 3])]]
    _Exchanged(([2, 1], lengths, values)).record_stream("s1")
    want = {id(t) for slot in lengths + values for t in slot}
    assert {i for i, s in recorded if s == "s1"} == want and len(recorded) == len(want)
    recorded.clear()
    ctx = _Context(dense=torch.ones(2, 3), batch_sizes=[2, 1], synced={"op.bias": torch.zeros(1)})
    ctx.record_stream("s2")
    assert {i for i, _ in recorded} == {id(ctx["dense"]), id(ctx["synced"]["op.bias"])}
