"""``apply``: the one call that switches the plugin on for a (model, dataloader) pair.

In an ordinary TorchRec training script, after building the model and the loader::

    import recd_plugin
    config = recd_plugin.RecDConfig.load(args.recd)   # flag, else $RECD_PLUGIN, else off
    model, loader = recd_plugin.apply(config, model, loader)

With the plugin off, both come back untouched (the same objects). With it on, ``apply`` first
measures every feature group on the loader's first ``probe_batches`` batches and keeps only
the groups whose deduplication pays on this machine (one printed line per group says why;
``modules/probe.py``); with none left, both come back untouched. Then the model's embedding
modules and the configured towers are converted in place (``recd_plugin.remove`` undoes that)
and the loader is wrapped to yield IKJT batches; the flag's other sections (``fae``, ``des``)
are done by their techniques the same way (``recd_plugin/technique.py``: each one's checks,
conversion with undo and loader step, in their declared order). Every check runs before the model is changed,
so a bad config leaves the model as it was; a refusal that only the conversion itself can
raise (``modules/swap.py``) undoes what was done, so a refused ``apply`` leaves the model (module
tree, hooks, state_dict), the loader and the config exactly as they were.
"""

from __future__ import annotations

import dataclasses
import weakref
from typing import Any, Callable, Iterable, List, Optional, Tuple, TypeVar

from torch import nn

from recd_plugin._ranks import say
from recd_plugin.config import RecDConfig, as_flag
from recd_plugin.des.technique import DES
from recd_plugin.errors import UnsupportedModelError
from recd_plugin.fae.technique import FAE
from recd_plugin.modules.recd import RecD
from recd_plugin.modules.probe import decide, keep_groups, probe_batches
from recd_plugin.modules.swap import check_model
from recd_plugin.technique import TECHNIQUES, Technique, all_or_nothing, build, convert_all, undo_all
from recd_plugin.transforms.dedup import builds_in_workers, plain_loader

#: The built-in techniques: each registered itself when imported (recd_plugin/technique.py).
BUILT_IN = (FAE, RecD, DES)
M = TypeVar("M", bound=nn.Module)
Config = Any  # a RecDConfig (the flag) or one registered technique's config (FAEConfig, DESConfig, ...)
_UNDO: "weakref.WeakKeyDictionary[nn.Module, Callable[[], None]]" = weakref.WeakKeyDictionary()


def apply(config: Config, model: M, loader: Optional[Iterable[Any]] = None) -> Tuple[M, Any]:
    """Switch the plugin on for ``model`` and ``loader`` as ``config`` says.

    ``config``: the flag (``RecDConfig.load(flag)``: every technique it names), or one
    technique's config alone (``FAEConfig(...)``, ``DESConfig(...)``).

    Returns:
        (model, loader): the same model converted in place, and the loader wrapped as the
        techniques need (``None`` stays ``None``). Unchanged objects when the plugin is off.
    """
    config = as_flag(config)
    if not config.enabled:
        return model, loader
    if model in _UNDO:
        raise UnsupportedModelError("recd-plugin is already applied to this model; call remove() first")
    config.validate()
    check_model(model, build(config))
    chosen = config.groups, config.towers
    try:
        return _apply_checked(config, model, loader)
    except BaseException:
        # A refusal after the probe narrowed the caller's config: give it back as it was.
        config.groups, config.towers = chosen
        raise


def _apply_checked(config: RecDConfig, model: M, loader: Optional[Iterable[Any]]) -> Tuple[M, Any]:
    """``apply`` after the checks: probe, wrap the loader, convert the model. A refusal on the
    way (a loader a technique cannot take, a conversion that refuses a table) leaves model and
    loader as they were."""
    _keep_groups_that_pay(config, model, loader)
    if not config.parts():
        # nothing pays: TorchRec's plain path, untouched (batches that arrive as IKJTs expanded)
        return model, plain_loader(loader)
    config = dataclasses.replace(config, sharded=config.is_sharded())  # decided once, here
    techniques = build(config)
    # Wrap the loader before converting the model: a loader step may refuse the loader, and
    # nothing may change before every check has passed.
    wrapped, unwrap = _wrap(techniques, config, loader, model)
    with all_or_nothing([unwrap]):  # the loader back too if a technique refuses
        unconvert = convert_all(model, techniques)  # undoes its own work first

    def undo() -> None:
        unconvert()
        unwrap()

    _UNDO[model] = undo
    return model, wrapped


