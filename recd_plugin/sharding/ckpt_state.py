"""Model and optimizer state in a checkpoint: what is saved, and a resume that changes nothing
unless all of it succeeds.

Saved: ``{"model": model.state_dict(), "optim": ...}``. The optimizer part is keyed by
parameter name either way: TorchRec's keyed optimizers (``CombinedOptimizer``,
``KeyedOptimizerWrapper``, DMP's ``fused_optimizer``) give their own ``state_dict()``; a plain
``torch.optim`` optimizer goes through torch's ``get_optimizer_state_dict`` /
``set_optimizer_state_dict``, which name its state by parameter and create its lazy state
(Adam's moments) on load, where loading into its empty ``state_dict()`` kept nothing.

Resume loads into a *staged* copy (fresh tensors shaped and sharded like the live ones, or
like the saved ones where the live optimizer has no state yet), checked against the
checkpoint's metadata first (keys, shapes, optimizer type and state names), and copies it into
the model and optimizer only once everything is read. A resume therefore needs memory for a
second copy of the state while it runs.

The manifest also records each optimizer's configuration (:func:`configuration`): a resume
with other hyperparameters is refused before anything is read, because loading would either
override this job's settings (torch's ``load_state_dict`` restores the saved param groups) or
give a TorchRec keyed optimizer state that its settings do not create (momentum buffers to
plain SGD).
"""

from __future__ import annotations

import copy
import json
import numbers
import warnings
from typing import Any, Dict, List, Optional, Set, Tuple

import torch
from torch import nn
from torch.distributed._shard.sharded_tensor import ShardedTensor
# Private in torch (2.13 and 2.14 alike): DCP's own key flattening, so the staged copy is keyed
# exactly as the checkpoint's metadata; tests/test_checkpoint.py runs on both supported stacks.
from torch.distributed.checkpoint._nested_dict import flatten_state_dict, unflatten_state_dict
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizer

from recd_plugin.errors import CheckpointError

State = Dict[str, Any]
Parts = Dict[str, torch.optim.Optimizer]  # root in the checkpoint ("optim", "fused") -> optimizer
Path_ = Tuple[Any, ...]
_SHOWN = 6  # problems listed in one message


def optimizers(model: nn.Module, optimizer: Optional[torch.optim.Optimizer]) -> Parts:
    """The optimizers a checkpoint holds, by their root in it: ``optim``, the one passed, and
    under DMP ``fused``, DMP's ``fused_optimizer`` when the one passed does not include it: the
    sharded tables' optimizer state (Adagrad's momentum) lives there, and a plain torch
    optimizer for the dense part would leave it behind. None (weights only): nothing."""
    if optimizer is None:
        return {}
    parts = {"optim": optimizer}
    fused = model.fused_optimizer if isinstance(model, DistributedModelParallel) else None
    if fused is not None and not _contains(optimizer, fused):
        parts["fused"] = fused
    return parts


def _contains(optimizer: torch.optim.Optimizer, part: torch.optim.Optimizer) -> bool:
    inner = [o for _, o in optimizer.optimizers] if isinstance(optimizer, CombinedOptimizer) else [
        getattr(optimizer, "_optimizer", None)]
    return optimizer is part or any(isinstance(o, torch.optim.Optimizer) and _contains(o, part) for o in inner)


def signature(parts: Parts) -> Dict[str, List[str]]:
    """Per root, the optimizer classes, outermost wrappers included (one entry per part of a
    CombinedOptimizer): what a resume compares to refuse another optimizer type."""
    return {root: _classes(optimizer) for root, optimizer in parts.items()}


def _classes(optimizer: torch.optim.Optimizer) -> List[str]:
    if isinstance(optimizer, CombinedOptimizer):
        return [f"{key}:{c}" if key else c for key, part in optimizer.optimizers for c in _classes(part)]
    name = type(optimizer).__qualname__  # not the module: TorchRec moves classes between releases
    inner = getattr(optimizer, "_optimizer", None)  # KeyedOptimizerWrapper and TorchRec's OptimizerWrapper
    return [f"{name}({', '.join(_classes(inner))})"] if isinstance(inner, torch.optim.Optimizer) else [name]


