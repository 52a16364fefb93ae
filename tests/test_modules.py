"""Dedup-aware modules and the plugin's apply/remove.

* DedupEmbeddingCollection on an IKJT == TorchRec's EmbeddingCollection on the plain KJT
  (values, lengths, indices, gradients), and the state_dict is interchangeable both ways.
* ``recd_plugin.apply`` on a small RecD-shaped model (EBC + EC + user tower + encoder):
  outputs, loss and every gradient equal the plugin-off model; ``remove`` undoes it.
* Every bad input raises the named error before the model changes.
"""

from __future__ import annotations

import copy
import io
from typing import Dict, List

import pytest
import torch
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor, KeyedTensor
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import DataLoader
from torchrec.modules.embedding_configs import EmbeddingBagConfig, EmbeddingConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection

from conftest import DIM, NUM_IDS, USER_GROUP, JaggedCase, RecModel, has_hooks, jagged_cases, session_batch
import recd_plugin
from recd_plugin import (
    ConfigError,
    DedupContext,
    DedupEmbeddingBagCollection,
    DedupEmbeddingCollection,
    DedupSpec,
    DedupSpecError,
    FeatureGroup,
    MalformedBatchError,
    NotDeduplicableError,
    RecDConfig,
    UnsupportedModelError,
    build_ikjt,
    dedup_tower,
)

# probe_batches=0: these tests check the dedup route itself, whichever route the probe
# (tests/test_probe.py) would pick for such small batches on this machine.
USER_FLAG = "groups.user.key=session_id; groups.user.features=user_id,history; probe_batches=0"
FULL_FLAG = USER_FLAG + "; towers.user_tower=user; towers.encoder=user"


# ------------------------------------------------------------------------------------------
# DedupEmbeddingCollection vs TorchRec's EmbeddingCollection.


def _ec_tables(features, rows: int = NUM_IDS) -> List[EmbeddingConfig]:
    # The first two features share a table; the others have one each.
    head = list(features[:2])
    tables = [EmbeddingConfig(name="t_shared", embedding_dim=DIM, num_embeddings=rows, feature_names=head)]
    tables += [EmbeddingConfig(name=f"t_{f}", embedding_dim=DIM, num_embeddings=rows, feature_names=[f])
               for f in features[2:]]
    return tables


def _ec_outputs_and_grads(ec: nn.Module, features, seed: int = 0):
    ec.zero_grad(set_to_none=True)
    out = ec(features)
    g = torch.Generator().manual_seed(seed)
    loss = sum((jt.values() * torch.randn(jt.values().shape, generator=g)).sum() for _, jt in sorted(out.items()))
    if isinstance(loss, torch.Tensor) and loss.requires_grad:
        loss.backward()
    grads = {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for n, p in ec.named_parameters()}
    return out, grads


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=jagged_cases(weighted=False, min_batch=1), need_indices=st.booleans(), seed=st.integers(0, 1000))
def test_dedup_ec_on_ikjt_equals_torchrec_ec_on_plain_kjt(case: JaggedCase, need_indices: bool, seed: int) -> None:
    torch.manual_seed(seed)
    ec = EmbeddingCollection(tables=_ec_tables(case.kjt.keys()), need_indices=need_indices)
    dedup = DedupEmbeddingCollection.from_module(ec)
    ikjt = build_ikjt(case.kjt, case.spec)

    ref, ref_grads = _ec_outputs_and_grads(ec, case.kjt)
    got, got_grads = _ec_outputs_and_grads(dedup, ikjt)
    assert sorted(got) == sorted(ref) == sorted(case.kjt.keys())
    for name, jt in ref.items():
        assert torch.equal(got[name].lengths(), jt.lengths()), name
        assert got[name].values().shape == jt.values().shape
        assert torch.equal(got[name].values(), jt.values()), name
        if need_indices:
            assert torch.equal(got[name].weights(), jt.weights()), name
        else:
            assert got[name].weights_or_none() is None
    for name in ref_grads:
        torch.testing.assert_close(got_grads[name], ref_grads[name], rtol=1e-5, atol=1e-5)

    # A plain KJT takes TorchRec's own path.
    plain, _ = _ec_outputs_and_grads(dedup, case.kjt)
    for name, jt in ref.items():
        assert torch.equal(plain[name].values(), jt.values())


