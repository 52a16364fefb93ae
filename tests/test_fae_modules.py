"""FAE hot/cold embedding layout and batch scheduler: equivalence with TorchRec's EBC,
state_dict both ways, cold-tier isolation, convert/undo, bad input, sample conservation."""

from __future__ import annotations

import copy
from typing import Dict, List, Tuple

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torchrec.datasets.utils import Batch
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recd_plugin import DedupSpec, FeatureGroup
from recd_plugin.sparse.ikjt import build_ikjt
from recd_plugin.data.criteo import criteo_batches, criteo_cardinalities
from recd_plugin.errors import HotSetError
from recd_plugin.fae.hotcold import HotColdEmbeddingBagCollection, convert_hot_cold
from recd_plugin.fae.hotset import HotSet, TableShape
from recd_plugin.fae.schedule import HotBatchScheduler, ScheduledBatch, hot_samples

# t_a: SUM, read by two features; t_b: MEAN; t_c: SUM, other dim; t_d: never in the hot set.
TABLES = [("t_a", 11, 4, ["fa", "fa2"], PoolingType.SUM), ("t_b", 9, 4, ["fb"], PoolingType.MEAN),
          ("t_c", 7, 3, ["fc"], PoolingType.SUM), ("t_d", 5, 4, ["fd"], PoolingType.SUM)]
FEATURES = [f for t in TABLES for f in t[3]]
ROWS = {f: t[1] for t in TABLES for f in t[3]}


def make_ebc(weighted: bool = False, seed: int = 0) -> EmbeddingBagCollection:
    torch.manual_seed(seed)
    pool = (lambda p: PoolingType.SUM) if weighted else (lambda p: p)
    return EmbeddingBagCollection(is_weighted=weighted, tables=[
        EmbeddingBagConfig(name=n, num_embeddings=r, embedding_dim=d, feature_names=list(fs), pooling=pool(p))
        for n, r, d, fs, p in TABLES])


def make_hot_set(rows: Dict[str, List[int]]) -> HotSet:
    shapes = {n: TableShape(r, d) for n, r, d, _, _ in TABLES if n != "t_d"}
    return HotSet(tables=shapes, rows={t: np.array(sorted(set(r)), dtype=np.int64) for t, r in rows.items()},
                  budget_bytes=1 << 20)


def kjt_of(bags: Dict[str, List[List[int]]], keys: List[str], weighted: bool) -> KeyedJaggedTensor:
    values = [v for k in keys for bag in bags[k] for v in bag]
    lengths = [len(bag) for k in keys for bag in bags[k]]
    w = torch.linspace(-1.0, 2.0, len(values)) if weighted else None
    return KeyedJaggedTensor(keys=keys, values=torch.tensor(values, dtype=torch.long), weights=w,
                             lengths=torch.tensor(lengths, dtype=torch.int32), stride=len(bags[keys[0]]))


