"""Batch statistics inside a dedup tower (issue 12, item 9).

A tower runs on the U unique rows of a group; its batch-norm layers must still normalize with
the statistics of the B samples and advance their running statistics as the plain model does.

* ``count_weighted_batch_norm`` on U rows with counts == torch's batch norm on the B repeated
  rows (rows of count 0, as padded in sharded mode, change nothing): outputs, gradients,
  running statistics, ``num_batches_tracked``, for every momentum / affine / tracking setting.
* A tower holding BatchNorm1d (2-D and 3-D input), BatchNorm2d or SyncBatchNorm (one process:
  local statistics) over several SGD steps on random session structures, plugin on vs off:
  outputs, loss, every gradient, running statistics equal; the same through ``recd_plugin.apply``.
* Layers that reduce over the batch in a way that cannot be weighted are refused before any
  hook is installed; ``remove`` gives every layer torch's forward back.

SyncBatchNorm over 2 ranks: integration_tests/test_tower_sync_batchnorm.py.
"""

from __future__ import annotations

import copy
from typing import Callable, Dict, List, Tuple

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from conftest import RecModel, has_hooks, session_batch
import recd_plugin
from recd_plugin import DedupContext, DedupSpec, FeatureGroup, RecDConfig, UnsupportedModelError, build_ikjt, dedup_tower
from recd_plugin.modules.batchnorm import check_tower_layers, count_weighted_batch_norm

SPEC = DedupSpec([FeatureGroup("user", ("user_id",), key="session_id")])
MOMENTA = [0.1, None, 0.7]
FLAG = ("groups.user.key=session_id; groups.user.features=user_id,history; probe_batches=0; "
        "towers.user_tower=user; towers.encoder=user")


def _bn_options() -> st.SearchStrategy:
    return st.fixed_dictionaries({"momentum": st.sampled_from(MOMENTA), "affine": st.booleans(),
                                  "track_running_stats": st.booleans()})


def _assert_same_state(got: nn.Module, want: nn.Module, **tol: float) -> None:
    """Parameters, their gradients and buffers (running statistics, num_batches_tracked)."""
    want_params = dict(want.named_parameters())
    for name, p in got.named_parameters():
        torch.testing.assert_close(p, want_params[name], **tol, msg=name)
        if want_params[name].grad is None:
            assert p.grad is None, name
        else:
            torch.testing.assert_close(p.grad, want_params[name].grad, **tol, msg=f"grad of {name}")
    want_buffers = dict(want.named_buffers())
    assert sorted(dict(got.named_buffers())) == sorted(want_buffers)
    for name, b in got.named_buffers():
        torch.testing.assert_close(b, want_buffers[name], **tol, msg=name)


# ------------------------------------------------------------------------------------------
# The weighted statistics themselves.


@settings(max_examples=60, deadline=None)
@given(counts=st.lists(st.integers(0, 5), min_size=1, max_size=8).filter(lambda c: sum(c) >= 2),
       length=st.sampled_from([0, 1, 3]), options=_bn_options(), train=st.booleans(),
       seed=st.integers(0, 2**16))
def test_weighted_statistics_equal_batch_norm_on_the_repeated_rows(
        counts: List[int], length: int, options: Dict, train: bool, seed: int) -> None:
    torch.manual_seed(seed)
    channels = 3
    bn = nn.BatchNorm1d(channels, **options).double().train(train)
    with torch.no_grad():
        if bn.affine:
            bn.weight.uniform_(0.5, 2.0)
            bn.bias.normal_()
    ref = copy.deepcopy(bn)
    shape = (len(counts), channels) + ((length,) if length else ())
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    c = torch.tensor(counts)
    # A row of count 0 (padding) must not count, whatever it holds.
    with torch.no_grad():
        x[c == 0] = 1e3
    x_ref = x.detach().repeat_interleave(c, dim=0).requires_grad_()
    for step in range(2):
        want = ref(x_ref)
        if ref.training or not ref.track_running_stats:
            got = count_weighted_batch_norm(bn, x, c, int(c.sum()))
        else:
            got = bn(x)  # running statistics: per sample
        torch.testing.assert_close(got.repeat_interleave(c, dim=0), want, rtol=1e-10, atol=1e-10)
        g = torch.randn(want.shape, dtype=torch.float64)
        want.backward(g)
        # The gradient reaching a unique row is the sum of its samples' gradients.
        g_rows = torch.zeros(got.shape, dtype=torch.float64).index_add_(
            0, torch.arange(len(counts)).repeat_interleave(c), g)
        got.backward(g_rows)
        summed = torch.zeros(x.shape, dtype=torch.float64).index_add_(
            0, torch.arange(len(counts)).repeat_interleave(c), x_ref.grad)
        torch.testing.assert_close(x.grad[c > 0], summed[c > 0], rtol=1e-8, atol=1e-10)
        _assert_same_state(bn, ref, rtol=1e-10, atol=1e-10)
        x.grad, x_ref.grad = None, None