def test_torchrec_ec_misreads_ikjt_which_is_why_it_is_swapped() -> None:
    batch = session_batch(1, batch=12, sessions=3)
    ikjt = build_ikjt(batch.sparse_features, DedupSpec([USER_GROUP]))
    unique = ikjt.stride_per_key()[ikjt.keys().index("history")]
    assert unique < 12
    ec = EmbeddingCollection(tables=_ec_tables(["history"], rows=30))
    assert ec(ikjt)["history"].lengths().numel() == unique  # stock EC: U rows, not B
    assert DedupEmbeddingCollection.from_module(ec)(ikjt)["history"].lengths().numel() == 12


def _saved(module: nn.Module) -> Dict[str, torch.Tensor]:
    """state_dict through torch.save / torch.load (a checkpoint file's round trip)."""
    buffer = io.BytesIO()
    torch.save(module.state_dict(), buffer)
    buffer.seek(0)
    return torch.load(buffer)


@pytest.mark.parametrize("kind", ["ec", "ebc"])
def test_state_dict_is_interchangeable_both_ways(kind: str) -> None:
    torch.manual_seed(0)
    if kind == "ec":
        tables = _ec_tables(["a", "b", "c"])
        plain_cls, dedup_cls = EmbeddingCollection, DedupEmbeddingCollection
    else:
        tables = [EmbeddingBagConfig(name=f"t_{f}", embedding_dim=DIM, num_embeddings=NUM_IDS, feature_names=[f])
                  for f in "abc"]
        plain_cls, dedup_cls = EmbeddingBagCollection, DedupEmbeddingBagCollection
    plain = plain_cls(tables=copy.deepcopy(tables))

    # from_module shares the very same tensors and keys.
    swapped = dedup_cls.from_module(plain)
    assert list(swapped.state_dict()) == list(plain.state_dict())
    for (n1, p1), (n2, p2) in zip(swapped.named_parameters(), plain.named_parameters()):
        assert n1 == n2 and p1 is p2

    # A separately built dedup module (other init): load both ways with strict=True.
    torch.manual_seed(1)
    other = dedup_cls(tables=copy.deepcopy(tables))
    assert list(other.state_dict()) == list(plain.state_dict())
    assert not all(torch.equal(a, b) for a, b in zip(other.state_dict().values(), plain.state_dict().values()))
    other.load_state_dict(_saved(plain), strict=True)
    for k, v in plain.state_dict().items():
        assert torch.equal(other.state_dict()[k], v)
    torch.manual_seed(2)
    fresh = plain_cls(tables=copy.deepcopy(tables))
    fresh.load_state_dict(_saved(dedup_cls.from_module(other)), strict=True)
    for k, v in other.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v)


# ------------------------------------------------------------------------------------------
# apply / remove on a small model.


def _pair():
    """(model, reference): same weights, the reference stays plain TorchRec."""
    torch.manual_seed(0)
    model = RecModel()
    ref = RecModel()
    ref.load_state_dict(model.state_dict(), strict=True)
    return model, ref


