"""Issue 12 (C2): inputs that used to give silently wrong results or raw tracebacks.

Each one is now exact or a plugin error (a ``RecDError``) that names the problem and the fix,
raised before the model, the loader or the config is changed:

* subclasses of TorchRec's EC / EBC: swapped when they keep TorchRec's forward, refused at
  ``apply`` when they override it and would read the deduplicated batch;
* a variable-batch KJT that lost its inverse indices (``permute``, ``flatten_lengths``,
  ``from_jt_dict``): ``expand`` / ``inverse_index`` / ``unique_count`` / the modules refuse it;
* non-integer ids: refused by ``build_ikjt`` (they were truncated and merged);
* a refused ``apply`` (a converter that refuses, injected faults in every converter): module
  tree, hooks, state_dict, loader and config exactly as before;
* flags and TOML files of every malformed kind: ``ConfigError`` only (property tests);
* bf16 / fp16 weights in a content-keyed group: deduplicated exactly;
* ``RecDConfig`` built in code: on with groups, checked when built.
"""

from __future__ import annotations

import copy
import io
from pathlib import Path
from typing import Any, Callable, Dict, List

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import DataLoader
from torchrec.modules.embedding_configs import EmbeddingBagConfig, EmbeddingConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from conftest import USER_GROUP, JaggedCase, RecModel, assert_kjt_equal, jagged_cases, session_batch
import recd_plugin
from recd_plugin import (
    ConfigError,
    DedupEmbeddingBagCollection,
    DedupEmbeddingCollection,
    DedupSpec,
    FeatureGroup,
    MalformedBatchError,
    RecDConfig,
    RecDError,
    UnsupportedModelError,
    build_ikjt,
    expand,
    inverse_index,
)
from recd_plugin.fae.config import FAEConfig
from recd_plugin.technique import TECHNIQUES
from recd_plugin.fae.hotset import HotSet, TableShape
from recd_plugin.modules import recd as recd_technique
from recd_plugin.modules.base import DedupModule
from recd_plugin.sparse.ikjt import unique_count

PROPERTY = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
USER_FLAG = "groups.user.key=session_id; groups.user.features=user_id,history; probe_batches=0"
FULL_FLAG = USER_FLAG + "; towers.user_tower=user; towers.encoder=user"


def snapshot(model: nn.Module) -> Dict[str, Any]:
    """Everything a refused ``apply`` must leave as it was: the module tree (names, types,
    objects), every hooks dict of every module, and the state_dict (keys and values)."""
    return {
        "tree": [(name, type(m), id(m)) for name, m in model.named_modules(remove_duplicate=False)],
        "hooks": [(name, {k: dict(v) for k, v in vars(m).items() if "hook" in k and isinstance(v, dict)})
                  for name, m in model.named_modules(remove_duplicate=False)],
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "params": [id(p) for p in model.parameters()],
    }


def assert_same(before: Dict[str, Any], after: Dict[str, Any]) -> None:
    assert after["tree"] == before["tree"]
    assert after["hooks"] == before["hooks"]
    assert after["params"] == before["params"]
    assert list(after["state"]) == list(before["state"])
    for k, v in before["state"].items():
        assert torch.equal(after["state"][k], v), k


# ------------------------------------------------------------------------------------------
# Item 6: subclasses of TorchRec's embedding modules.


class MyEC(EmbeddingCollection):
    """A user subclass that keeps TorchRec's forward (a helper method only)."""

    def table_names(self) -> List[str]:
        return [c.name for c in self.embedding_configs()]


class MyEBC(EmbeddingBagCollection):
    def table_names(self) -> List[str]:
        return [c.name for c in self.embedding_bag_configs()]


class ForwardEC(EmbeddingCollection):
    """A user subclass with its own forward: the plugin cannot swap it."""

    def forward(self, features: KeyedJaggedTensor):  # type: ignore[override]
        return super().forward(features)


class ForwardEBC(EmbeddingBagCollection):
    def forward(self, features: KeyedJaggedTensor):  # type: ignore[override]
        return super().forward(features)


