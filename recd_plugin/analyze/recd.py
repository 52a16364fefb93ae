"""RecD on your data: unique fraction of the session-level feature group per batch size.

::

    from recd_plugin.analyze.sources import load_sample
    from recd_plugin.analyze.recd import analyze_groups
    g = analyze_groups(load_sample("movielens-100k"))
    g.stored, g.clustered     # unique fraction u at BATCH_SIZES, as stored / sorted by session

The *unique fraction* u of a feature group at batch size B is what the IKJT keeps: batches of
B consecutive rows, per batch the number of distinct session keys (the group is deduplicated
by its key, ``groups.NAME.key``), summed over batches and divided by the rows. This is the
definition ``DedupStats.unique_fraction`` (the dedup benchmark's u) uses, the last partial
batch included. Three row orders are measured:

* **stored**: the rows as they are in the data (what the plugin sees if you feed the files
  in order);
* **clustered**: stably sorted by the session key (``recd-plugin preprocess`` writes this
  layout; RecD's data-generation step);
* **shuffled**: a random permutation (``--seed``): what a pipeline that shuffles samples
  gets, the reason RecD clusters sessions first.

Data without a session key column can still repeat features by content: logged impressions
of one user carry the same user features row after row, whether a user id names the user or
the user *is* the tuple of a few categorical features (no id column at all).
:func:`search_content` finds such a group from the tuples themselves (section "Content
groups" below); the plugin compares its rows by content (a group without ``key``). Data where
nothing repeats together (criteo-synthetic: one independent impression per row, ids popular
one by one) has no group: RecD does not apply, and both return None.

Content groups
--------------

Candidates are the sparse columns that repeat within batches (own u at batch 1024 at most
``CONTENT_MAX_U``). Every combination of two or more of them whose tuples still repeat (joint
u at most ``CONTENT_MAX_U``: two rows or more per unique tuple) is measured. They are tried in
the order of the work deduplication saves, (1 - u) x the group's per-row cost (embedding
floats per row: ids per row x dim), and the first that is **one entity** is the group. One
entity: no part of the group is independent of the rest. Scattering a part within its batch
(one random permutation of each batch's rows for the part's columns: each column keeps its
values per batch, only the rows they sit on change) must raise the group's unique rows by more
than 1 / ``CONTENT_TOGETHER`` and beyond noise (``CONTENT_NOISE_Z``); a part independent of
the rest (a popular item id next to the user's features, a position, a second entity) leaves
them as they were, up to noise.

This needs no column that determines the others (a user id): four user features of a handful
of values each, whose pairs look nearly independent, still move together as a tuple. It
refuses what is merely popular: one column alone is no group (FAE's case), and popular ids
side by side are independent parts. The combinations are measured on the first
``SEARCH_BATCHES`` batches; every group tried is reported (:class:`ContentSearch`) with its u
and verdict, and the chosen one is measured again on the whole sample.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from itertools import combinations
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from recd_plugin.analyze.sources import DataSample, row_codes

BATCH_SIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)


def unique_fraction(keys: np.ndarray, batch_size: int) -> float:
    """Distinct ``keys`` per batch of ``batch_size`` consecutive rows, summed over batches,
    divided by the rows (nan for no rows)."""
    n = int(keys.size)
    if n == 0:
        return float("nan")
    batch = np.arange(n, dtype=np.int64) // batch_size
    order = np.lexsort((keys, batch))  # rows grouped by batch, keys sorted within it
    k, b = keys[order], batch[order]
    new = np.ones(n, dtype=bool)
    new[1:] = (k[1:] != k[:-1]) | (b[1:] != b[:-1])
    return float(new.sum() / n)


#: A column is a content-group candidate while it repeats within batches (own u at batch 1024
#: at most this), and a group while its tuples do (joint u at most this: 2 rows per unique row).
CONTENT_MAX_U = 0.5
#: A group is one entity when scattering any part of it within batches raises its unique rows
#: by more than 1 / this (an independent part leaves them as they were, up to noise) ...
CONTENT_TOGETHER = 0.9
#: ... and by more than this many standard deviations of the noise: the distinct count of a
#: random arrangement varies by at most sqrt(count), the difference of two by sqrt(2 count).
CONTENT_NOISE_Z = 4.0
#: Candidates combined in every subset; beyond, the most entangled ones (pairwise) only.
CONTENT_EXHAUSTIVE = 10
#: Groups of at most this many columns are checked split by split; larger ones column by column.
CONTENT_SPLITS = 8
#: Batches of the stored order the search measures on (the chosen group: the whole sample).
SEARCH_BATCHES = 32


@dataclass
class GroupReport:
    """The session-level feature group and its unique fractions (lists aligned with
    ``batch_sizes``; nan where the sample has fewer rows than the batch). ``key`` is None for
    a group found by content (no session key column)."""

    name: str
    key: Optional[str]
    features: List[str]
    rows: int
    sessions: int
    batch_sizes: List[int]
    stored: List[float]
    clustered: List[float]
    shuffled: List[float]
    per_feature: Dict[str, float] = field(default_factory=dict)  # distinct values per row, B=1024
    search: Optional["ContentSearch"] = None  # how a group found by content was found

    def at(self, batch_size: int, order: str = "clustered") -> float:
        """u at ``batch_size`` (one of ``batch_sizes``) in ``order``."""
        return getattr(self, order)[self.batch_sizes.index(batch_size)]

    def mean_rows_per_session(self) -> float:
        return self.rows / max(self.sessions, 1)


def analyze_groups(sample: DataSample, batch_sizes=BATCH_SIZES, seed: int = 0,
                   name: str = "session") -> Optional[GroupReport]:
    """Unique fractions of the session-level group of ``sample``; None without a session key."""
    if sample.session_key is None or not sample.session_columns:
        return None
    key = row_codes(sample.table.column(sample.session_key))
    per_feature = {c: unique_fraction(row_codes(sample.table.column(c)), min(1024, key.size))
                   for c in sample.session_columns}
    return GroupReport(name=name, key=sample.session_key, features=list(sample.session_columns),
                       rows=int(key.size), sessions=int(np.unique(key).size), batch_sizes=list(batch_sizes),
                       **_curves(key, batch_sizes, seed), per_feature=per_feature)


def _curves(key: np.ndarray, batch_sizes: Sequence[int], seed: int) -> Dict[str, List[float]]:
    """u of ``key`` at each batch size: as stored, clustered (stable sort), shuffled (``seed``)."""
    orders = {"stored": key, "clustered": key[np.argsort(key, kind="stable")],
              "shuffled": key[np.random.default_rng(seed).permutation(key.size)]}
    return {o: [unique_fraction(k, b) if b <= k.size else float("nan") for b in batch_sizes]
            for o, k in orders.items()}


_MIX = (0xBF58476D1CE4E5B9, 0x94D049BB133111EB)


def _mix(codes: np.ndarray, salt: int) -> np.ndarray:
    """uint64 [N]: splitmix64 of ``codes + salt``. A bijection that spreads each column's codes
    (``salt`` per column) over 64 bits, so the wrapping sum over a tuple's columns identifies
    the tuple: two different tuples collide with probability about 2^-64."""
    with np.errstate(over="ignore"):
        z = codes.astype(np.int64, copy=False).view(np.uint64) + np.uint64(salt)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(_MIX[0])
        z = (z ^ (z >> np.uint64(27))) * np.uint64(_MIX[1])
        return z ^ (z >> np.uint64(31))


def _salts(count: int, seed: int) -> List[int]:
    return [int(s) for s in np.random.default_rng(seed).integers(1, 2**63, size=count)]


def tuple_key(columns: Sequence[np.ndarray], seed: int = 0) -> np.ndarray:
    """int64 [N]: one code per row of the tuple of ``columns`` (row codes), equal tuples ->
    equal codes (a 64-bit hash; collisions about 2^-64 per pair of tuples)."""
    key = np.zeros(columns[0].size, dtype=np.uint64)
    for col, salt in zip(columns, _salts(len(columns), seed)):
        key += _mix(col, salt)
    return key.view(np.int64)


class _Tuples:
    """Unique fractions of column tuples on the first ``rows`` rows, in batches of ``batch_size``;
    also with a part of the tuple *scattered*: its columns read through one random permutation
    of each batch's rows, so they keep their values per batch but not the rows they sit on."""

    def __init__(self, codes: Mapping[str, np.ndarray], rows: int, batch_size: int, seed: int) -> None:
        salts = _salts(len(codes) + 1, seed)
        batch = np.arange(rows, dtype=np.int64) // batch_size
        self.rows = rows
        self.hashes = {c: _mix(v[:rows], s) for (c, v), s in zip(codes.items(), salts[1:])}
        self.batch = _mix(batch, salts[0])  # in every key: distinct (batch, tuple) pairs are counted
        # Batches are consecutive rows, so sorting by (batch, random) permutes within batches.
        self.scatter = np.lexsort((np.random.default_rng(seed).random(rows), batch))
        self._cache: Dict[Tuple[Tuple[str, ...], Tuple[str, ...]], float] = {}

    def u(self, group: Sequence[str], scattered: Sequence[str] = ()) -> float:
        key = (tuple(group), tuple(scattered))
        if key not in self._cache:
            h = self.batch.copy()
            for c in group:
                h += self.hashes[c][self.scatter] if c in scattered else self.hashes[c]
            self._cache[key] = np.unique(h).size / max(self.rows, 1)
        return self._cache[key]


