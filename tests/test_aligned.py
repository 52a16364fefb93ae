"""The aligned IKJT layout and sharded mode's output gather, in one process.

* ``build_ikjt(..., aligned=True)``: a plain KJT of batch B to TorchRec (no variable batch),
  duplicates' rows empty; ``expand`` restores the input; its unique rows, first samples and
  counts equal the compact layout's (property tests).
* Sharded mode (``sharded=true``) keeps TorchRec's modules; with the gather hooks the model's
  outputs, loss and gradients equal plugin off, also after the module at a path is replaced by
  one that ignores inverse indices, as DistributedModelParallel's sharded modules do. The
  2-rank DMP runs are in integration_tests/.
"""

from __future__ import annotations

from typing import Dict

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from torch import nn
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from conftest import RecModel, assert_kjt_equal, has_hooks, jagged_cases, session_batch
import recd_plugin
from recd_plugin import RecDConfig
from recd_plugin.sparse.ikjt import build_ikjt, expand, group_rows, is_aligned, unique_count, unique_rows

PROPERTY = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FLAG = "groups.user.key=session_id; groups.user.features=user_id,history; sharded=true"


@PROPERTY
@given(jagged_cases())
def test_aligned_layout_expands_back_and_agrees_with_the_compact_one(case) -> None:
    aligned = build_ikjt(case.kjt, case.spec, aligned=True)
    compact = build_ikjt(case.kjt, case.spec)
    assert is_aligned(aligned) and not aligned.variable_stride_per_key()
    assert aligned.stride() == case.kjt.stride() and aligned.keys() == case.kjt.keys()
    assert_kjt_equal(expand(aligned), case.kjt)
    for g in case.spec.groups:
        f = g.all_features[0]
        first_a, inv_a = group_rows(aligned, f)
        first_c, inv_c = group_rows(compact, f)
        assert torch.equal(first_a, first_c) and torch.equal(inv_a, inv_c)
        assert unique_count(aligned, f) == unique_count(compact, f) == first_c.numel()
        assert_kjt_equal(unique_rows(aligned, list(g.all_features)), unique_rows(compact, list(g.all_features)))
        # Only the first sample of each unique row carries ids: duplicates are empty rows.
        lengths = aligned[f].lengths()
        dup = torch.ones(aligned.stride(), dtype=torch.bool)
        dup[first_a] = False
        assert int(lengths[dup].abs().sum()) == 0


def _grads(model: nn.Module) -> Dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _step(model: nn.Module, batch) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    out = model(batch)
    nn.functional.binary_cross_entropy_with_logits(out, batch.labels).backward()
    return out.detach()


class _IgnoresInverse(nn.Module):
    """Stands in for a DMP-sharded module: a plain KJT of batch B to it (inverse indices
    ignored, as TorchRec's sharded EBC/EC do for a KJT that is not variable-batch)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, kjt: KeyedJaggedTensor):
        plain = KeyedJaggedTensor(keys=kjt.keys(), values=kjt.values(), lengths=kjt.lengths(),
                                  weights=kjt.weights_or_none(), stride=kjt.stride())
        return self.inner(plain)


class _LazyIgnoresInverse(_IgnoresInverse):
    """Also returns its output as TorchRec's sharded modules do: a LazyAwaitable."""

    def forward(self, kjt: KeyedJaggedTensor):
        from torchrec.distributed.types import LazyNoWait

        return LazyNoWait(super().forward(kjt))


@pytest.mark.parametrize("towers", ["", "; towers.user_tower=user; towers.encoder=user"])
@pytest.mark.parametrize("replace", [None, _IgnoresInverse, _LazyIgnoresInverse])
def test_sharded_mode_matches_plugin_off_and_follows_replaced_modules(towers: str, replace) -> None:
    torch.manual_seed(0)
    model, ref = RecModel(), RecModel()
    ref.load_state_dict(model.state_dict())
    batches = [session_batch(seed, batch=24, sessions=4) for seed in range(3)]
    config = RecDConfig.from_string(FLAG + towers + "; probe_batches=0")
    model, loader = recd_plugin.apply(config, model, batches)
    assert type(model.ebc) is EmbeddingBagCollection and type(model.ec) is EmbeddingCollection  # kept for DMP
    if replace:  # after apply, as DistributedModelParallel does
        model.ebc, model.ec = replace(model.ebc), replace(model.ec)
    for batch, plain in zip(loader, batches):
        kjt = batch.sparse_features
        assert is_aligned(kjt) and kjt.stride() == 24 and unique_count(kjt, "history") < 24
        out, out_ref = _step(model, batch), _step(ref, plain)
        torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-5)
        grads = {n.replace(".inner.", "."): g for n, g in _grads(model).items()}
        grads_ref = _grads(ref)
        assert set(grads) == set(grads_ref)
        for name, g in grads_ref.items():
            torch.testing.assert_close(grads[name], g, rtol=1e-5, atol=1e-5, msg=name)
        if towers:
            assert model.encoder.rows_seen[-1] == unique_count(kjt, "history")
    recd_plugin.remove(model)
    assert not has_hooks(model)


def test_without_the_gather_a_module_that_ignores_inverse_indices_would_be_wrong() -> None:
    """Why the gather hook exists: TorchRec's sharded modules read an aligned IKJT as a plain
    batch, so the duplicates' rows would stay empty."""
    torch.manual_seed(0)
    model = RecModel()
    batch = session_batch(0, batch=24, sessions=4)
    aligned = build_ikjt(batch.sparse_features, RecDConfig.from_string(FLAG).spec, aligned=True)
    ignoring = _IgnoresInverse(model.ebc)
    assert not torch.allclose(ignoring(aligned).values(), model.ebc(batch.sparse_features).values())


def test_an_output_the_gather_cannot_expand_is_refused_not_passed_on() -> None:
    class Odd(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, kjt: KeyedJaggedTensor):
            return self.inner(kjt).values()  # a bare tensor: which columns are which is lost

    model = RecModel()
    batches = [session_batch(0, batch=24, sessions=4)]
    model, loader = recd_plugin.apply(RecDConfig.from_string(FLAG + "; probe_batches=0"), model, batches)
    model.ebc = Odd(model.ebc)
    with pytest.raises(recd_plugin.UnsupportedModelError, match="cannot expand"):
        model(next(iter(loader)))


def test_sharded_mode_is_automatic_under_torchrun(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    config = RecDConfig.from_string("groups.user.key=session_id; groups.user.features=user_id")
    assert not config.is_sharded()
    monkeypatch.setenv("LOCAL_RANK", "0")  # torchrun --nproc_per_node 1, TorchX -j 1x1
    assert config.is_sharded()
