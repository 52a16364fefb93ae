"""Dataloader transform: DedupLoader / DedupCollate / dedup_batch / DedupStats.

Over a list of Batches (dedup in the training process) and over a DataLoader with workers
(dedup inside the workers): every batch passes dense features and labels through bit for
bit, ``expand(sparse)`` is the input KJT, and the stats count every sample once.
"""

from __future__ import annotations

import copy
import pickle
import traceback
from dataclasses import dataclass
from typing import Any, List

import pytest
import torch
from torch.utils.data import DataLoader, Dataset
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from conftest import USER_GROUP, RecModel, assert_kjt_equal, kjt_rows, session_batch
import recd_plugin
from recd_plugin import (
    DedupCollate,
    DedupLoader,
    DedupSpec,
    DedupStats,
    FeatureGroup,
    MalformedBatchError,
    NotDeduplicableError,
    RecDConfig,
    dedup_batch,
    expand,
)

ITEM_GROUP = FeatureGroup("item", ["item_id"])  # content-keyed: equal item ids repeat
SPEC = DedupSpec([USER_GROUP, ITEM_GROUP])  # every feature of the batch is in a group
SIZES = [24, 24, 1, 24, 7]  # includes a batch of one and a short last batch


class SessionBatches(Dataset):
    """Map-style dataset whose item i is a whole Batch (use with batch_size=None)."""

    def __init__(self, sizes: List[int], per_sample_history: bool = False) -> None:
        self.sizes = list(sizes)
        self.per_sample_history = per_sample_history

    def __len__(self) -> int:
        return len(self.sizes)

    def __getitem__(self, i: int) -> Batch:
        return session_batch(i, batch=self.sizes[i], sessions=4, per_sample_history=self.per_sample_history)


def _distinct(rows: List[Any]) -> int:
    return len(set(rows))


def check_epoch(outputs: List[Batch], inputs: List[Batch]) -> None:
    assert len(outputs) == len(inputs)
    for out, inp in zip(outputs, inputs):
        assert isinstance(out, Batch)
        # Dense features and labels: bit-identical, same dtype and shape.
        assert out.dense_features.dtype == inp.dense_features.dtype
        assert torch.equal(out.dense_features, inp.dense_features)
        assert out.labels.dtype == inp.labels.dtype
        assert torch.equal(out.labels, inp.labels)
        ikjt = out.sparse_features.ikjt()  # the IKJT itself (the model's code reads the plain batch)
        assert ikjt.inverse_indices_or_none() is not None
        assert_kjt_equal(expand(ikjt), inp.sparse_features)
        strides = dict(zip(ikjt.keys(), ikjt.stride_per_key()))
        sessions = _distinct(kjt_rows(inp.sparse_features, "session_id"))
        assert strides["session_id"] == strides["user_id"] == strides["history"] == sessions
        assert strides["item_id"] == _distinct(kjt_rows(inp.sparse_features, "item_id"))


def check_stats(stats: DedupStats, inputs: List[Batch], epochs: int) -> None:
    total = sum(b.labels.shape[0] for b in inputs) * epochs
    assert stats.batches == len(inputs) * epochs
    assert stats.samples_in == stats.samples_out == total
    assert stats.rows == {"user": total, "item": total}
    users = sum(_distinct(kjt_rows(b.sparse_features, "session_id")) for b in inputs) * epochs
    items = sum(_distinct(kjt_rows(b.sparse_features, "item_id")) for b in inputs) * epochs
    assert stats.unique_rows == {"user": users, "item": items}
    assert stats.unique_fraction("user") == pytest.approx(users / total)
    assert stats.unique_fraction("item") == pytest.approx(items / total)
    assert stats.unique_fraction("user") < 0.5  # the sessions really repeat
    assert stats.unique_fraction("nope") == 0.0


def test_dedup_loader_over_a_list_of_batches() -> None:
    inputs = [session_batch(i, batch=n, sessions=4) for i, n in enumerate(SIZES)]
    snapshot = copy.deepcopy(inputs)
    loader = DedupLoader(inputs, SPEC)
    assert not loader.in_workers
    assert len(loader) == len(inputs)
    first = list(loader)
    check_epoch(first, snapshot)
    # The input batches are not modified; dense tensors are passed through, not copied.
    for out, inp, snap in zip(first, inputs, snapshot):
        assert out.dense_features is inp.dense_features and out.labels is inp.labels
        assert_kjt_equal(inp.sparse_features, snap.sparse_features)
    check_stats(loader.stats, snapshot, epochs=1)
    second = list(loader)  # a second epoch
    check_epoch(second, snapshot)
    check_stats(loader.stats, snapshot, epochs=2)


