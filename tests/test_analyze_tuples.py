"""recd-plugin analyze on logged impressions whose user is a *tuple* of categorical features (no
user id, no session column; issue 21): the content search finds the tuple, refuses what is
merely popular or independent, and the flag it prints trains exactly as plugin-off."""

from __future__ import annotations

import copy
import json
import re
from itertools import combinations
from pathlib import Path
from typing import List, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection

import recd_plugin
from recd_plugin.analyze.advice import advise_recd
from recd_plugin.analyze.recd import CONTENT_MAX_U, content_group, search_content, tuple_key, unique_fraction
from recd_plugin.analyze.sources import load_sample, row_codes
from recd_plugin.cli import main
from recd_plugin.config import RecDConfig
from recd_plugin.data import TableBatches

#: Values of each user feature (a handful, as logged-bandit data's hashed user features).
CARDS = (3, 4, 6, 8, 5, 7)
ITEMS = 80
POSITIONS = 3


def _zipf(rng: np.random.Generator, n: int, size: int, exponent: float = 1.0) -> np.ndarray:
    """``size`` draws of 0..n-1 with probability proportional to 1 / (rank + 1) ** exponent."""
    w = 1.0 / np.arange(1, n + 1) ** exponent
    return rng.choice(n, size=size, p=w / w.sum())


def tuple_impressions(path: Path, rows: int = 10_000, k: int = 4, entities: int = 160, seed: int = 0,
                      items: int = ITEMS, item_entity: bool = False) -> Path:
    """Logged impressions without a user id or a session column.

    The user is the tuple of ``k`` categorical features (``user_feature_0..k-1``, a handful of
    values each): ``entities`` distinct tuples, Zipf-popular, one per row in random order, so
    within a batch the rows repeat as whole tuples while each feature (and each pair) alone
    looks nearly independent of the others. Per row: a Zipf-popular ``item_id`` (``items``, a
    popular id that repeats within batches on its own), a ``position`` (1..3), a ``click``
    depending on the user and the item, and a ``timestamp``. ``item_entity``: also an
    ``item_genre`` determined by the item (a second entity, independent of the user).
    """
    rng = np.random.default_rng(seed)
    pool = np.stack([rng.integers(0, c, size=8 * entities) for c in CARDS[:k]], axis=1)
    _, first = np.unique(pool, axis=0, return_index=True)
    users = pool[np.sort(first)[:entities]]  # distinct tuples, in random order
    user = _zipf(rng, entities, rows)
    item = _zipf(rng, items, rows, 1.1)
    logit = rng.normal(0, 1, entities)[user] + rng.normal(0, 1, items)[item] - 1.0
    columns = {f"user_feature_{j}": users[user, j].astype(np.int64) for j in range(k)}
    columns.update({"item_id": item.astype(np.int64),
                    "position": rng.integers(1, POSITIONS + 1, size=rows).astype(np.int64),
                    "click": (rng.random(rows) < 1 / (1 + np.exp(-logit))).astype(np.int64),
                    "timestamp": np.sort(rng.integers(1_600_000_000, 1_600_086_400, size=rows))})
    if item_entity:
        columns["item_genre"] = (item * 7) % 12
    pq.write_table(pa.table(columns), path)
    return path


USER = [f"user_feature_{j}" for j in range(4)]


