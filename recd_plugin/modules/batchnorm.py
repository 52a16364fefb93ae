"""Exact batch statistics for the batch-norm layers inside a dedup tower.

A dedup tower runs on the U unique rows of a group; a batch-norm layer inside it would take
its mean and variance over those U rows, each session once, instead of over the B samples
(plugin off), so both its output and its running statistics would drift. Here the forward of
every torch batch-norm layer in a tower (``BatchNorm1d/2d/3d``, ``SyncBatchNorm``) is replaced,
on the instance only, by the same computation with each row weighted by the number of samples
it stands for (``torch.bincount(inverse, minlength=U)``; rows padded in for equal per-rank
counts weigh 0; L is the number of elements per row and channel, 1 for 2-D input):

    mean = sum_i c_i x_i / n,   var = sum_i c_i (x_i - mean)^2 / n,   n = B * L

normalized with the biased ``var``; the running statistics are updated as torch does (momentum
or, with ``momentum=None``, the cumulative average over ``num_batches_tracked``; the unbiased
``var * n / (n - 1)``). ``SyncBatchNorm`` all-reduces the weighted sums and counts over its
process group, through ``torch.distributed.nn`` so that gradients cross ranks as in torch's
own. The forward is one differentiable function of the U rows, so autograd gives the plain
path's gradients: a row's gradient is the sum of its samples'.

Layers using their running statistics (eval mode) are per-sample and keep torch's forward, as
does a plain batch-norm layer while its tower sees a batch without repeats (B rows).
``check_tower_layers`` refuses, before anything is installed, the layers inside a tower that
reduce over the batch in a way this module cannot weight.
"""

from __future__ import annotations

import math
from typing import Callable, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from recd_plugin.errors import UnsupportedModelError

#: (counts [U] int64, B) of the tower's current call, or None while it runs on B plain rows.
RowCounts = Callable[[], Optional[Tuple[torch.Tensor, int]]]

#: torch's own forwards, which the weighted one reproduces; a subclass overriding ``forward``
#: computes something this module cannot know.
_STOCK_FORWARDS = (_BatchNorm.forward, nn.SyncBatchNorm.forward)
_SOFTMAXES = (nn.Softmax, nn.LogSoftmax, nn.Softmin)


def _refusal(layer: nn.Module) -> Optional[str]:
    """Why ``layer`` reduces over the batch in a way a tower cannot weight, and the fix; or None."""
    if isinstance(layer, _BatchNorm) and type(layer).forward not in _STOCK_FORWARDS:
        return ("overrides the batch-norm forward, so its batch statistics cannot be weighted by "
                "session counts; use torch's BatchNorm/SyncBatchNorm forward or move it out of the tower")
    if isinstance(layer, _InstanceNorm) and layer.track_running_stats:
        return ("averages its running statistics over the batch (track_running_stats=True), which "
                "would count each session once; set track_running_stats=False or move it out of the tower")
    if isinstance(layer, _SOFTMAXES) and layer.dim == 0:
        return "normalizes over dim 0, the batch; normalize over a feature dimension or move it out of the tower"
    return None


def check_tower_layers(module: nn.Module, name: str) -> None:
    """Raise ``UnsupportedModelError`` if ``module`` (the tower ``name``) holds a layer that
    reduces over the batch dimension and that the plugin cannot make exact.

    The torch batch-norm layers (``BatchNorm1d/2d/3d``, ``SyncBatchNorm``) are exact inside a
    tower (``weight_batch_norms``); instance, group and layer norms are per-sample. Modules
    of your own that mix rows of the batch cannot be detected: keep them out of towers.
    """
    for path, layer in module.named_modules():
        why = _refusal(layer)
        if why is not None:
            where = f"{name}.{path}" if path else name
            raise UnsupportedModelError(
                f"recd tower {name!r}: layer {where!r} ({type(layer).__name__}) {why}. A tower runs "
                "once per unique session, so a layer that reduces over the batch would see each "
                "session once instead of once per sample."
            )


def _sync_group(bn: _BatchNorm) -> Optional[dist.ProcessGroup]:
    """The process group ``bn`` synchronizes over in this call, as torch's SyncBatchNorm
    decides it (training mode, more than one rank); None for a local layer."""
    if not (isinstance(bn, nn.SyncBatchNorm) and bn.training and dist.is_available() and dist.is_initialized()):
        return None
    group = bn.process_group or dist.group.WORLD
    return group if dist.get_world_size(group) > 1 else None


def _average_factor(bn: _BatchNorm) -> float:
    """Advance ``num_batches_tracked`` and return the running-average factor, as torch's forward."""
    if not (bn.training and bn.track_running_stats and bn.num_batches_tracked is not None):
        return 0.0 if bn.momentum is None else bn.momentum
    bn.num_batches_tracked.add_(1)
    return 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum


