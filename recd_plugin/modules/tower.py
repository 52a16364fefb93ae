"""Run a user-side dense submodule on unique rows, expand where it meets per-sample features.

TorchRec's dense towers always see the expanded batch, even when every input row of the tower
comes from session features that repeat across the samples of a session. ``dedup_tower``
installs two forward hooks on such a module (a sequence encoder, a user tower): the first
keeps one row per unique session (``x[first]``), the second expands the result
(``y[inverse]``). The module object, its type and its state_dict keys stay unchanged, and
the math is the same: rows of one session are equal, and the gradient reaching the kept
row is the sum over its samples, as in the plain path.

The inverse index comes from the IKJT the model is called with: ``DedupContext.attach(model)``
records it at each forward of the root model::

    ctx = DedupContext.attach(model, spec)
    handle = dedup_tower(model.user_tower, ctx, group="user", name="user_tower")
    model(batch)            # user_tower runs on U rows instead of B
    handle.remove()         # back to the plain module

A tower may also take the batch's KJT: it then receives a plain KJT of the group's unique
rows (batch U), and everything inside it, embedding lookups included, runs once per session.
This is the fastest form (RecD's: expand only where user meets item), e.g. a ``UserTower``
module holding the user embeddings, the sequence encoder and the MLP.

Only wrap modules whose inputs depend on the group's features alone; the first
``verify_batches`` calls check dense inputs and raise ``NotDeduplicableError`` otherwise.

Batch-norm layers inside a tower would take their statistics over the U unique rows, each
session once; ``dedup_tower`` makes them weight each row by the number of samples it stands
for (``recd_plugin.modules.batchnorm``), so outputs, gradients and running statistics stay
those of the plain path, and refuses layers that reduce over the batch in a way it cannot
weight (``check_tower_layers``) before installing anything.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch
import torch.fx
from torch import nn
from torch.utils.hooks import RemovableHandle
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor, KeyedTensor

from recd_plugin.config import verify_step
from recd_plugin.errors import NotDeduplicableError, UnsupportedModelError
from recd_plugin.modules.batchnorm import WeightedHandle, weight_batch_norms
from recd_plugin._ranks import all_reduce_ints
from recd_plugin.sparse.dedup_kjt import DedupKJT
from recd_plugin.sparse.ikjt import DedupSpec, group_rows, is_aligned, jagged_index_select, select_rows, unique_rows


class DedupContext:
    """Per-forward inverse indices of each feature group, taken from the model's IKJT input."""

    def __init__(self, spec: DedupSpec, pad_over_ranks: bool = False,
                 observer: Optional[Callable[[Optional[KeyedJaggedTensor], bool], None]] = None) -> None:
        self.spec = spec
        #: called at each forward of the root model with (its batch's KJT, training mode): the
        #: route decision times the job's steps there (``recd_plugin.transforms.route``)
        self.observer = observer
        #: sharded mode: every rank hands its towers the same number of rows, the maximum of
        #: U over ranks (ROW_WISE sharding's backward all-gathers per-rank pieces, which gloo
        #: and nccl need equal); the extra rows repeat sample 0 and are never read.
        self.pad_over_ranks = pad_over_ranks
        self._kjt: Optional[KeyedJaggedTensor] = None
        self._cache: Dict[str, Tuple[torch.Tensor, torch.Tensor]] = {}
        self.handles: List[RemovableHandle] = []

    @classmethod
    def attach(cls, model: nn.Module, spec: DedupSpec, pad_over_ranks: bool = False,
               observer: Optional[Callable[[Optional[KeyedJaggedTensor], bool], None]] = None) -> "DedupContext":
        """Record the IKJT at each forward of ``model``; forget it when the forward ends, so a
        tower called directly afterwards never reuses a stale inverse index."""
        ctx = cls(spec, pad_over_ranks, observer)
        ctx.handles = [
            model.register_forward_pre_hook(ctx._capture, with_kwargs=True),
            model.register_forward_hook(ctx._forget, always_call=True),
        ]
        return ctx

    def detach(self) -> None:
        for h in self.handles:
            h.remove()
        self.set(None)

    def _capture(self, module: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> None:
        kjt = _find_kjt(list(args) + list(kwargs.values()))
        self.set(kjt)
        if self.observer is not None:
            self.observer(kjt, module.training)

    def _forget(self, module: nn.Module, args: Any, output: Any) -> None:
        self.set(None)

    def set(self, kjt: Optional[KeyedJaggedTensor]) -> None:
        self._kjt = kjt
        self._cache = {}

    def current(self) -> Optional[KeyedJaggedTensor]:
        """The KJT the root model was called with, during its forward; else None."""
        return self._kjt

    def rows(self, group: str) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        """(first [U], inverse [B]) of ``group`` in the current batch; None if not an IKJT."""
        if group in self._cache:
            return self._cache[group]
        kjt = self._kjt
        if kjt is None or kjt.inverse_indices_or_none() is None:
            return None
        if isinstance(kjt, DedupKJT) and group not in kjt.dedup_groups:
            return None  # the group takes the plain route in this batch
        # Rows no sample reads (empty bags padded in for equal per-rank counts) take sample
        # 0's dense inputs: any valid row will do, their outputs are never read.
        first, inv = group_rows(kjt, self.spec.group(group).all_features[0])
        if self.pad_over_ranks:
            [most] = all_reduce_ints([first.numel()], "max")
            first = torch.cat([first, first.new_zeros(most - first.numel())])
        self._cache[group] = (first, inv)
        return self._cache[group]


def _find_kjt(items: List[Any], depth: int = 0) -> Optional[KeyedJaggedTensor]:
    """The batch's KJT among forward arguments: a KJT, or one inside a tuple, list, dict or a
    batch object's fields (TorchRec's ``Batch``, ``ModelInput``, a user dataclass); the plugin's
    ``DedupKJT`` first when there are several."""
    found: Optional[KeyedJaggedTensor] = None
    for item in items:
        if isinstance(item, DedupKJT):
            return item
        if isinstance(item, KeyedJaggedTensor):
            found = found or item
            continue
        if depth >= 2 or isinstance(item, (torch.Tensor, str, bytes, int, float)) or item is None:
            continue
        if isinstance(item, (list, tuple)):
            inner = list(item)
        elif isinstance(item, dict):
            inner = list(item.values())
        else:
            inner = list(getattr(item, "__dict__", {}).values())
        sub = _find_kjt(inner, depth + 1)
        if isinstance(sub, DedupKJT):
            return sub
        found = found or sub
    return found


class _TowerHooks:
    def __init__(self, ctx: DedupContext, group: str, name: str, verify_batches: int, always: bool = False) -> None:
        self.ctx, self.group, self.name, self.always = ctx, group, name, always
        self.verify_left = verify_batches
        self.active: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
        self._counts: Optional[torch.Tensor] = None

    def row_counts(self) -> Optional[Tuple[torch.Tensor, int]]:
        """(counts [U] int64, B) while the module runs on unique rows: how many samples each
        row stands for (0 for rows padded in for equal per-rank counts); else None. Read by
        the batch-norm layers inside the tower, computed once per call."""
        if self.active is None:
            return None
        first, inv = self.active
        if self._counts is None:
            self._counts = torch.bincount(inv, minlength=first.numel())
        return self._counts, inv.numel()

    def before(self, module: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any]):
        if any(isinstance(x, torch.fx.Proxy) for x in (*args, *kwargs.values())):
            return _mark_traced(args, kwargs)
        rows = self.ctx.rows(self.group)
        self.active, self._counts = None, None
        if rows is None:
            return None
        first, inv = rows
        if first.numel() == inv.numel() and not self.always:
            return None  # no repeats in this batch: nothing to save
        batch = inv.numel()
        self.active = rows
        verify, self.verify_left = verify_step(self.verify_left)

        features = self.ctx.spec.group(self.group).all_features
        reduced: List[Any] = []

        def take(x: Any, where: str) -> Any:
            if isinstance(x, KeyedJaggedTensor):
                if x.inverse_indices_or_none() is None:
                    return x
                # The whole sub-model reads the batch: hand it the group's unique rows as a
                # plain KJT of batch U, so its embedding lookups run on U rows, unexpanded.
                if is_aligned(x):  # (padded to the rows every rank hands its tower)
                    reduced.append(select_rows(x, features, first))
                else:
                    reduced.append(unique_rows(x, features, check=False))  # one group: same inverse
                return reduced[-1]
            if hasattr(x, "lengths") and not isinstance(x, torch.Tensor):
                raise UnsupportedModelError(
                    f"dedup tower {self.name!r}: {where} is a {type(x).__name__}; a wrapped "
                    "module takes the batch's KJT or dense tensors [B, ...] (pad jagged inputs first)"
                )
            if not isinstance(x, torch.Tensor) or x.dim() == 0 or x.shape[0] != batch:
                return x
            kept = x.index_select(0, first)
            if verify and not torch.equal(kept.index_select(0, inv), x):
                raise NotDeduplicableError(
                    f"dedup tower {self.name!r}: {where} differs between samples of one "
                    f"{self.group!r} group; the module reads per-sample data. Wrap only modules "
                    "whose inputs come from the group's features, or remove it from `towers`."
                )
            reduced.append(kept)
            return kept

        new_args = tuple(take(a, f"input {i}") for i, a in enumerate(args))
        new_kwargs = {k: take(v, f"input {k!r}") for k, v in kwargs.items()}
        if not reduced:
            self.active = None  # no input has the batch as first dimension: run as is
            return None
        return new_args, new_kwargs

    def after(self, module: nn.Module, args: Any, kwargs: Any, output: Any) -> Any:
        if self.active is None:
            return None
        first, inv = self.active
        self.active, self._counts = None, None
        return expand_output(output, inv, first.numel())


