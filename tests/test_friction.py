"""Small frictions users reported: ``recd_plugin.sharding`` reached as an attribute right after
``import recd_plugin`` (PEP 562), while the import itself stays lean (tests/test_layout.py);
batches other than TorchRec's ``Batch`` (its ``ModelInput``, dicts: the flag's ``batch_kjt``);
towers that draw randomness named at ``apply``, or refused (``tower_randomness = refuse``)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import recd_plugin


def _run(code: str) -> dict:
    """Run ``code`` in a fresh interpreter; it prints one JSON object on its last line."""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         cwd=Path(__file__).parent)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_sharding_is_reachable_as_an_attribute_but_not_loaded_by_the_import() -> None:
    result = _run(
        "import json, sys\n"
        "import recd_plugin\n"
        "before = 'recd_plugin.sharding' in sys.modules\n"
        "listed = 'sharding' in dir(recd_plugin)\n"
        "for_dmp = recd_plugin.sharding.for_dmp\n"
        "print(json.dumps({'before': before, 'listed': listed, 'name': for_dmp.__module__,\n"
        "                  'after': 'recd_plugin.sharding' in sys.modules,\n"
        "                  'same': recd_plugin.sharding is sys.modules['recd_plugin.sharding']}))\n")
    assert result == {"before": False, "listed": True, "name": "recd_plugin.sharding.planner", "after": True,
                      "same": True}


def test_only_the_lazy_subpackages_resolve_and_other_names_raise_as_before() -> None:
    result = _run(
        "import json, sys\n"
        "import recd_plugin\n"
        "print(json.dumps({'storage': recd_plugin.storage.DedupReader.__module__,\n"
        "                  'data': recd_plugin.data.__name__,\n"
        "                  'analyze': hasattr(recd_plugin, 'analyze'), 'cli': hasattr(recd_plugin, 'cli')}))\n")
    # The tooling sits above the public API: imported by name, never reached as an attribute.
    assert result == {"storage": "recd_plugin.storage.reader", "data": "recd_plugin.data", "analyze": False,
                      "cli": False}
    with pytest.raises(AttributeError, match="^module 'recd_plugin' has no attribute 'shardng'$"):
        recd_plugin.shardng  # noqa: B018
    assert {"data", "sharding", "storage"} <= set(dir(recd_plugin))


# -- batches that are not TorchRec's Batch: ModelInput, dicts, dataclasses (issue 18 item 6) ----


class _OnIdlist(torch.nn.Module):
    """A model over TorchRec's ``ModelInput`` (its test models' batch): the KJT is ``idlist_features``."""

    def __init__(self) -> None:
        super().__init__()
        from conftest import RecModel

        self.inner = RecModel()

    def forward(self, batch) -> torch.Tensor:
        from torchrec.datasets.utils import Batch

        return self.inner(Batch(batch.float_features, batch.idlist_features, batch.label))


def _model_inputs(n: int, idscore: bool = False) -> list:
    from torchrec.distributed.test_utils.test_model import ModelInput

    from conftest import session_batch

    out = []
    for s in range(n):
        b = session_batch(s, batch=32, sessions=4)
        out.append(ModelInput(float_features=b.dense_features, idlist_features=b.sparse_features,
                              idscore_features=b.sparse_features if idscore else None, label=b.labels))
    return out


def _losses(model: torch.nn.Module, loader, labels=lambda b: b.label) -> list:
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    out = []
    for b in loader:
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(b), labels(b))
        loss.backward()
        opt.step()
        out.append(float(loss))
    return out


FLAG = "groups.user.key=session_id; groups.user.features=user_id,history; towers.inner.user_tower=user"


@pytest.mark.parametrize("extra", ["", "; route=dedup"])
def test_torchrecs_model_input_batches_are_deduplicated_and_train_as_plugin_off(extra: str) -> None:
    import copy

    torch.manual_seed(0)
    base, batches = _OnIdlist(), _model_inputs(40)
    plain = _losses(copy.deepcopy(base), batches)
    model, loader = recd_plugin.apply(recd_plugin.RecDConfig.from_string(FLAG + extra), copy.deepcopy(base), batches)
    first = next(iter(loader))
    assert type(first).__name__ == "ModelInput" and recd_plugin.is_dedup(first.idlist_features)
    assert first.idscore_features is None and first.float_features is batches[0].float_features
    torch.testing.assert_close(torch.tensor(_losses(model, loader)), torch.tensor(plain), rtol=0, atol=1e-5)


def test_a_batch_with_two_kjts_needs_batch_kjt_and_names_the_choice() -> None:
    batches = _model_inputs(2, idscore=True)
    model, loader = recd_plugin.apply(recd_plugin.RecDConfig.from_string(FLAG + "; route=dedup"), _OnIdlist(), batches)
    with pytest.raises(recd_plugin.MalformedBatchError, match=r"several \(\['idlist_features', 'idscore_features'\]\).*"
                                                             r"batch_kjt=idlist_features"):
        next(iter(loader))
    recd_plugin.remove(model)
    model, loader = recd_plugin.apply(recd_plugin.RecDConfig.from_string(
        FLAG + "; route=dedup; batch_kjt=idlist_features"), _OnIdlist(), batches)
    first = next(iter(loader))
    assert recd_plugin.is_dedup(first.idlist_features) and first.idscore_features is batches[0].idscore_features
    recd_plugin.remove(model)


def test_dict_batches_take_the_field_the_flag_names() -> None:
    import copy

    from conftest import RecModel, session_batch
    from torchrec.datasets.utils import Batch

    class OnDict(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = RecModel()

        def forward(self, batch: dict) -> torch.Tensor:
            return self.inner(Batch(batch["dense"], batch["features"], batch["labels"]))

    torch.manual_seed(0)
    base = OnDict()
    batches = [{"dense": b.dense_features, "features": b.sparse_features, "labels": b.labels}
               for b in (session_batch(s, batch=32, sessions=4) for s in range(30))]
    plain = _losses(copy.deepcopy(base), batches, labels=lambda b: b["labels"])
    flag = FLAG + "; batch_kjt=features"
    model, loader = recd_plugin.apply(recd_plugin.RecDConfig.from_string(flag), copy.deepcopy(base), batches)
    got = _losses(model, loader, labels=lambda b: b["labels"])
    torch.testing.assert_close(torch.tensor(got), torch.tensor(plain), rtol=0, atol=1e-5)
    bad = recd_plugin.RecDConfig.from_string(FLAG + "; batch_kjt=sparse")
    model2, loader2 = recd_plugin.apply(bad, OnDict(), batches)
    with pytest.raises(recd_plugin.MalformedBatchError, match="batch_kjt names 'sparse'.*no field 'sparse'.*"
                                                             r"\['features'\]"):
        next(iter(loader2))
    recd_plugin.remove(model2)


# -- towers that draw randomness (issue 18 item 5) ----------------------------------------------


def _dropout_tower_model():
    from conftest import RecModel

    model = RecModel()
    model.user_tower.mlp.insert(1, torch.nn.Dropout(0.1))
    return model


def test_a_tower_with_dropout_is_named_at_apply(capsys: pytest.CaptureFixture) -> None:
    flag = "groups.user.key=session_id; groups.user.features=user_id,history; towers.user_tower=user"
    model, _ = recd_plugin.apply(recd_plugin.RecDConfig.from_string(flag), _dropout_tower_model(), [])
    out = capsys.readouterr().out
    assert "tower 'user_tower' draws randomness once per session" in out and "user_tower.mlp.1 (Dropout p=0.1)" in out
    assert "tower_randomness = refuse" in out
    recd_plugin.remove(model)


def test_tower_randomness_refuse_makes_it_an_error_before_anything_changes() -> None:
    from conftest import has_hooks

    flag = ("groups.user.key=session_id; groups.user.features=user_id,history; towers.user_tower=user; "
            "tower_randomness=refuse")
    model = _dropout_tower_model()
    with pytest.raises(recd_plugin.UnsupportedModelError, match=r"'user_tower' draws randomness in training "
                                                                r"\(user_tower.mlp.1 \(Dropout p=0.1\)\).*p to 0"):
        recd_plugin.apply(recd_plugin.RecDConfig.from_string(flag), model, [])
    assert has_hooks(model) == []
    with pytest.raises(recd_plugin.ConfigError, match="'tower_randomness' must be one of"):
        recd_plugin.RecDConfig.from_string(flag.replace("refuse", "never"))