@dataclass
class TriedGroup:
    """One combination of columns the content search tried (u on the search rows)."""

    features: Tuple[str, ...]
    u: float
    saved: float                           # (1 - u) x the group's per-row cost: what dedup saves
    split: Optional[Tuple[str, ...]] = None  # a part independent of the rest; None: one entity
    ratio: float = float("nan")            # u / u with `split` scattered; for an entity the largest over its splits

    @property
    def entity(self) -> bool:
        return self.split is None

    def describe(self) -> str:
        head = f"{{{', '.join(self.features)}}} u={self.u:.3f}"
        if self.entity:
            return (f"{head}: one entity (scattering any part multiplies its unique rows by {1 / self.ratio:.2f}x "
                    "or more)")
        noise = " (within noise)" if self.ratio <= CONTENT_TOGETHER else ""
        return (f"{head}: {', '.join(self.split)} independent of the rest (scattered: unique rows x"
                f"{1 / self.ratio:.2f}{noise})")


@dataclass
class ContentSearch:
    """What :func:`search_content` measured: every column's own u (whole sample), the
    candidates, and the groups tried, most work saved first (the chosen one last)."""

    batch_size: int
    rows: int                   # rows the combinations were measured on (the sample's first)
    own: Dict[str, float]       # every sparse column's own u at batch_size
    considered: List[str]       # own u <= CONTENT_MAX_U: they repeat within batches
    combined: List[str]         # the candidates combined (the most entangled beyond CONTENT_EXHAUSTIVE)
    repeating: int              # combinations of 2+ columns whose tuples repeat (u <= CONTENT_MAX_U)
    tried: List[TriedGroup] = field(default_factory=list)

    @property
    def chosen(self) -> Optional[TriedGroup]:
        return self.tried[-1] if self.tried and self.tried[-1].entity else None

    def verdict(self) -> str:
        """One line: why no group was found."""
        n, bound = len(self.considered), CONTENT_MAX_U
        if not n:
            return f"no column repeats within batches (own u > {bound:g} at batch {self.batch_size} for every one)"
        if not self.tried:
            return (f"{n} columns repeat within batches, but no combination of two or more repeats as a tuple "
                    f"(joint u > {bound:g})")
        return (f"{n} columns repeat within batches and {self.repeating} combinations of them repeat as tuples, but "
                "none is one entity: each holds a part independent of the rest (popular ids, independent values)")

    def why(self, shown: int = 6) -> List[str]:
        """Two lines for the advice: the columns considered, and the groups tried."""
        b, bound = self.batch_size, CONTENT_MAX_U
        others = [c for c in self.own if c not in self.considered]
        cols = (f"columns considered (own u at batch {b} <= {bound:g}: they repeat within batches): "
                + (", ".join(f"{c} {self.own[c]:.3f}" for c in self.considered) or "none")
                + (f"; not considered (u > {bound:g}): " + ", ".join(f"{c} {self.own[c]:.3f}" for c in others)
                   if others else ""))
        if self.combined != self.considered:
            cols += (f"; combined: the {len(self.combined)} that move most with another one: "
                     f"{', '.join(self.combined)}")
        if not self.tried:
            return [cols, f"groups tried: none: no combination of two or more of them repeats as a tuple "
                          f"(joint u <= {bound:g} on the first {self.rows:,} rows)"]
        tried = self.tried if len(self.tried) <= shown else self.tried[:shown - 1] + self.tried[-1:]
        more = len(self.tried) - len(tried)
        return [cols, f"groups tried on the first {self.rows:,} rows, most work saved ((1 - u) x per-row cost) "
                      f"first, of {self.repeating} combinations whose tuples repeat (joint u <= {bound:g}): "
                      + "; ".join(t.describe() for t in tried) + (f" ({more} more not shown)" if more else "")]