def test_dedup_loader_in_dataloader_workers() -> None:
    dataset = SessionBatches(SIZES)
    inputs = [dataset[i] for i in range(len(dataset))]
    dl = DataLoader(dataset, batch_size=None, num_workers=2)
    loader = DedupLoader(dl, SPEC)
    assert loader.in_workers is True
    assert isinstance(dl.collate_fn, DedupCollate)
    assert len(loader) == len(dataset)
    for epoch in (1, 2):
        outputs = list(loader)
        check_epoch(outputs, inputs)
        check_stats(loader.stats, inputs, epochs=epoch)


def test_apply_wraps_a_dataloader_in_workers_and_dedups_in_process_when_told() -> None:
    dataset = SessionBatches(SIZES[:2])
    inputs = [dataset[i] for i in range(len(dataset))]
    flag = "groups.user.key=session_id; groups.user.features=user_id,history; groups.item.features=item_id; probe_batches=0"
    model, loader = recd_plugin.apply(RecDConfig.from_string(flag), RecModel(),
                                      DataLoader(dataset, batch_size=None, num_workers=2))
    assert isinstance(loader, DedupLoader) and loader.in_workers
    check_epoch(list(loader), inputs)
    recd_plugin.remove(model)

    dl = DataLoader(dataset, batch_size=None, num_workers=0)
    model, loader = recd_plugin.apply(RecDConfig.from_string(flag + "; in_workers=false"), model, dl)
    assert isinstance(loader, DedupLoader) and not loader.in_workers
    assert dl.collate_fn is not None and not isinstance(dl.collate_fn, DedupCollate)
    check_epoch(list(loader), inputs)
    check_stats(loader.stats, inputs, epochs=1)
    recd_plugin.remove(model)


@dataclass
class Sample:
    session: int
    item: int
    x: float


def collate_samples(samples: List[Sample]) -> Batch:
    """A user's collate_fn: samples -> Batch."""
    n = len(samples)
    return Batch(
        dense_features=torch.tensor([[s.x] for s in samples]),
        sparse_features=KeyedJaggedTensor(
            keys=["session_id", "item_id"],
            values=torch.tensor([s.session for s in samples] + [s.item for s in samples]),
            lengths=torch.ones(2 * n, dtype=torch.long),
        ),
        labels=torch.zeros(n),
    )


def test_dedup_collate_runs_the_users_collate_then_dedups_and_pickles() -> None:
    spec = DedupSpec([FeatureGroup("s", [], key="session_id")])
    collate = pickle.loads(pickle.dumps(DedupCollate(collate_samples, spec, verify_batches=1)))
    samples = [Sample(3, 1, 0.5), Sample(3, 2, 1.5), Sample(4, 1, 2.5)]
    batch = collate(samples)
    assert batch.sparse_features.ikjt().stride_per_key() == [2, 3]
    assert torch.equal(batch.dense_features, torch.tensor([[0.5], [1.5], [2.5]]))
    assert_kjt_equal(expand(batch.sparse_features), collate_samples(samples).sparse_features)
    # Without a collate_fn (batch_size=None loaders) the item is already a Batch.
    plain = collate_samples(samples)
    assert DedupCollate(None, spec)(plain).sparse_features.ikjt().stride_per_key() == [2, 3]


@pytest.mark.parametrize("item, pattern", [
    ({"dense_features": torch.zeros(1, 1)}, r"expected a torchrec Batch.*got dict"),
    ((torch.zeros(1, 1), None, torch.zeros(1)), r"expected a torchrec Batch.*got tuple"),
    (Sample(1, 2, 0.0), r"expected a torchrec Batch.*got Sample"),
])
def test_loader_item_that_is_not_a_batch(item: Any, pattern: str) -> None:
    loader = DedupLoader([item], SPEC)
    with pytest.raises(MalformedBatchError, match=pattern):
        next(iter(loader))


def test_labels_must_match_the_batch_size() -> None:
    batch = session_batch(0, batch=6)
    bad = Batch(batch.dense_features, batch.sparse_features, torch.zeros(5))
    with pytest.raises(MalformedBatchError, match="5 labels but its KJT has batch size 6"):
        dedup_batch(bad, SPEC)


