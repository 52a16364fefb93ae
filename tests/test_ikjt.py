"""IKJT builder: build_ikjt / expand / inverse_index / unique_rows, FeatureGroup, DedupSpec.

Property tests draw random jagged KJTs with a valid spec (conftest.jagged_cases) and compare
the builder with a plain-Python reference (first-appearance numbering); the IKJT is also fed
to TorchRec's own EmbeddingBagCollection, which must pool it exactly like the plain batch.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from conftest import DIM, NUM_IDS, JaggedCase, assert_kjt_equal, jagged_cases, kjt_rows, label_case, make_kjt
from recd_plugin import (
    DedupEmbeddingBagCollection,
    DedupSpec,
    DedupSpecError,
    FeatureGroup,
    MalformedBatchError,
    build_ikjt,
    expand,
    inverse_index,
    is_ikjt,
    unique_rows,
)
from recd_plugin.sparse.ikjt import expand_rows, is_identity, jagged_index_select, unique_first

PROPERTY = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def kjt(keys, rows, weights=None, stride=None) -> KeyedJaggedTensor:
    """Small literal KJT: rows[k] is a list of bags (lists of ids) per key."""
    lengths = [len(r) for k in keys for r in rows[k]]
    values = [v for k in keys for r in rows[k] for v in r]
    return KeyedJaggedTensor(
        keys=list(keys),
        values=torch.tensor(values, dtype=torch.long),
        lengths=torch.tensor(lengths, dtype=torch.long),
        weights=None if weights is None else torch.tensor(weights, dtype=torch.float32),
        stride=stride,
    )


# ------------------------------------------------------------------------------------------
# Properties on random batches.


@PROPERTY
@given(jagged_cases())
def test_expand_inverts_build(case: JaggedCase) -> None:
    label_case(case)
    ikjt = build_ikjt(case.kjt, case.spec)
    assert is_ikjt(ikjt)
    assert ikjt.keys() == case.kjt.keys()
    assert_kjt_equal(expand(ikjt), case.kjt)


@PROPERTY
@given(jagged_cases())
def test_strides_inverse_and_first_appearance_order(case: JaggedCase) -> None:
    ikjt = build_ikjt(case.kjt, case.spec)
    keys = case.kjt.keys()
    # One stride per key: unique rows of its group, or B for an ungrouped feature.
    assert ikjt.stride_per_key() == [case.expected_unique[k] for k in keys]
    for k in keys:
        if case.group_of[k] is None:
            assert ikjt.stride_per_key()[keys.index(k)] == case.batch
    if case.batch:
        assert ikjt.stride() == case.batch
    names, inv = ikjt.inverse_indices()
    assert names == keys and inv.dtype == torch.long and tuple(inv.shape) == (len(keys), case.batch)
    for k in keys:
        # Reference numbering by first appearance: also pins the unique-row order.
        assert inverse_index(ikjt, k).tolist() == case.expected_inverse[k]
        # Unique row u is the row of the first sample mapped to u.
        inv_k = case.expected_inverse[k]
        first = [inv_k.index(u) for u in range(case.expected_unique[k])]
        assert first == sorted(first)
        assert kjt_rows(ikjt, k) == [case.rows[k][i] for i in first]


@PROPERTY
@given(jagged_cases())
def test_unique_rows_of_a_group(case: JaggedCase) -> None:
    ikjt = build_ikjt(case.kjt, case.spec)
    for g in case.spec.groups:
        feats = list(g.all_features)
        u = unique_rows(ikjt, feats)
        assert u.inverse_indices_or_none() is None
        assert u.keys() == feats
        assert u.stride() == case.expected_unique[feats[0]] or case.batch == 0
        for f in feats:
            inv = case.expected_inverse[f]
            first = [inv.index(r) for r in range(case.expected_unique[f])]
            assert kjt_rows(u, f) == [case.rows[f][i] for i in first]


@PROPERTY
@given(st.integers(1, 40), st.integers(0, 3), st.booleans(), st.randoms(use_true_random=False))
def test_identity_inverse_when_all_rows_unique(batch: int, hist_len: int, keyed: bool, rnd) -> None:
    # Every sample has its own session id / its own content: nothing repeats.
    ids = list(range(batch))
    rnd.shuffle(ids)
    rows = {
        "sid": [[i] for i in ids],
        "hist": [[i] + [rnd.randrange(5) for _ in range(hist_len)] for i in ids],
        "item": [[rnd.randrange(3)] for _ in ids],
    }
    group = FeatureGroup("u", ["hist"], key="sid") if keyed else FeatureGroup("u", ["sid", "hist"])
    k = kjt(["sid", "hist", "item"], rows)
    ikjt = build_ikjt(k, DedupSpec([group]))
    assert ikjt.stride_per_key() == [batch, batch, batch]
    arange = torch.arange(batch)
    for f in ("sid", "hist", "item"):
        assert torch.equal(inverse_index(ikjt, f), arange)
    # Even without duplicates the batch is a variable-batch IKJT (never a mix of both kinds).
    assert is_ikjt(ikjt)
    assert_kjt_equal(expand(ikjt), k)


@PROPERTY
@given(st.integers(1, 40), st.lists(st.integers(0, 9), max_size=6), st.booleans())
def test_all_duplicate_batch_gives_one_unique_row(batch: int, hist, keyed: bool) -> None:
    rows = {"sid": [[3]] * batch, "hist": [list(hist)] * batch, "item": [[i % 4] for i in range(batch)]}
    group = FeatureGroup("u", ["hist"], key="sid") if keyed else FeatureGroup("u", ["sid", "hist"])
    k = kjt(["item", "sid", "hist"], rows)
    ikjt = build_ikjt(k, DedupSpec([group]))
    assert ikjt.stride_per_key() == [batch, 1, 1]
    assert inverse_index(ikjt, "hist").tolist() == [0] * batch
    assert kjt_rows(unique_rows(ikjt, ["sid", "hist"]), "hist") == [tuple((v, 1.0) for v in hist)]
    assert_kjt_equal(expand(ikjt), k)


def _ebc(features, pooling: PoolingType, weighted: bool, seed: int) -> EmbeddingBagCollection:
    torch.manual_seed(seed)
    # One table per feature, plus one table shared by two features when there are >= 2.
    tables = [
        EmbeddingBagConfig(name=f"t_{f}", embedding_dim=DIM, num_embeddings=NUM_IDS,
                           feature_names=[f], pooling=pooling)
        for f in features[2:]
    ]
    if len(features) >= 2:
        tables.insert(0, EmbeddingBagConfig(name="t_shared", embedding_dim=DIM, num_embeddings=NUM_IDS,
                                            feature_names=list(features[:2]), pooling=pooling))
    else:
        tables.insert(0, EmbeddingBagConfig(name="t_only", embedding_dim=DIM, num_embeddings=NUM_IDS,
                                            feature_names=list(features), pooling=pooling))
    return EmbeddingBagCollection(tables=tables, is_weighted=weighted)


def _pooled_and_grads(ebc: EmbeddingBagCollection, features: KeyedJaggedTensor, probe: torch.Tensor):
    ebc.zero_grad(set_to_none=True)
    out = ebc(features)
    (out.values() * probe).sum().backward()
    grads = {n: p.grad.clone() if p.grad is not None else torch.zeros_like(p) for n, p in ebc.named_parameters()}
    return out, grads


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=jagged_cases(min_batch=1, int32_lengths=False), pooling=st.sampled_from([PoolingType.SUM, PoolingType.MEAN]),
       data=st.data())
def test_torchrec_ebc_pools_ikjt_like_plain_batch(case: JaggedCase, pooling: PoolingType, data) -> None:
    label_case(case)
    # nn.EmbeddingBag takes per-sample weights with SUM pooling only.
    weighted = case.weighted and pooling == PoolingType.SUM
    features = case.kjt.keys()
    plain = case.kjt
    if case.weighted and not weighted:
        plain = KeyedJaggedTensor(keys=plain.keys(), values=plain.values(), lengths=plain.lengths(),
                                  stride=plain.stride())
    ebc = _ebc(features, pooling, weighted, seed=data.draw(st.integers(0, 100)))
    ikjt = build_ikjt(plain, case.spec)
    probe = torch.randn(case.batch, DIM * len(features), generator=torch.Generator().manual_seed(1))

    ref, ref_grads = _pooled_and_grads(ebc, plain, probe)
    got, got_grads = _pooled_and_grads(ebc, ikjt, probe)  # TorchRec's own EBC, fed the IKJT
    assert got.keys() == ref.keys()
    assert got.values().shape == ref.values().shape == (case.batch, DIM * len(features))
    torch.testing.assert_close(got.values(), ref.values(), rtol=1e-5, atol=1e-6)
    for name in ref_grads:
        torch.testing.assert_close(got_grads[name], ref_grads[name], rtol=1e-5, atol=1e-5)

    dedup = DedupEmbeddingBagCollection.from_module(ebc)  # the plugin's EBC, same tables
    got, got_grads = _pooled_and_grads(dedup, ikjt, probe)
    torch.testing.assert_close(got.values(), ref.values(), rtol=1e-5, atol=1e-6)
    for name in ref_grads:
        torch.testing.assert_close(got_grads[name], ref_grads[name], rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------
# Batch size 0: build_ikjt accepts it (no error path for it in _check_kjt / build_ikjt).


@pytest.mark.parametrize("group", [
    FeatureGroup("u", ["hist"], key="sid"),
    FeatureGroup("u", ["sid", "hist"]),
])
def test_empty_batch_is_supported(group: FeatureGroup) -> None:
    empty = kjt(["sid", "hist", "item"], {"sid": [], "hist": [], "item": []})
    assert empty.stride() == 0
    ikjt = build_ikjt(empty, DedupSpec([group]))
    assert ikjt.stride_per_key() == [0, 0, 0]
    assert inverse_index(ikjt, "hist").numel() == 0
    assert_kjt_equal(expand(ikjt), empty)


# ------------------------------------------------------------------------------------------
# Hand-checked examples and the primitives.


def test_worked_example() -> None:
    rows = {
        "sid": [[7], [7], [9], [7]],
        "hist": [[1, 2], [1, 2], [3], [1, 2]],
        "item": [[5], [6], [5], [5]],
    }
    k = kjt(["sid", "hist", "item"], rows)
    ikjt = build_ikjt(k, DedupSpec([FeatureGroup("user", ["hist"], key="sid"), FeatureGroup("it", ["item"])]))
    assert ikjt.stride_per_key() == [2, 2, 2]
    assert inverse_index(ikjt, "sid").tolist() == [0, 0, 1, 0]
    assert inverse_index(ikjt, "item").tolist() == [0, 1, 0, 0]
    assert ikjt.values().tolist() == [7, 9, 1, 2, 3, 5, 6]
    assert ikjt.lengths().tolist() == [1, 1, 2, 1, 1, 1]
    assert_kjt_equal(expand(ikjt), k)


def test_content_rows_compare_length_and_every_feature_and_weights() -> None:
    # [1] vs [1, 0]: equal after zero padding, but different rows.
    k = kjt(["a"], {"a": [[1], [1, 0], [1], [0, 1]]})
    assert inverse_index(build_ikjt(k, DedupSpec([FeatureGroup("g", ["a"])])), "a").tolist() == [0, 1, 0, 2]
    # Equal in "a", different in "b": the group's rows differ.
    k = kjt(["a", "b"], {"a": [[1], [1], [1]], "b": [[2], [3], [2]]})
    ikjt = build_ikjt(k, DedupSpec([FeatureGroup("g", ["a", "b"])]))
    assert inverse_index(ikjt, "a").tolist() == [0, 1, 0]
    assert ikjt.stride_per_key() == [2, 2]
    # Equal ids, different weights: different rows.
    k = kjt(["a"], {"a": [[4], [4], [4]]}, weights=[1.0, 2.0, 1.0])
    ikjt = build_ikjt(k, DedupSpec([FeatureGroup("g", ["a"])]))
    assert inverse_index(ikjt, "a").tolist() == [0, 1, 0]
    assert_kjt_equal(expand(ikjt), k)


def test_key_is_deduplicated_with_its_group_and_can_be_listed_as_feature() -> None:
    rows = {"sid": [[5], [5], [6]], "hist": [[1], [1], []]}
    k = kjt(["hist", "sid"], rows)
    for group in (FeatureGroup("u", ["hist"], key="sid"), FeatureGroup("u", ["sid", "hist"], key="sid")):
        ikjt = build_ikjt(k, DedupSpec([group]))
        assert ikjt.stride_per_key() == [2, 2]
        assert_kjt_equal(expand(ikjt), k)
    assert FeatureGroup("u", ["hist"], key="sid").all_features == ("sid", "hist")
    assert FeatureGroup("u", ["hist", "sid"], key="sid").all_features == ("hist", "sid")


def test_ungrouped_and_empty_spec_get_identity_inverse() -> None:
    k = kjt(["a", "b"], {"a": [[1], [1]], "b": [[], [2, 2]]})
    ikjt = build_ikjt(k, DedupSpec([]))
    assert is_ikjt(ikjt)
    assert ikjt.stride_per_key() == [2, 2]
    assert torch.equal(inverse_index(ikjt, "a"), torch.arange(2))
    assert_kjt_equal(expand(ikjt), k)


def test_inverse_index_and_expand_on_plain_kjt() -> None:
    k = kjt(["a"], {"a": [[1], [2], [3]]})
    assert not is_ikjt(k)
    assert torch.equal(inverse_index(k, "a"), torch.arange(3))
    assert expand(k) is k


def test_unique_first_orders_by_first_appearance() -> None:
    first, inv = unique_first(torch.tensor([9, 3, 9, 1, 3, 1, 0]))
    assert first.tolist() == [0, 1, 3, 6]
    assert inv.tolist() == [0, 1, 0, 2, 1, 2, 3]
    first, inv = unique_first(torch.tensor([[1, 2], [0, 0], [1, 2]]))
    assert first.tolist() == [0, 1] and inv.tolist() == [0, 1, 0]
    first, inv = unique_first(torch.tensor([4, 2, 8]))
    assert is_identity(inv) and first.tolist() == [0, 1, 2]
    # Session-clustered ids (contiguous runs), and an id that comes back in a second run.
    first, inv = unique_first(torch.tensor([5, 5, 3, 3, 3, 8]))
    assert first.tolist() == [0, 2, 5] and inv.tolist() == [0, 0, 1, 1, 1, 2]
    first, inv = unique_first(torch.tensor([5, 5, 3, 5, 3]))
    assert first.tolist() == [0, 2] and inv.tolist() == [0, 0, 1, 0, 1]
    first, inv = unique_first(torch.tensor([2]))
    assert first.tolist() == [0] and inv.tolist() == [0]
    first, inv = unique_first(torch.zeros(0, dtype=torch.long))
    assert first.numel() == 0 and inv.numel() == 0


def test_jagged_index_select_and_expand_rows() -> None:
    values = torch.tensor([10, 11, 20, 30, 31, 32])
    lengths = torch.tensor([2, 1, 0, 3])
    out, out_lengths, positions = jagged_index_select(values, lengths, torch.tensor([3, 0, 2, 0]))
    assert out.tolist() == [30, 31, 32, 10, 11, 10, 11]
    assert out_lengths.tolist() == [3, 2, 0, 2]
    assert torch.equal(values[positions], out)
    rows = torch.randn(3, 2)
    assert expand_rows(rows, torch.arange(3)) is rows  # identity: no copy
    assert expand_rows(rows, None) is rows
    assert torch.equal(expand_rows(rows, torch.tensor([2, 2, 0, 1])), rows[[2, 2, 0, 1]])


# ------------------------------------------------------------------------------------------
# Errors: each names the problem.


def test_spec_rejects_overlapping_groups() -> None:
    with pytest.raises(DedupSpecError, match=r"'hist'.*'a'.*'b'.*one group"):
        DedupSpec([FeatureGroup("a", ["hist"]), FeatureGroup("b", ["item", "hist"])])
    # A key counts as a member of its group.
    with pytest.raises(DedupSpecError, match="'sid'"):
        DedupSpec([FeatureGroup("a", ["hist"], key="sid"), FeatureGroup("b", ["sid"])])
    with pytest.raises(DedupSpecError, match="two feature groups are named 'a'"):
        DedupSpec([FeatureGroup("a", ["x"]), FeatureGroup("a", ["y"])])


def test_feature_group_validation() -> None:
    with pytest.raises(DedupSpecError, match="twice"):
        FeatureGroup("g", ["a", "a"])
    with pytest.raises(DedupSpecError, match="no features and no key"):
        FeatureGroup("g", [])
    with pytest.raises(DedupSpecError, match="non-empty string"):
        FeatureGroup("", ["a"])


def test_unknown_feature_in_group_suggests_a_name() -> None:
    k = kjt(["session_id", "history"], {"session_id": [[1]], "history": [[2]]})
    spec = DedupSpec([FeatureGroup("user", ["histroy"], key="session_id")])
    with pytest.raises(DedupSpecError, match=r"'histroy'.*'user'.*did you mean 'history'"):
        build_ikjt(k, spec)
    with pytest.raises(DedupSpecError, match="did you mean 'user'"):
        spec.group("usr")
    with pytest.raises(DedupSpecError, match="did you mean 'history'"):
        inverse_index(build_ikjt(k, DedupSpec([])), "histry")
    with pytest.raises(DedupSpecError, match="'nope'"):
        unique_rows(build_ikjt(k, DedupSpec([])), ["nope"])


def test_unique_rows_refuses_features_of_different_groups() -> None:
    k = kjt(["a", "b"], {"a": [[1], [1], [2]], "b": [[1], [2], [3]]})
    ikjt = build_ikjt(k, DedupSpec([FeatureGroup("g", ["a"])]))
    with pytest.raises(DedupSpecError, match="different groups"):
        unique_rows(ikjt, ["a", "b"])


def test_unique_rows_refuses_different_groups_with_equal_unique_counts() -> None:
    # Regression: groups were told apart by unique counts only, so equal counts were paired.
    # Samples (a, b): (1, 5), (1, 6), (2, 6). Each group has 2 unique rows, but unique row 0 of
    # "a" (sample 0) and unique row 0 of "b" (sample 0) pair up while row 1 does not: a=2 is
    # first seen at sample 2, b=6 at sample 1.
    k = kjt(["a", "b"], {"a": [[1], [1], [2]], "b": [[5], [6], [6]]})
    ikjt = build_ikjt(k, DedupSpec([FeatureGroup("ga", ["a"]), FeatureGroup("gb", ["b"])]))
    assert ikjt.stride_per_key() == [2, 2]
    with pytest.raises(DedupSpecError, match="different groups"):
        unique_rows(ikjt, ["a", "b"])


@pytest.mark.parametrize("sid_rows, bad, count", [
    ([[1], [], [2]], 1, 0),
    ([[1], [2], [2, 3]], 2, 2),
])
def test_key_feature_must_hold_one_id_per_sample(sid_rows, bad, count) -> None:
    k = kjt(["sid", "hist"], {"sid": sid_rows, "hist": [[1], [1], [1]]})
    with pytest.raises(MalformedBatchError, match=fr"'sid'.*exactly one id.*sample {bad} has {count}"):
        build_ikjt(k, DedupSpec([FeatureGroup("u", ["hist"], key="sid")]))


def test_malformed_kjt_is_rejected() -> None:
    spec = DedupSpec([FeatureGroup("g", ["a"])])
    too_few_values = KeyedJaggedTensor(keys=["a"], values=torch.tensor([1, 2, 3]), lengths=torch.tensor([2, 2]))
    with pytest.raises(MalformedBatchError, match="lengths sum to 4 but there are 3 values"):
        build_ikjt(too_few_values, spec)
    wrong_count = KeyedJaggedTensor(keys=["a", "b"], values=torch.tensor([1, 2, 3]),
                                    lengths=torch.tensor([1, 1, 1]), stride=2)
    with pytest.raises(MalformedBatchError, match="3 lengths for 2 keys x batch 2"):
        build_ikjt(wrong_count, DedupSpec([]))
    negative = KeyedJaggedTensor(keys=["a"], values=torch.tensor([1]), lengths=torch.tensor([2, -1]))
    with pytest.raises(MalformedBatchError, match="negative lengths"):
        build_ikjt(negative, spec)
    with pytest.raises(MalformedBatchError, match="expected a torchrec KeyedJaggedTensor, got dict"):
        build_ikjt({"a": torch.tensor([1])}, spec)  # type: ignore[arg-type]


def test_already_variable_batch_kjt_is_rejected() -> None:
    k = kjt(["a"], {"a": [[1], [1], [2]]})
    spec = DedupSpec([FeatureGroup("g", ["a"])])
    ikjt = build_ikjt(k, spec)
    with pytest.raises(MalformedBatchError, match="already variable-batch.*expand"):
        build_ikjt(ikjt, spec)
    # A VBE KJT without inverse indices is refused too.
    vbe = KeyedJaggedTensor(keys=["a"], values=torch.tensor([1, 2]), lengths=torch.tensor([1, 1]),
                            stride_per_key_per_rank=[[2]])
    assert vbe.variable_stride_per_key()
    with pytest.raises(MalformedBatchError, match="already variable-batch"):
        build_ikjt(vbe, spec)


def test_make_kjt_helper_roundtrip() -> None:
    # The test helper itself: rows -> KJT -> rows.
    rows = {"a": [((1, 0.5), (2, 1.0)), ()], "b": [((3, 2.0),), ((4, -1.5),)]}
    k = make_kjt(["a", "b"], rows, weighted=True, batch=2)
    assert kjt_rows(k, "a") == rows["a"] and kjt_rows(k, "b") == rows["b"]


def test_features_given_as_a_string_are_refused() -> None:
    with pytest.raises(DedupSpecError, match=r"list of names.*\['history'\]"):
        FeatureGroup("user", "history")  # type: ignore[arg-type]