def test_single_value_per_channel_is_refused_as_torch_does() -> None:
    bn = nn.BatchNorm1d(2)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        count_weighted_batch_norm(bn, torch.randn(2, 2), torch.tensor([1, 0]), 1)
    assert int(bn.num_batches_tracked) == 0


# ------------------------------------------------------------------------------------------
# Towers, plugin on vs off.


class Holder(nn.Module):
    """Root model: the KJT carries the session structure, the tower reads dense ``x`` [B, ...]."""

    def __init__(self, tower: nn.Module) -> None:
        super().__init__()
        self.tower = tower

    def forward(self, kjt: KeyedJaggedTensor, x: torch.Tensor) -> torch.Tensor:
        return self.tower(x)


class SeqTower(nn.Module):
    """[B, D, L] -> Conv1d -> BatchNorm1d over (B, L) -> [B, C]: a 3-D batch norm."""

    def __init__(self, dim: int, channels: int, norm: nn.Module) -> None:
        super().__init__()
        self.conv = nn.Conv1d(dim, channels, kernel_size=1)
        self.norm = norm
        self.out = nn.Linear(channels, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.norm(self.conv(x))).mean(-1))


class GridTower(nn.Module):
    """[B, D, H, W] -> BatchNorm2d -> [B, D]."""

    def __init__(self, dim: int, norm: nn.Module) -> None:
        super().__init__()
        self.norm = norm
        self.out = nn.Linear(dim, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.norm(x).mean((-1, -2)))


DIM, CHANNELS = 4, 5
# Smooth activations only: a batch of one session has zero variance, so the normalized values
# are 0 up to rounding, and a ReLU's gradient there would depend on the rounding's sign.


def _tower(kind: str, options: Dict) -> Tuple[nn.Module, Tuple[int, ...]]:
    """(tower, shape of one sample's input)."""
    if kind == "mlp":
        return nn.Sequential(nn.Linear(DIM, CHANNELS), nn.BatchNorm1d(CHANNELS, **options), nn.Tanh(),
                             nn.Linear(CHANNELS, 2)), (DIM,)
    if kind == "sync":
        return nn.Sequential(nn.Linear(DIM, CHANNELS), nn.SyncBatchNorm(CHANNELS, **options), nn.Tanh(),
                             nn.Linear(CHANNELS, 2)), (DIM,)
    if kind == "seq":
        return SeqTower(DIM, CHANNELS, nn.BatchNorm1d(CHANNELS, **options)), (DIM, 3)
    return GridTower(DIM, nn.BatchNorm2d(DIM, **options)), (DIM, 2, 2)


def session_kjt(session_of: List[int]) -> KeyedJaggedTensor:
    """Plain KJT of batch B: ``session_id`` and a session-constant ``user_id``."""
    users = [(7 * s + 3) % 50 for s in session_of]
    return KeyedJaggedTensor(keys=["session_id", "user_id"], values=torch.tensor(session_of + users),
                             lengths=torch.ones(2 * len(session_of), dtype=torch.long), stride=len(session_of))