#: Optimizer settings a resume does not compare. ``lr``: LR schedules change it while training
#: (a plain torch optimizer gets the saved value back, as torch's load_state_dict does; a keyed
#: one keeps its own). The others pick a kernel, not the math or the state names. Keys starting
#: with "_" are TorchRec's bookkeeping (``_save_param_groups``).
_NOT_COMPARED = frozenset({"lr", "foreach", "fused", "capturable", "differentiable"})


def configuration(parts: Parts) -> Dict[str, List[Dict[str, Any]]]:
    """Per root, per optimizer inside it (CombinedOptimizer parts, wrapped optimizers): its part
    key, class and constructor hyperparameters as JSON values, for the manifest. ``defaults``,
    not the param groups: schedules (OneCycleLR's momentum cycling too) change the groups while
    training, never the values the optimizer was built with."""
    return {root: [{"part": key, "type": type(leaf).__qualname__,
                    "hyperparameters": {k: _plain(v) for k, v in sorted((getattr(leaf, "defaults", None) or {}).items())
                                        if k not in _NOT_COMPARED and not str(k).startswith("_")}}
                   for key, leaf in _named_leaves(optimizer)]
            for root, optimizer in parts.items()}


def _plain(value: Any) -> Any:
    """``value`` as a JSON value that compares equal when the setting is the same."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return f"<{type(value).__qualname__}>"  # e.g. a callable: its repr holds an address


def check_configuration(parts: Parts, saved: Optional[Dict[str, Any]], metadata: Metadata) -> None:
    """Refuse a resume whose optimizers were built with other hyperparameters than the saved
    ones (``saved``: the manifest's record; None for a checkpoint written before it had one).
    Only settings both sides know are compared, so a torch upgrade that adds an option does
    not refuse an old checkpoint."""
    if not saved or not parts:
        return
    live = json.loads(json.dumps(configuration(parts)))  # tuples become lists, as in the manifest
    problems = []
    for root, leaves in live.items():
        kept = saved.get(root) if isinstance(saved.get(root), list) else []
        for was, now in zip(kept, leaves):
            part = f"[{now['part']}]" if now["part"] else ""
            where = f"{root}{part} {now['type']}"
            before = was.get("hyperparameters") if isinstance(was, dict) else None
            if not isinstance(before, dict) or was.get("type") != now["type"]:
                problems.append(f"{where}: saved as {was!r}")
                continue
            problems += [f"{where} {k}={before[k]!r} in the checkpoint, {now['hyperparameters'][k]!r} here"
                         for k in sorted(set(before) & set(now["hyperparameters"]))
                         if before[k] != now["hyperparameters"][k]]
    if problems:
        state = "; ".join(f"{root}: {_names({p for ps in _by_param(_saved(metadata, root)).values() for p in ps})}"
                          for root in live)
        raise CheckpointError(
            f"the checkpoint was saved with another optimizer configuration: {'; '.join(problems[:_SHOWN])}"
            f"{f' (and {len(problems) - _SHOWN} more)' if len(problems) > _SHOWN else ''}. Its per-parameter "
            f"optimizer state ({state}) belongs to that configuration: loading it would drop that state or "
            "silently replace this job's settings. Resume with the optimizer configuration the checkpoint was "
            "saved with, or start from a fresh checkpoint directory (resume(model, None) loads the weights only "
            "and starts the optimizer fresh)")


def state_to_save(model: nn.Module, parts: Parts) -> State:
    state: State = {"model": model.state_dict()}
    for root, optimizer in parts.items():
        if isinstance(optimizer, KeyedOptimizer):
            state[root] = optimizer.state_dict()
            continue
        fresh = not optimizer.state
        state[root] = get_optimizer_state_dict(_unwrapped(model), optimizer)
        if fresh:
            # The helper creates lazy state with a zero-gradient step (Adam's step becomes 1);
            # saving an optimizer that has not stepped yet must not change how it steps next.
            optimizer.state.clear()
            state[root]["state"] = {}
    return state


def _unwrapped(model: nn.Module) -> nn.Module:
    """The module whose attribute paths are the parameter names: torch's state-dict helpers walk
    them, and DMP's names skip its wrappers (``_dmp_wrapped_module``, DDP's ``module``)."""
    return model.module if isinstance(model, DistributedModelParallel) else model


# ------------------------------------------------------------------------------------ staging


def _fresh_like(value: Any) -> Any:
    """An unshared copy to load into: same shape, dtype, device and sharding (ShardedTensor,
    DTensor), contents undefined; other values deep-copied."""
    if isinstance(value, (torch.Tensor, ShardedTensor)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # ShardedTensor's creation ops warn about their deprecation
            return torch.empty_like(value)
    return copy.deepcopy(value)


def _saved(metadata: Metadata, root: str) -> Dict[str, Path_]:
    """flat key -> object path of the saved entries under ``root`` ("model" or "optim")."""
    paths = metadata.planner_data or {}
    return {k: tuple(p) for k, p in paths.items() if p and p[0] == root}


def _from_metadata(metadata: Metadata, saved: Dict[str, Path_]) -> State:
    """Fresh host tensors shaped like the saved entries ``saved`` (nested as saved); the
    optimizer copies them to its parameters' devices when it loads them."""
    entries = {k: metadata.state_dict_metadata[k] for k in saved}
    flat = {k: None if isinstance(m, BytesStorageMetadata) else torch.empty(m.size, dtype=m.properties.dtype)
            for k, m in entries.items()}
    return unflatten_state_dict(flat, saved)