def row_costs(sample: DataSample, dims: Optional[Mapping[str, int]] = None) -> Dict[str, float]:
    """Embedding floats per row of every sparse column: mean ids per row x its table's dim
    (``dims``; 1 each without), the work deduplicating the column's rows saves."""
    from recd_plugin.data.columns import JaggedColumn

    out = {}
    for c in sample.sparse:
        col = JaggedColumn.from_arrow(sample.table.column(c), c)
        ids = 1.0 if col.offsets is None else col.values.size / max(sample.rows, 1)
        out[c] = ids * (dims or {}).get(c, 1)
    return out


def search_content(sample: DataSample, cost: Optional[Mapping[str, float]] = None, seed: int = 0) -> ContentSearch:
    """Find the columns that repeat together by content (module section "Content groups").

    ``cost``: per-row cost of each column (:func:`row_costs`, the default), which ranks the
    groups by the work their deduplication saves.
    """
    b = min(1024, sample.rows)
    if b == 0:
        return ContentSearch(0, 0, {}, [], [], 0)
    codes = {c: row_codes(sample.table.column(c)) for c in sample.sparse}
    own = {c: unique_fraction(codes[c], b) for c in sample.sparse}
    considered = [c for c in sample.sparse if own[c] <= CONTENT_MAX_U]
    rows = min(sample.rows, SEARCH_BATCHES * b)
    tuples = _Tuples({c: codes[c] for c in considered}, rows, b, seed)
    combined = considered if len(considered) <= CONTENT_EXHAUSTIVE else _most_entangled(tuples, considered)
    repeating = _repeating_groups(tuples, combined)
    cost = cost if cost is not None else row_costs(sample)
    saved = {g: (1.0 - u) * sum(cost.get(c, 1.0) for c in g) for g, u in repeating.items()}
    search = ContentSearch(b, rows, own, considered, combined, len(repeating))
    for g in sorted(repeating, key=lambda g: (-saved[g], -len(g), g)):
        search.tried.append(_one_entity(tuples, g, repeating[g], saved[g]))
        if search.tried[-1].entity:
            break
    return search


