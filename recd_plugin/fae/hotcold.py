"""FAE's hot/cold embedding layout: hot rows in fast memory, cold rows in host memory.

``HotColdEmbeddingBagCollection`` replaces chosen tables of a TorchRec
``EmbeddingBagCollection`` (EBC) by a *hot tier* (the hot set's rows of all chosen tables of
one dim, one tensor on ``device``: the GPU when there is one) and a *cold tier* (every other
row, one tensor per table, in host memory: CPU). Each row lives in exactly one tier. Tables
the hot set does not name keep their original ``nn.EmbeddingBag`` (the same module object).
Use it through :func:`convert_hot_cold`, which swaps every EBC of a model in place::

    from recd_plugin.fae.hotset import HotSet
    from recd_plugin.fae.hotcold import convert_hot_cold

    hot = HotSet.load("out/hot.npz")
    undo = convert_hot_cold(model, hot, device=torch.device("cuda"))   # before the optimizer
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ...train...                      # outputs and gradients equal the plain EBC's
    model.state_dict()               # the original keys: embedding_bags.<table>.weight [N, D]
    undo()                           # the original EBCs are back, trained weights written in

Unchanged: the output ``KeyedTensor`` (keys, order, values for SUM and MEAN pooling,
per-sample weights on weighted SUM tables), the gradients (each row's gradient lands in the
tier that holds it), the state_dict keys and shapes (assembled from the tiers on save,
scattered into them on load). Changed: the parameters (``hot_g0`` [H, D], ``cold_<table>``
[N - H_table, D]: build the optimizer *after* converting); the original EBC's converted
weights are released while converted (no double memory; undo re-creates them); and a tier
that a batch does not read gets a None gradient where torch's dense one is all zeros. For
SGD and Adagrad without momentum or weight decay that is the same step; with momentum, Adam
or weight decay, the unread tier skips that step (as with any sparse-gradient layout).

Devices: on a CPU-only machine both tiers are host memory and the layout must cost nothing
(one lookup for all hot ids instead of one per table pays for the remap). On a GPU the hot
tier sits in HBM and the cold tables in CPU memory; cold partial pools are computed on the
CPU and copied over (``[bags, D]``, small). fbgemm's UVM (``new_managed_tensor``) would let
the GPU read the cold tier in place; it is CUDA-only and not used here. Convert *after*
``model.to(device)`` (``.to`` would move the cold tier too).

Hot-row synchronization: FAE keeps a replica of the hot rows in its CPU tables and copies
them between tiers when its scheduler switches between all-hot and mixed batches. Here each
row has one home and mixed batches read their hot rows from the hot tier, so there is no
replica and nothing to copy: the tiers are consistent by construction, and :meth:`sync` is a
no-op kept so a scheduler may call it at every switch.

An all-hot batch never touches the cold tier (no lookup, no gradient): ``tier_lookups``
counts lookups per tier and ``cold_ids`` the ids the cold tier served.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn
from torchrec.modules.embedding_configs import PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingBagCollectionInterface
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from recd_plugin.errors import ConfigError, HotSetError, UnsupportedModelError, did_you_mean
from recd_plugin.fae.hotset import HotSet, TableShape
from recd_plugin.fae.lookup import bag_sum, build_remap, cold_pools, split_tiers
from recd_plugin.modules.base import DedupModule
from recd_plugin.modules.swap import swap_modules
from recd_plugin.sparse.ids import first_bad_id
from recd_plugin.sparse.ikjt import expand_rows


def ebc_tables(ebc: EmbeddingBagCollection) -> Dict[str, TableShape]:
    """{table: TableShape} of an EBC (rows, dim and element size of its weights)."""
    return {c.name: TableShape(c.num_embeddings, c.embedding_dim, ebc.embedding_bags[c.name].weight.element_size())
            for c in ebc.embedding_bag_configs()}


class _Group:
    """Split tables of one dim and dtype: one hot tensor, gids = table base + row."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.tables: List[str] = []
        self.rows: List[int] = []  # per table
        self.hot: List[torch.Tensor] = []  # per table: sorted hot row ids [H_t] int64
        self.features: List[int] = []  # flat feature indices, in output order
        self.table_of: List[int] = []  # per feature: index into tables
        self.mean: List[bool] = []  # per feature
        self.table_remap = True  # remap kind, see lookup.split_tiers

    def hot_range(self, i: int) -> Tuple[int, int]:
        start = sum(len(h) for h in self.hot[:i])
        return start, start + len(self.hot[i])

    def cold_mask(self, i: int) -> torch.Tensor:
        mask = torch.ones(self.rows[i], dtype=torch.bool)
        mask[self.hot[i]] = False
        return mask  # [N] True on cold rows


