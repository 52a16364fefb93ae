"""DES operators: FM, wide/linear and first-dense-layer terms split into partials + combine.

Each operator is a plain ``nn.Module`` with the standard math when unsharded, written as two
halves so that a model-parallel shard can compute the first half on the embedding fields it
owns and only the (small) partial results cross the network (DES, SIGIR 2020):

* ``partials(fields)``: what a shard computes from *its* fields, for every sample it sees.
  Partials of disjoint field sets **add up**: ``partials(all) == sum(partials(part_i))``.
* ``combine(summed_partials)``: the final math, run where the sample lives.

=====================  =====================================  ==========================
operator               partials per sample                    combine
=====================  =====================================  ==========================
FactorizationMachine   ``S = sum_f v_f`` (D), ``Q = sum_f     ``0.5 * (||S||^2 - Q)``
                       ||v_f||^2`` (1): D + 1 floats          -> [B, 1]
WideLinear             ``sum_f w_f`` (1-dim embeddings): 1    ``+ bias`` -> [B, 1]
FirstDenseLayer        ``sum_f W_f e_f`` (H)                  ``+ W_x x + b`` -> [B, H]
=====================  =====================================  ==========================

``fields`` is a [B, F, D] tensor of *sum-pooled* embeddings (one slot per field, in the
operator's ``tables`` order) or a torchrec ``KeyedTensor`` (the output of an
``EmbeddingBagCollection``). A dict of ``JaggedTensor`` (``EmbeddingCollection``, sequence
features) is refused with a :class:`~recd_plugin.errors.DESError`: the substitution is exact
only for sum pooling (a MEAN-pooled bag is not the sum of per-shard partial bags).

Example::

    import torch
    from recd_plugin.des import FactorizationMachine, FirstDenseLayer, WideLinear
    v = torch.randn(4, 26, 16)                        # [B, F, D] pooled fields
    fm = FactorizationMachine(tables=[f"t_C{i}" for i in range(1, 27)])
    fm(v)                                             # [4, 1] == 0.5*((v.sum(1))**2 - (v**2).sum(1)).sum(1, keepdim=True)
    p = fm.partials(v[:, :10]) + fm.partials(v[:, 10:])   # two shards' partials, summed
    torch.allclose(fm.combine(p), fm(v))              # True
    first = FirstDenseLayer(tables=fm.tables, embedding_dim=16, out_features=64, dense_in_features=13)
    first(v, dense=torch.randn(4, 13))                # [4, 64] == Linear(cat([dense, v.flatten(1)]))
"""

from __future__ import annotations

import math
import numbers
from typing import Any, List, Optional, Sequence, Union

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedTensor

from recd_plugin.errors import DESError

Fields = Union[torch.Tensor, KeyedTensor]


def stack_fields(x: Any, keys: Optional[Sequence[str]] = None, who: str = "operator") -> torch.Tensor:
    """``x`` (a [B, F, D] tensor or a KeyedTensor of pooled embeddings) -> [B, F, D].

    ``keys`` picks and orders the KeyedTensor's keys (default: all, in the tensor's order;
    every selected key must have the same dimension). Anything else - notably the dict of
    JaggedTensor an ``EmbeddingCollection`` returns - raises DESError.
    """
    if isinstance(x, KeyedTensor):
        d = x.to_dict()
        names = list(keys) if keys is not None else list(x.keys())
        missing = [k for k in names if k not in d]
        if missing:
            raise DESError(f"{who}: the KeyedTensor has no key(s) {missing}; it has {list(d)}. "
                           "Pass keys= naming the pooled embeddings this operator reads.")
        dims = {d[k].shape[1] for k in names}
        if len(dims) != 1:
            raise DESError(f"{who}: fields {names} have different dimensions {sorted(dims)}; "
                           "an operator's fields must share one embedding dimension.")
        return torch.stack([d[k] for k in names], dim=1)
    if isinstance(x, dict) or isinstance(x, JaggedTensor):
        raise DESError(f"{who}: got {type(x).__name__} (per-position sequence embeddings, e.g. the "
                       "output of an EmbeddingCollection); DES operators need sum-pooled fields. Use an "
                       "EmbeddingBagCollection with PoolingType.SUM for these features.")
    if not isinstance(x, torch.Tensor) or x.dim() != 3:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise DESError(f"{who}: expected pooled fields as a [B, F, D] tensor or a KeyedTensor, got {shape}.")
    return x


class DESOperator(nn.Module):
    """Base class: an operator over the sum-pooled embeddings of ``tables`` (one field per
    table feature; the DES module resolves tables to fields)."""

    def __init__(self, tables: Optional[Sequence[str]] = None) -> None:
        super().__init__()
        if isinstance(tables, str):  # list() would split it into one-letter table names
            raise DESError(f"DES: {type(self).__name__} tables must be a list of table names, got the string "
                           f"{tables!r}; write tables=[{tables!r}]")
        self.tables: List[str] = list(tables or [])

    def partial_size(self, embedding_dim: int) -> int:
        """Floats per sample that ``partials`` returns."""
        raise NotImplementedError

    def partials(self, fields: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        raise NotImplementedError

    def combine(self, partials: torch.Tensor, dense: Optional[torch.Tensor] = None) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, fields: Fields, dense: Optional[torch.Tensor] = None,
                keys: Optional[Sequence[str]] = None) -> torch.Tensor:
        v = stack_fields(fields, keys, type(self).__name__)
        return self.combine(self.partials(v), dense)