def _most_entangled(tuples: _Tuples, columns: List[str], keep: int = CONTENT_EXHAUSTIVE) -> List[str]:
    """The ``keep`` columns that move most with some other one (lowest pair u / u with one of
    the two scattered), in data order: too many candidates to combine every subset."""
    score = {c: 1.0 for c in columns}
    for a, b in combinations(columns, 2):
        r = tuples.u((a, b)) / tuples.u((a, b), (b,))
        score[a], score[b] = min(score[a], r), min(score[b], r)
    best = set(sorted(columns, key=lambda c: (score[c], columns.index(c)))[:keep])
    return [c for c in columns if c in best]


def _repeating_groups(tuples: _Tuples, columns: Sequence[str]) -> Dict[Tuple[str, ...], float]:
    """Joint u of every combination of two or more ``columns`` whose tuples repeat (u at most
    ``CONTENT_MAX_U``). A combination over the bound is not extended: more columns never repeat more."""
    found: Dict[Tuple[str, ...], float] = {}

    def grow(group: Tuple[str, ...], start: int) -> None:
        for i in range(start, len(columns)):
            g = group + (columns[i],)
            u = tuples.u(g)
            if u > CONTENT_MAX_U:
                continue
            if len(g) > 1:
                found[g] = u
            grow(g, i + 1)

    grow((), 0)
    return found


