"""FAE switched on by the plugin's one flag: ``fae.hot_set=...; fae.window=...``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig

import recd_plugin
from recd_plugin import RecDConfig
from recd_plugin.data.criteo import criteo_batches
from recd_plugin.errors import ConfigError, HotSetError, UnsupportedModelError
from recd_plugin.fae.hotcold import HotColdEmbeddingBagCollection
from recd_plugin.fae.hotset import HotSet, TableShape

ROWS, FIELDS = 50, ["C1", "C2", "C3"]


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ebc = EmbeddingBagCollection(tables=[
            EmbeddingBagConfig(name=f"t_{f}", embedding_dim=4, num_embeddings=ROWS, feature_names=[f]) for f in FIELDS])

    def forward(self, kjt):
        return torch.cat([v for v in self.ebc(kjt).to_dict().values()], dim=1).sum(dim=1)


def _batches():
    out = []
    for b in criteo_batches(6, 32, seed=1, max_rows=ROWS):
        kjt = b.sparse_features
        keep = [k for k in kjt.keys() if k in FIELDS]
        out.append(type(b)(dense_features=b.dense_features, sparse_features=kjt.permute([kjt.keys().index(k) for k in keep]),
                           labels=b.labels))
    return out


@pytest.fixture()
def hot_path(tmp_path: Path) -> Path:
    hot = HotSet({f"t_{f}": TableShape(ROWS, 4) for f in FIELDS},
                 {f"t_{f}": np.arange(0, ROWS, 3) for f in FIELDS}, budget_bytes=3 * 17 * 16)
    path = tmp_path / "hot.npz"
    hot.save(path)
    return path


def test_flag_turns_fae_on_and_remove_restores(hot_path: Path) -> None:
    torch.manual_seed(0)
    model, plain = Model(), Model()
    plain.load_state_dict(model.state_dict())
    batches = _batches()
    config = RecDConfig.from_string(f"fae.hot_set={hot_path}; fae.window=3; fae.force_layout=true")  # on cpu
    model, loader = recd_plugin.apply(config, model, batches)
    assert isinstance(model.ebc, HotColdEmbeddingBagCollection)
    seen = 0
    for b in loader:
        assert hasattr(b, "all_hot")
        torch.testing.assert_close(model(b.sparse_features), plain(b.sparse_features))
        seen += b.labels.numel()
    assert seen == sum(b.labels.numel() for b in batches)
    loader.check()  # conservation counters of the epoch
    recd_plugin.remove(model)
    assert type(model.ebc) is EmbeddingBagCollection
    torch.testing.assert_close(model.state_dict()["ebc.embedding_bags.t_C1.weight"],
                               plain.state_dict()["ebc.embedding_bags.t_C1.weight"])


def test_on_a_cpu_model_fae_leaves_the_plain_path_and_says_why(hot_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Never slower: a cpu model's tables have no faster tier for the hot rows, so the hot/cold
    layout (two lookups and a merge instead of one) and the scheduler are not built."""
    model, batches = Model(), _batches()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out, loader = recd_plugin.apply(RecDConfig.from_string(f"fae.hot_set={hot_path}; fae.window=3"), model, batches)
    assert type(out.ebc) is EmbeddingBagCollection and loader is batches
    assert "fae left on TorchRec's plain path" in capsys.readouterr().out
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    recd_plugin.remove(model)
    with pytest.raises(ConfigError, match="'force_layout' must be true or false"):
        RecDConfig.from_string(f"fae.hot_set={hot_path}; fae.force_layout=3")


def test_stale_hot_set_and_bad_fae_flags_are_refused_before_any_change(hot_path: Path, tmp_path: Path) -> None:
    stale = HotSet({"t_C1": TableShape(ROWS + 1, 4)}, {"t_C1": np.arange(3)}, budget_bytes=48)
    stale.save(tmp_path / "stale.npz")
    model = Model()
    with pytest.raises(HotSetError, match="stale hot set"):
        recd_plugin.apply(RecDConfig.from_string(f"fae.hot_set={tmp_path / 'stale.npz'}"), model)
    assert type(model.ebc) is EmbeddingBagCollection
    with pytest.raises(UnsupportedModelError, match="t_C9"):
        recd_plugin.apply(RecDConfig.from_string(f"fae.hot_set={hot_path}; fae.tables=t_C9"), model)
    with pytest.raises(HotSetError, match="not a readable hot set"):
        recd_plugin.apply(RecDConfig.from_string(f"fae.hot_set={tmp_path / 'missing.npz'}"), model)
    with pytest.raises(ConfigError, match="window"):
        RecDConfig.from_string(f"fae.hot_set={hot_path}; fae.window=-2")
    with pytest.raises(ConfigError, match="fae.*unknown key 'hot'"):
        RecDConfig.from_string("fae.hot=x")
    assert type(model.ebc) is EmbeddingBagCollection