#: The remap kinds of HotColdEmbeddingBagCollection (see its docstring).
REMAPS = ("auto", "table", "search")


def _check_arguments(tables: Optional[Sequence[str]], remap: object) -> None:
    """ConfigError for a remap kind or a ``tables`` argument the constructor cannot take,
    before any table is copied (a string would be split into one-letter table names)."""
    if not isinstance(remap, str) or remap not in REMAPS:
        hint = did_you_mean(remap, REMAPS) if isinstance(remap, str) else ""
        raise ConfigError(f"HotColdEmbeddingBagCollection: remap must be one of {list(REMAPS)}, got {remap!r}{hint}; "
                          "'auto' (the default) picks 'table' on CPU or when its remap array takes less memory "
                          "than the hot rows, 'search' avoids that array")
    if isinstance(tables, str):
        raise ConfigError(f"HotColdEmbeddingBagCollection: tables must be a list of table names, got the string "
                          f"{tables!r}; write tables=[{tables!r}] (or None for every table of the hot set)")


class HotColdEmbeddingBagCollection(EmbeddingBagCollectionInterface):
    """An EBC whose chosen tables are split into a hot tier (``device``) and a cold tier (CPU).

    Args:
        ebc: the EBC to copy (left unchanged; :func:`convert_hot_cold` swaps and releases).
        hot_set: the hot rows; shapes must match the EBC's tables (else HotSetError).
        tables: tables to split (default: every table of ``ebc`` that the hot set names).
        device: hot tier device (default: where ``ebc``'s weights are).
        remap: "table" (a [rows] int32 remap on ``device``: one gather per id), "search"
            (binary search over the hot ids: no table-sized array, ~2 ms per 50k ids on CPU), or
            "auto": "table" on CPU or when it takes less memory than the hot rows.

    Input: KJT (plain, or a RecD IKJT), batch B. Output: ``KeyedTensor`` [B, sum of dims],
    the same keys and values as ``ebc(features)``.
    """

    def __init__(self, ebc: EmbeddingBagCollection, hot_set: HotSet, tables: Optional[Sequence[str]] = None,
                 device: Optional[torch.device] = None, remap: str = "auto") -> None:
        super().__init__()
        _check_arguments(tables, remap)
        shapes = ebc_tables(ebc)
        chosen = [t for t in shapes if t in hot_set.tables] if tables is None else list(tables)
        for t in chosen:
            if t not in hot_set.tables or t not in shapes:
                where = "the hot set" if t not in hot_set.tables else "this EmbeddingBagCollection"
                raise HotSetError(f"table {t!r} is not in {where} (hot set: {sorted(hot_set.tables)}, EBC: "
                                  f"{sorted(shapes)}); profile that table or leave it out of `tables`")
        hot_set.check_tables({**hot_set.tables, **shapes})  # this EBC's real shapes for its tables
        self._is_weighted = ebc.is_weighted()
        self._embedding_bag_configs = ebc.embedding_bag_configs()
        self._embedding_names: List[str] = list(ebc._embedding_names)
        self._lengths_per_embedding: List[int] = list(ebc._lengths_per_embedding)
        self._flat: List[str] = [f for c in self._embedding_bag_configs for f in c.feature_names]
        self._table_of: List[str] = [c.name for c in self._embedding_bag_configs for _ in c.feature_names]
        self.embedding_bags = nn.ModuleDict({t: ebc.embedding_bags[t] for t in shapes if t not in chosen})
        self._plain = [fi for fi, t in enumerate(self._table_of) if t not in chosen]
        self._groups: List[_Group] = []
        by_key: Dict[tuple, _Group] = {}
        for fi, t in enumerate(self._table_of):
            if t not in chosen:
                continue
            c = next(c for c in self._embedding_bag_configs if c.name == t)
            if c.pooling not in (PoolingType.SUM, PoolingType.MEAN):
                raise UnsupportedModelError(f"table {t!r}: pooling {c.pooling} is not supported by the hot/cold "
                                            "layout (SUM and MEAN are); leave it out of `tables`")
            if self._is_weighted and c.pooling == PoolingType.MEAN:
                raise UnsupportedModelError(f"table {t!r}: weighted MEAN pooling; torch's embedding_bag takes "
                                            "per-sample weights for SUM only, so the original EBC cannot run it either")
            key = (c.embedding_dim, ebc.embedding_bags[t].weight.dtype)
            g = by_key.get(key)
            if g is None:
                g = by_key[key] = _Group(f"g{len(self._groups)}")
                self._groups.append(g)
            if t not in g.tables:
                g.tables.append(t)
                g.rows.append(c.num_embeddings)
                g.hot.append(torch.from_numpy(hot_set.rows.get(t, np.zeros(0, np.int64))))
            g.features.append(fi)
            g.table_of.append(g.tables.index(t))
            g.mean.append(c.pooling == PoolingType.MEAN)
        self.tier_lookups: Dict[str, int] = {"hot": 0, "cold": 0}
        self.cold_ids = 0
        for g in self._groups:
            src = [ebc.embedding_bags[t].weight.detach() for t in g.tables]
            dev = torch.device(device) if device is not None else src[0].device
            hot = torch.cat([w[h.to(w.device)] for w, h in zip(src, g.hot)])
            self.register_parameter(f"hot_{g.name}", nn.Parameter(hot.to(dev)))
            for i, (t, w) in enumerate(zip(g.tables, src)):
                # One cold tensor per table, like TorchRec's: its dense gradient has the plain
                # EBC's size (a fused [all cold rows, D] gradient is re-mmapped by glibc each step).
                self.register_parameter(f"cold_{t}", nn.Parameter(w[g.cold_mask(i).to(w.device)].cpu()))
            base = np.cumsum([0] + g.rows[:-1]).tolist()
            hot_gids = torch.cat([h + b for h, b in zip(g.hot, base)])
            # Table-sized remap when it is cheap where it lives (host memory, or less fast
            # memory than the hot rows themselves), else binary search (lookup.split_tiers).
            g.table_remap = (remap == "table" or remap == "auto" and (
                dev.type == "cpu" or 4 * sum(g.rows) <= hot.numel() * hot.element_size()))
            self.register_buffer(f"_remap_{g.name}", build_remap(hot_gids, sum(g.rows), g.table_remap).to(dev),
                                 persistent=False)
            self.register_buffer(f"_base_{g.name}", torch.tensor([base[i] for i in g.table_of], device=dev),
                                 persistent=False)
            self.register_buffer(f"_rows_{g.name}", torch.tensor([g.rows[i] for i in g.table_of], device=dev),
                                 persistent=False)
        self.register_state_dict_post_hook(_original_key_order)
        self.train(ebc.training)

    def embedding_bag_configs(self) -> list:
        return self._embedding_bag_configs

    def is_weighted(self) -> bool:
        return self._is_weighted

    @property
    def hot_cold_tables(self) -> List[str]:
        """The tables split into tiers."""
        return [t for g in self._groups for t in g.tables]

    @property
    def feature_to_table(self) -> Dict[str, str]:
        """{feature: table} of the split tables (what :class:`HotBatchScheduler` classifies)."""
        return {self._flat[fi]: g.tables[i] for g in self._groups for fi, i in zip(g.features, g.table_of)}

    def sync(self) -> None:
        """No-op: every row lives in exactly one tier, so the tiers never disagree (module doc)."""

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        kjt, inverse_of = DedupModule.inverse_of(features)
        where = {k: i for i, k in enumerate(kjt.keys())}
        missing = [f for f in self._flat if f not in where]
        if missing:
            raise UnsupportedModelError(f"the input KJT lacks feature(s) {missing} (it has {kjt.keys()})")
        pooled: List[torch.Tensor] = [torch.empty(0)] * len(self._flat)
        if self._plain:  # untouched tables: exactly TorchRec's path
            jt = kjt.to_dict()
            for fi in self._plain:
                f = jt[self._flat[fi]]
                pooled[fi] = self.embedding_bags[self._table_of[fi]](
                    input=f.values(), offsets=f.offsets(),
                    per_sample_weights=f.weights() if self._is_weighted else None).float()
        for g in self._groups:
            # The group's features as one jagged slice: a view when they are adjacent in the KJT
            # in table order (the usual case), else a permuted copy.
            idx = [where[self._flat[fi]] for fi in g.features]
            contiguous = idx == list(range(idx[0], idx[0] + len(idx)))
            sub = kjt if contiguous else kjt.permute(idx)
            a = idx[0] if contiguous else 0
            b = a + len(idx)
            strides, opk = sub.stride_per_key(), sub.offset_per_key()
            values = sub.values()[opk[a]:opk[b]]
            offsets = sub.offsets()[sum(strides[:a]):sum(strides[:b]) + 1] - opk[a]
            weights = sub.weights()[opk[a]:opk[b]] if self._is_weighted else None
            out = self._pool(g, values, offsets, weights, sub.length_per_key()[a:b], strides[a:b])
            for fi, p in zip(g.features, out.split(strides[a:b])):
                pooled[fi] = p.float()
        if inverse_of is not None:  # RecD IKJT: pooled unique rows -> one row per sample
            pooled = [expand_rows(p, inverse_of[self._flat[fi]]) for fi, p in enumerate(pooled)]
        return KeyedTensor(keys=self._embedding_names, values=torch.cat(pooled, dim=1),
                           length_per_key=self._lengths_per_embedding)

    def _pool(self, g: _Group, values: torch.Tensor, offsets: torch.Tensor, weights: Optional[torch.Tensor],
              counts: List[int], strides: List[int]) -> torch.Tensor:
        """One group: values [V] ids, offsets [bags + 1]; counts / strides: ids / bags per
        feature. Returns [bags, D] = hot partial sum + cold partial sums (MEAN: / length)."""
        hot_w, remap = getattr(self, f"hot_{g.name}"), getattr(self, f"_remap_{g.name}")
        dev = remap.device
        values, offsets = values.to(dev, torch.long), offsets.to(dev, torch.long)
        counts_t = torch.tensor(counts, device=dev)
        bad = first_bad_id(values, counts, getattr(self, f"_rows_{g.name}"))
        if bad is not None:
            k, id_ = bad
            raise HotSetError(f"feature {self._flat[g.features[k]]!r}: id {id_} is outside table "
                              f"{g.tables[g.table_of[k]]!r} (rows 0..{g.rows[g.table_of[k]] - 1}); fix the input ids or "
                              "the table config (the plain EBC would fail on it too)")
        base = torch.repeat_interleave(getattr(self, f"_base_{g.name}"), counts_t, output_size=values.numel())
        split = split_tiers(values + base, remap, offsets, g.table_remap)
        if weights is not None:
            weights = weights.to(dev)
        pooled = None
        if split.n_hot or not split.n_cold:
            pooled = bag_sum(hot_w, split.hot_slot, split.hot_offsets,
                             None if weights is None else weights.index_select(0, split.hot_sel))
            self.tier_lookups["hot"] += 1
        if split.n_cold:  # skipped for all-hot batches: the cold tier is not read and gets no gradient
            # cold_rank counts every cold row of the group: minus the earlier tables' cold rows.
            shifts = [sum(g.rows[:i]) - g.hot_range(i)[0] for i in g.table_of]
            cold_ws = [getattr(self, f"cold_{g.tables[i]}") for i in g.table_of]
            cold, lookups = cold_pools(cold_ws, shifts, split, weights, strides)
            pooled = cold if pooled is None else pooled + cold
            self.tier_lookups["cold"] += lookups
            self.cold_ids += split.n_cold
        if any(g.mean):
            lengths = (offsets[1:] - offsets[:-1]).clamp(min=1)
            if not all(g.mean):
                is_mean = torch.repeat_interleave(torch.tensor(g.mean, device=dev), torch.tensor(strides, device=dev))
                lengths = torch.where(is_mean, lengths, torch.ones_like(lengths))
            pooled = pooled / lengths.unsqueeze(1).to(pooled.dtype)
        return pooled

    # -- the original single-table layout ------------------------------------------------------

    def _locate(self, table: str) -> Tuple[_Group, int]:
        for g in self._groups:
            if table in g.tables:
                return g, g.tables.index(table)
        raise KeyError(f"table {table!r} is not split into tiers (split tables: {self.hot_cold_tables})")

    def table_weight(self, table: str, grad: bool = False) -> Optional[torch.Tensor]:
        """Table ``table`` in the original layout: a CPU copy [N, D] assembled from the tiers.
        ``grad=True``: its gradient, the same way (None before any backward reached it)."""
        g, i = self._locate(table)
        h0, h1 = g.hot_range(i)
        hot, cold = getattr(self, f"hot_{g.name}"), getattr(self, f"cold_{table}")
        if grad:
            if hot.grad is None and cold.grad is None:
                return None
            hot = hot.grad if hot.grad is not None else torch.zeros_like(hot)
            cold = cold.grad if cold.grad is not None else torch.zeros_like(cold)
        full = torch.empty(g.rows[i], hot.shape[1], dtype=hot.dtype)
        full[g.hot[i]] = hot.detach()[h0:h1].cpu()
        full[g.cold_mask(i)] = cold.detach().cpu()
        return full

    @torch.no_grad()
    def load_table(self, table: str, weight: torch.Tensor) -> None:
        """Scatter an original-layout table [N, D] into the tiers."""
        g, i = self._locate(table)
        h0, h1 = g.hot_range(i)
        weight = weight.detach().cpu()
        getattr(self, f"hot_{g.name}")[h0:h1].copy_(weight[g.hot[i]])
        getattr(self, f"cold_{table}").copy_(weight[g.cold_mask(i)])

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
            w = state_dict.pop(key)  # popped: `embedding_bags` (untouched tables) must not see it
            g, i = self._locate(t)
            want = (g.rows[i], getattr(self, f"hot_{g.name}").shape[1])
            if tuple(w.shape) != want:
                error_msgs.append(f"size mismatch for {key}: copying a param with shape {tuple(w.shape)}, "
                                  f"the table is {want}")
            else:
                self.load_table(t, w)
        if strict:
            unexpected_keys.extend(k for k in state_dict if k.startswith(prefix)
                                   and k[len(prefix):].split(".", 1)[0] not in self._modules)

    @torch.no_grad()
    def write_back(self, ebc: EmbeddingBagCollection) -> None:
        """Put the split tables into ``ebc``'s weights (re-allocated if they were released)."""
        for t in self.hot_cold_tables:
            w = ebc.embedding_bags[t].weight
            w.data = self.table_weight(t).to(w.device)

    def extra_repr(self) -> str:
        return "\n".join(f"{g.name}: tables={g.tables} hot={tuple(getattr(self, f'hot_{g.name}').shape)}"
                         f"@{getattr(self, f'hot_{g.name}').device} cold@cpu" for g in self._groups)