def _loss(out: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return nn.functional.binary_cross_entropy_with_logits(out, labels)


def test_apply_matches_plugin_off_outputs_loss_and_gradients() -> None:
    model, ref = _pair()
    batches = [session_batch(seed, batch=24, sessions=4) for seed in range(3)]
    model, loader = recd_plugin.apply(RecDConfig.from_string(FULL_FLAG), model, batches)
    assert type(model.ec) is DedupEmbeddingCollection
    assert type(model.ebc) is DedupEmbeddingBagCollection
    assert type(model.user_tower).__name__ == "UserTower"  # towers keep their type: hooks only
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.1)

    for step, (batch, plain) in enumerate(zip(loader, batches)):
        ikjt = batch.sparse_features.ikjt()
        assert ikjt.inverse_indices_or_none() is not None
        unique = ikjt.stride_per_key()[ikjt.keys().index("history")]
        assert unique < plain.sparse_features.stride()
        opt.zero_grad()
        opt_ref.zero_grad()
        out, out_ref = model(batch), ref(plain)
        loss, loss_ref = _loss(out, batch.labels), _loss(out_ref, plain.labels)
        loss.backward()
        loss_ref.backward()
        assert out.shape == out_ref.shape == (24,)
        torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-5)
        for (name, p), (name_ref, p_ref) in zip(model.named_parameters(), ref.named_parameters()):
            assert name == name_ref
            assert p.grad is not None, name
            torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-5, atol=1e-5, msg=name)
        # The towers really ran on the unique rows only.
        assert model.encoder.rows_seen[-1] == unique and ref.encoder.rows_seen[-1] == 24
        assert model.user_tower.rows_seen[-1] == unique
        opt.step()
        opt_ref.step()
    for (name, p), p_ref in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, p_ref, rtol=1e-5, atol=1e-5, msg=name)

    # state_dict: same keys, loadable both ways (strict).
    assert list(model.state_dict()) == list(ref.state_dict())
    ref.load_state_dict(_saved(model), strict=True)
    model.load_state_dict(_saved(ref), strict=True)


def test_converted_model_also_takes_plain_batches() -> None:
    model, ref = _pair()
    recd_plugin.apply(RecDConfig.from_string(FULL_FLAG), model)
    plain = session_batch(5)
    torch.testing.assert_close(model(plain), ref(plain), rtol=1e-5, atol=1e-5)
    assert model.encoder.rows_seen[-1] == 24  # no IKJT, nothing to deduplicate


def test_remove_restores_plain_modules_and_no_hooks_remain() -> None:
    model, _ = _pair()
    ebc, ec = model.ebc, model.ec
    keys = list(model.state_dict())
    recd_plugin.apply(RecDConfig.from_string(FULL_FLAG), model)
    assert has_hooks(model) == ["<root>", "user_tower", "encoder"]
    assert recd_plugin.remove(model) is model
    assert model.ebc is ebc and type(model.ebc) is EmbeddingBagCollection
    assert model.ec is ec and type(model.ec) is EmbeddingCollection
    assert not any(isinstance(m, (DedupEmbeddingCollection, DedupEmbeddingBagCollection)) for m in model.modules())
    assert has_hooks(model) == []
    assert list(model.state_dict()) == keys
    # The plain model works, and the plugin can be applied again.
    batch = session_batch(2)
    model(batch)
    assert model.encoder.rows_seen[-1] == 24
    recd_plugin.apply(RecDConfig.from_string(FULL_FLAG), model)
    assert type(model.ec) is DedupEmbeddingCollection
    recd_plugin.remove(model)
    assert recd_plugin.remove(model) is model  # removing twice is harmless


@pytest.mark.parametrize("config", [RecDConfig(), RecDConfig.from_string("off"), RecDConfig.load(None, env={})])
def test_config_off_returns_identical_objects(config: RecDConfig) -> None:
    model, _ = _pair()
    loader = [session_batch(0)]
    before = {name: type(m) for name, m in model.named_modules()}
    got_model, got_loader = recd_plugin.apply(config, model, loader)
    assert got_model is model and got_loader is loader
    assert {name: type(m) for name, m in model.named_modules()} == before
    assert has_hooks(model) == []
    assert recd_plugin.apply(config, model, None) == (model, None)


# ------------------------------------------------------------------------------------------
# Bad inputs: the named error, a message naming the problem, and the model unchanged.


def _assert_unconverted(model: nn.Module, types: Dict[str, type]) -> None:
    assert {name: type(m) for name, m in model.named_modules()} == types
    assert not model._forward_pre_hooks and not model._forward_hooks
    assert has_hooks(model) == []
    # apply() did not register the model either: a good config still applies afterwards.
    recd_plugin.apply(RecDConfig.from_string(USER_FLAG), model)
    recd_plugin.remove(model)


