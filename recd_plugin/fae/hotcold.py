"""FAE's hot/cold embedding layout: hot rows in fast memory, cold rows in host memory.

``HotColdEmbeddingBagCollection`` replaces chosen tables of a TorchRec
``EmbeddingBagCollection`` (EBC) by two tensors per group of same-dim tables: a *hot tier*
(the hot set's rows, on ``device``: the GPU when there is one) and a *cold tier* (every other
row, in host memory: CPU). Each row lives in exactly one tier. Tables the hot set does not
name keep their original ``nn.EmbeddingBag`` (the same module object). Use it through
:func:`convert_hot_cold`, which swaps every EBC of a model in place and returns the undo::

    from recd_plugin.fae.hotset import HotSet
    from recd_plugin.fae.hotcold import convert_hot_cold

    hot = HotSet.load("out/hot.npz")
    undo = convert_hot_cold(model, hot, device=torch.device("cuda"))   # before the optimizer
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ...train...                      # outputs and gradients equal the plain EBC's
    model.state_dict()               # the original keys: embedding_bags.<table>.weight [N, D]
    undo()                           # the original EBCs are back, trained weights written in

What stays the same: the output ``KeyedTensor`` (keys, order, values for SUM and MEAN
pooling, per-sample weights for weighted SUM tables), the gradients (each row's gradient
lands in the tier that holds it), the state_dict keys and shapes (exported by assembling the
tiers; ``load_state_dict`` takes the original layout too). What changes: the parameters
(``hot_g0``, ``cold_g0``, ...: build the optimizer after converting) and the original EBC's
converted weights are released while converted (no double memory; undo restores them).

Devices: on a CPU-only machine both tiers are host memory and the layout only has to cost
nothing. On a GPU, the hot tier sits in HBM and the cold tier in CPU memory; the cold rows'
partial pools are computed on the CPU and copied over (``[bags, D]``, small). fbgemm's UVM
(``torch.ops.fbgemm.new_managed_tensor``) would let the GPU read the cold tier directly; it
is CUDA-only and not used here. Convert *after* ``model.to(device)`` (``.to`` would move the
cold tier too).

Hot-row synchronization (``sync``): FAE keeps a copy of the hot rows in the CPU table and
copies them between tiers when its scheduler switches between all-hot and mixed batches.
Here each row has one home and mixed batches read hot rows from the hot tier, so there is no
replica and no copy to make: both tiers are always consistent, and ``sync()`` is a
documented no-op kept so a scheduler can call it at every switch.

An all-hot batch never touches the cold tier (no lookup, no gradient); ``tier_lookups``
counts the lookups per tier.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchrec.modules.embedding_configs import PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingBagCollectionInterface
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from recd_plugin.errors import HotSetError, UnsupportedModelError
from recd_plugin.fae.hotset import HotSet, TableShape
from recd_plugin.modules.base import DedupModule
from recd_plugin.sparse.ikjt import complete_cumsum, expand_rows


def ebc_tables(ebc: EmbeddingBagCollection) -> Dict[str, TableShape]:
    """{table: TableShape} of an EBC (from its weights: rows, dim, element size)."""
    return {c.name: TableShape(c.num_embeddings, c.embedding_dim,
                               ebc.embedding_bags[c.name].weight.element_size())
            for c in ebc.embedding_bag_configs()}


@dataclass
class _Group:
    """Converted tables sharing one dim and dtype: one hot and one cold tensor."""

    name: str
    tables: List[str] = field(default_factory=list)
    rows: List[int] = field(default_factory=list)  # per table
    hot: List[torch.Tensor] = field(default_factory=list)  # per table: sorted hot ids [H_t]
    features: List[int] = field(default_factory=list)  # indices into the flat feature list
    feature_table: List[int] = field(default_factory=list)  # per feature: index into tables
    mean: List[bool] = field(default_factory=list)  # per feature

    def hot_base(self, i: int) -> int:
        return sum(len(h) for h in self.hot[:i])

    def cold_base(self, i: int) -> int:
        return sum(self.rows[:i]) - self.hot_base(i)


class HotColdEmbeddingBagCollection(EmbeddingBagCollectionInterface):
    """An EBC whose chosen tables are split into a hot tier (``device``) and a cold tier (CPU).

    Args:
        ebc: the EBC to copy (left unchanged; :func:`convert_hot_cold` swaps and releases).
        hot_set: the hot rows; its shapes must match the EBC's tables (else HotSetError).
        tables: tables to split (default: every table of ``ebc`` the hot set names).
        device: hot tier device (default: where ``ebc``'s weights are).

    Input: KJT (plain or RecD IKJT), batch B. Output: ``KeyedTensor`` [B, sum of dims], the
    same keys and values as ``ebc(features)``.
    """

    def __init__(self, ebc: EmbeddingBagCollection, hot_set: HotSet, tables: Optional[Sequence[str]] = None,
                 device: Optional[torch.device] = None) -> None:
        super().__init__()
        shapes = ebc_tables(ebc)
        chosen = [t for t in shapes if t in hot_set.tables] if tables is None else list(tables)
        for t in chosen:
            if t not in hot_set.tables:
                raise HotSetError(f"table {t!r} is not in the hot set (it has {sorted(hot_set.tables)}); "
                                  "profile that table or leave it out of `tables`")
            if t not in shapes:
                raise HotSetError(f"table {t!r} is not a table of this EmbeddingBagCollection "
                                  f"(it has {sorted(shapes)})")
        # Profiled shapes for tables elsewhere in the model, this EBC's real shapes for its own.
        hot_set.check_tables({**hot_set.tables, **shapes})
        self._is_weighted = ebc.is_weighted()
        self._embedding_bag_configs = ebc.embedding_bag_configs()
        self._embedding_names: List[str] = list(ebc._embedding_names)
        self._lengths_per_embedding: List[int] = list(ebc._lengths_per_embedding)
        self._flat: List[str] = [f for c in self._embedding_bag_configs for f in c.feature_names]
        self._table_of: List[str] = [c.name for c in self._embedding_bag_configs for _ in c.feature_names]
        self.embedding_bags = nn.ModuleDict({t: ebc.embedding_bags[t] for t in shapes if t not in chosen})
        self._plain: List[int] = []  # flat feature indices read by untouched tables
        self._groups: List[_Group] = []
        by_key: Dict[tuple, _Group] = {}
        fi = 0
        for c in self._embedding_bag_configs:
            for _ in c.feature_names:
                if c.name not in chosen:
                    self._plain.append(fi)
                else:
                    if c.pooling not in (PoolingType.SUM, PoolingType.MEAN):
                        raise UnsupportedModelError(f"table {c.name!r}: pooling {c.pooling} is not supported by "
                                                    "the hot/cold layout (SUM and MEAN are); leave it out of `tables`")
                    if self._is_weighted and c.pooling == PoolingType.MEAN:
                        raise UnsupportedModelError(f"table {c.name!r}: weighted MEAN pooling; torch's "
                                                    "embedding_bag takes per-sample weights for SUM only, so the "
                                                    "original EBC cannot run this table either")
                    w = ebc.embedding_bags[c.name].weight
                    g = by_key.get((c.embedding_dim, w.dtype))
                    if g is None:
                        g = by_key[(c.embedding_dim, w.dtype)] = _Group(f"g{len(self._groups)}")
                        self._groups.append(g)
                    if c.name not in g.tables:
                        g.tables.append(c.name)
                        g.rows.append(c.num_embeddings)
                        g.hot.append(torch.from_numpy(hot_set.rows.get(c.name, np.zeros(0, np.int64))))
                    g.features.append(fi)
                    g.feature_table.append(g.tables.index(c.name))
                    g.mean.append(c.pooling == PoolingType.MEAN)
                fi += 1
        self.tier_lookups: Dict[str, int] = {"hot": 0, "cold": 0}
        self.cold_ids = 0  # ids served by the cold tier since construction
        for g in self._groups:
            src = [ebc.embedding_bags[t].weight.detach() for t in g.tables]
            dev = device if device is not None else src[0].device
            hot = torch.cat([w[h.to(w.device)] for w, h in zip(src, g.hot)]).to(dev)
            cold = torch.cat([w[self._cold_mask(g, i).to(w.device)] for i, w in enumerate(src)]).to("cpu")
            self.register_parameter(f"hot_{g.name}", nn.Parameter(hot))
            self.register_parameter(f"cold_{g.name}", nn.Parameter(cold))
            # Global ids: table i's row r is gid base[i] + r. The hot gids, sorted, plus a sentinel
            # (the group's row count) are all the remap needs; see _pool for why not a table.
            base = np.cumsum([0] + g.rows[:-1])
            gids = torch.cat([h + int(b) for h, b in zip(g.hot, base)] + [torch.tensor([sum(g.rows)])])
            self.register_buffer(f"_gids_{g.name}", gids.to(dev), persistent=False)
            self.register_buffer(f"_base_{g.name}", torch.tensor([int(base[t]) for t in g.feature_table],
                                                                 device=dev), persistent=False)
            self.register_buffer(f"_rows_{g.name}", torch.tensor([g.rows[t] for t in g.feature_table],
                                                                 device=dev), persistent=False)
        self.register_state_dict_post_hook(_original_key_order)
        self.train(ebc.training)

    # -- TorchRec's EBC interface ------------------------------------------------------------

    def embedding_bag_configs(self) -> list:
        return self._embedding_bag_configs

    def is_weighted(self) -> bool:
        return self._is_weighted

    def sync(self) -> None:
        """No-op: every row lives in exactly one tier, so the tiers never disagree (module doc)."""

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        kjt, inverse_of = DedupModule.inverse_of(features)
        keys = kjt.keys()
        where = {k: i for i, k in enumerate(keys)}
        missing = [f for f in self._flat if f not in where]
        if missing:
            raise UnsupportedModelError(f"the input KJT lacks feature(s) {missing} (it has {keys})")
        pooled: List[Optional[torch.Tensor]] = [None] * len(self._flat)
        if self._plain:  # untouched tables: exactly TorchRec's path
            jt = kjt.to_dict()
            for fi in self._plain:
                f = jt[self._flat[fi]]
                bag = self.embedding_bags[self._table_of[fi]]
                pooled[fi] = bag(input=f.values(), offsets=f.offsets(),
                                 per_sample_weights=f.weights() if self._is_weighted else None).float()
        for g in self._groups:
            # The group's features as one jagged slice: a view when they are adjacent in the
            # KJT in table order (the usual case), else a permuted copy.
            idx = [where[self._flat[fi]] for fi in g.features]
            contiguous = idx == list(range(idx[0], idx[0] + len(idx)))
            sub = kjt if contiguous else kjt.permute(idx)
            a = idx[0] if contiguous else 0
            b = a + len(idx)
            strides = sub.stride_per_key()
            sub_strides = strides[a:b]
            row0, row1 = sum(strides[:a]), sum(strides[:b])
            opk = sub.offset_per_key()
            v0, v1 = opk[a], opk[b]
            offsets = sub.offsets()[row0:row1 + 1]
            values = sub.values()[v0:v1]
            weights = sub.weights()[v0:v1] if self._is_weighted else None
            out = self._pool(g, values, offsets - v0 if v0 else offsets, weights,
                             sub.length_per_key()[a:b], sub_strides)
            for fi, p in zip(g.features, out.split(sub_strides)):
                pooled[fi] = p.float()
        if inverse_of is not None:  # RecD IKJT: pooled unique rows -> one row per sample
            pooled = [expand_rows(p, inverse_of[self._flat[fi]]) for fi, p in enumerate(pooled)]
        return KeyedTensor(keys=self._embedding_names, values=torch.cat(pooled, dim=1),
                           length_per_key=self._lengths_per_embedding)

    def _pool(self, g: _Group, values: torch.Tensor, offsets: torch.Tensor, weights: Optional[torch.Tensor],
              counts: List[int], strides: List[int]) -> torch.Tensor:
        """Pool one group. values [V] ids, offsets [bags + 1], counts/strides per feature
        (ids / bags). Returns [bags, D]: hot partial sum + cold partial sum (MEAN: / length)."""
        hot_w, cold_w = getattr(self, f"hot_{g.name}"), getattr(self, f"cold_{g.name}")
        gids = getattr(self, f"_gids_{g.name}")
        dev = gids.device
        values, offsets = values.to(dev, torch.long), offsets.to(dev, torch.long)
        n = values.numel()
        counts_t = torch.tensor(counts, device=dev)
        limit = torch.repeat_interleave(getattr(self, f"_rows_{g.name}"), counts_t, output_size=n)
        if n and bool(((values < 0) | (values >= limit)).any()):
            raise self._range_error(g, values, limit, counts)
        gid = values + torch.repeat_interleave(getattr(self, f"_base_{g.name}"), counts_t, output_size=n)
        # Remap by binary search over the sorted hot gids: memory is the hot set only (a
        # table-sized int32 remap costs 4 bytes x every row: 400 MB for a 10^8-row table) and
        # at Criteo batch sizes it is no slower than the table gather (log2(H) ~ 17 steps per id
        # on a cache-resident array vs one cache miss per id into a table-sized array).
        # pos = #hot gids below gid: hot slot if gid is hot, else its cold slot is gid - pos.
        pos = torch.searchsorted(gids, gid)
        is_hot = gids.index_select(0, pos) == gid
        hot_cum = complete_cumsum(is_hot)
        hot_offsets = hot_cum.index_select(0, offsets)
        n_hot = int(hot_cum[-1])
        n_cold = n - n_hot
        pooled: Optional[torch.Tensor] = None
        if n_hot or not n_cold:
            sel = is_hot.nonzero().squeeze(1)
            pooled = _BagSum.apply(hot_w, pos.index_select(0, sel), hot_offsets,
                                   None if weights is None else weights.to(dev).index_select(0, sel))
            self.tier_lookups["hot"] += 1
        if n_cold:  # skipped for all-hot batches: the cold tier is never read nor gets a gradient
            sel = (~is_hot).nonzero().squeeze(1)
            cdev = cold_w.device
            cold = _BagSum.apply(cold_w, (gid - pos).index_select(0, sel).to(cdev), (offsets - hot_offsets).to(cdev),
                                 None if weights is None else weights.index_select(0, sel.to(weights.device)).to(cdev))
            cold = cold.to(dev)
            pooled = cold if pooled is None else pooled + cold
            self.tier_lookups["cold"] += 1
            self.cold_ids += n_cold
        assert pooled is not None
        if any(g.mean):
            lengths = (offsets[1:] - offsets[:-1]).clamp(min=1)
            if not all(g.mean):
                is_mean = torch.repeat_interleave(torch.tensor(g.mean, device=dev), torch.tensor(strides, device=dev))
                lengths = torch.where(is_mean, lengths, torch.ones_like(lengths))
            pooled = pooled / lengths.unsqueeze(1).to(pooled.dtype)
        return pooled

    def _range_error(self, g: _Group, values: torch.Tensor, limit: torch.Tensor, counts: List[int]) -> HotSetError:
        bad = int(((values < 0) | (values >= limit)).nonzero()[0])
        k = int(np.searchsorted(np.cumsum(counts), bad, side="right"))
        table = g.tables[g.feature_table[k]]
        return HotSetError(f"feature {self._flat[g.features[k]]!r}: id {int(values[bad])} is outside table "
                           f"{table!r} (rows 0..{g.rows[g.feature_table[k]] - 1}); fix the input ids or the "
                           "table config (the plain EBC would fail on it too)")

    # -- the original single-table layout ------------------------------------------------------

    def _locate(self, table: str) -> tuple:
        for g in self._groups:
            if table in g.tables:
                return g, g.tables.index(table)
        raise KeyError(f"table {table!r} is not split into tiers (split tables: {self.hot_cold_tables})")

    @staticmethod
    def _cold_mask(g: _Group, i: int) -> torch.Tensor:
        mask = torch.ones(g.rows[i], dtype=torch.bool)
        mask[g.hot[i]] = False
        return mask  # [N] True for cold rows

    @property
    def hot_cold_tables(self) -> List[str]:
        return [t for g in self._groups for t in g.tables]

    def _tiers(self, g: _Group, i: int, grad: bool = False) -> tuple:
        hot, cold = getattr(self, f"hot_{g.name}"), getattr(self, f"cold_{g.name}")
        if grad:
            if hot.grad is None and cold.grad is None:
                return None
            hot = hot.grad if hot.grad is not None else torch.zeros_like(hot)
            cold = cold.grad if cold.grad is not None else torch.zeros_like(cold)
        hb, cb, h = g.hot_base(i), g.cold_base(i), len(g.hot[i])
        return hot[hb:hb + h], cold[cb:cb + g.rows[i] - h]

    def table_weight(self, table: str, grad: bool = False) -> Optional[torch.Tensor]:
        """Table ``table`` in the original layout, [N, D] on the CPU (a copy assembled from the
        tiers). ``grad=True``: its gradient the same way (None before any backward)."""
        g, i = self._locate(table)
        tiers = self._tiers(g, i, grad)
        if tiers is None:
            return None
        hot, cold = (t.detach().cpu() for t in tiers)
        full = torch.empty(g.rows[i], hot.shape[1], dtype=hot.dtype)
        full[g.hot[i]] = hot
        full[self._cold_mask(g, i)] = cold
        return full

    @torch.no_grad()
    def load_table(self, table: str, weight: torch.Tensor) -> None:
        """Scatter an original-layout table [N, D] into the tiers."""
        g, i = self._locate(table)
        hot, cold = self._tiers(g, i)
        weight = weight.detach().cpu()
        hot.copy_(weight[g.hot[i]])
        cold.copy_(weight[self._cold_mask(g, i)])

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        # Instead of the tier parameters: the original EBC's keys and full tables.
        for t in self.hot_cold_tables:
            destination[f"{prefix}embedding_bags.{t}.weight"] = self.table_weight(t)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, local_metadata: dict, strict: bool,
                              missing_keys: List[str], unexpected_keys: List[str], error_msgs: List[str]) -> None:
        for t in self.hot_cold_tables:
            key = f"{prefix}embedding_bags.{t}.weight"
            if key not in state_dict:
                missing_keys.append(key)
                continue
            w = state_dict.pop(key)  # popped: embedding_bags (untouched tables only) must not see it
            g, i = self._locate(t)
            want = (g.rows[i], getattr(self, f"hot_{g.name}").shape[1])
            if tuple(w.shape) != want:
                error_msgs.append(f"size mismatch for {key}: copying a param with shape {tuple(w.shape)}, "
                                  f"the table is {want}")
                continue
            self.load_table(t, w)
        if strict:
            unexpected_keys.extend(k for k in state_dict if k.startswith(prefix)
                                   and k[len(prefix):].split(".", 1)[0] not in self._modules)

    def extra_repr(self) -> str:
        parts = []
        for g in self._groups:
            hot, cold = getattr(self, f"hot_{g.name}"), getattr(self, f"cold_{g.name}")
            parts.append(f"{g.name}: tables={g.tables} hot={tuple(hot.shape)}@{hot.device} "
                         f"cold={tuple(cold.shape)}@{cold.device}")
        return "\n".join(parts)

    @torch.no_grad()
    def write_back(self, ebc: EmbeddingBagCollection) -> None:
        """Copy the split tables into ``ebc``'s weights (re-allocated if they were released)."""
        for t in self.hot_cold_tables:
            w = ebc.embedding_bags[t].weight
            w.data = self.table_weight(t).to(w.device)


def _original_key_order(module: HotColdEmbeddingBagCollection, state_dict: dict, prefix: str, _meta: dict) -> None:
    """The module's keys come last in ``state_dict``: re-insert them in the original table order."""
    for c in module.embedding_bag_configs():
        key = f"{prefix}embedding_bags.{c.name}.weight"
        if key in state_dict:
            state_dict[key] = state_dict.pop(key)


def convert_hot_cold(model: nn.Module, hot_set: HotSet, tables: Optional[List[str]] = None,
                     device: Optional[torch.device] = None) -> Callable[[], None]:
    """Swap every ``EmbeddingBagCollection`` of ``model`` that holds hot-set tables for a
    :class:`HotColdEmbeddingBagCollection`, in place; returns the undo.

    Everything is checked first (tables, shapes: a stale hot set raises HotSetError and
    nothing changes). Converted tables of the original EBCs are released until undo, which
    writes the trained weights back and puts the original modules back at every path.
    """
    if isinstance(model, EmbeddingBagCollection):
        raise UnsupportedModelError("pass the model that contains the EmbeddingBagCollection: it is swapped "
                                    "in its parent")
    for name, m in model.named_modules():
        if type(m).__module__.startswith("torchrec.distributed"):
            raise UnsupportedModelError(f"module {name!r} is already sharded; convert the unsharded model")
    found = [(p, m) for p, m in model.named_modules(remove_duplicate=False) if isinstance(m, EmbeddingBagCollection)]
    shapes: Dict[str, TableShape] = {}
    for _, m in found:
        shapes.update(ebc_tables(m))
    hot_set.check_tables(shapes)
    chosen = list(hot_set.tables) if tables is None else list(tables)
    for t in chosen:
        if t not in hot_set.tables:
            raise HotSetError(f"table {t!r} is not in the hot set (it has {sorted(hot_set.tables)}); profile it "
                              "or leave it out of `tables`")
    new: Dict[int, HotColdEmbeddingBagCollection] = {}
    for _, m in found:  # build all (and so validate all) before the first swap
        mine = [t for t in ebc_tables(m) if t in chosen]
        if mine and id(m) not in new:
            new[id(m)] = HotColdEmbeddingBagCollection(m, hot_set, mine, device)
    originals = {id(m): m for _, m in found}
    for key, hc in new.items():
        for t in hc.hot_cold_tables:  # the tiers hold these rows now
            w = originals[key].embedding_bags[t].weight
            w.data = w.data.new_empty((0, w.shape[1]))
    swapped = [(p, m) for p, m in found if id(m) in new]
    for p, m in swapped:
        _set_submodule(model, p, new[id(m)])
    done = [False]

    def undo() -> None:
        if done[0]:
            return
        done[0] = True
        for key, hc in new.items():
            hc.write_back(originals[key])
            originals[key].train(hc.training)
        for p, m in swapped:
            _set_submodule(model, p, m)

    return undo


def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, module)
