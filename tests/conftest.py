"""Shared helpers for the recd-plugin unit tests: random jagged batches, KJT comparison, a
small RecD-shaped model and session-structured ``Batch`` factories.

The hypothesis strategy ``jagged_cases`` draws a plain KJT together with a ``DedupSpec`` that
is *valid* for it (features of a key-group are constant within a key) and the expected
deduplication computed independently in plain Python (first-appearance numbering), so the
tests compare the library against a reference rather than against itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from hypothesis import event
from hypothesis import strategies as st
from torch import nn
from torchrec.datasets.utils import Batch
from torchrec.modules.embedding_configs import EmbeddingBagConfig, EmbeddingConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recd_plugin import DedupSpec, FeatureGroup

FEATURE_NAMES = ["f0", "f1", "f2", "f3", "f4", "f5"]
NUM_IDS = 8  # ids are drawn from [0, NUM_IDS): small, so rows repeat
WEIGHTS = [0.5, 1.0, 2.0, -1.5]

Row = Tuple[Tuple[int, float], ...]  # one bag: (id, weight) pairs


@dataclass
class JaggedCase:
    """A random plain KJT, a valid spec, and the reference dedup result."""

    kjt: KeyedJaggedTensor
    spec: DedupSpec
    batch: int
    rows: Dict[str, List[Row]]  # feature -> B bags
    group_of: Dict[str, Optional[str]]  # feature -> group name (None: ungrouped)
    expected_inverse: Dict[str, List[int]] = field(default_factory=dict)  # first-appearance
    expected_unique: Dict[str, int] = field(default_factory=dict)
    weighted: bool = False


def first_appearance(items: Sequence) -> List[int]:
    """Reference numbering: each distinct item gets the next id at its first appearance."""
    ids: Dict = {}
    return [ids.setdefault(x, len(ids)) for x in items]


def make_kjt(keys: Sequence[str], rows: Dict[str, List[Row]], weighted: bool,
             batch: int, lengths_dtype: torch.dtype = torch.long) -> KeyedJaggedTensor:
    values: List[int] = []
    weights: List[float] = []
    lengths: List[int] = []
    for k in keys:
        for bag in rows[k]:
            lengths.append(len(bag))
            values.extend(i for i, _ in bag)
            weights.extend(w for _, w in bag)
    return KeyedJaggedTensor(
        keys=list(keys),
        values=torch.tensor(values, dtype=torch.long),
        weights=torch.tensor(weights, dtype=torch.float32) if weighted else None,
        lengths=torch.tensor(lengths, dtype=lengths_dtype),
        stride=batch,
    )


def _bag(weighted: bool) -> st.SearchStrategy:
    pair = st.tuples(st.integers(0, NUM_IDS - 1), st.sampled_from(WEIGHTS) if weighted else st.just(1.0))
    return st.lists(pair, min_size=0, max_size=6).map(tuple)


@st.composite
def jagged_cases(draw, weighted: Optional[bool] = None, min_batch: int = 0, max_batch: int = 40,
                 allow_key_group: bool = True, allow_content_groups: bool = True,
                 int32_lengths: bool = True) -> JaggedCase:
    keys = draw(st.permutations(FEATURE_NAMES))[: draw(st.integers(1, 6))]
    # Batch sizes 0 and 1 get a fixed share (about 1/10 each) of the draws; the rest spread
    # over [2, max_batch].
    r = draw(st.integers(0, 9))
    batch = r if r < 2 and r >= min_batch else draw(st.integers(max(min_batch, 2), max_batch))
    weighted = draw(st.booleans()) if weighted is None else weighted
    bag = _bag(weighted)
    remaining = list(keys)
    rows: Dict[str, List[Row]] = {}
    group_of: Dict[str, Optional[str]] = {k: None for k in keys}
    groups: List[FeatureGroup] = []
    expected_inverse: Dict[str, List[int]] = {}

    def pooled_rows(n_features: int) -> List[Tuple[Row, ...]]:
        # A small pool of row tuples; samples pick from it, so whole tuples repeat, and the
        # pool entries may share some of their bags by chance (partial matches).
        pool = draw(st.lists(st.tuples(*[bag] * n_features), min_size=1, max_size=5))
        picks = draw(st.lists(st.integers(0, len(pool) - 1), min_size=batch, max_size=batch))
        return [pool[i] for i in picks]

    layouts = ["key", "content", "both"] * 2 + ["none"]
    layout = draw(st.sampled_from([x for x in layouts if (allow_key_group or "key" not in x)
                                   and (allow_content_groups or x not in ("content", "both"))] or ["none"]))
    # One group keyed by a one-id-per-sample key feature (a session id).
    if layout in ("key", "both"):
        key = remaining.pop(draw(st.integers(0, len(remaining) - 1)))
        feats = [f for f in remaining if draw(st.booleans())]
        remaining = [f for f in remaining if f not in feats]
        n_sessions = draw(st.integers(1, max(1, min(batch, 8))))
        session_ids = draw(st.lists(st.integers(0, NUM_IDS - 1), min_size=n_sessions,
                                    max_size=n_sessions, unique=True))
        key_weight = {s: draw(st.sampled_from(WEIGHTS)) if weighted else 1.0 for s in session_ids}
        sample_sessions = draw(st.lists(st.sampled_from(session_ids), min_size=batch, max_size=batch))
        if draw(st.booleans()):  # RecD's layout: the samples of a session are contiguous
            order = {s: i for i, s in reversed(list(enumerate(sample_sessions)))}
            sample_sessions.sort(key=order.__getitem__)
        rows[key] = [((s, key_weight[s]),) for s in sample_sessions]
        for f in feats:  # constant within a session: one row per session id
            per_session = {s: draw(bag) for s in session_ids}
            rows[f] = [per_session[s] for s in sample_sessions]
        name = "session"
        groups.append(FeatureGroup(name, feats, key=key))
        inv = first_appearance(sample_sessions)
        for f in [key] + feats:
            group_of[f] = name
            expected_inverse[f] = inv

    # Content-keyed groups over arbitrary remaining features.
    g = 0
    while layout in ("content", "both") and remaining and (g == 0 or draw(st.booleans())):
        size = draw(st.integers(1, len(remaining)))
        feats, remaining = remaining[:size], remaining[size:]
        samples = pooled_rows(len(feats))
        for j, f in enumerate(feats):
            rows[f] = [s[j] for s in samples]
            group_of[f] = f"content{g}"
        inv = first_appearance(samples)
        for f in feats:
            expected_inverse[f] = inv
        groups.append(FeatureGroup(f"content{g}", feats))
        g += 1

    for f in remaining:  # ungrouped: arbitrary rows, identity inverse
        rows[f] = [s[0] for s in pooled_rows(1)]
        expected_inverse[f] = list(range(batch))

    lengths_dtype = draw(st.sampled_from([torch.long, torch.int32])) if int32_lengths else torch.long
    kjt = make_kjt(keys, rows, weighted, batch, lengths_dtype)
    expected_unique = {f: (max(inv) + 1 if inv else 0) for f, inv in expected_inverse.items()}
    return JaggedCase(kjt, DedupSpec(groups), batch, rows, group_of, expected_inverse,
                      expected_unique, weighted)


def label_case(case: JaggedCase) -> None:
    """Record what a drawn case covers (shown by pytest --hypothesis-show-statistics)."""
    event("batch 0" if case.batch == 0 else "batch 1" if case.batch == 1 else "batch >= 2")
    dup = any(case.expected_unique[f] < case.batch for f in case.expected_unique)
    event("some group has duplicates" if dup else "no duplicates")
    event(f"groups: {sorted('key' if g.key else 'content' for g in case.spec.groups)}")
    event("weighted" if case.weighted else "unweighted")


def kjt_rows(kjt: KeyedJaggedTensor, feature: str) -> List[Row]:
    """Bags of one feature of a plain or variable-batch KJT, as python tuples.

    Reads lengths/values directly (TorchRec's ``to_dict`` fails on a plain batch-0 KJT).
    """
    strides = kjt.stride_per_key()
    k = kjt.keys().index(feature)
    lengths = kjt.lengths().long().tolist()
    row0 = sum(strides[:k])
    start = sum(lengths[:row0])
    values = kjt.values().tolist()
    w = kjt.weights_or_none()
    weights = w.tolist() if w is not None else [1.0] * len(values)
    out: List[Row] = []
    for n in lengths[row0:row0 + strides[k]]:
        out.append(tuple(zip(values[start:start + n], weights[start:start + n])))
        start += n
    return out


def assert_kjt_equal(actual: KeyedJaggedTensor, expected: KeyedJaggedTensor) -> None:
    """Exact equality of two plain KJTs: keys, stride, values, lengths, weights, dtypes."""
    assert actual.inverse_indices_or_none() is None
    assert not actual.variable_stride_per_key()
    assert actual.keys() == expected.keys()
    assert actual.stride() == expected.stride()
    assert actual.stride_per_key() == expected.stride_per_key()
    assert actual.values().dtype == expected.values().dtype
    assert actual.lengths().dtype == expected.lengths().dtype
    assert torch.equal(actual.values(), expected.values())
    assert torch.equal(actual.lengths(), expected.lengths())
    aw, ew = actual.weights_or_none(), expected.weights_or_none()
    assert (aw is None) == (ew is None)
    if ew is not None:
        assert aw.dtype == ew.dtype
        assert torch.equal(aw, ew)


# ------------------------------------------------------------------------------------------
# Session-structured batches and a small RecD-shaped model (user side + item side).

SPARSE = ["session_id", "user_id", "history", "item_id"]
DIM = 8
USER_GROUP = FeatureGroup("user", ("user_id", "history"), key="session_id")


def session_batch(seed: int, batch: int = 24, sessions: int = 5, max_history: int = 5,
                  per_sample_history: bool = False, dense_dim: int = 3) -> Batch:
    """A Batch whose user features are constant within a session (unless told otherwise).

    ``per_sample_history=True`` makes ``history`` differ between samples of one session: a
    feature that is wrongly declared session-constant.
    """
    g = torch.Generator().manual_seed(seed)
    session_of = torch.sort(torch.randint(0, sessions, (batch,), generator=g)).values
    session_ids = (session_of * 7 + seed) % 50
    user_of_session = torch.randint(0, 20, (sessions,), generator=g)
    hist_len = torch.randint(0, max_history + 1, (sessions,), generator=g)
    hist = [torch.randint(0, 30, (int(n),), generator=g) for n in hist_len]
    user_rows = [[int(user_of_session[s])] for s in session_of]
    hist_rows = [hist[int(s)].tolist() for s in session_of]
    if per_sample_history:
        hist_rows = [r + [i % 30] for i, r in enumerate(hist_rows)]
    item_rows = [[int(i)] for i in torch.randint(0, 30, (batch,), generator=g)]
    rows = {
        "session_id": [[int(s)] for s in session_ids],
        "user_id": user_rows,
        "history": hist_rows,
        "item_id": item_rows,
    }
    lengths = [len(r) for k in SPARSE for r in rows[k]]
    values = [v for k in SPARSE for r in rows[k] for v in r]
    kjt = KeyedJaggedTensor(keys=list(SPARSE), values=torch.tensor(values, dtype=torch.long),
                            lengths=torch.tensor(lengths, dtype=torch.long), stride=batch)
    return Batch(
        dense_features=torch.randn(batch, dense_dim, generator=g),
        sparse_features=kjt,
        labels=torch.randint(0, 2, (batch,), generator=g).float(),
    )


class Encoder(nn.Module):
    """Encoder-like: (x [B, L, D], mask [B, L]) -> (per-position [B, L, D], pooled [B, D])."""

    def __init__(self, dim: int = DIM) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, dim)
        self.rows_seen: List[int] = []

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        self.rows_seen.append(x.shape[0])
        h = torch.tanh(self.proj(x)) * mask.unsqueeze(-1)
        pooled = h.sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
        return h, pooled


class UserTower(nn.Module):
    """Dense user tower: [B, D] -> [B, D]."""

    def __init__(self, dim: int = DIM) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim))
        self.rows_seen: List[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.rows_seen.append(x.shape[0])
        return self.mlp(x)


class RecModel(nn.Module):
    """EBC (user_id, item_id) + EC (history) + user tower + sequence encoder + item tower."""

    def __init__(self, dim: int = DIM, dense_dim: int = 3, max_len: int = 6) -> None:
        super().__init__()
        self.max_len = max_len
        self.ebc = EmbeddingBagCollection(tables=[
            EmbeddingBagConfig(name="t_user", embedding_dim=dim, num_embeddings=20,
                               feature_names=["user_id"], pooling=PoolingType.SUM),
            EmbeddingBagConfig(name="t_item", embedding_dim=dim, num_embeddings=30,
                               feature_names=["item_id"], pooling=PoolingType.MEAN),
        ])
        self.ec = EmbeddingCollection(tables=[
            EmbeddingConfig(name="t_hist", embedding_dim=dim, num_embeddings=30,
                            feature_names=["history"]),
        ])
        self.user_tower = UserTower(dim)
        self.encoder = Encoder(dim)
        self.item_tower = nn.Linear(dim, dim)
        self.head = nn.Linear(3 * dim + dense_dim, 1)

    def forward(self, batch: Batch) -> torch.Tensor:
        kjt = batch.sparse_features
        pooled = self.ebc(kjt)
        seq = self.ec(kjt)["history"]
        x = seq.to_padded_dense(self.max_len)  # [B, L, D]
        lengths = seq.lengths().clamp(max=self.max_len)
        mask = torch.arange(self.max_len).unsqueeze(0) < lengths.unsqueeze(1)  # [B, L]
        _, hist = self.encoder(x, mask)
        user = self.user_tower(pooled["user_id"])
        item = self.item_tower(pooled["item_id"])
        z = torch.cat([user + hist, item, hist * item, batch.dense_features], dim=1)
        return self.head(z).squeeze(-1)


def sgd_losses(model: nn.Module, loader, loss_of=None, lr: float = 0.1) -> List[float]:
    """Per-step losses of plain SGD over ``loader``; ``loss_of(model, batch)`` (default: BCE of
    ``model(batch)`` against the batch's labels)."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    losses = []
    for b in loader:
        opt.zero_grad()
        loss = loss_of(model, b) if loss_of is not None else \
            nn.functional.binary_cross_entropy_with_logits(model(b), b.labels)
        loss.backward()
        opt.step()
        losses.append(float(loss))
    return losses


def has_hooks(model: nn.Module) -> List[str]:
    """Names of modules that carry any forward (pre-)hook."""
    return [
        name or "<root>"
        for name, m in model.named_modules()
        if m._forward_pre_hooks or m._forward_hooks
    ]