def test_the_tuple_is_found_without_an_id_column(tmp_path: Path) -> None:
    s = load_sample(str(tuple_impressions(tmp_path / "t.parquet")), progress=False)
    assert s.session_key is None and "click" not in s.sparse and "timestamp" not in s.sparse
    g = content_group(s, batch_sizes=(256, 1024))
    assert g is not None and g.key is None and g.features == USER
    u = g.at(1024, "stored")
    assert 0.08 <= u <= 0.2
    # Each feature alone and each pair repeat far more than the tuple: no column (nor pair)
    # determines the others, the entity is the tuple.
    codes = {c: row_codes(s.table.column(c)) for c in USER}
    assert all(g.per_feature[c] <= 0.01 for c in USER)  # 3 to 8 values per batch
    assert all(unique_fraction(tuple_key([codes[a], codes[b]]), 1024) <= 0.05 for a, b in combinations(USER, 2))
    search = g.search
    assert search is not None and set(search.considered) == set(USER) | {"item_id", "position"}
    chosen = search.chosen
    assert chosen is not None and chosen.features == tuple(USER) and chosen.ratio < 0.75
    # Tried before it (more work saved on paper): groups holding an independent part.
    for t in search.tried[:-1]:
        assert not t.entity and set(t.split) & {"item_id", "position"}
    rec = advise_recd(s, g, 1024, 0.5)
    assert rec.recommended and rec.flag == "groups.repeated.features=" + ",".join(USER)
    assert f"{u:.3f} as stored" in rec.why[1]  # advised on the u training reads (stored order)
    text = " ".join(rec.why)
    assert "columns considered" in text and "user_feature_0 0.003" in text
    assert f"{{{', '.join(USER)}}} u={chosen.u:.3f}: one entity" in text
    assert "the job decides" in text and "`meta`" in text


def test_popular_ids_and_independent_columns_form_no_group(tmp_path: Path) -> None:
    """A popular item id, a position and a few independent low-cardinality columns all repeat
    within batches, alone and together; none moves with another: no group."""
    rng = np.random.default_rng(1)
    rows = 8192
    t = pa.table({"item_id": _zipf(rng, 80, rows, 1.1), "ad_id": _zipf(rng, 300, rows, 1.2),
                  "position": rng.integers(1, 4, rows), "weekday": rng.integers(0, 7, rows),
                  "device": rng.integers(0, 3, rows), "label": rng.random(rows).astype(np.float32)})
    pq.write_table(t, tmp_path / "p.parquet")
    s = load_sample(str(tmp_path / "p.parquet"), progress=False)
    search = search_content(s)
    assert len(search.considered) == 5 and search.tried and search.chosen is None
    assert content_group(s) is None
    rec = advise_recd(s, None, 1024, 0.5, search=search)
    assert not rec.recommended and "RecD does not apply" in rec.why[0]
    assert "5 columns repeat within batches" in rec.why[1] and "none is one entity" in rec.why[1]
    assert "columns considered" in rec.why[2] and "independent of the rest" in rec.why[3]


def test_two_independent_entities_are_not_one_group(tmp_path: Path) -> None:
    """The user tuple and a popular item with its genre: each repeats as a tuple, and together
    they save more rows on paper, but the item part is independent of the user part."""
    path = tuple_impressions(tmp_path / "t.parquet", entities=40, items=10, item_entity=True)
    search = search_content(load_sample(str(path), progress=False))
    assert search.chosen is not None and search.chosen.features == tuple(USER)
    mixed = [t for t in search.tried if set(t.features) & {"item_id", "item_genre"} and set(t.features) & set(USER)]
    assert mixed and all(not t.entity for t in mixed)
    assert all(t.saved > search.chosen.saved for t in mixed)


def test_advice_follows_the_jobs_keep_rule(tmp_path: Path) -> None:
    """One rule: RecD is recommended exactly where the prediction passes the job's ``keeps``;
    elsewhere no flag, and `why` says the job decides and what would change the prediction."""
    from recd_plugin.analyze.advice import Advice
    from recd_plugin.analyze.route import RouteCosts, predict
    from recd_plugin.transforms.route import KEEP_BELOW, keeps

    s = load_sample(str(tuple_impressions(tmp_path / "t.parquet")), progress=False)
    g = content_group(s, batch_sizes=(1024,))
    u = g.at(1024, "stored")
    costs = RouteCosts(1024, 64, expand_ms=2.0, loader_ms=1.0)
    for f in np.linspace(0.0, 1.0, 21):
        for step_ms in (None, 4.0, 40.0):
            rec = advise_recd(s, g, 1024, float(f), costs, step_ms)
            rel = (1 - f) + f * u + (0.0 if step_ms is None else costs.expand_ms / step_ms)
            assert rec.recommended == keeps(rel, 1.0) == (predict(float(f), u, costs, step_ms).route == "dedup")
    rec = advise_recd(s, g, 1024, 0.02)  # saves under 1 - KEEP_BELOW of the step: the job keeps plain
    assert 0.02 * (1 - u) < 1 - KEEP_BELOW and not rec.recommended and rec.flag == ""
    assert Advice([rec], 1024).flag == "off"
    assert "keep rule" in rec.why[-1] and "--dedup-share" in rec.why[-1] and rec.gain.startswith("none")