def _original_key_order(module: HotColdEmbeddingBagCollection, state_dict: dict, prefix: str, _meta: dict) -> None:
    """This module's keys are the last ones in ``state_dict``: re-insert them in table order."""
    for c in module.embedding_bag_configs():
        key = f"{prefix}embedding_bags.{c.name}.weight"
        if key in state_dict:
            state_dict[key] = state_dict.pop(key)


def convert_hot_cold(model: nn.Module, hot_set: HotSet, tables: Optional[List[str]] = None,
                     device: Optional[torch.device] = None, remap: str = "auto") -> Callable[[], None]:
    """Swap every ``EmbeddingBagCollection`` of ``model`` that holds hot-set tables for a
    :class:`HotColdEmbeddingBagCollection`, in place; returns the undo.

    Everything is checked first (tables, shapes: a stale hot set raises HotSetError and
    nothing changes). Converted tables of the original EBCs are released until undo, which
    writes the trained weights back and puts the original modules back at every path.
    """
    _check_arguments(tables, remap)  # also when no EBC has a table to convert
    if isinstance(model, EmbeddingBagCollection):
        raise UnsupportedModelError("pass the model that contains the EmbeddingBagCollection: it is swapped in "
                                    "its parent")
    for name, m in model.named_modules():
        if type(m).__module__.startswith("torchrec.distributed"):
            raise UnsupportedModelError(f"module {name!r} is already sharded; convert the unsharded model")
    found = [(p, m) for p, m in model.named_modules(remove_duplicate=False) if isinstance(m, EmbeddingBagCollection)]
    shapes = {t: s for _, m in found for t, s in ebc_tables(m).items()}
    hot_set.check_tables(shapes)
    chosen = list(hot_set.tables) if tables is None else list(tables)
    for t in chosen:
        if t not in hot_set.tables:
            raise HotSetError(f"table {t!r} is not in the hot set (it has {sorted(hot_set.tables)}); profile it "
                              "or leave it out of `tables`")
    originals = {id(m): m for _, m in found}
    new: Dict[int, HotColdEmbeddingBagCollection] = {}
    for key, m in originals.items():  # build (and so validate) all before the first swap
        mine = [t for t in ebc_tables(m) if t in chosen]
        if mine:
            new[key] = HotColdEmbeddingBagCollection(m, hot_set, mine, device, remap)
    for key, hc in new.items():
        for t in hc.hot_cold_tables:  # the tiers hold these rows now
            w = originals[key].embedding_bags[t].weight
            w.data = w.data.new_empty((0, w.shape[1]))
    restore = swap_modules(model, new)
    done = [False]

    def undo() -> None:
        if done[0]:
            return
        done[0] = True
        for key, hc in new.items():
            hc.write_back(originals[key])
        restore()

    return undo
