"""The storage branch reaches the plugin path: ``recd_plugin.apply(config, model, DedupReader)``.

A ``DedupReader`` yields batches that are already IKJTs. ``apply``'s loader step (and its
probe) must take them as they are: check that the flag's groups are the batch's own
deduplication, pass them on in the compact layout (or convert them to the aligned one when
sharded), and train exactly like the flat data. Tested here:

* the MovieLens example's two-tower model trained (SGD) on the flat batches through ``apply``
  and on the reader's batches through ``apply``, same initial weights, same samples in the same
  order (the layout's): per-step losses equal to 1e-6, for the example's flag (item features
  not grouped: the loader gives them one row per sample again), a flag naming both of the
  reader's groups (pure pass-through), and sharded mode (aligned IKJTs);
* a flag whose group disagrees with the reader's dedup: a clear ``MalformedBatchError``
  naming the feature and the fix, raised by ``apply`` (its probe) before the model changes;
* the sharded conversion: the aligned batch equals ``build_ikjt(expand(kjt), aligned=True)``;
* the probe measures the same unique fractions on the reader's batches as on the flat ones,
  and the loader's ``DedupStats`` agree too; DataLoader workers give the same batches.
"""

from __future__ import annotations

import copy
import importlib.util
import sys
from pathlib import Path
from typing import Any, List

import pyarrow as pa
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from conftest import assert_kjt_equal
import recd_plugin
from recd_plugin import MalformedBatchError, RecDConfig
from recd_plugin.data import TableBatches, cardinalities, generate_sessions, storage_roles
from recd_plugin.modules.recd import decider_of
from recd_plugin.sparse.dedup_kjt import DedupKJT
from recd_plugin.sparse.ikjt import build_ikjt, expand, is_aligned
from recd_plugin.storage import DedupReader, StorageSpec, preprocess
from recd_plugin.transforms.dedup import DedupLoader, dedup_batch, from_ikjt

ROOT = Path(__file__).resolve().parents[1]
SPEC = StorageSpec(**storage_roles())
BATCH = 64