@st.composite
def session_structures(draw: Callable) -> Tuple[List[int], bool]:
    """(session of each sample, aligned layout?): B >= 2, any number of sessions, in RecD's
    contiguous order or shuffled."""
    batch = draw(st.integers(2, 24))
    sessions = draw(st.integers(1, batch))
    session_of = draw(st.lists(st.integers(0, sessions - 1), min_size=batch, max_size=batch))
    if draw(st.booleans()):
        session_of.sort()
    return session_of, draw(st.booleans())


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from(["mlp", "sync", "seq", "grid"]), options=_bn_options(),
       steps=st.lists(st.tuples(session_structures(), st.booleans()), min_size=3, max_size=3),
       seed=st.integers(0, 2**16))
def test_batch_norm_tower_matches_plugin_off_over_training_steps(
        kind: str, options: Dict, steps: List[Tuple[Tuple[List[int], bool], bool]], seed: int) -> None:
    torch.manual_seed(seed)
    tower, sample_shape = _tower(kind, options)
    model, ref = Holder(tower).double(), Holder(copy.deepcopy(tower)).double()
    ctx = DedupContext.attach(model, SPEC)
    dedup_tower(model.tower, ctx, group="user", name="tower")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    for (session_of, aligned), train in steps:
        model.train(train), ref.train(train)
        kjt = session_kjt(session_of)
        per_session = torch.randn((max(session_of) + 1,) + sample_shape, dtype=torch.float64)
        x = per_session[torch.tensor(session_of)]  # session-constant rows, as the tower's contract
        out = model(build_ikjt(kjt, SPEC, aligned=aligned), x)
        want = ref(kjt, x)
        torch.testing.assert_close(out, want, rtol=1e-9, atol=1e-9)
        target = torch.randn(want.shape, dtype=torch.float64)
        loss, ref_loss = ((out - target) ** 2).mean(), ((want - target) ** 2).mean()
        torch.testing.assert_close(loss, ref_loss, rtol=1e-9, atol=1e-9)
        opt.zero_grad(), ref_opt.zero_grad()
        loss.backward(), ref_loss.backward()
        _assert_same_state(model, ref, rtol=1e-7, atol=1e-9)
        opt.step(), ref_opt.step()
        _assert_same_state(model, ref, rtol=1e-7, atol=1e-9)


def test_batch_norm_user_tower_through_apply_matches_plugin_off() -> None:
    """The issue's case: a user tower with BatchNorm1d, float32, plugin on vs off, 3 SGD steps.
    (SGD, not Adam: the bias before the batch norm has a zero gradient up to rounding, which
    Adam would scale up to full steps on both sides.)"""
    torch.manual_seed(0)
    model = RecModel()
    model.user_tower.mlp = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 8))
    ref = copy.deepcopy(model)
    batches = [session_batch(seed, batch=24, sessions=4) for seed in range(3)]
    model, loader = recd_plugin.apply(RecDConfig.from_string(FLAG), model, batches)
    opt, ref_opt = torch.optim.SGD(model.parameters(), lr=0.1), torch.optim.SGD(ref.parameters(), lr=0.1)
    for ibatch, batch in zip(loader, batches):
        out, want = model(ibatch), ref(batch)
        assert model.user_tower.rows_seen[-1] < 24  # the tower really ran on unique rows
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
        loss = nn.functional.binary_cross_entropy_with_logits(out, batch.labels)
        ref_loss = nn.functional.binary_cross_entropy_with_logits(want, batch.labels)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
        opt.zero_grad(), ref_opt.zero_grad()
        loss.backward(), ref_loss.backward()
        _assert_same_state(model, ref, rtol=1e-4, atol=1e-5)
        opt.step(), ref_opt.step()
    _assert_same_state(model, ref, rtol=1e-4, atol=1e-5)
    assert int(model.user_tower.mlp[1].num_batches_tracked) == 3
    recd_plugin.remove(model)
    assert "forward" not in vars(model.user_tower.mlp[1])


# ------------------------------------------------------------------------------------------
# Refusals, layout, removal.