@pytest.mark.parametrize("make_config, error, pattern", [
    # Unknown feature in a group, with a suggestion.
    (lambda: RecDConfig.from_string("groups.user.key=session_id; groups.user.features=user_id,histroy"),
     DedupSpecError, r"'histroy'.*did you mean 'history'"),
    # Unknown tower path, with a suggestion.
    (lambda: RecDConfig.from_string(USER_FLAG + "; towers.user_towr=user"),
     UnsupportedModelError, r"'user_towr' is not a submodule.*did you mean 'user_tower'"),
    # An embedding module named as a tower.
    (lambda: RecDConfig.from_string(USER_FLAG + "; towers.ec=user"),
     UnsupportedModelError, r"'ec' is an embedding module"),
    # Built in code (no parser): a tower naming an undefined group.
    (lambda: RecDConfig(enabled=True, groups=[USER_GROUP], towers={"user_tower": "usr"}),
     ConfigError, r"'user_tower' reads group 'usr'.*not defined.*did you mean 'user'"),
    # Built in code: overlapping groups.
    (lambda: RecDConfig(enabled=True, groups=[USER_GROUP, FeatureGroup("seq", ["history"])]),
     ConfigError, r"'history' is in groups 'user' and 'seq'"),
    # Enabled but no groups.
    (lambda: RecDConfig(enabled=True), ConfigError, r"names no feature group"),
])
def test_bad_config_raises_and_leaves_model_unconverted(make_config, error, pattern) -> None:
    model, _ = _pair()
    types = {name: type(m) for name, m in model.named_modules()}
    with pytest.raises(error, match=pattern):
        recd_plugin.apply(make_config(), model, [session_batch(0)])
    _assert_unconverted(model, types)


def test_tower_naming_undefined_group_fails_at_parse_time() -> None:
    with pytest.raises(ConfigError, match=r"reads group 'usr', which is not defined.*did you mean 'user'"):
        RecDConfig.from_string(USER_FLAG + "; towers.user_tower=usr")
    with pytest.raises(ConfigError, match=r"'history' is in groups"):
        RecDConfig.from_string(USER_FLAG + "; groups.seq.features=history")


def test_already_deduplicated_dataloader_is_refused_before_the_model_changes() -> None:
    model, _ = _pair()
    types = {name: type(m) for name, m in model.named_modules()}
    loader = DataLoader([session_batch(0)], batch_size=None, num_workers=2)
    recd_plugin.DedupLoader(loader, DedupSpec([USER_GROUP]))
    with pytest.raises(MalformedBatchError, match="already deduplicated"):
        recd_plugin.apply(RecDConfig.from_string(USER_FLAG), model, loader)
    _assert_unconverted(model, types)


def test_apply_twice_is_refused() -> None:
    model, _ = _pair()
    config = RecDConfig.from_string(FULL_FLAG)
    recd_plugin.apply(config, model)
    hooks = has_hooks(model)
    with pytest.raises(UnsupportedModelError, match="already applied.*remove"):
        recd_plugin.apply(config, model)
    assert has_hooks(model) == hooks  # the second call added nothing
    assert len(model.user_tower._forward_pre_hooks) == 1
    recd_plugin.remove(model)


@pytest.mark.parametrize("module", ["ebc", "ec"])
def test_applying_to_an_embedding_module_directly_is_refused(module: str) -> None:
    model, _ = _pair()
    target = getattr(model, module)
    with pytest.raises(UnsupportedModelError, match="not to the embedding module itself"):
        recd_plugin.apply(RecDConfig.from_string(USER_FLAG), target)
    assert type(target) in (EmbeddingBagCollection, EmbeddingCollection)
    assert not target._forward_pre_hooks and not target._forward_hooks


def test_model_without_embedding_modules_is_refused() -> None:
    with pytest.raises(UnsupportedModelError, match="no torchrec EmbeddingBagCollection"):
        recd_plugin.apply(RecDConfig.from_string(USER_FLAG), nn.Linear(2, 2))