def _example_model_module() -> Any:
    spec = importlib.util.spec_from_file_location("recd_example_movielens_model",
                                                  ROOT / "examples" / "movielens" / "model.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


EXAMPLE = _example_model_module()
# probe_batches=0: these tests check the route itself, whichever the probe would pick here.
USER_FLAG = EXAMPLE.RECD_FLAG + "; probe_batches=0"
# Both of the reader's groups: its batches are then passed on exactly as they are.
BOTH_FLAG = USER_FLAG + "; groups.item.key=item_id; groups.item.features=item_genres,item_year"
FLAGS = {"user": USER_FLAG, "both": BOTH_FLAG, "user-sharded": USER_FLAG + "; sharded=true",
         "both-sharded": BOTH_FLAG + "; sharded=true"}


@pytest.fixture(scope="module")
def table() -> pa.Table:
    return generate_sessions(num_users=60, num_items=120, seed=3)


@pytest.fixture(scope="module")
def stored(table: pa.Table, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("store") / "ds"
    summary = preprocess(table, out, SPEC, rows_per_file=700, row_group_rows=256, progress=False)
    assert summary.rows == table.num_rows and not summary.violations
    return out


def _flat_batches(table: pa.Table, reader: DedupReader) -> List[Batch]:
    """The flat (plain KJT) batches of the same samples in the same order: the layout's order,
    which for an unshuffled reader is the table's (tests/test_storage.py checks that); batch
    boundaries as the reader cut them (whole sessions)."""
    out, start = [], 0
    for b in reader:
        n = b.labels.numel()
        plain = TableBatches(table.slice(start, n), batch_size=n)[0]
        assert_kjt_equal(expand(b.sparse_features), plain.sparse_features)  # same samples, same order
        out.append(plain)
        start += n
    assert start == table.num_rows
    return out


def _assert_ikjt_equal(actual: KeyedJaggedTensor, expected: KeyedJaggedTensor) -> None:
    """Exact equality of two IKJTs (either layout): keys, per-key strides, values, lengths,
    weights, dtypes and inverse indices (a batch's ``DedupKJT``: its IKJT)."""
    actual, expected = (k.ikjt() if isinstance(k, DedupKJT) else k for k in (actual, expected))
    assert actual.keys() == expected.keys()
    assert actual.variable_stride_per_key() == expected.variable_stride_per_key()
    assert actual.stride_per_key() == expected.stride_per_key()
    assert actual.values().dtype == expected.values().dtype
    assert actual.lengths().dtype == expected.lengths().dtype
    assert torch.equal(actual.values(), expected.values())
    assert torch.equal(actual.lengths(), expected.lengths())
    assert (actual.weights_or_none() is None) == (expected.weights_or_none() is None)
    a_names, a_inv = actual.inverse_indices()
    e_names, e_inv = expected.inverse_indices()
    assert list(a_names) == list(e_names) and torch.equal(a_inv, e_inv)


def _loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    logits = model(batch.sparse_features, batch.dense_features)
    return nn.functional.binary_cross_entropy_with_logits(logits, batch.labels)


def _train(model: nn.Module, loader: Any, steps: int) -> List[float]:
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    for step, batch in enumerate(loader):
        if step == steps:
            break
        opt.zero_grad()
        loss = _loss(model, batch)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("flag", list(FLAGS))
def test_reader_batches_through_apply_train_like_the_flat_data(table: pa.Table, stored: Path, flag: str) -> None:
    reader = DedupReader(stored, BATCH)
    flat = _flat_batches(table, reader)
    steps = min(len(flat), 8)
    torch.manual_seed(0)
    model_flat = EXAMPLE.TwoTower(cardinalities(table), dim=8, light=True)
    model_reader = copy.deepcopy(model_flat)  # same initial weights

    model_flat, loader_flat = recd_plugin.apply(RecDConfig.from_string(FLAGS[flag]), model_flat, flat)
    model_reader, loader_reader = recd_plugin.apply(RecDConfig.from_string(FLAGS[flag]), model_reader, reader)
    assert isinstance(loader_reader, DedupLoader)
    sharded = flag.endswith("sharded")

    # The batches the model sees: the same IKJT from either source.
    for a, b in zip(loader_flat, loader_reader):
        assert is_aligned(b.sparse_features) == sharded
        _assert_ikjt_equal(b.sparse_features, a.sparse_features)
        assert torch.equal(a.labels, b.labels) and torch.equal(a.dense_features, b.dense_features)

    losses_flat = _train(model_flat, loader_flat, steps)
    losses_reader = _train(model_reader, loader_reader, steps)
    assert len(losses_reader) == steps
    torch.testing.assert_close(torch.tensor(losses_reader), torch.tensor(losses_flat), rtol=0, atol=1e-6)
    for (name, p), p_flat in zip(model_reader.named_parameters(), model_flat.parameters()):
        torch.testing.assert_close(p, p_flat, rtol=1e-6, atol=1e-6, msg=name)

    # DedupStats stay meaningful: the reader's batches count as the flat ones do.
    s_flat, s_reader = loader_flat.stats, loader_reader.stats
    assert s_reader.samples_in == s_reader.samples_out == s_flat.samples_in
    assert s_reader.rows == s_flat.rows and s_reader.unique_rows == s_flat.unique_rows
    assert 0 < s_reader.unique_fraction("user") < 0.5


def test_both_groups_pass_the_readers_batches_through_untouched(stored: Path) -> None:
    spec = RecDConfig.from_string(BOTH_FLAG).spec
    batch = next(iter(DedupReader(stored, BATCH)))
    out = dedup_batch(batch, spec, verify=True).sparse_features
    assert out.ikjt().values() is batch.sparse_features.values()  # the reader's tensors, not a copy
    _assert_ikjt_equal(out, batch.sparse_features)


def test_ungrouped_features_get_one_row_per_sample_again(stored: Path) -> None:
    spec = RecDConfig.from_string(USER_FLAG).spec
    for batch in DedupReader(stored, BATCH):
        out = dedup_batch(batch, spec, verify=True).sparse_features.ikjt()
        ref = build_ikjt(expand(batch.sparse_features), spec)
        assert out.stride_per_key() == ref.stride_per_key()
        assert out.stride_per_key()[out.keys().index("item_id")] == batch.labels.numel()
        _assert_ikjt_equal(out, ref)


@pytest.mark.parametrize("flag", ["user", "both"])
def test_sharded_mode_converts_to_the_aligned_layout(stored: Path, flag: str) -> None:
    """The loader step with a sharded config, on one process: aligned IKJTs equal to what the
    flat path builds (build_ikjt(..., aligned=True) of the expanded batch)."""
    config = RecDConfig.from_string(FLAGS[flag] + "; sharded=true")
    loader = recd_plugin.wrap(config, DedupReader(stored, BATCH))
    assert isinstance(loader, DedupLoader) and loader.aligned
    n = 0
    for batch, raw in zip(loader, DedupReader(stored, BATCH)):
        out = batch.sparse_features
        ref = build_ikjt(expand(raw.sparse_features), config.spec, aligned=True)
        assert is_aligned(out) and out.stride() == raw.labels.numel()
        _assert_ikjt_equal(out, ref)
        assert_kjt_equal(expand(out), expand(raw.sparse_features))
        n += 1
    assert n > 3
    # Back to compact from aligned: the same as the compact route.
    aligned = batch.sparse_features
    _assert_ikjt_equal(from_ikjt(aligned, config.spec), build_ikjt(expand(aligned), config.spec))


def test_flag_that_disagrees_with_the_readers_dedup_is_refused_by_apply(table: pa.Table, stored: Path) -> None:
    flag = ("groups.user.key=session_id; groups.user.features=user_id,item_genres; probe_batches=2")
    model = EXAMPLE.TwoTower(cardinalities(table), dim=8, light=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    types = [type(m) for m in model.modules()]
    with pytest.raises(MalformedBatchError) as e:
        recd_plugin.apply(RecDConfig.from_string(flag), model, DedupReader(stored, BATCH))
    msg = str(e.value)
    assert "already deduplicated" in msg and "'item_genres'" in msg and "'user'" in msg
    assert "groups.user.key=session_id; groups.user.features=user_id" in msg  # the fix
    assert "'item_id'" in msg  # the batch's own groups are listed
    assert [type(m) for m in model.modules()] == types  # nothing changed
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_flag_mismatch_is_refused_before_a_batch_is_read(stored: Path) -> None:
    """The reader declares its groups (batch_groups()): checked when its loader is wrapped; a
    reader that does not is checked on its batches (first batch, before the first step)."""
    config = RecDConfig.from_string("groups.g.features=item_id,user_zip; probe_batches=0")
    with pytest.raises(MalformedBatchError, match="flag group 'g' puts 'user_zip' with 'item_id'"):
        recd_plugin.wrap(config, DedupReader(stored, BATCH))

    class Undeclared(DedupReader):
        batch_groups = None  # type: ignore[assignment]

    loader = recd_plugin.wrap(config, Undeclared(stored, BATCH))
    with pytest.raises(MalformedBatchError, match="flag group 'g' puts 'user_zip' with 'item_id'"):
        next(iter(loader))


def test_a_group_key_with_several_ids_is_refused_on_verify_batches(stored: Path) -> None:
    config = RecDConfig.from_string("groups.g.key=history; groups.g.features=user_id; probe_batches=0")
    batch = next(iter(DedupReader(stored, BATCH)))
    with pytest.raises(MalformedBatchError, match="key feature 'history' of group 'g'"):
        dedup_batch(batch, config.spec, verify=True)


def test_variable_batch_kjt_without_inverse_indices_is_refused(stored: Path) -> None:
    kjt = next(iter(DedupReader(stored, BATCH))).sparse_features
    lost = KeyedJaggedTensor(keys=kjt.keys(), values=kjt.values(), lengths=kjt.lengths(),
                             stride_per_key_per_rank=[[s] for s in kjt.stride_per_key()])
    spec = RecDConfig.from_string(USER_FLAG).spec
    with pytest.raises(MalformedBatchError, match="without inverse_indices"):
        from_ikjt(lost, spec)
    batch = next(iter(DedupReader(stored, BATCH)))
    with pytest.raises(MalformedBatchError, match="loader got a variable-batch KJT without inverse_indices"):
        dedup_batch(Batch(batch.dense_features, lost, batch.labels), spec)


def test_the_reader_is_counted_like_the_flat_data(table: pa.Table, stored: Path, capsys) -> None:
    reader = DedupReader(stored, BATCH)
    flat = _flat_batches(table, reader)
    spec = RecDConfig.from_string(BOTH_FLAG).spec
    from_reader, from_flat = DedupLoader(reader, spec), DedupLoader(flat, spec)
    list(from_reader), list(from_flat)
    for g in ("user", "item"):
        assert from_reader.stats.unique_fraction(g) == from_flat.stats.unique_fraction(g)
        assert 0 < from_reader.stats.unique_fraction(g) < 1
    # apply with the decision on: no error, the announcement, batches of B samples.
    model = EXAMPLE.TwoTower(cardinalities(table), dim=8, light=True)
    model2, loader = recd_plugin.apply(RecDConfig.from_string(EXAMPLE.RECD_FLAG), copy.deepcopy(model), reader)
    assert "groups ['user'] will be decided on the first training steps" in capsys.readouterr().out
    first = next(iter(loader))
    assert first.labels.numel() == first.sparse_features.stride()  # the model's code reads B rows


def test_when_no_group_pays_the_plain_model_gets_plain_batches(table: pa.Table, stored: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The job's steps keep nothing: TorchRec's plain path, which takes plain KJTs (its
    EmbeddingCollection would misread an IKJT), so the reader's batches come expanded."""
    reader = DedupReader(stored, BATCH)
    flat = _flat_batches(table, reader)
    torch.manual_seed(0)
    model = EXAMPLE.TwoTower(cardinalities(table), dim=8, light=False)  # with the EmbeddingCollection
    ref = copy.deepcopy(model)
    flag = "groups.user.key=session_id; groups.user.features=user_id,history; probe_batches=2"
    model, loader = recd_plugin.apply(RecDConfig.from_string(flag), model, reader)
    decider_of(model).decided = ()  # what the steps decide when nothing pays (tests/test_route.py)
    for a, b in zip(loader, flat):
        assert_kjt_equal(a.sparse_features, b.sparse_features)  # plain KJTs, no inverse indices
    steps = min(len(flat), 4)
    torch.testing.assert_close(torch.tensor(_train(model, loader, steps)), torch.tensor(_train(ref, flat, steps)),
                               rtol=0, atol=1e-6)
    # wrap() of another reader for this model: plain batches too.
    config = RecDConfig.from_string(flag)
    config.groups, config.towers = [], {}
    other = recd_plugin.wrap(config, DataLoader(DedupReader(stored, BATCH), batch_size=None))
    assert next(iter(other)).sparse_features.inverse_indices_or_none() is None
    # A flat loader on that path comes back as it was.
    assert recd_plugin.wrap(config, flat) is flat


def test_dataloader_workers_give_the_same_batches(stored: Path) -> None:
    config = RecDConfig.from_string(USER_FLAG)
    here = list(recd_plugin.wrap(config, DedupReader(stored, BATCH)))
    workers = DataLoader(DedupReader(stored, BATCH), batch_size=None, num_workers=1)
    loader = recd_plugin.wrap(config, workers)
    assert loader.in_workers
    got = list(loader)
    assert len(got) == len(here)
    for a, b in zip(got, here):
        _assert_ikjt_equal(a.sparse_features, b.sparse_features)
    assert loader.stats.samples_in == sum(b.labels.numel() for b in here)
    loader.unwrap()