def tower_input(x: Any) -> Any:
    """Identity at run time; in an fx trace, the node that marks a tower's input as modified.

    Why: TorchRec's ``TrainPipelineSparseDist`` traces the model and pipelines the input
    all-to-all of every sharded module whose input comes straight from the batch, computing
    it from the batch itself ahead of the forward. A tower's embedding modules get the
    group's unique rows from the tower hook instead, so they must not be pipelined; this
    node makes TorchRec see an input modification and leave them unpipelined (they then run
    their communication inside the forward, on the unique rows).
    """
    return x


def _mark_traced(args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Tuple[Tuple[Any, ...], Dict[str, Any]]:
    def mark(x: Any) -> Any:
        if isinstance(x, torch.fx.Proxy):
            return x.tracer.create_proxy("call_function", tower_input, (x,), {})
        return x

    return tuple(mark(a) for a in args), {k: mark(v) for k, v in kwargs.items()}


def expand_output(output: Any, inv: torch.Tensor, num_unique: int) -> Any:
    """Expand every tensor of ``output`` with ``num_unique`` rows back to one row per sample."""
    if isinstance(output, torch.Tensor):
        return output.index_select(0, inv) if output.dim() > 0 and output.shape[0] == num_unique else output
    if isinstance(output, KeyedTensor):
        return KeyedTensor(keys=output.keys(), length_per_key=output.length_per_key(),
                           values=expand_output(output.values(), inv, num_unique), key_dim=output.key_dim())
    if isinstance(output, JaggedTensor):
        if output.lengths().numel() != num_unique:
            return output
        values, lengths, positions = jagged_index_select(output.values(), output.lengths(), inv)
        weights = output.weights_or_none()
        return JaggedTensor(values=values, lengths=lengths.to(output.lengths().dtype),
                            weights=weights.index_select(0, positions) if weights is not None else None)
    if isinstance(output, KeyedJaggedTensor):
        raise UnsupportedModelError("a dedup tower returned a KeyedJaggedTensor; towers return tensors, "
                                    "KeyedTensors or JaggedTensors (one row per unique session)")
    if isinstance(output, tuple):
        return tuple(expand_output(o, inv, num_unique) for o in output)
    if isinstance(output, list):
        return [expand_output(o, inv, num_unique) for o in output]
    if isinstance(output, dict):
        return {k: expand_output(v, inv, num_unique) for k, v in output.items()}
    return output


class TowerHandle:
    """Removes a dedup tower's hooks: the module is then plain again."""

    def __init__(self, handles: List[Union[RemovableHandle, WeightedHandle]]) -> None:
        self._handles = handles

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def dedup_tower(
    module: nn.Module, ctx: DedupContext, group: str, name: str = "", verify_batches: int = 1,
    always: bool = False,
) -> TowerHandle:
    """Make ``module`` run on the unique rows of ``group`` (inputs [B, ...] -> [U, ...]).

    An IKJT input (the batch's sparse features) becomes a plain KJT of the group's U unique
    rows, so a whole user-side sub-model, embedding lookups included, runs at batch U; its
    embedding modules must read only the group's features (``apply`` checks this).
    Tensor inputs whose first dimension is the batch size B are reduced to U unique rows;
    every output tensor (nested in tuples, lists, dicts) with U rows is expanded back to B.
    Inputs must be batch-first: a call where no input has B rows runs unchanged.
    ``always``: reduce even a batch without repeats (U == B). Sharded embedding modules inside
    the tower must see one kind of KJT on every batch (TorchRec's sharded modules break when
    plain and variable-batch KJTs mix), so sharded mode always hands them the plain KJT.
    Batch-norm layers inside weight each row by its sample count (exact batch statistics);
    other layers that reduce over the batch are refused (``UnsupportedModelError``) before
    any hook is installed.
    """
    ctx.spec.group(group)  # raises a clear error for an unknown group
    name = name or type(module).__name__
    hooks = _TowerHooks(ctx, group, name, verify_batches, always)
    return TowerHandle([
        weight_batch_norms(module, name, hooks.row_counts),  # refuses unweightable layers, installs nothing then
        module.register_forward_pre_hook(hooks.before, with_kwargs=True),
        module.register_forward_hook(hooks.after, with_kwargs=True),
    ])