class SubclassModel(nn.Module):
    """``emb`` (an EC or EBC of class ``cls``) reads ``feature``; an EBC reads the rest."""

    def __init__(self, cls: type, feature: str = "history") -> None:
        super().__init__()
        self.feature = feature
        if issubclass(cls, EmbeddingCollection):
            self.emb = cls(tables=[EmbeddingConfig(name="t_emb", embedding_dim=4, num_embeddings=50,
                                                   feature_names=[feature])])
        else:
            self.emb = cls(tables=[EmbeddingBagConfig(name="t_emb", embedding_dim=4, num_embeddings=50,
                                                      feature_names=[feature])])
        others = [f for f in ("user_id", "history", "item_id") if f != feature]
        self.ebc = EmbeddingBagCollection(tables=[EmbeddingBagConfig(
            name=f"t_{f}", embedding_dim=4, num_embeddings=50, feature_names=[f]) for f in others])

    def forward(self, batch: Any) -> torch.Tensor:
        kjt = batch.sparse_features
        out = self.emb(kjt)
        x = out[self.feature].to_padded_dense(6).sum(1) if isinstance(out, dict) else out.values()
        return (x * self.ebc(kjt).values()[:, :4]).sum(1)  # [B]


@pytest.mark.parametrize("cls", [MyEC, MyEBC])
def test_subclass_keeping_torchrec_forward_is_swapped_and_matches_plugin_off(cls: type) -> None:
    torch.manual_seed(0)
    model, ref = SubclassModel(cls), SubclassModel(cls)
    ref.load_state_dict(model.state_dict())
    batch = session_batch(0, batch=24, sessions=4)
    model, loader = recd_plugin.apply(RecDConfig.from_string(USER_FLAG), model, [batch])
    assert isinstance(model.emb, cls) and isinstance(model.emb, DedupModule)  # the user's class, deduplicating
    assert model.emb.table_names() == ["t_emb"]
    ikjt_batch = next(iter(loader))
    if cls is MyEC:  # the bug: the EC read the unique rows as the batch (24 samples -> 4 rows)
        assert model.emb(ikjt_batch.sparse_features)["history"].lengths().numel() == 24
    out, want = model(ikjt_batch), ref(batch)
    torch.testing.assert_close(out, want)
    out.sum().backward()
    want.sum().backward()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)
    # A converted model still pickles and deep-copies (the dedup subclass is made at run time).
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert type(loaded.emb) is type(model.emb) and type(copy.deepcopy(model).emb) is type(model.emb)
    torch.testing.assert_close(loaded(ikjt_batch), want)
    recd_plugin.remove(model)
    assert type(model.emb) is cls


@pytest.mark.parametrize("cls", [ForwardEC, ForwardEBC])
@pytest.mark.parametrize("sharded", [False, True])
def test_subclass_overriding_forward_that_reads_a_grouped_feature_is_refused(cls: type, sharded: bool) -> None:
    model = SubclassModel(cls, feature="history")
    before = snapshot(model)
    config = RecDConfig.from_string(USER_FLAG + f"; sharded={str(sharded).lower()}")
    with pytest.raises(UnsupportedModelError, match=r"'emb' \(Forward.*overrides forward\(\).*'history'.*Fix: "):
        recd_plugin.apply(config, model, [session_batch(0)])
    assert_same(before, snapshot(model))


@pytest.mark.parametrize("cls", [ForwardEC, ForwardEBC])
def test_subclass_overriding_forward_outside_the_groups_is_left_as_it_is(cls: type) -> None:
    torch.manual_seed(0)
    model, ref = SubclassModel(cls, feature="item_id"), SubclassModel(cls, feature="item_id")
    ref.load_state_dict(model.state_dict())
    batch = session_batch(1, batch=24, sessions=4)
    model, loader = recd_plugin.apply(RecDConfig.from_string(USER_FLAG), model, [batch])
    assert type(model.emb) is cls  # not swapped: its own forward runs, on full-batch rows
    torch.testing.assert_close(model(next(iter(loader))), ref(batch))
    recd_plugin.remove(model)


def test_from_module_refuses_a_subclass_with_its_own_forward() -> None:
    ec = ForwardEC(tables=[EmbeddingConfig(name="t", embedding_dim=4, num_embeddings=5, feature_names=["a"])])
    with pytest.raises(UnsupportedModelError, match="overrides forward"):
        DedupEmbeddingCollection.from_module(ec)
    with pytest.raises(UnsupportedModelError, match="is not a EmbeddingBagCollection"):
        DedupEmbeddingBagCollection.from_module(ec)