def test_tower_reading_per_sample_input_raises_before_any_step() -> None:
    model, _ = _pair()
    initial = copy.deepcopy(model.state_dict())
    # item_tower reads the item embedding: it differs between samples of one session.
    config = RecDConfig.from_string(USER_FLAG + "; towers.item_tower=user")
    model, loader = recd_plugin.apply(config, model, [session_batch(s) for s in range(3)])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    steps = 0
    with pytest.raises(NotDeduplicableError, match=r"'item_tower'.*per-sample"):
        for batch in loader:
            opt.zero_grad()
            _loss(model(batch), batch.labels).backward()
            opt.step()
            steps += 1
    assert steps == 0
    for k, v in initial.items():
        assert torch.equal(model.state_dict()[k], v), k


class _Recorder(nn.Module):
    """Identity on tensors; remembers a KJT input and returns its per-row lengths [N, K]."""

    def forward(self, x):  # type: ignore[no-untyped-def]
        if isinstance(x, KeyedJaggedTensor):
            self.seen = x
            return x.lengths().view(len(x.keys()), -1).t().float()
        return x


def test_dedup_tower_refuses_jagged_input_and_unknown_group() -> None:
    spec = DedupSpec([USER_GROUP])
    holder = nn.Module()
    holder.inner = _Recorder()
    ctx = DedupContext.attach(holder, spec)
    with pytest.raises(DedupSpecError, match="did you mean 'user'"):
        dedup_tower(holder.inner, ctx, group="usr")
    handle = dedup_tower(holder.inner, ctx, group="user", name="inner")
    ikjt = build_ikjt(session_batch(0).sparse_features, spec)
    ctx.set(ikjt)
    history = ikjt.to_dict()["history"]
    with pytest.raises(UnsupportedModelError, match="'inner'.*JaggedTensor.*dense tensors"):
        holder.inner(history)
    # The batch's IKJT reaches the module as a plain KJT of the group's unique rows.
    holder.inner(ikjt)
    seen = holder.inner.seen
    assert isinstance(seen, KeyedJaggedTensor) and seen.inverse_indices_or_none() is None
    assert seen.keys() == list(USER_GROUP.all_features)
    assert seen.stride() == ikjt.stride_per_key()[ikjt.keys().index("history")]
    # A dense [B, D] session-constant input runs on U rows and comes back with B rows.
    first, inv = ctx.rows("user")
    x = torch.randn(int(first.numel()), 4)[inv]
    assert torch.equal(holder.inner(x), x)
    handle.remove()
    ctx.detach()
    assert has_hooks(holder) == []


def test_tower_without_batch_major_input_is_left_alone_or_refused() -> None:
    spec = DedupSpec([USER_GROUP])
    holder = nn.Module()
    holder.inner = nn.Identity()
    ctx = DedupContext.attach(holder, spec)
    dedup_tower(holder.inner, ctx, group="user", name="inner")
    ctx.set(build_ikjt(session_batch(0, batch=24, sessions=4).sparse_features, spec))
    x = torch.randn(6, 24, 3)  # sequence-first [L, B, D]: nothing to deduplicate along dim 0
    try:
        y = holder.inner(x)
    except UnsupportedModelError:
        return  # refusing is fine too
    assert y.shape == x.shape and torch.equal(y, x)


def test_remove_keeps_train_eval_mode_of_swapped_modules() -> None:
    model, _ = _pair()
    recd_plugin.apply(RecDConfig.from_string(USER_FLAG), model)
    model.eval()
    recd_plugin.remove(model)
    assert not model.training
    assert [name for name, m in model.named_modules() if m.training] == []


def test_tower_called_outside_a_model_forward_is_not_deduplicated() -> None:
    model, ref = _pair()
    batch = session_batch(0, batch=24, sessions=4)
    model, loader = recd_plugin.apply(RecDConfig.from_string(FULL_FLAG), model, [batch])
    model(next(iter(loader)))  # a training step's forward: uses up verification
    x = torch.randn(24, model.user_tower.mlp[0].in_features)  # per-sample rows
    torch.testing.assert_close(model.user_tower(x), ref.user_tower(x))


