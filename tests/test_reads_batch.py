"""Model code reads the plain batch: a DedupKJT answers every public reader as the plain batch
when the caller is the model's own code, and as the IKJT when it is TorchRec or the plugin
(recd_plugin/sparse/dedup_kjt.py). The DMP modes are integration_tests/test_reads_the_batch.py."""

from __future__ import annotations

import copy
import pickle
from typing import List

import pytest
import torch
from hypothesis import given, settings
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from conftest import assert_kjt_equal, jagged_cases, session_batch, sgd_losses
import recd_plugin
from recd_plugin import RecDConfig
from recd_plugin.bench.reads_batch import FLAG, ReadsBatch, with_position
from recd_plugin.sparse.dedup_kjt import READERS, DedupKJT, model_code
from recd_plugin.sparse.ikjt import build_ikjt

CARD = {"user_id": 20, "history": 30, "item_id": 30, "position": 64}


def _train(model: torch.nn.Module, loader) -> List[float]:
    return sgd_losses(model, loader, lambda m, b: m(b)[0])  # ReadsBatch returns (loss, ...)


@pytest.mark.parametrize("tower", [False, True])
@pytest.mark.parametrize("extra", ["", "; route=dedup", "; route=dedup; sharded=true"])
def test_a_model_reading_the_batch_trains_exactly_as_plugin_off(tower: bool, extra: str) -> None:
    """Unsharded (compact IKJT), and the aligned layout on one process; through the decision's
    blocks and with the group kept."""
    torch.manual_seed(0)
    base = ReadsBatch(CARD, tower=tower)
    batches = [with_position(session_batch(s, batch=48, sessions=4)) for s in range(50)]
    plain = _train(copy.deepcopy(base), batches)
    flag = FLAG + extra + ("; towers.seq=user" if tower else "")
    model, loader = recd_plugin.apply(RecDConfig.from_string(flag), copy.deepcopy(base), batches)
    torch.testing.assert_close(torch.tensor(_train(model, loader)), torch.tensor(plain), rtol=0, atol=1e-5)


def test_without_the_plain_view_the_same_model_reads_unique_rows() -> None:
    """What the view prevents: the IKJT itself handed to the same model reads U rows where its
    code expects B (compact: a size error) or carriers only (aligned: other values)."""
    torch.manual_seed(0)
    model = ReadsBatch(CARD)
    batch = with_position(session_batch(0, batch=48, sessions=4))
    spec = RecDConfig.from_string(FLAG).spec
    want = model.logits(batch)
    compact = build_ikjt(batch.sparse_features, spec)
    viewed = DedupKJT.of(compact, ("user",))
    assert viewed["history"].lengths().numel() == 48 and compact["history"].lengths().numel() < 48
    aligned = DedupKJT.of(build_ikjt(batch.sparse_features, spec, aligned=True), ("user",))
    assert torch.equal(aligned.lengths(), batch.sparse_features.lengths())
    assert not torch.equal(aligned.ikjt().lengths(), batch.sparse_features.lengths())  # duplicates empty
    converted, _ = recd_plugin.apply(RecDConfig.from_string(FLAG + "; route=dedup"), copy.deepcopy(model))
    got = converted.logits(type(batch)(batch.dense_features, viewed, batch.labels))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@settings(max_examples=60, deadline=None)
@given(case=jagged_cases(min_batch=1))
def test_every_reader_answers_model_code_as_the_plain_batch(case) -> None:
    """Property, both layouts: each public reader of a DedupKJT, called from here (model code),
    equals the plain KJT's; TorchRec's own code and the plugin read the IKJT."""
    for aligned in (False, True):
        ikjt = build_ikjt(case.kjt, case.spec, aligned=aligned)
        kjt = DedupKJT.of(ikjt, tuple(g.name for g in case.spec.groups))
        plain = case.kjt
        assert torch.equal(kjt.values(), plain.values()) and torch.equal(kjt.lengths(), plain.lengths())
        assert torch.equal(kjt.offsets(), plain.offsets()) and kjt.stride() == plain.stride()
        assert kjt.length_per_key() == plain.length_per_key() and kjt.stride_per_key() == plain.stride_per_key()
        assert kjt.inverse_indices_or_none() is None and not kjt.variable_stride_per_key()
        if plain.weights_or_none() is not None:
            assert torch.equal(kjt.weights(), plain.weights())
        for key in plain.keys():
            assert torch.equal(kjt[key].values(), plain[key].values())
            assert torch.equal(kjt.to_dict()[key].lengths(), plain.to_dict()[key].lengths())
        assert_kjt_equal(kjt.permute(list(range(len(plain.keys())))[::-1]),
                         plain.permute(list(range(len(plain.keys())))[::-1]))
        assert str(kjt) == str(plain)
        assert kjt.ikjt().inverse_indices_or_none() is not None  # the IKJT is still there
        moved = kjt.to(torch.device("cpu"))
        assert type(moved) is DedupKJT and torch.equal(moved.values(), plain.values())
        again = pickle.loads(pickle.dumps(kjt))  # DataLoader workers send it between processes
        assert type(again) is DedupKJT and torch.equal(again.lengths(), plain.lengths())


def test_torchrec_and_the_plugin_read_the_ikjt() -> None:
    assert not model_code("torchrec.distributed.embeddingbag") and not model_code("recd_plugin.modules.tower")
    assert not model_code("torch.nn.modules.module") and not model_code("fbgemm_gpu.sparse_ops")
    assert model_code("__main__") and model_code("my_project.model") and model_code("recd_plugin.bench.models")
    assert model_code("torchrec_extras.model")  # a package merely named like TorchRec is model code
    assert set(READERS) >= {"values", "lengths", "offsets", "__getitem__", "to_dict", "permute", "split"}
    public = {n for n, v in vars(KeyedJaggedTensor).items() if callable(v) and not n.startswith("_")}
    unread = public - set(READERS)
    # What is left out keeps the IKJT on purpose (moves, constructors, distributed internals, keys).
    assert unread <= {"to", "pin_memory", "record_stream", "keys", "device", "concat", "empty", "empty_like",
                      "from_jt_dict", "from_lengths_sync", "from_offsets_sync", "dist_init", "dist_labels",
                      "dist_splits", "dist_tensors", "sync", "unsync", "copy_", "clear_storage"}, unread