# ------------------------------------------------------------------------------------------
# Item 7: a variable-batch KJT that lost its inverse indices is refused, never passed on.


STRIPPERS: Dict[str, Callable[[KeyedJaggedTensor], KeyedJaggedTensor]] = {
    "permute": lambda k: k.permute(list(range(len(k.keys())))),
    "flatten_lengths": lambda k: k.flatten_lengths(),
    "from_jt_dict": lambda k: KeyedJaggedTensor.from_jt_dict(k.to_dict()),
}


@pytest.mark.parametrize("strip", list(STRIPPERS))
def test_expand_refuses_a_variable_batch_kjt_without_inverse_indices(strip: str) -> None:
    ikjt = build_ikjt(session_batch(0, batch=24, sessions=4).sparse_features, DedupSpec([USER_GROUP]))
    stripped = STRIPPERS[strip](ikjt)
    assert stripped.inverse_indices_or_none() is None and stripped.variable_stride_per_key()
    fix = r"without inverse_indices.*permute.*call recd_plugin.expand\(kjt\) before"
    with pytest.raises(MalformedBatchError, match="expand\\(\\) got a variable-batch KJT " + fix):
        expand(stripped)
    with pytest.raises(MalformedBatchError, match=fix):
        inverse_index(stripped, "history")
    with pytest.raises(MalformedBatchError, match=fix):
        unique_count(stripped, "history")
    ec = EmbeddingCollection(tables=[EmbeddingConfig(name="t", embedding_dim=4, num_embeddings=50,
                                                     feature_names=["history"])])
    with pytest.raises(MalformedBatchError, match="an embedding module got .*" + fix):
        DedupEmbeddingCollection.from_module(ec)(stripped)


@PROPERTY
@given(case=jagged_cases(min_batch=1), strip=st.sampled_from(list(STRIPPERS)))
def test_expand_never_returns_a_stripped_ikjt_as_the_batch(case: JaggedCase, strip: str) -> None:
    ikjt = build_ikjt(case.kjt, case.spec)
    assert_kjt_equal(expand(ikjt), case.kjt)  # with its inverse indices: exact
    try:
        stripped = STRIPPERS[strip](ikjt)
    except Exception:  # noqa: BLE001 - TorchRec cannot rebuild this one at all: nothing to misread
        return
    if stripped.inverse_indices_or_none() is None and stripped.variable_stride_per_key():
        with pytest.raises(MalformedBatchError, match="without inverse_indices"):
            expand(stripped)


# ------------------------------------------------------------------------------------------
# Item 8: non-integer ids.


def test_float_ids_are_refused_not_truncated() -> None:
    # The case: [1.5, 1.2] in a content-keyed group became [1.5, 1.5] (one row).
    kjt = KeyedJaggedTensor(keys=["u"], values=torch.tensor([1.5, 1.2]), lengths=torch.tensor([1, 1]), stride=2)
    with pytest.raises(MalformedBatchError, match=r"feature 'u' holds torch.float32 ids, e.g. 1.5: ids must be "
                                                  r"an integer tensor.*torch.long"):
        build_ikjt(kjt, DedupSpec([FeatureGroup("g", ["u"])]))


@PROPERTY
@given(case=jagged_cases(weighted=False, min_batch=1), data=st.data(),
       dtype=st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16]),
       aligned=st.booleans())