def _shape_problems(template: State, metadata: Metadata) -> List[str]:
    """Entries of ``template`` the checkpoint lacks or holds with another shape or kind."""
    problems = []
    for key, value in flatten_state_dict(template)[0].items():
        saved = metadata.state_dict_metadata.get(key)
        is_tensor = isinstance(value, (torch.Tensor, ShardedTensor))
        if saved is None:
            problems.append(f"no {key!r} in the checkpoint")
        elif isinstance(saved, BytesStorageMetadata) == is_tensor:
            problems.append(f"{key!r} is {'a tensor' if is_tensor else 'not a tensor'} here, not in the checkpoint")
        elif is_tensor and tuple(saved.size) != tuple(value.size()):
            problems.append(f"{key!r} has shape {list(value.size())} here, {list(saved.size)} in the checkpoint")
    return problems


def _by_param(paths: Dict[str, Path_]) -> Dict[str, Set[Path_]]:
    """Optimizer ``state`` entries grouped by parameter: param key -> paths below it."""
    out: Dict[str, Set[Path_]] = {}
    for p in paths.values():
        if len(p) > 3 and p[1] == "state":
            out.setdefault(p[2], set()).add(p[3:])
    return out


def _keyed_template(root: str, optimizer: KeyedOptimizer, metadata: Metadata, problems: List[str]) -> State:
    """Live state copied fresh, plus the saved state of parameters whose state the optimizer
    creates lazily (a fresh KeyedOptimizerWrapper's dense part): TorchRec's load copies into
    existing state only, so :func:`apply` creates it first."""
    live = optimizer.state_dict()
    template = {"state": {p: {n: _fresh_like(v) for n, v in s.items()} for p, s in live["state"].items()},
                **{k: copy.deepcopy(v) for k, v in live.items() if k != "state"}}
    saved = _saved(metadata, root)
    saved_by, live_by = _by_param(saved), _by_param(flatten_state_dict({root: live})[1])
    for key in sorted(set(saved_by) | set(live_by)):
        if key in live_by and saved_by.get(key) != live_by[key]:
            problems.append(f"optimizer state of {key!r}: the checkpoint has {_names(saved_by.get(key))}, "
                            f"this optimizer keeps {_names(live_by[key])}")
        elif key not in live_by and not (key in optimizer.params and optimizer.params[key].requires_grad):
            problems.append(f"the checkpoint has optimizer state {_names(saved_by[key])} for {key!r}, which this "
                            f"optimizer {'does not hold' if key not in optimizer.params else 'keeps no state for'} "
                            "(another optimizer type?)")
        elif key not in live_by:
            template["state"][key] = _from_metadata(metadata, {
                k: p[3:] for k, p in saved.items() if len(p) > 3 and p[1] == "state" and p[2] == key})
    return template