def _one_entity(tuples: _Tuples, group: Tuple[str, ...], u: float, saved: float) -> TriedGroup:
    """``group`` checked split by split (single columns first; column by column only beyond
    ``CONTENT_SPLITS`` columns): the first part whose scattering leaves the group's unique rows
    within 1 / ``CONTENT_TOGETHER`` is independent of the rest."""
    if len(group) > CONTENT_SPLITS:
        parts: List[Tuple[str, ...]] = [(c,) for c in group]
    else:  # a part and its complement are one split: each once (the first column stands for the rest)
        rest = group[1:]
        parts = [(group[0],)] + [p for k in range(1, len(rest)) for p in combinations(rest, k)]
    worst, d = 0.0, u * tuples.rows
    for part in parts:
        scattered = tuples.u(group, part) * tuples.rows
        if not _moves_together(d, scattered):
            return TriedGroup(group, u, saved, part, d / scattered)
        worst = max(worst, d / scattered)
    return TriedGroup(group, u, saved, None, worst)


def _moves_together(distinct: float, scattered: float) -> bool:
    """A group's distinct (batch, tuple) pairs ``distinct`` vs ``scattered`` with a part
    scattered: fewer by ``CONTENT_TOGETHER`` and by more than the noise of two random
    arrangements (``CONTENT_NOISE_Z`` x sqrt(2 x count): occupancy counts vary less than Poisson)."""
    return (distinct <= CONTENT_TOGETHER * scattered
            and scattered - distinct >= CONTENT_NOISE_Z * math.sqrt(2.0 * scattered))


def content_report(sample: DataSample, search: ContentSearch, batch_sizes=BATCH_SIZES, seed: int = 0,
                   name: str = "repeated") -> Optional[GroupReport]:
    """The unique fractions of the group ``search`` chose, on the whole sample (None: no group)."""
    if search.chosen is None:
        return None
    group = sorted(search.chosen.features, key=sample.sparse.index)
    key = tuple_key([row_codes(sample.table.column(c)) for c in group], seed)
    return GroupReport(name=name, key=None, features=group, rows=int(key.size),
                       sessions=int(np.unique(key).size), batch_sizes=list(batch_sizes),
                       **_curves(key, batch_sizes, seed), per_feature={c: search.own[c] for c in group},
                       search=search)


def content_group(sample: DataSample, batch_sizes=BATCH_SIZES, seed: int = 0, name: str = "repeated",
                  cost: Optional[Mapping[str, float]] = None) -> Optional[GroupReport]:
    """Columns that repeat together by content within batches of the stored order (no key
    column): :func:`search_content` then :func:`content_report`. None when no such group exists."""
    return content_report(sample, search_content(sample, cost, seed), batch_sizes, seed, name)


def amdahl_bound(f: float, u: float) -> float:
    """RecD's speed-up bound 1 / ((1 - f) + f * u): a share ``f`` of the step time is
    deduplicable work, which shrinks to the unique fraction ``u`` of the rows."""
    return 1.0 / ((1.0 - f) + f * u)