def test_non_integer_ids_are_refused_naming_the_feature(case: JaggedCase, data: Any, dtype: torch.dtype,
                                                        aligned: bool) -> None:
    n = case.kjt.values().numel()
    assume(n > 0)
    at = data.draw(st.integers(0, n - 1), label="fractional value at")
    values = case.kjt.values().to(dtype)
    values[at] += 0.5  # ids are < 8: exact in every float dtype
    bad = KeyedJaggedTensor(keys=case.kjt.keys(), values=values, lengths=case.kjt.lengths(), stride=case.batch)
    lengths = case.kjt.lengths().long().tolist()
    row = int(np.searchsorted(np.cumsum(lengths), at, side="right"))
    feature = case.kjt.keys()[row // case.batch]
    with pytest.raises(MalformedBatchError, match=f"feature '{feature}' holds {dtype} ids.*integer tensor"):
        build_ikjt(bad, case.spec, aligned=aligned)
    whole = KeyedJaggedTensor(keys=case.kjt.keys(), values=case.kjt.values().to(dtype),
                              lengths=case.kjt.lengths(), stride=case.batch)
    with pytest.raises(MalformedBatchError, match="integer tensor"):  # whole floats: still not ids
        build_ikjt(whole, case.spec, aligned=aligned)


# ------------------------------------------------------------------------------------------
# Item 14: bf16 / fp16 weights in a content-keyed group.


@PROPERTY
@given(case=jagged_cases(weighted=True), dtype=st.sampled_from([torch.bfloat16, torch.float16]),
       aligned=st.booleans())
def test_half_precision_weights_are_deduplicated_exactly(case: JaggedCase, dtype: torch.dtype, aligned: bool) -> None:
    kjt = KeyedJaggedTensor(keys=case.kjt.keys(), values=case.kjt.values(), lengths=case.kjt.lengths(),
                            weights=case.kjt.weights().to(dtype), stride=case.batch)  # WEIGHTS are exact in both
    ikjt = build_ikjt(kjt, case.spec, aligned=aligned)
    assert_kjt_equal(expand(ikjt), kjt)
    if not aligned:
        for f, want in case.expected_inverse.items():
            assert inverse_index(ikjt, f).tolist() == want, f


def test_bf16_rows_differing_only_in_weights_stay_apart() -> None:
    kjt = KeyedJaggedTensor(keys=["u"], values=torch.tensor([3, 3, 3]), lengths=torch.tensor([1, 1, 1]),
                            weights=torch.tensor([0.5, 0.5, 1.0], dtype=torch.bfloat16), stride=3)
    ikjt = build_ikjt(kjt, DedupSpec([FeatureGroup("g", ["u"])]))
    assert inverse_index(ikjt, "u").tolist() == [0, 0, 1]
    assert ikjt.weights().dtype == torch.bfloat16


# ------------------------------------------------------------------------------------------
# Item 10: a refused apply leaves model, loader and config exactly as they were.


class WeightedMeanModel(nn.Module):
    """A weighted EBC with a MEAN table (which the hot/cold layout refuses) next to the user side."""

    def __init__(self) -> None:
        super().__init__()
        self.wbc = EmbeddingBagCollection(tables=[EmbeddingBagConfig(
            name="t_item", embedding_dim=4, num_embeddings=30, feature_names=["item_id"],
            pooling=PoolingType.MEAN)], is_weighted=True)
        self.ebc = EmbeddingBagCollection(tables=[EmbeddingBagConfig(
            name="t_user", embedding_dim=4, num_embeddings=20, feature_names=["user_id"])])
        self.user_tower = nn.Linear(4, 4)

    def forward(self, batch: Any) -> torch.Tensor:
        return self.user_tower(self.ebc(batch.sparse_features).values()).sum(1)


def test_fae_hot_set_naming_a_weighted_mean_table_leaves_no_hook(tmp_path: Path) -> None:
    HotSet({"t_item": TableShape(30, 4)}, {"t_item": np.arange(3)}, budget_bytes=48).save(tmp_path / "hot.npz")
    model = WeightedMeanModel()
    before = snapshot(model)
    config = RecDConfig.from_string(f"fae.hot_set={tmp_path / 'hot.npz'}; fae.force_layout=true; groups.user.key=session_id; "
                                    "groups.user.features=user_id; towers.user_tower=user; probe_batches=0")
    with pytest.raises(UnsupportedModelError, match="weighted MEAN"):
        recd_plugin.apply(config, model, [session_batch(0)])
    assert_same(before, snapshot(model))


@pytest.mark.parametrize("sharded", [False, True])
@pytest.mark.parametrize("failing", ["fae", "recd_swap_or_gather", "recd", "second_tower"])
def test_a_converter_that_fails_leaves_model_loader_and_config_as_they_were(
        monkeypatch: pytest.MonkeyPatch, failing: str, sharded: bool, tmp_path: Path) -> None:
    """Fault injection, with FAE (order 10) and RecD (20) on: each technique's conversion in
    turn raises (RecD's after FAE's hot/cold layout was made), RecD's towers step raises after
    its swap (unsharded) or gather (sharded) step ran, or the second tower's hooks refuse after
    the first tower's were installed."""
    HotSet({"t_user": TableShape(20, 8)}, {"t_user": np.arange(3)}, budget_bytes=96).save(tmp_path / "hot.npz")
    def boom(*args: Any, **kwargs: Any) -> Any:
        raise UnsupportedModelError(f"injected: {failing} refused")

    if failing == "second_tower":
        calls: List[int] = []
        real = recd_technique._tower.dedup_tower

        def flaky(*args: Any, **kwargs: Any) -> Any:
            calls.append(1)
            if len(calls) == 2:
                raise UnsupportedModelError("injected: second tower refused")
            return real(*args, **kwargs)

        monkeypatch.setattr(recd_technique._tower, "dedup_tower", flaky)
    elif failing == "recd_swap_or_gather":  # the towers' step refuses, after the swap / gather ran
        monkeypatch.setattr(recd_technique, "_hook_towers", boom)
    else:
        monkeypatch.setattr(TECHNIQUES[{"fae": FAEConfig, "recd": RecDConfig}[failing]], "convert", boom)
    model = RecModel()
    loader = DataLoader([session_batch(0)], batch_size=None, num_workers=2)
    collate = loader.collate_fn
    config = RecDConfig.from_string(FULL_FLAG + f"; sharded={str(sharded).lower()}; fae.hot_set={tmp_path / 'hot.npz'}; "
                                    "fae.force_layout=true")
    groups, towers = list(config.groups), dict(config.towers)
    before = snapshot(model)
    with pytest.raises(UnsupportedModelError, match="injected"):
        recd_plugin.apply(config, model, loader)
    assert_same(before, snapshot(model))
    assert loader.collate_fn is collate
    assert config.groups == groups and config.towers == towers
    monkeypatch.undo()
    recd_plugin.apply(config, model, loader)  # not registered as applied: a good run still works
    recd_plugin.remove(model)
    assert_same(before, snapshot(model))


def test_a_refused_loader_leaves_the_config_as_it_was() -> None:
    model = RecModel()
    loader = DataLoader([session_batch(0)], batch_size=None, num_workers=2)
    recd_plugin.DedupLoader(loader, DedupSpec([USER_GROUP]))  # already wrapped: apply refuses it
    config = RecDConfig.from_string(FULL_FLAG)
    groups = list(config.groups)
    with pytest.raises(MalformedBatchError, match="already deduplicated"):
        recd_plugin.apply(config, model, loader)
    assert config.groups == groups


# ------------------------------------------------------------------------------------------
# Item 13: malformed flags and TOML files.


@pytest.mark.parametrize("text, pattern", [
    ("groups.u.features=a; verify_batches=--5", r"'verify_batches' must be an integer .*got '--5'"),
    ("groups.u.features=a; verify_batches=²", r"'verify_batches' must be an integer .*got '²'"),
    ("groups.u.features=a; verify_batches=٣", r"'verify_batches' must be an integer .*got '٣'"),
    ("groups.u.features=a; probe_batches=①", r"'probe_batches' must be an integer .*got '①'"),
    ("groups.u.features=a; probe_batches=-", r"'probe_batches' must be an integer .*got '-'"),
    ("fae.hot_set=h.npz; fae.window=--5", r"fae 'window' must be an integer >= 0.*got '--5'"),
])
def test_flag_numbers_that_int_cannot_read_are_config_errors(text: str, pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        RecDConfig.from_string(text)


@pytest.mark.parametrize("flag, pattern", [
    (b"groups.u.features=a", r"recd flag must be a string, got bytes .*decode it first.*'@recd.toml'"),
    (bytearray(b"off"), r"recd flag must be a string, got bytearray"),
    (5, r"recd flag must be a string, got int 5; pass"),
    (["groups.u.features=a"], r"recd flag must be a string, got list"),
])
def test_non_string_flags_are_config_errors(flag: Any, pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        RecDConfig.load(flag)
    with pytest.raises(ConfigError, match=pattern):
        RecDConfig.from_string(flag)


def test_a_path_flag_reads_the_toml_file(tmp_path: Path) -> None:
    path = tmp_path / "recd.toml"
    path.write_text('[recd.groups.u]\nkey = "sid"\nfeatures = ["a"]\n')
    assert RecDConfig.load(path) == RecDConfig.from_string(f"@{path}") == RecDConfig.from_toml(str(path))
    assert RecDConfig.load(path).enabled


@pytest.mark.parametrize("body", ["recd = 5\n", "recd = []\n", "recd = true\n", 'recd = "on"\n', "recd = [1, 2]\n"])
def test_a_recd_key_that_is_not_a_table_is_a_config_error(tmp_path: Path, body: str) -> None:
    path = tmp_path / "recd.toml"
    path.write_text(body)
    with pytest.raises(ConfigError, match=r"recd config must be a table of settings, got .*write \[recd\]"):
        RecDConfig.from_toml(path)


@pytest.mark.parametrize("flag", ["@a\x00b.toml", "groups=\x00; groups=x.toml"])
def test_a_path_that_cannot_be_opened_is_a_config_error(flag: str) -> None:
    with pytest.raises(ConfigError, match="is not a valid path.*null byte.*--recd @path/to/recd.toml"):
        RecDConfig.from_string(flag)


def test_a_latin1_toml_file_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "recd.toml"
    path.write_bytes('[recd.groups.u]\nfeatures = ["café"]\n'.encode("latin-1"))
    with pytest.raises(ConfigError, match=r"recd.toml' is not UTF-8 text \(byte 0xe9 at offset \d+\).*save it as UTF-8"):
        RecDConfig.load(f"@{path}")


_FLAG_NAMES = st.sampled_from(["groups", "towers", "features", "key", "u", "", "fae", "hot_set", "window", "tables",
                               "verify_batches", "probe_batches", "in_workers", "sharded", "enabled", "x y"])
_FLAG_VALUES = st.one_of(
    st.sampled_from(["true", "off", "a", "a,b", "1", "-1", "", " ", '"q"', "@", "x.toml"]),
    st.text(alphabet="-0123456789²٣①,.;=aé \x00\n", max_size=6),
)
_FLAG_ITEMS = st.tuples(st.lists(_FLAG_NAMES, min_size=1, max_size=4).map(".".join), _FLAG_VALUES).map("=".join)
_FLAGS = st.one_of(st.lists(_FLAG_ITEMS, max_size=5).map("; ".join),
                   st.text(alphabet="=;.,- \"'ab1²", max_size=20))


@PROPERTY
@given(_FLAGS)
def test_any_flag_string_parses_or_raises_config_error(text: str) -> None:
    try:
        config = RecDConfig.from_string(text)
    except ConfigError:
        return
    assert isinstance(config.enabled, bool)
    if config.enabled:
        config.validate()  # what parsed is valid by the same rules


_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-3, 3), st.floats(allow_nan=True), st.text(max_size=4),
                     st.binary(max_size=2))
_NAMES = st.sampled_from(["groups", "towers", "features", "key", "u", "", "fae", "hot_set", "window", "tables",
                          "verify_batches", "probe_batches", "in_workers", "sharded", "enabled", "recd"])
_TREES = st.recursive(_SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                        st.dictionaries(_NAMES, inner, max_size=4)), max_leaves=12)