def test_nested_towers_match_plugin_off_or_are_refused() -> None:
    model, ref = _pair()
    batch = session_batch(0, batch=24, sessions=4)
    try:
        model, loader = recd_plugin.apply(RecDConfig.from_string(FULL_FLAG + "; towers.user_tower.mlp=user"),
                                          model, [batch])
    except UnsupportedModelError:
        return  # refusing nested towers is fine too
    torch.testing.assert_close(model(next(iter(loader))), ref(batch), rtol=1e-5, atol=1e-5)


class _UserSide(nn.Module):
    """A whole user side taking the batch's KJT: user EBC + history EC + MLP -> [B, D]."""

    def __init__(self) -> None:
        super().__init__()
        self.bags = EmbeddingBagCollection(tables=[EmbeddingBagConfig(
            name="t_user", embedding_dim=4, num_embeddings=20, feature_names=["user_id"])])
        self.seq = EmbeddingCollection(tables=[EmbeddingConfig(
            name="t_hist", embedding_dim=4, num_embeddings=30, feature_names=["history"])])
        self.mlp = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))

    def forward(self, sparse: KeyedJaggedTensor) -> torch.Tensor:
        user = self.bags(sparse)["user_id"]
        hist = self.seq(sparse)["history"]
        pooled = hist.to_padded_dense().sum(dim=1)  # [B, 4]: works for empty histories too
        return self.mlp(torch.cat([user, pooled], dim=1))


class _KJTTowerModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.user_side = _UserSide()
        self.items = EmbeddingBagCollection(tables=[EmbeddingBagConfig(
            name="t_item", embedding_dim=4, num_embeddings=30, feature_names=["item_id"])])

    def forward(self, batch: Batch) -> torch.Tensor:
        return (self.user_side(batch.sparse_features) * self.items(batch.sparse_features)["item_id"]).sum(1)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tower_taking_the_kjt_runs_the_user_side_on_unique_rows_and_matches(seed: int) -> None:
    torch.manual_seed(seed)
    model, ref = _KJTTowerModel(), _KJTTowerModel()
    ref.load_state_dict(model.state_dict(), strict=True)
    batch = session_batch(seed, batch=24, sessions=4)
    flag = "groups.user.key=session_id; groups.user.features=user_id,history; towers.user_side=user; probe_batches=0"
    model, loader = recd_plugin.apply(RecDConfig.from_string(flag), model, [batch])
    seen: List[int] = []
    model.user_side.mlp.register_forward_hook(lambda m, i, o: seen.append(o.shape[0]))
    ibatch = next(iter(loader))
    out, want = model(ibatch), ref(batch)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
    assert seen == [ibatch.sparse_features.ikjt().stride_per_key()[0]] and seen[0] < 24  # U rows, not B
    _loss(out, batch.labels).backward()
    _loss(want, batch.labels).backward()
    grads = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[name].grad, rtol=1e-5, atol=1e-6, msg=name)


def test_tower_reading_a_feature_outside_its_group_is_refused() -> None:
    model = _KJTTowerModel()
    flag = "groups.user.key=session_id; groups.user.features=history; towers.user_side=user"
    with pytest.raises(UnsupportedModelError, match="'user_side' reads feature 'user_id'.*not in group 'user'"):
        recd_plugin.apply(RecDConfig.from_string(flag), model)
    assert has_hooks(model) == [] and type(model.user_side.seq) is EmbeddingCollection


class _SharedEC(nn.Module):
    """One EmbeddingCollection reachable under two names (e.g. shared by two towers)."""

    def __init__(self) -> None:
        super().__init__()
        self.ec = EmbeddingCollection(tables=[EmbeddingConfig(
            name="t_hist", embedding_dim=4, num_embeddings=30, feature_names=["history"])])
        self.alias = self.ec

    def forward(self, batch: Batch) -> torch.Tensor:
        a = self.ec(batch.sparse_features)["history"].to_padded_dense().sum(1)
        b = self.alias(batch.sparse_features)["history"].to_padded_dense().sum(1)
        return (a * b).sum(1)