# ---------------------------------------------------------------------------------------------
# The printed flag trains: analyze -> flag -> apply on a TorchRec model, losses equal plugin-off.

SPARSE = USER + ["item_id", "position"]
BATCH = 256


class _Ranker(nn.Module):
    """An EmbeddingBagCollection over every categorical column, then an MLP to a click logit.
    Tables as analyze describes the model without --model (one per feature, named after it,
    dim 16), so a hot set it may write for FAE fits them too."""

    def __init__(self, cards: Sequence[int], dim: int = 16) -> None:
        super().__init__()
        self.ebc = EmbeddingBagCollection(tables=[
            EmbeddingBagConfig(name=f, embedding_dim=dim, num_embeddings=n, feature_names=[f],
                               pooling=PoolingType.SUM) for f, n in zip(SPARSE, cards)])
        self.mlp = nn.Sequential(nn.Linear(dim * len(SPARSE), 16), nn.ReLU(), nn.Linear(16, 1))

    def forward(self, batch) -> torch.Tensor:
        pooled = self.ebc(batch.sparse_features)
        return self.mlp(torch.cat([pooled[f] for f in SPARSE], dim=1)).squeeze(-1)


def _train(model: nn.Module, loader) -> List[float]:
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    for b in loader:
        opt.zero_grad()
        loss = nn.functional.binary_cross_entropy_with_logits(model(b), b.labels)
        loss.backward()
        opt.step()
        losses.append(float(loss))
    return losses


def test_the_printed_flag_trains_exactly_as_plugin_off(tmp_path: Path, capsys) -> None:
    data = tuple_impressions(tmp_path / "t.parquet")
    assert main(["analyze", str(data), "--out", str(tmp_path / "o"), "--no-progress",
                 "--batch-size", str(BATCH)]) == 0
    out = capsys.readouterr().out
    flag = re.search(r'^flag: --recd "(.*)"$', out, re.M).group(1)
    assert "groups.repeated.features=" + ",".join(USER) in flag.split("; ")
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["content_search"]["chosen"] == USER
    assert "Content search" in (tmp_path / "o" / "report.html").read_text()
    table = pq.read_table(data)
    batches = list(TableBatches(table, BATCH, SPARSE, dense_features=[], label="click"))
    cards = [int(pa.compute.max(table.column(f)).as_py()) + 1 for f in SPARSE]
    torch.manual_seed(0)
    base = _Ranker(cards)
    plain = _train(copy.deepcopy(base), batches)
    assert len(plain) == len(batches) == 40
    # The group deduplicated on every step, and the flag exactly as printed (the route decided on
    # the job's own first steps): the same losses either way.
    for f in (flag + "; route=dedup", flag):
        model, loader = recd_plugin.apply(RecDConfig.from_string(f), copy.deepcopy(base), batches)
        torch.testing.assert_close(torch.tensor(_train(model, loader)), torch.tensor(plain), rtol=0, atol=1e-5)
        decided = recd_plugin.decisions(model)
        assert decided is not None and [d.group for d in decided] == ["repeated"]
        recd_plugin.remove(model)


def test_content_bound_is_the_advice_bound() -> None:
    from recd_plugin.analyze.advice import RECD_MAX_U

    assert CONTENT_MAX_U == RECD_MAX_U  # a group found by content is one the advice can recommend