@PROPERTY
@given(st.dictionaries(_NAMES, _TREES, max_size=5) | _TREES)
def test_any_parsed_toml_tree_builds_or_raises_config_error(data: Any) -> None:
    try:
        RecDConfig.from_dict(data)
    except ConfigError:
        pass


# ------------------------------------------------------------------------------------------
# Item 20: a RecDConfig built in code.


def test_config_built_with_groups_is_on_and_equals_the_flag() -> None:
    built = RecDConfig(groups=[USER_GROUP], towers={"user_tower": "user"}, probe_batches=0)
    assert built.enabled
    assert built == RecDConfig.from_string(
        "groups.user.key=session_id; groups.user.features=user_id,history; towers.user_tower=user; probe_batches=0")
    assert not RecDConfig().enabled
    assert not RecDConfig(groups=[USER_GROUP], enabled=False).enabled
    assert RecDConfig(fae=FAEConfig(hot_set=Path("out/hot.npz"))).fae.hot_set == "out/hot.npz"  # type: ignore[union-attr]


def test_config_built_with_groups_switches_the_plugin_on() -> None:
    # Before: RecDConfig(groups=[...]) was off, and apply() returned the model untouched.
    model = RecModel()
    recd_plugin.apply(RecDConfig(groups=[USER_GROUP], probe_batches=0), model)
    assert type(model.ec) is DedupEmbeddingCollection
    recd_plugin.remove(model)