class _CustomNorm(nn.BatchNorm1d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 2


@pytest.mark.parametrize("layer, message", [
    (nn.InstanceNorm1d(4, track_running_stats=True), r"InstanceNorm1d.*track_running_stats=False"),
    (nn.LazyInstanceNorm2d(track_running_stats=True), r"LazyInstanceNorm2d.*track_running_stats=False"),
    (_CustomNorm(4), r"'tower\.1' \(_CustomNorm\) overrides the batch-norm forward"),
    (nn.Softmax(dim=0), r"Softmax.*dim 0, the batch"),
])
def test_unweightable_batch_layers_are_refused_before_anything_is_installed(layer: nn.Module, message: str) -> None:
    tower = nn.Sequential(nn.BatchNorm1d(4), layer)
    with pytest.raises(UnsupportedModelError, match=message):
        check_tower_layers(tower, "tower")
    holder = Holder(tower)
    own_hooks = has_hooks(holder)  # a lazy layer's own initialization hook
    ctx = DedupContext.attach(holder, SPEC)
    with pytest.raises(UnsupportedModelError, match=r"recd tower 'tower'.*" + message):
        dedup_tower(holder.tower, ctx, group="user", name="tower")
    ctx.detach()
    assert has_hooks(holder) == own_hooks and all("forward" not in vars(m) for m in holder.modules())


@pytest.mark.parametrize("layer", [
    nn.BatchNorm1d(4), nn.BatchNorm2d(4), nn.BatchNorm3d(4), nn.SyncBatchNorm(4), nn.LazyBatchNorm1d(),
    nn.InstanceNorm1d(4), nn.LayerNorm(4), nn.GroupNorm(2, 4), nn.Softmax(dim=-1), nn.Dropout(0.0),
])
def test_exact_or_per_sample_layers_are_accepted(layer: nn.Module) -> None:
    check_tower_layers(nn.Sequential(nn.Linear(4, 4), layer), "tower")


def test_apply_refuses_an_unweightable_tower_layer_before_changing_the_model() -> None:
    model = RecModel()
    model.user_tower.mlp.insert(1, nn.InstanceNorm1d(8, track_running_stats=True))
    ec_type = type(model.ec)
    with pytest.raises(UnsupportedModelError, match=r"'user_tower\.mlp\.1'.*track_running_stats=False"):
        recd_plugin.apply(RecDConfig.from_string(FLAG), model)
    assert has_hooks(model) == [] and type(model.ec) is ec_type


class _FlatTower(nn.Module):
    """Folds the sequence into the batch before its batch norm: [B, L, C] -> [B * L, C]."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.reshape(-1, 3)).reshape(x.shape)


def test_batch_norm_on_rows_other_than_the_towers_is_refused_before_its_statistics_change() -> None:
    holder = Holder(_FlatTower())
    ctx = DedupContext.attach(holder, SPEC)
    dedup_tower(holder.tower, ctx, group="user", name="tower")
    session_of = [0, 0, 1, 1, 1]
    x = torch.randn(2, 4, 3)[torch.tensor(session_of)]
    before = copy.deepcopy(holder.tower.norm.state_dict())
    with pytest.raises(UnsupportedModelError, match=r"'tower\.norm'.*shape \(8, 3\).*2 unique rows.*Reshape"):
        holder(build_ikjt(session_kjt(session_of), SPEC), x)
    for k, v in holder.tower.norm.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_remove_restores_torch_forward_and_state_dict_keys() -> None:
    shared = nn.BatchNorm1d(3)
    a, b = nn.Sequential(nn.Linear(3, 3), shared), nn.Sequential(shared, nn.Linear(3, 3))
    holder = nn.Module()
    holder.a, holder.b = a, b
    keys = list(holder.state_dict())
    ctx = DedupContext.attach(holder, SPEC)
    ha = dedup_tower(a, ctx, group="user", name="a")
    hb = dedup_tower(b, ctx, group="user", name="b")
    assert type(shared) is nn.BatchNorm1d and list(holder.state_dict()) == keys
    ha.remove()
    assert "forward" in vars(shared)  # still inside tower b
    hb.remove()
    ctx.detach()
    assert "forward" not in vars(shared) and has_hooks(holder) == []