def _names(paths: Optional[Set[Path_]]) -> str:
    return str(sorted(".".join(map(str, p)) for p in paths or ())) if paths else "none"


def _torch_template(root: str, model: nn.Module, optimizer: torch.optim.Optimizer, metadata: Metadata,
                    problems: List[str]) -> State:
    """The saved state as fresh host tensors (a fresh torch optimizer has none to copy), for
    parameters this optimizer updates."""
    saved = _saved(metadata, root)
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in held}
    for key in sorted(set(_by_param(saved)) - names):
        problems.append(f"the checkpoint has optimizer state for {key!r}, which this optimizer does not update")
    template = _from_metadata(metadata, {k: p[1:] for k, p in saved.items()})
    template.setdefault("state", {})  # saved before the first step: no state entries at all
    return template


def stage(model: nn.Module, parts: Parts, metadata: Metadata, saved_signature: Dict[str, List[str]],
          saved_config: Optional[Dict[str, Any]] = None) -> State:
    """What to load the checkpoint into, checked against its ``metadata``: every key of the
    model there and nothing more, the same shapes, the same optimizer types, configuration
    (``saved_config``, the manifest's record) and state names. Raises CheckpointError listing
    what does not match."""
    if parts and saved_signature != signature(parts):
        raise CheckpointError(
            f"the checkpoint's optimizer state was saved by {saved_signature or 'no optimizer'}, this job resumes "
            f"with {signature(parts)}: loading it would drop or misread that state (moments, momentum, step). "
            "Build the optimizer the saved job used, or start from a fresh checkpoint directory; "
            "resume(model, None) loads the weights only and starts the optimizer fresh")
    check_configuration(parts, saved_config, metadata)
    problems: List[str] = []
    template: State = {"model": {k: _fresh_like(v) for k, v in model.state_dict().items()}}
    in_model = set(flatten_state_dict(template)[0])
    problems += [f"the checkpoint holds {k!r}, which the model does not have" for k in _saved(metadata, "model")
                 if k not in in_model]
    for root, optimizer in parts.items():
        template[root] = (_keyed_template(root, optimizer, metadata, problems) if isinstance(optimizer, KeyedOptimizer)
                          else _torch_template(root, model, optimizer, metadata, problems))
    problems += _shape_problems(template, metadata)
    if problems:
        more = f" (and {len(problems) - _SHOWN} more)" if len(problems) > _SHOWN else ""
        raise CheckpointError(f"the checkpoint does not fit this model and optimizer: {'; '.join(problems[:_SHOWN])}"
                              f"{more}. Build the model and optimizer the saved job used (same modules, table "
                              "sizes and optimizer types)")
    return template