class FactorizationMachine(DESOperator):
    """Classic second-order FM interaction over F fields (Rendle 2010), without the linear
    term (that is :class:`WideLinear`): ``0.5 * sum_d((sum_f v_fd)^2 - sum_f v_fd^2)``.

    Not ``torchrec.modules.deepfm.FactorizationMachine`` (which is a DeepFM-style MLP over
    the concatenation, not this sum); this fills that gap. Parameter-free.
    """

    def partial_size(self, embedding_dim: int) -> int:
        return embedding_dim + 1

    def partials(self, fields: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """[N, F, D] -> [N, D + 1] = [S | Q], ``S = sum_f v_f``, ``Q = sum_f ||v_f||^2``."""
        return torch.cat([fields.sum(dim=1), fields.square().sum(dim=(1, 2)).unsqueeze(1)], dim=1)

    def combine(self, partials: torch.Tensor, dense: Optional[torch.Tensor] = None) -> torch.Tensor:
        """[B, D + 1] summed partials -> [B, 1] interaction."""
        s, q = partials[:, :-1], partials[:, -1:]
        return 0.5 * (s.square().sum(dim=1, keepdim=True) - q)


class WideLinear(DESOperator):
    """Wide / linear term over sparse ids: the sum of 1-dim embeddings of every id of every
    field, plus a bias. The 1-dim tables live in the embedding collection (``embedding_dim=1``);
    this module holds the bias."""

    def __init__(self, tables: Optional[Sequence[str]] = None) -> None:
        super().__init__(tables)
        self.bias = nn.Parameter(torch.zeros(1))

    def partial_size(self, embedding_dim: int) -> int:
        return 1

    def partials(self, fields: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """[N, F, 1] -> [N, 1]."""
        if fields.shape[-1] != 1:
            raise DESError(f"WideLinear: fields must be 1-dim embeddings ([N, F, 1]), got {tuple(fields.shape)}; "
                           "give the wide tables embedding_dim=1.")
        return fields.sum(dim=1)

    def combine(self, partials: torch.Tensor, dense: Optional[torch.Tensor] = None) -> torch.Tensor:
        return partials + self.bias


class FirstDenseLayer(DESOperator):
    """The first dense layer over ``[x, e_1, ..., e_F]`` (dense features, then fields):
    ``y = W_x x + sum_f W_f e_f + b``, [B, H]. Equal to ``nn.Linear(dense_in + F*D, H)``
    applied to ``cat([x, e_1 .. e_F])`` with weight ``linear_weight()``.

    Parameters: ``field_weight`` [H, F, D] (the W_f, sharded with their tables under DES),
    ``dense_weight`` [H, dense_in] and ``bias`` [H] (replicated). Initialised like nn.Linear.
    """

    def __init__(self, tables: Sequence[str], embedding_dim: int, out_features: int,
                 dense_in_features: int = 0, bias: bool = True) -> None:
        super().__init__(tables)
        if not self.tables:
            raise DESError("FirstDenseLayer: tables must name at least one table.")
        for name, value, least in (("embedding_dim", embedding_dim, 1), ("out_features", out_features, 1),
                                   ("dense_in_features", dense_in_features, 0)):
            # torch would fail later without the argument's name (negative sizes, a division by zero)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < least:
                raise DESError(f"FirstDenseLayer: {name} must be an integer >= {least}, got {value!r}; "
                               "give the tables' embedding dim, the layer's width and the dense input width")
        self.embedding_dim, self.out_features, self.dense_in_features = embedding_dim, out_features, dense_in_features
        fan_in = dense_in_features + len(self.tables) * embedding_dim
        bound = 1.0 / math.sqrt(fan_in)  # nn.Linear's default init range
        self.field_weight = nn.Parameter(torch.empty(out_features, len(self.tables), embedding_dim).uniform_(-bound, bound))
        self.dense_weight = nn.Parameter(torch.empty(out_features, dense_in_features).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(out_features).uniform_(-bound, bound)) if bias else None

    def partial_size(self, embedding_dim: int) -> int:
        return self.out_features

    def partials(self, fields: torch.Tensor, weight: Optional[torch.Tensor] = None, **kwargs: Any) -> torch.Tensor:
        """[N, F', D] fields and their W_f blocks ``weight`` [H, F', D] (default: all F) -> [N, H]."""
        w = self.field_weight if weight is None else weight
        if fields.shape[1:] != w.shape[1:]:
            raise DESError(f"FirstDenseLayer: fields {tuple(fields.shape)} do not match weight blocks {tuple(w.shape)}.")
        return torch.einsum("nfd,hfd->nh", fields, w)

    def combine(self, partials: torch.Tensor, dense: Optional[torch.Tensor] = None) -> torch.Tensor:
        out = partials
        if self.dense_in_features:
            if dense is None or dense.shape[-1] != self.dense_in_features:
                got = None if dense is None else tuple(dense.shape)
                raise DESError(f"FirstDenseLayer: needs dense features [B, {self.dense_in_features}], got {got}.")
            out = out + dense @ self.dense_weight.t()
        return out + self.bias if self.bias is not None else out

    def linear_weight(self) -> torch.Tensor:
        """[H, dense_in + F*D]: the equivalent nn.Linear weight over cat([x, e_1 .. e_F])."""
        return torch.cat([self.dense_weight, self.field_weight.flatten(1)], dim=1)


