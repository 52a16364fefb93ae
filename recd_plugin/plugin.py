"""``apply``: the one call that switches the plugin on for a (model, dataloader) pair.

In an ordinary TorchRec training script, after building the model and the loader::

    import recd_plugin
    config = recd_plugin.RecDConfig.load(args.recd)   # flag, else $RECD_PLUGIN, else off
    model, loader = recd_plugin.apply(config, model, loader)

With the plugin off, both come back untouched (the same objects). With it on, the model's
embedding modules and the configured towers are converted in place (``recd_plugin.remove``
undoes that) and the loader is wrapped to yield IKJT batches whose KJT the model's own code
reads as the plain batch (``recd_plugin/sparse/dedup_kjt.py``). Which groups stay
deduplicated is decided on the job's first training steps, timed both ways
(``recd_plugin/transforms/route.py``; one printed line per group). The flag's other sections
(``fae``, ``des``) are done by their techniques the same way (``recd_plugin/technique.py``:
each one's checks, conversion with undo and loader step, in their declared order). Every check
runs before the model is changed, so a bad config leaves the model as it was; a refusal that
only the conversion itself can raise (``modules/swap.py``) undoes what was done, so a refused
``apply`` leaves the model (module tree, hooks, state_dict), the loader and the config exactly
as they were. ``apply`` reads nothing from the loader and leaves every random state as it
found it (``recd_plugin/_rng.py``).
"""

from __future__ import annotations

import dataclasses
import weakref
from typing import Any, Callable, Iterable, List, Optional, Tuple, TypeVar

from torch import nn

from recd_plugin._rng import random_state_kept
from recd_plugin.config import RecDConfig, as_flag
from recd_plugin.des.technique import DES
from recd_plugin.errors import UnsupportedModelError
from recd_plugin.fae.technique import FAE
from recd_plugin.modules.recd import RecD, decider_of
from recd_plugin.modules.swap import check_model
from recd_plugin.technique import TECHNIQUES, Technique, all_or_nothing, build, convert_all, undo_all
from recd_plugin.transforms.dedup import check_not_deduplicated, plain_loader
from recd_plugin.transforms.route import GroupDecision

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
    check_not_deduplicated(loader)
    with random_state_kept(loader):  # nothing the plugin does may move the user's RNG
        check_model(model, build(config))
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


def decisions(model: nn.Module) -> Optional[List[GroupDecision]]:
    """What the job's first training steps decided for each feature group of ``model`` (one
    ``GroupDecision`` per group: kept or not, measured step times, why); None while the
    measurement is under way or when ``apply`` did not deduplicate ``model``."""
    decider = decider_of(model)
    if decider is None or decider.decided is None:
        return None
    return list(decider.decisions) or [GroupDecision(g, True, decider.why_not_measured) for g in decider.decided]


def wrap(config: Config, loader: Optional[Iterable[Any]], model: Optional[nn.Module] = None) -> Any:
    """The loader as ``apply`` wraps it; also for another loader (evaluation, test) of a model
    that ``apply`` converted.

    Each technique's loader step, in their declared order: FAE regroups batches into all-hot
    and mixed ones within ``fae.window`` batches (``HotBatchScheduler``; its feature -> table
    map comes from ``model``; unsharded only); RecD yields IKJT batches (``DedupLoader``), so
    that towers run on unique rows for this loader too. Given ``model`` (converted by
    ``apply``), the loader follows the groups decided on its training steps (every group until
    then: both routes compute the same). Returns the loader unchanged when the plugin is off;
    without RecD groups, a loader whose batches arrive deduplicated
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