def check_groups(model: nn.Module, parts: Parts, staged: State) -> None:
    """After the load, before anything is applied: a torch optimizer's parameter groups must
    split the parameters as the saved ones did (their hyperparameters are restored by group;
    the saved groups are known only once read)."""
    names = {id(p): n for n, p in model.named_parameters()}
    for root, optimizer in parts.items():
        if isinstance(optimizer, KeyedOptimizer):
            continue
        live = sorted(sorted(names.get(id(p), "?") for p in g["params"]) for g in optimizer.param_groups)
        saved = sorted(sorted(g.get("params", [])) for g in staged[root].get("param_groups", []))
        if live != saved:
            raise CheckpointError(f"the optimizer's parameter groups {live} differ from the saved ones {saved}: "
                                  "build the optimizer with the parameter groups of the saved job")


def apply(model: nn.Module, parts: Parts, staged: State) -> None:
    """Copy the loaded ``staged`` state into the optimizers, then the model (the optimizers
    first: TorchRec's ``init_state`` takes a zero-gradient step, which the model's load then
    overwrites)."""
    for root, optimizer in parts.items():
        if isinstance(optimizer, KeyedOptimizer):
            _apply_keyed(optimizer, staged[root])
        else:
            set_optimizer_state_dict(_unwrapped(model), optimizer, staged[root], options=StateDictOptions(strict=False))
    model.load_state_dict(staged["model"])


def _apply_keyed(optimizer: KeyedOptimizer, staged: State) -> None:
    """TorchRec's load copies into existing state only, and needs every parameter's: lazy state
    is created first by ``init_state()`` (a step on zero gradients). If the saved job never
    stepped a parameter that step gave state to, the load fails, and the step is undone."""
    if not set(staged["state"]) - set(optimizer.state_dict()["state"]):
        optimizer.load_state_dict(staged)
        return
    dense = [(p, p.detach().clone(), p.grad) for p in optimizer.params.values() if p.requires_grad]
    empty = [leaf for leaf in _leaves(optimizer) if not leaf.state]
    optimizer.init_state()
    try:
        # A checkpoint without a configuration record (older) can still hold state this
        # optimizer does not create (momentum buffers, plain SGD here): name that, not a count.
        created = optimizer.state_dict()["state"]
        other = sorted(k for k, s in staged["state"].items() if set(s) != set(created.get(k, {})))
        if other:
            raise CheckpointError(
                f"optimizer state of {other[0]!r}: the checkpoint has {sorted(staged['state'][other[0]])}, this "
                f"optimizer creates {sorted(created.get(other[0], {}))}: it was saved with another optimizer "
                "configuration. Resume with the optimizer configuration the checkpoint was saved with, or start "
                "from a fresh checkpoint directory (resume(model, None) loads the weights only)")
        optimizer.load_state_dict(staged)
    except (KeyError, ValueError, CheckpointError) as e:
        for leaf in empty:
            leaf.state.clear()
        for p, value, _ in dense:
            p.detach().copy_(value)  # a zero-gradient step moves weights under weight decay
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"the checkpoint lacks optimizer state that this optimizer creates on its first "
                              f"step ({e}): the saved job never stepped some parameters. TorchRec optimizers "
                              "load the state of every parameter; resume with resume(model, None) to load the "
                              "weights only") from None
    finally:
        for p, _, grad in dense:
            p.grad = grad  # init_state leaves zero gradients behind


def _leaves(optimizer: torch.optim.Optimizer) -> List[torch.optim.Optimizer]:
    """The optimizers inside ``optimizer`` (itself if none) whose state a step creates."""
    return [leaf for _, leaf in _named_leaves(optimizer)]


def _named_leaves(optimizer: torch.optim.Optimizer, key: str = "") -> List[Tuple[str, torch.optim.Optimizer]]:
    """:func:`_leaves` with their CombinedOptimizer keys ("" outside one), for messages."""
    if isinstance(optimizer, CombinedOptimizer):
        return [leaf for k, part in optimizer.optimizers
                for leaf in _named_leaves(part, ".".join(x for x in (key, k) if x))]
    inner = getattr(optimizer, "_optimizer", None)
    return _named_leaves(inner, key) if isinstance(inner, torch.optim.Optimizer) else [(key, optimizer)]