def _keep_groups_that_pay(config: RecDConfig, model: nn.Module, loader: Optional[Iterable[Any]]) -> None:
    """Measure each group on the loader's first batches (``modules/probe.py``); narrow
    ``config`` in place to the groups that pay, so that ``wrap(config, other_loader)`` later
    matches the converted model. One line per group says what was decided and why."""
    if not config.groups:
        return
    batches, why_not = probe_batches(loader, config.probe_batches)
    if batches is None:
        if loader is not None and config.probe_batches > 0:
            say(f"recd-plugin: every group deduplicated unmeasured: {why_not}")
        return
    decisions = decide(model, config, batches, config.probe_batches, aligned=config.is_sharded(),
                       build_in_loop=not builds_in_workers(loader, config.in_workers))
    for d in decisions:
        say(d.line())
    # u per group, summed over ranks: the planner hints read it (recd_plugin.sharding.for_dmp)
    config.probed_unique_fraction = {d.group: d.unique_fraction for d in decisions}
    narrowed = keep_groups(config, decisions)
    config.groups, config.towers = narrowed.groups, narrowed.towers


def wrap(config: Config, loader: Optional[Iterable[Any]], model: Optional[nn.Module] = None) -> Any:
    """The loader as ``apply`` wraps it; also for another loader (evaluation, test) of a model
    that ``apply`` converted.

    Each technique's loader step, in their declared order: FAE regroups batches into all-hot
    and mixed ones within ``fae.window`` batches (``HotBatchScheduler``; its feature -> table
    map comes from ``model``; unsharded only); RecD yields IKJT batches (``DedupLoader``), so
    that towers run on unique rows for this loader too. Returns the loader unchanged when the
    plugin is off; without RecD groups (none configured, or none kept by ``apply``'s probe,
    which narrows ``config``), a loader whose batches arrive deduplicated
    (``recd_plugin.storage.DedupReader``) yields them expanded to plain KJTs.
    """
    config = as_flag(config)
    if not config.enabled or loader is None:
        return loader
    if config.parts():
        config.validate()
    return _wrap(build(config), config, loader, model)[0]


def _wrap(techniques: List[Technique], config: RecDConfig, loader: Optional[Iterable[Any]],
          model: Optional[nn.Module]) -> Tuple[Any, Callable[[], None]]:
    """(the wrapped loader, undo): undo gives a wrapped ``DataLoader`` its own ``collate_fn`` back."""
    if loader is None:
        return None, lambda: None
    if not config.groups:  # TorchRec's plain path: a loader of IKJTs (storage.DedupReader) expanded
        loader = plain_loader(loader)
    with all_or_nothing([]) as undo:
        for t in techniques:
            wrapped = t.wrap_loader(loader, model)
            if wrapped is not loader and hasattr(wrapped, "unwrap"):  # a DedupLoader: collate_fn back
                undo.append(wrapped.unwrap)
            loader = wrapped
    return loader, lambda: undo_all(undo)


def remove(model: nn.Module) -> nn.Module:
    """Undo ``apply`` on ``model``: plain TorchRec modules again, no hooks, and the loader
    given to ``apply`` gets its own ``collate_fn`` back."""
    converted = tuple(t for technique in TECHNIQUES.values() for t in technique.converted_types)
    undo = _UNDO.pop(model, None)
    if undo is not None:
        undo()
    elif any(isinstance(m, converted) for m in model.modules()):
        raise UnsupportedModelError(
            "this model holds recd-plugin modules but was not converted by apply() itself (a copy "
            "of a converted model?); call remove() on the original before copying it"
        )
    return model
