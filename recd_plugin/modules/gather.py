"""Expand the outputs of TorchRec's own embedding modules that read aligned IKJTs.

Sharded mode keeps the model's TorchRec ``EmbeddingBagCollection`` / ``EmbeddingCollection``
(DistributedModelParallel's default sharders shard only those exact types) and feeds them
*aligned* IKJTs (``build_ikjt(..., aligned=True)``): to TorchRec an ordinary KJT of batch B, so
no table takes TorchRec's variable-batch path, in which a per-sample table pays fbgemm's VBE
metadata and kernels for nothing. A grouped feature's ids sit only on the first sample of each
unique row; TorchRec's sharded modules look up and send only those ids and leave the other
samples' rows empty (pooled: zero). A forward hook on each such module then gathers every
sample's row from its carrier sample:

* ``KeyedTensor`` (EBC): one ``index_select`` per run of adjacent columns of one group;
* ``Dict[str, JaggedTensor]`` (EC): one jagged gather per grouped feature;
* a sharded module's ``LazyAwaitable`` of either: the gather joins its callbacks, so it runs
  when TorchRec resolves the output (after the output all-to-all, still overlapped).

Any other output is refused with an error: passing on rows that only carriers filled would be
silently wrong.

Backward is the matching ``index_add``: the carrier's gradient is the sum over its samples,
exactly the plain path's gradient of a row that every sample of the session looked up.
TorchRec's *unsharded* EBC applies ``inverse_indices`` itself, so its output is left alone.

Why hooks, re-attached by path: DistributedModelParallel replaces the module object at each
path by its sharded version (hooks on the original are not carried over), after ``apply``. The
root model survives DMP, so a forward pre-hook on it puts the gather hook on whatever module
sits at each path, once per module object (a dictionary lookup per step)::

    gather = OutputGather.attach(model, ctx, ["sparse_arch.embedding_bag_collection"])
    model = DistributedModelParallel(model, ...)   # the hook follows to the sharded module
    gather.remove()
"""

from __future__ import annotations

import functools
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle
from torchrec.distributed.types import Awaitable
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor, KeyedTensor

from recd_plugin.errors import UnsupportedModelError
from recd_plugin.modules.tower import DedupContext
from recd_plugin.sparse.dedup_kjt import DedupKJT
from recd_plugin.sparse.ikjt import is_aligned, jagged_index_select


def _feature(name: str) -> str:
    """TorchRec names a shared feature's output ``feature@table``."""
    return name.split("@", 1)[0]


def _carriers(kjt: KeyedJaggedTensor, names: Sequence[str], group_of: Dict[str, str]) -> List[Optional[Tuple[str, torch.Tensor]]]:
    """(group, carrier [B]) for each output name that belongs to a group; None otherwise."""
    inv_names, tensor = kjt.inverse_indices()
    index = {n: i for i, n in enumerate(inv_names)}
    out: List[Optional[Tuple[str, torch.Tensor]]] = []
    for name in names:
        f = _feature(name)
        g = group_of.get(f)
        out.append((g, tensor[index[f]]) if g is not None and f in index else None)
    return out


def gather_keyed_tensor(kt: KeyedTensor, carriers: List[Optional[Tuple[str, torch.Tensor]]]) -> KeyedTensor:
    """[B, sum D] pooled rows -> the same with each grouped key's rows taken from its carriers."""
    values = kt.values()
    runs: List[list] = []  # [group, carrier, start, end] of adjacent columns of one group (or none)
    start = 0
    for width, c in zip(kt.length_per_key(), carriers):
        group = c[0] if c is not None else None
        if runs and runs[-1][0] == group:
            runs[-1][3] += width
        else:
            runs.append([group, c[1] if c is not None else None, start, start + width])
        start += width
    blocks = [values[:, a:b] if carrier is None else values[:, a:b].index_select(0, carrier)
              for _, carrier, a, b in runs]
    return KeyedTensor(keys=kt.keys(), length_per_key=kt.length_per_key(),
                       values=blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=1), key_dim=kt.key_dim())