def _sum_over_ranks(t: torch.Tensor, group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    if group is None:
        return t
    from torch.distributed.nn.functional import all_reduce  # differentiable: the backward all-reduces too

    return all_reduce(t, group=group)


def count_weighted_batch_norm(bn: _BatchNorm, x: torch.Tensor, counts: torch.Tensor, samples: int,
                              group: Optional[dist.ProcessGroup] = None) -> torch.Tensor:
    """``bn`` applied with batch statistics to x [U, C, *] whose row i stands for ``counts[i]``
    samples ([U]; ``samples`` = their sum B): the output [U, C, *] equals ``bn(x[inverse])``'s
    rows, and the running statistics advance as for those B samples. ``group``: all-reduce the
    statistics over its ranks (SyncBatchNorm)."""
    per_row = math.prod(x.shape[2:])
    if group is None and samples * per_row == 1:
        # torch's own refusal (F.batch_norm), for the batch the plain path would have seen
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {samples * per_row}")
    factor = _average_factor(bn)
    dtype = torch.promote_types(x.dtype, torch.float32)  # half inputs: float32 statistics, as torch's kernels
    shape = (1, x.shape[1]) + (1,) * (x.dim() - 2)
    dims = [0, *range(2, x.dim())]
    xf = x.to(dtype)
    counts = counts.to(device=x.device, dtype=dtype)
    w = counts.view((-1,) + (1,) * (x.dim() - 1))
    total = _sum_over_ranks(torch.cat([(w * xf).sum(dims), counts.sum().view(1) * per_row]), group)
    n = total[-1]
    mean = total[:-1] / n
    centered = xf - mean.view(shape)
    # Two passes (mean, then squared deviations) rather than E[x^2] - mean^2: no cancellation.
    var = _sum_over_ranks((w * centered * centered).sum(dims), group) / n
    y = centered * torch.rsqrt(var + bn.eps).view(shape)
    if bn.weight is not None:
        y = y * bn.weight.to(dtype).view(shape)
    if bn.bias is not None:
        y = y + bn.bias.to(dtype).view(shape)
    if bn.training and bn.track_running_stats and bn.running_mean is not None and bn.running_var is not None:
        with torch.no_grad():
            bn.running_mean.mul_(1 - factor).add_(mean.to(bn.running_mean.dtype), alpha=factor)
            unbiased = var * n / (n - 1)
            bn.running_var.mul_(1 - factor).add_(unbiased.to(bn.running_var.dtype), alpha=factor)
    return y.to(x.dtype)


class _WeightedForward:
    """The instance ``forward`` of one batch-norm layer inside a tower (see the module docstring)."""

    def __init__(self, bn: _BatchNorm, where: str) -> None:
        self.bn, self.where = bn, where
        #: one per tower holding the layer (a layer object may be shared by two towers)
        self.sources: List[RowCounts] = []

    def rows(self) -> Optional[Tuple[torch.Tensor, int]]:
        """The counts of the tower now running on unique rows, if any."""
        return next((r for r in (source() for source in self.sources) if r is not None), None)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        bn = self.bn
        group = _sync_group(bn)
        rows = self.rows()
        batch_stats = bn.training or (bn.running_mean is None and bn.running_var is None)
        # Running statistics are per-sample; a plain batch of B rows is the plain path. A synced
        # layer always takes the weighted route, so that every rank runs the same collectives.
        if not batch_stats or (rows is None and group is None):
            return type(bn).forward(bn, x)
        bn._check_input_dim(x)
        if rows is None:
            counts, samples = torch.ones(x.shape[0], dtype=torch.long, device=x.device), x.shape[0]
        else:
            counts, samples = rows
            if x.shape[0] != counts.numel():
                raise UnsupportedModelError(
                    f"batch-norm layer {self.where!r} got input of shape {tuple(x.shape)} inside its dedup "
                    f"tower, whose call runs on {counts.numel()} unique rows: its batch statistics can be "
                    "weighted only when the layer's first dimension is the tower's rows. Reshape to "
                    "[rows, C, ...] before the layer, or move it out of the tower."
                )
        return count_weighted_batch_norm(bn, x, counts, samples, group)


class WeightedHandle:
    """Takes one tower's counts off its batch-norm layers; a layer left without a tower gets
    torch's forward back."""

    def __init__(self, patches: List[_WeightedForward], rows: RowCounts) -> None:
        self._patches, self._rows = patches, rows

    def remove(self) -> None:
        for patch in self._patches:
            if self._rows in patch.sources:
                patch.sources.remove(self._rows)
            if not patch.sources and vars(patch.bn).get("forward") is patch:
                del patch.bn.forward


def weight_batch_norms(module: nn.Module, name: str, rows: RowCounts) -> WeightedHandle:
    """Make every torch batch-norm layer in the tower ``module`` weight its rows by ``rows()``
    (refusing first what ``check_tower_layers`` refuses). Type, parameters, buffers and
    state_dict keys are unchanged: only the instances' ``forward`` is set."""
    check_tower_layers(module, name)
    patches: List[_WeightedForward] = []
    for path, layer in module.named_modules():
        if not isinstance(layer, _BatchNorm):
            continue
        patch = vars(layer).get("forward")
        if not isinstance(patch, _WeightedForward):
            patch = _WeightedForward(layer, f"{name}.{path}" if path else name)
            layer.forward = patch  # type: ignore[method-assign]  # instance attribute: the class is untouched
        patch.sources.append(rows)
        patches.append(patch)
    return WeightedHandle(patches, rows)