def test_feature_not_constant_within_session_fails_at_first_batch_before_any_step() -> None:
    torch.manual_seed(0)
    model = RecModel()
    initial = copy.deepcopy(model.state_dict())
    bad = [session_batch(i, per_sample_history=True) for i in range(3)]
    config = RecDConfig.from_string("groups.user.key=session_id; groups.user.features=user_id,history; probe_batches=0")
    model, loader = recd_plugin.apply(config, model, bad)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    steps = 0
    with pytest.raises(NotDeduplicableError, match=r"'history' is not constant within group 'user'.*'session_id'"):
        for batch in loader:
            opt.zero_grad()
            torch.nn.functional.binary_cross_entropy_with_logits(model(batch), batch.labels).backward()
            opt.step()
            steps += 1
    assert steps == 0
    assert loader.stats.batches == 0
    for k, v in initial.items():
        assert torch.equal(model.state_dict()[k], v), k
    recd_plugin.remove(model)


def test_not_deduplicable_is_reported_from_workers() -> None:
    dl = DataLoader(SessionBatches([12, 12], per_sample_history=True), batch_size=None, num_workers=2)
    loader = DedupLoader(dl, DedupSpec([USER_GROUP]))
    assert loader.in_workers
    with pytest.raises(NotDeduplicableError, match="'history' is not constant") as excinfo:
        next(iter(loader))
    # Drop the traceback's frames now: they hold the DataLoader iterator in a reference
    # cycle, and a worker shutdown run later by the garbage collector waits ~5 s per worker.
    traceback.clear_frames(excinfo.value.__traceback__)


def test_verify_batches_counts_batches() -> None:
    good, bad = session_batch(0), session_batch(1, per_sample_history=True)
    spec = DedupSpec([USER_GROUP])
    with pytest.raises(NotDeduplicableError):
        list(DedupLoader([good, bad], spec, verify_batches=2))
    # Verification off (or past its first batches): the wrong grouping goes unchecked.
    out = list(DedupLoader([good, bad], spec, verify_batches=1))
    assert len(out) == 2
    with pytest.raises(AssertionError):
        assert_kjt_equal(expand(out[1].sparse_features), bad.sparse_features)


def _weighted(batch: Batch, per_sample: bool) -> Batch:
    kjt = batch.sparse_features
    n = kjt.values().numel()
    weights = torch.ones(n)
    if per_sample:  # one weight per sample index: differs within a session
        weights = torch.arange(n, dtype=torch.float32) + 1
    return Batch(batch.dense_features, KeyedJaggedTensor(keys=kjt.keys(), values=kjt.values(), lengths=kjt.lengths(),
                                                         weights=weights, stride=kjt.stride()), batch.labels)


def test_weighted_features_pass_through() -> None:
    inp = _weighted(session_batch(0), per_sample=False)
    out = dedup_batch(inp, DedupSpec([USER_GROUP]), verify=True)
    assert_kjt_equal(expand(out.sparse_features), inp.sparse_features)


def test_weights_not_constant_within_session_are_reported() -> None:
    # Regression: verification compared ids and lengths only, so per-sample weights were
    # silently replaced by the first sample's weights.
    inp = _weighted(session_batch(0), per_sample=True)
    with pytest.raises(NotDeduplicableError, match="not constant"):
        dedup_batch(inp, DedupSpec([USER_GROUP]), verify=True)
    out = dedup_batch(inp, DedupSpec([USER_GROUP]), verify=False)  # what verification guards
    assert not torch.equal(expand(out.sparse_features).weights(), inp.sparse_features.weights())


def _empty_batch() -> Batch:
    kjt = KeyedJaggedTensor(keys=["session_id", "user_id", "history", "item_id"],
                            values=torch.zeros(0, dtype=torch.long), lengths=torch.zeros(0, dtype=torch.long))
    return Batch(torch.zeros(0, 3), kjt, torch.zeros(0))


def test_empty_batch_without_verification() -> None:
    out = dedup_batch(_empty_batch(), SPEC, verify=False)
    assert out.sparse_features.stride_per_key() == [0, 0, 0, 0]
    assert_kjt_equal(expand(out.sparse_features), _empty_batch().sparse_features)


def test_empty_batch_through_a_verifying_loader() -> None:
    # Regression: verification (on for a loader's first batch) crashed with IndexError in
    # TorchRec's KJT.to_dict on a batch of size 0. Working or a MalformedBatchError are fine.
    loader = DedupLoader([_empty_batch()], SPEC)  # verify_batches=1 by default
    try:
        out = list(loader)
    except MalformedBatchError:
        return
    assert len(out) == 1 and loader.stats.samples_in == loader.stats.samples_out == 0