@pytest.mark.parametrize("make, pattern", [
    (lambda: RecDConfig(groups=[USER_GROUP], verify_batches="x"), r"'verify_batches' must be an integer .*got 'x'"),
    (lambda: RecDConfig(verify_batches="x"), r"'verify_batches' must be an integer"),  # off, still checked
    (lambda: RecDConfig(groups=[USER_GROUP], probe_batches=-1), r"'probe_batches' must be an integer >= 0"),
    (lambda: RecDConfig(groups=[USER_GROUP], in_workers="yes"), r"'in_workers' must be true or false, got 'yes'"),
    (lambda: RecDConfig(groups=[USER_GROUP], sharded="no"), r"'sharded' must be true or false"),
    (lambda: RecDConfig(groups=[USER_GROUP], enabled="false"), r"'enabled' must be true or false"),
    (lambda: RecDConfig(groups=["user"]), r"groups must be a list of FeatureGroup.*FeatureGroup\('user'"),
    (lambda: RecDConfig(groups=USER_GROUP), r"groups must be a list of FeatureGroup"),
    (lambda: RecDConfig(groups=[USER_GROUP], towers={"user_tower": 5}), r"'towers' must map module paths"),
    (lambda: RecDConfig(groups=[USER_GROUP], towers={"user_tower": "usr"}), r"reads group 'usr'.*did you mean 'user'"),
    (lambda: RecDConfig(groups=[USER_GROUP, FeatureGroup("s", ["history"])]), r"'history' is in groups"),
    (lambda: RecDConfig(enabled=True), r"names no feature group"),
    (lambda: RecDConfig(groups=[USER_GROUP], fae="hot.npz"), r"fae must be an instance of FAEConfig.*FAEConfig\(hot_set="),
    (lambda: FAEConfig(hot_set=5), r"fae needs 'hot_set'"),
    (lambda: FAEConfig(hot_set="h.npz", window=-1), r"fae 'window' must be an integer >= 0"),
    (lambda: FAEConfig(hot_set="h.npz", tables=[1]), r"fae 'tables' must be a list of table names"),
])
def test_config_built_in_code_is_checked_when_built(make: Callable[[], Any], pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        make()


@pytest.mark.parametrize("make, pattern", [
    (lambda: FeatureGroup("u", ["a", None]), r"features and key are feature names.*got None"),
    (lambda: FeatureGroup("u", ["a"], key=7), r"got 7"),
    (lambda: FeatureGroup("u", 5), r"got 5"),
    (lambda: FeatureGroup("u", ["a"], key=""), r"got ''"),
    (lambda: DedupSpec(["u"]), r"DedupSpec takes FeatureGroup objects, got 'u'"),
])
def test_feature_groups_built_in_code_are_checked(make: Callable[[], Any], pattern: str) -> None:
    with pytest.raises(RecDError, match=pattern):
        make()


def test_a_config_edited_after_it_was_built_is_checked_at_apply() -> None:
    model = RecModel()
    before = snapshot(model)
    config = RecDConfig(groups=[USER_GROUP], probe_batches=0)
    config.verify_batches = "x"  # type: ignore[assignment]
    with pytest.raises(ConfigError, match="'verify_batches' must be an integer"):
        recd_plugin.apply(config, model, [session_batch(0)])
    assert_same(before, snapshot(model))


def test_apply_leaves_the_callers_config_as_it_was() -> None:
    """The group decision is kept with the model, never written into the caller's config."""
    config = RecDConfig.from_string(USER_FLAG.replace("; probe_batches=0", "") + "; towers.user_tower=user")
    before = (list(config.groups), dict(config.towers), config.enabled, config.sharded)
    recd_plugin.apply(config, RecModel(), [session_batch(0)])
    assert (config.groups, config.towers, config.enabled, config.sharded) == before