def gather_jagged(jt: JaggedTensor, carrier: torch.Tensor) -> JaggedTensor:
    """B jagged rows, duplicates empty -> every sample's row copied from its carrier."""
    values, lengths, positions = jagged_index_select(jt.values(), jt.lengths(), carrier)
    weights = jt.weights_or_none()
    return JaggedTensor(values=values, lengths=lengths.to(jt.lengths().dtype),
                        weights=weights.index_select(0, positions) if weights is not None else None)


class OutputGather:
    """The gather hooks of one model: which module paths, and the hook on each."""

    def __init__(self, ctx: DedupContext, paths: Sequence[str]) -> None:
        self.ctx = ctx
        self.paths = list(paths)
        self.group_of = {f: g.name for g in ctx.spec.groups for f in g.all_features}
        self._hooked: Dict[str, Tuple[nn.Module, RemovableHandle]] = {}
        self._root_handle: Optional[RemovableHandle] = None

    @classmethod
    def attach(cls, model: nn.Module, ctx: DedupContext, paths: Sequence[str]) -> "OutputGather":
        gather = cls(ctx, paths)
        gather._root_handle = model.register_forward_pre_hook(gather._follow)
        gather._follow(model, ())
        return gather

    def remove(self) -> None:
        for _, handle in self._hooked.values():
            handle.remove()
        self._hooked.clear()
        if self._root_handle is not None:
            self._root_handle.remove()
            self._root_handle = None

    def _follow(self, root: nn.Module, args: Any) -> None:
        for path in self.paths:
            module = root.get_submodule(path)
            hooked = self._hooked.get(path)
            if hooked is not None and hooked[0] is module:
                continue
            if hooked is not None:
                hooked[1].remove()
            self._hooked[path] = (module, module.register_forward_hook(functools.partial(self._after, path)))

    def _after(self, path: str, module: nn.Module, args: Tuple[Any, ...], output: Any) -> Any:
        own = args[0] if args and isinstance(args[0], KeyedJaggedTensor) else None
        if isinstance(module, EmbeddingBagCollection) and own is not None and own.inverse_indices_or_none() is not None:
            return None  # TorchRec's unsharded EBC applied the inverse indices itself
        # The batch's IKJT as the root model received it: code between the batch and this
        # module may have dropped the inverse indices (KeyedJaggedTensor.permute does).
        kjt = own if own is not None and is_aligned(own) else self.ctx.current()
        if kjt is None or not is_aligned(kjt):
            return None
        if isinstance(output, Awaitable):
            # A sharded module returns a LazyAwaitable of its output (TorchRec resolves it on
            # first use); gather when it resolves, so the output dist still overlaps compute.
            output.callbacks.append(functools.partial(self._gather, path, kjt))
            return None
        return self._gather(path, kjt, output)

    def _gather(self, path: str, kjt: KeyedJaggedTensor, output: Any) -> Any:
        group_of = self.group_of
        if isinstance(kjt, DedupKJT):  # only the groups this batch deduplicates have carriers
            group_of = {f: g for f, g in group_of.items() if g in kjt.dedup_groups}
        return gather_output(output, kjt, group_of, path)


def gather_output(output: Any, kjt: KeyedJaggedTensor, group_of: Dict[str, str], path: str = "") -> Any:
    """An EBC's ``KeyedTensor`` or an EC's ``Dict[str, JaggedTensor]`` computed on the aligned
    IKJT ``kjt`` -> every sample's rows taken from its carrier (``group_of``: feature -> group)."""
    if isinstance(output, KeyedTensor):
        carriers = _carriers(kjt, output.keys(), group_of)
        return gather_keyed_tensor(output, carriers) if any(c is not None for c in carriers) else output
    if isinstance(output, dict) and all(isinstance(v, JaggedTensor) for v in output.values()):
        names = list(output)
        carriers = _carriers(kjt, names, group_of)
        return {n: gather_jagged(output[n], c[1]) if c is not None else output[n] for n, c in zip(names, carriers)}
    # Never pass on rows that only the carriers filled: that would be silently wrong.
    raise UnsupportedModelError(
        f"recd-plugin: embedding module {path!r} returned a {type(output).__name__}, which the plugin "
        "cannot expand to the batch (expected a KeyedTensor, a dict of JaggedTensors, or TorchRec's "
        "awaitable of one). Set sharded=false in the flag, or report the module type.")