def test_remove_gives_the_dataloader_its_collate_back() -> None:
    dl = DataLoader(SessionBatches(SIZES[:2]), batch_size=None, num_workers=1)
    original = dl.collate_fn
    flag = "groups.user.key=session_id; groups.user.features=user_id,history; groups.item.features=item_id; probe_batches=0"
    model, loader = recd_plugin.apply(RecDConfig.from_string(flag), RecModel(), dl)
    assert isinstance(dl.collate_fn, DedupCollate)
    recd_plugin.remove(model)
    assert dl.collate_fn is original


def test_plain_batches_from_stale_workers_are_deduplicated_in_process() -> None:
    # persistent workers started before the wrap keep the old collate_fn and yield plain
    # batches: the loader must still deliver IKJTs, not pass plain batches through.
    dataset = SessionBatches(SIZES[:3])
    inputs = [dataset[i] for i in range(len(dataset))]
    dl = DataLoader(dataset, batch_size=None, num_workers=1, persistent_workers=True)
    list(dl)  # workers start with the user's collate
    loader = DedupLoader(dl, SPEC)
    assert loader.in_workers
    outputs = list(loader)
    assert all(recd_plugin.is_ikjt(b.sparse_features) for b in outputs)
    check_epoch(outputs, inputs)


def _with_rows(batch: Batch, feature: str, rows: dict) -> Batch:
    """``batch`` with sample i's ``feature`` row replaced by ``rows[i]`` (a list of ids)."""
    k = batch.sparse_features
    jts = dict(k.to_dict())  # to_dict() is cached on the KJT: never mutate it
    old = [v.tolist() for v in torch.split(jts[feature].values(), jts[feature].lengths().tolist())]
    new = [rows.get(i, r) for i, r in enumerate(old)]
    jts[feature] = type(jts[feature])(values=torch.tensor([x for r in new for x in r], dtype=torch.long),
                                      lengths=torch.tensor([len(r) for r in new]))
    return Batch(batch.dense_features, KeyedJaggedTensor.from_jt_dict({key: jts[key] for key in k.keys()}),
                 batch.labels)


def test_varying_row_lengths_within_a_session_are_caught_on_every_batch() -> None:
    # verify_batches=0 turns the exact check off, yet a history that grows within a session
    # (a per-sample feature declared session-level) is still refused by the length check.
    good = session_batch(3, batch=24, sessions=4)
    assert int(good.sparse_features["session_id"].values()[0]) == int(good.sparse_features["session_id"].values()[1])
    first = good.sparse_features["history"].values()[: int(good.sparse_features["history"].lengths()[0])].tolist()
    bad = _with_rows(good, "history", {1: first + [7]})
    with pytest.raises(NotDeduplicableError, match="'history' is not constant within group 'user'"):
        list(DedupLoader([good, bad], SPEC, verify_batches=0))


def test_verify_every_batch_with_minus_one() -> None:
    good = [session_batch(i, batch=24, sessions=4) for i in range(3)]
    ids = good[2].sparse_features["user_id"].values()
    assert int(good[2].sparse_features["session_id"].values()[0]) == int(good[2].sparse_features["session_id"].values()[1])
    # Same lengths, a different id within a session: only the exact comparison sees it.
    good[2] = _with_rows(good[2], "user_id", {1: [(int(ids[0]) + 1) % 20]})
    assert len(list(DedupLoader(good, SPEC, verify_batches=1))) == 3  # only batch 0 is compared
    with pytest.raises(NotDeduplicableError, match="'user_id' is not constant"):
        list(DedupLoader(good, SPEC, verify_batches=-1))


def test_remove_stops_persistent_workers_that_hold_the_plugins_collate() -> None:
    dl = DataLoader(SessionBatches(SIZES[:2]), batch_size=None, num_workers=1, persistent_workers=True)
    flag = "groups.user.key=session_id; groups.user.features=user_id,history; groups.item.features=item_id; probe_batches=0"
    model, loader = recd_plugin.apply(RecDConfig.from_string(flag), RecModel(), dl)
    assert all(recd_plugin.is_ikjt(b.sparse_features) for b in loader)  # workers run DedupCollate
    recd_plugin.remove(model)
    assert not any(recd_plugin.is_ikjt(b.sparse_features) for b in dl)  # new workers, user's collate