def test_a_module_under_two_names_is_converted_at_both() -> None:
    model, ref = _SharedEC(), _SharedEC()
    ref.load_state_dict(model.state_dict())
    batch = session_batch(0, batch=24, sessions=4)
    flag = "groups.user.key=session_id; groups.user.features=history; probe_batches=0"
    model, loader = recd_plugin.apply(RecDConfig.from_string(flag), model, [batch])
    assert model.ec is model.alias and type(model.alias) is DedupEmbeddingCollection
    torch.testing.assert_close(model(next(iter(loader))), ref(batch))
    recd_plugin.remove(model)
    assert model.ec is model.alias and type(model.alias) is EmbeddingCollection


class _KTTower(nn.Module):
    def forward(self, x: torch.Tensor) -> Dict[str, object]:
        kt = KeyedTensor(keys=["a", "b"], length_per_key=[2, 2], values=x[:, :4])
        jt = JaggedTensor(values=x[:, :1].reshape(-1).repeat_interleave(2), lengths=torch.full((x.shape[0],), 2))
        return {"kt": kt, "jt": jt}


def test_tower_outputs_keyed_and_jagged_tensors_are_expanded() -> None:
    spec = DedupSpec([USER_GROUP])
    holder = nn.Module()
    holder.tower = _KTTower()
    ctx = DedupContext.attach(holder, spec)
    dedup_tower(holder.tower, ctx, group="user", name="tower")
    ctx.set(build_ikjt(session_batch(0, batch=24, sessions=4).sparse_features, spec))
    first, inv = ctx.rows("user")
    x = torch.randn(int(first.numel()), 6)[inv]  # session-constant [B, 6]
    out = holder.tower(x)
    want = _KTTower()(x)
    torch.testing.assert_close(out["kt"].values(), want["kt"].values())
    assert out["kt"].keys() == ["a", "b"]
    torch.testing.assert_close(out["jt"].values(), want["jt"].values())
    assert torch.equal(out["jt"].lengths(), want["jt"].lengths())


def test_tensordict_input_is_accepted_like_torchrec() -> None:
    from tensordict import TensorDict

    ebc = EmbeddingBagCollection(tables=[EmbeddingBagConfig(
        name="t_user", embedding_dim=4, num_embeddings=10, feature_names=["user_id"])])
    td = TensorDict({"user_id": torch.nested.nested_tensor(
        [torch.tensor([1]), torch.tensor([2, 3])], layout=torch.jagged)}, batch_size=[2])
    want = ebc(td).values()
    got = DedupEmbeddingBagCollection.from_module(ebc)(td).values()
    torch.testing.assert_close(got, want)


def test_dedup_ec_keeps_int32_lengths() -> None:
    ec = EmbeddingCollection(tables=[EmbeddingConfig(
        name="t_hist", embedding_dim=4, num_embeddings=30, feature_names=["history"])])
    kjt = session_batch(0, batch=24, sessions=4).sparse_features
    k32 = KeyedJaggedTensor(keys=kjt.keys(), values=kjt.values().int(), lengths=kjt.lengths().int())
    want = ec(k32)["history"]
    got = DedupEmbeddingCollection.from_module(ec)(build_ikjt(k32, DedupSpec([USER_GROUP])))["history"]
    assert got.lengths().dtype == want.lengths().dtype == torch.int32
    assert torch.equal(got.lengths(), want.lengths())
    torch.testing.assert_close(got.values(), want.values())


def test_converted_model_pickles_and_a_copy_cannot_be_removed() -> None:
    model, _ = _pair()
    recd_plugin.apply(RecDConfig.from_string(FULL_FLAG), model)
    buf = io.BytesIO()
    torch.save(model, buf)  # no local lambdas in the plugin's hooks
    buf.seek(0)
    assert type(torch.load(buf, weights_only=False)) is type(model)
    with pytest.raises(UnsupportedModelError, match="not converted by apply"):
        recd_plugin.remove(copy.deepcopy(model))
    recd_plugin.remove(model)  # the original still can
    assert has_hooks(model) == []