@st.composite
def cases(draw):
    batch = draw(st.integers(1, 6))
    bags = {f: [draw(st.lists(st.integers(0, ROWS[f] - 1), max_size=4)) for _ in range(batch)] for f in FEATURES}
    hot = {t: draw(st.lists(st.integers(0, r - 1), max_size=r)) for t, r, _, _, _ in TABLES[:3]}
    keys = draw(st.permutations(FEATURES + ["extra"]))
    bags["extra"] = [[0]] * batch
    return bags, hot, list(keys), draw(st.booleans()), draw(st.sampled_from(["table", "search"]))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_outputs_and_gradients_equal_torchrec(case) -> None:
    bags, hot_rows, keys, weighted, remap = case
    ebc = make_ebc(weighted)
    hc = HotColdEmbeddingBagCollection(copy.deepcopy(ebc), make_hot_set(hot_rows), remap=remap)
    assert sorted(hc.hot_cold_tables) == ["t_a", "t_b", "t_c"] and list(hc.embedding_bags) == ["t_d"]
    kjt = kjt_of(bags, keys, weighted)
    want, got = ebc(kjt), hc(kjt)
    assert got.keys() == want.keys() and got.length_per_key() == want.length_per_key()
    torch.testing.assert_close(got.values(), want.values(), rtol=1e-5, atol=1e-6)
    grad = torch.randn_like(want.values())
    want.values().backward(grad)
    got.values().backward(grad)
    for t in ["t_a", "t_b", "t_c"]:
        g = hc.table_weight(t, grad=True)  # None: no lookup reached the table (torch: zeros)
        g = torch.zeros_like(ebc.embedding_bags[t].weight) if g is None else g
        torch.testing.assert_close(g, ebc.embedding_bags[t].weight.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(hc.embedding_bags["t_d"].weight.grad, ebc.embedding_bags["t_d"].weight.grad)


def test_recd_ikjt_input() -> None:
    """A RecD IKJT (unique rows + inverse indices) gives the plain KJT's output."""
    ebc = make_ebc()
    hc = HotColdEmbeddingBagCollection(copy.deepcopy(ebc), make_hot_set({"t_a": [1], "t_b": [2, 3], "t_c": [0]}))
    bags = {"fa": [[1], [1], [4]], "fa2": [[2, 1], [2, 1], []], "fb": [[3], [5], [2, 8]], "fc": [[0], [6], [1]],
            "fd": [[1], [2], [3]]}
    kjt = kjt_of(bags, FEATURES, False)
    ikjt = build_ikjt(kjt, DedupSpec([FeatureGroup("user", ["fa", "fa2"])]))
    assert ikjt.stride_per_key()[0] == 2
    torch.testing.assert_close(hc(ikjt).values(), ebc(kjt).values())


def test_state_dict_both_ways() -> None:
    ebc = make_ebc()
    hot = make_hot_set({"t_a": [0, 3], "t_b": [8], "t_c": []})
    hc = HotColdEmbeddingBagCollection(copy.deepcopy(ebc), hot)
    sd, sd_hc = ebc.state_dict(), hc.state_dict()
    assert list(sd_hc) == list(sd)  # same keys, same order
    for k in sd:
        assert sd_hc[k].shape == sd[k].shape and torch.equal(sd_hc[k], sd[k])
    other = HotColdEmbeddingBagCollection(make_ebc(seed=1), hot)
    other.load_state_dict(sd)  # original layout -> hot/cold
    assert all(torch.equal(other.state_dict()[k], sd[k]) for k in sd)
    back = make_ebc(seed=2)
    back.load_state_dict(other.state_dict())  # hot/cold -> original layout
    assert all(torch.equal(back.state_dict()[k], sd[k]) for k in sd)
    bad = dict(sd)
    bad["embedding_bags.t_a.weight"] = torch.zeros(3, 4)
    with pytest.raises(RuntimeError, match="size mismatch"):
        other.load_state_dict(bad)
    with pytest.raises(RuntimeError, match="Missing key"):
        other.load_state_dict({k: v for k, v in sd.items() if k != "embedding_bags.t_b.weight"})
    with pytest.raises(RuntimeError, match="Unexpected key"):
        other.load_state_dict({**sd, "hot_g0": torch.zeros(1)})


def test_all_hot_batch_never_touches_cold_tier() -> None:
    hc = HotColdEmbeddingBagCollection(make_ebc(), make_hot_set({"t_a": [1, 2], "t_b": [0, 4], "t_c": [6]}))
    with torch.no_grad():
        for name, p in hc.named_parameters():
            if name.startswith("cold_"):
                p.fill_(float("nan"))
    bags = {"fa": [[1, 2], []], "fa2": [[2], [1]], "fb": [[0, 4, 4], [4]], "fc": [[6], []], "fd": [[0], [4]]}
    out = hc(kjt_of(bags, FEATURES, False))
    out.values().sum().backward()
    assert torch.isfinite(out.values()).all()
    assert hc.tier_lookups == {"hot": 2, "cold": 0} and hc.cold_ids == 0
    assert all(p.grad is None for n, p in hc.named_parameters() if n.startswith("cold_"))
    bags["fb"][1] = [3]  # one cold id: exactly one cold lookup, the NaN shows up
    out = hc(kjt_of(bags, FEATURES, False))
    assert hc.tier_lookups["cold"] == 1 and hc.cold_ids == 1 and torch.isnan(out.values()).any()


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ebc = make_ebc()
        self.top = nn.Linear(4 * 4 + 3, 1)

    def forward(self, kjt: KeyedJaggedTensor) -> torch.Tensor:
        return self.top(self.ebc(kjt).values()).sum()


def train(model: nn.Module, steps: int) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    rng = np.random.default_rng(0)
    for _ in range(steps):
        bags = {f: [list(rng.integers(0, ROWS[f], rng.integers(0, 3))) for _ in range(4)] for f in FEATURES}
        opt.zero_grad()
        model(kjt_of(bags, FEATURES, False)).backward()
        opt.step()


def test_convert_trains_like_plain_and_undo_restores() -> None:
    plain, model = Model(), Model()
    model.load_state_dict(plain.state_dict())
    original = model.ebc
    keys = list(model.state_dict())
    undo = convert_hot_cold(model, make_hot_set({"t_a": [0, 5, 10], "t_b": [1], "t_c": [2, 3]}))
    assert isinstance(model.ebc, HotColdEmbeddingBagCollection) and list(model.state_dict()) == keys
    assert original.embedding_bags["t_a"].weight.numel() == 0  # released while converted
    train(plain, 5)
    train(model, 5)
    for k, v in plain.state_dict().items():
        torch.testing.assert_close(model.state_dict()[k], v, rtol=1e-5, atol=1e-6)
    undo()
    undo()  # a second call changes nothing
    assert model.ebc is original
    for k, v in plain.state_dict().items():
        torch.testing.assert_close(model.state_dict()[k], v, rtol=1e-5, atol=1e-6)


def test_stale_hot_set_raises_before_any_change() -> None:
    model = Model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ebc = model.ebc
    stale = HotSet(tables={"t_a": TableShape(12, 4), "t_b": TableShape(9, 4)},
                   rows={"t_a": np.array([11]), "t_b": np.array([0])}, budget_bytes=100)
    with pytest.raises(HotSetError, match="stale hot set: table 't_a'.*re-run"):
        convert_hot_cold(model, stale)
    other = HotSet(tables={"t_zz": TableShape(3, 4)}, rows={}, budget_bytes=100)
    with pytest.raises(HotSetError, match="'t_zz'"):
        convert_hot_cold(model, other)
    with pytest.raises(HotSetError, match="not in the hot set"):
        convert_hot_cold(model, make_hot_set({}), tables=["t_d"])
    assert model.ebc is ebc
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_ids_out_of_range() -> None:
    hc = HotColdEmbeddingBagCollection(make_ebc(), make_hot_set({"t_a": [1]}))
    bags = {f: [[0]] for f in FEATURES}
    bags["fb"] = [[9]]
    with pytest.raises(HotSetError, match="feature 'fb': id 9 is outside table 't_b'"):
        hc(kjt_of(bags, FEATURES, False))
    bags["fb"] = [[-1]]
    with pytest.raises(HotSetError, match="id -1"):
        hc(kjt_of(bags, FEATURES, False))


# -- scheduler --------------------------------------------------------------------------------

CRITEO_ROWS = 500


def criteo_hot_set(share: float = 0.05) -> Tuple[HotSet, Dict[str, str]]:
    """Hot set = the ``share`` most frequent rows of each field in other data; features C1..
    map to tables t_C1.."""
    prof = list(criteo_batches(4, 512, seed=9, max_rows=CRITEO_ROWS))
    tables = {f"t_{f}": TableShape(n, 16) for f, n in criteo_cardinalities(CRITEO_ROWS).items()}
    rows = {}
    for t in tables:
        u, c = np.unique(torch.cat([b.sparse_features[t[2:]].values() for b in prof]).numpy(), return_counts=True)
        rows[t] = np.sort(u[np.argsort(-c, kind="stable")[: max(1, int(len(u) * share))]])
    return HotSet(tables=tables, rows=rows, budget_bytes=1 << 20), {f[2:]: f for f in tables}


def tagged_batches(n: int, size: int, last: int) -> List[Batch]:
    """Criteo batches plus a multi-hot weighted feature; dense column 0 = global sample index."""
    out = []
    for i, b in enumerate(criteo_batches(n, size, seed=3, max_rows=CRITEO_ROWS)):
        if i == n - 1:
            b = Batch(b.dense_features[:last], _head(b.sparse_features, last), b.labels[:last])
        m = b.labels.shape[0]
        b.dense_features[:, 0] = torch.arange(i * size, i * size + m, dtype=torch.float32)
        lengths = torch.arange(m, dtype=torch.int32) % 3
        extra = KeyedJaggedTensor(keys=["multi"], values=torch.arange(int(lengths.sum())), lengths=lengths)
        kjt = KeyedJaggedTensor.concat([b.sparse_features, extra])
        w = torch.rand(kjt.values().numel(), generator=torch.Generator().manual_seed(i))
        out.append(Batch(b.dense_features, KeyedJaggedTensor(keys=kjt.keys(), values=kjt.values(), weights=w,
                                                             lengths=kjt.lengths(), stride=m), b.labels))
    return out


def _head(kjt: KeyedJaggedTensor, m: int) -> KeyedJaggedTensor:
    jt = kjt.to_dict()
    return KeyedJaggedTensor.from_jt_dict({k: type(v)(values=v.values()[:m], lengths=v.lengths()[:m])
                                           for k, v in jt.items()})


def sample_tuples(batches: List[Batch]) -> List[tuple]:
    """Every sample as (dense row, label, per key: ids and weights), sorted."""
    out = []
    for b in batches:
        kjt = b.sparse_features
        lengths = kjt.lengths().view(len(kjt.keys()), -1)
        offsets = kjt.offsets()
        for s in range(b.labels.shape[0]):
            feats = []
            for k in range(len(kjt.keys())):
                r = k * lengths.shape[1] + s
                lo, hi = int(offsets[r]), int(offsets[r + 1])
                feats.append((tuple(kjt.values()[lo:hi].tolist()), tuple(kjt.weights()[lo:hi].tolist())))
            out.append((tuple(b.dense_features[s].tolist()), float(b.labels[s]), tuple(feats)))
    return sorted(out)


@pytest.mark.parametrize("window", [None, 1, 3, 4])
def test_scheduler_preserves_samples_within_windows(window) -> None:
    hot_set, f2t = criteo_hot_set()
    inputs = tagged_batches(7, 64, last=37)
    sched = HotBatchScheduler(inputs, hot_set, f2t, window=window)
    switches = []
    sched.on_switch = lambda: switches.append(1)
    out = list(sched)
    assert all(isinstance(b, ScheduledBatch) for b in out)
    assert [b.labels.shape[0] for b in out] == [b.labels.shape[0] for b in inputs]
    assert sample_tuples(out) == sample_tuples(inputs)  # exact content, nothing lost or doubled
    s = sched.stats
    s.check()
    assert s.samples_in == s.samples_out == 6 * 64 + 37 and s.label_sum_in == s.label_sum_out
    assert s.hot_batches + s.mixed_batches == 7 and s.switches == len(switches)
    hot_per_batch = [hot_samples(b.sparse_features, hot_set, f2t) for b in out]
    for b, hot in zip(out, hot_per_batch):
        assert b.all_hot == bool(hot.all())  # all-hot batches really are all-hot
    position = np.concatenate([b.dense_features[:, 0].numpy() for b in out]).astype(int)
    span = 64 * (window or 1)
    assert np.array_equal(np.arange(len(position)) // span, position // span)  # never leaves its window
    if window is None:
        assert all(o.sparse_features is i.sparse_features for o, i in zip(out, inputs))
    assert [b.all_hot for b in list(sched)] == [b.all_hot for b in out]  # deterministic, per epoch
    assert len(sched.epochs) == 2


def test_scheduler_packs_hot_samples_into_all_hot_batches() -> None:
    hot_set, _ = criteo_hot_set(share=0.7)
    f2t = {"C9": "t_C9", "C20": "t_C20", "C17": "t_C17"}  # tiny tables, mostly hot: many hot samples
    inputs = tagged_batches(8, 32, last=32)
    n_hot = sum(int(hot_samples(b.sparse_features, hot_set, f2t).sum()) for b in inputs)
    plain = HotBatchScheduler(inputs, hot_set, f2t)
    regrouped = HotBatchScheduler(inputs, hot_set, f2t, window=8)
    list(plain), list(regrouped)
    assert regrouped.stats.hot_batches == n_hot // 32 >= 2
    assert regrouped.stats.hot_batches > plain.stats.hot_batches
    assert regrouped.stats.switches <= 1


def test_scheduler_bad_input() -> None:
    hot_set, f2t = criteo_hot_set()
    with pytest.raises(HotSetError, match="t_C99"):
        HotBatchScheduler([], hot_set, {"C1": "t_C99"})
    with pytest.raises(ValueError, match="window"):
        HotBatchScheduler([], hot_set, f2t, window=0)
    small = HotSet(tables={"t_C1": TableShape(2, 16)}, rows={"t_C1": np.array([0])}, budget_bytes=64)
    with pytest.raises(HotSetError, match="outside table 't_C1'"):
        list(HotBatchScheduler(tagged_batches(1, 16, 16), small, {"C1": "t_C1"}))


def test_scheduled_all_hot_batches_skip_the_cold_tier() -> None:
    """End to end: the scheduler's all-hot batches run the hot/cold EBC without a cold lookup."""
    hot_set, _ = criteo_hot_set(share=0.7)
    f2t = {"C9": "t_C9", "C20": "t_C20", "C17": "t_C17"}
    ebc = EmbeddingBagCollection(tables=[EmbeddingBagConfig(name=t, num_embeddings=s.num_embeddings, embedding_dim=4,
                                                            feature_names=[t[2:]]) for t, s in hot_set.tables.items()])
    hs = HotSet(tables={t: TableShape(s.num_embeddings, 4) for t, s in hot_set.tables.items()},
                rows=hot_set.rows, budget_bytes=1 << 20)
    hc = HotColdEmbeddingBagCollection(ebc, hs, tables=list(f2t.values()))
    assert hc.feature_to_table == f2t
    seen = set()
    for b in HotBatchScheduler(tagged_batches(6, 32, last=32), hs, hc.feature_to_table, window=6):
        before = hc.tier_lookups["cold"]
        hc(b.sparse_features)
        assert (hc.tier_lookups["cold"] == before) == b.all_hot
        seen.add(b.all_hot)
    assert seen == {True, False}
