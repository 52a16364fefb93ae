"""RecD as a registered technique (``recd_plugin/technique.py``): its checks, model conversion
and loader step, for the flag's groups and towers (the ``RecDConfig`` itself is its config).

* ``check``: every group feature is read by an embedding table of the model; towers are
  submodules, not nested, not embedding modules, read only their group's features and have no
  layer that reduces over the batch other than BatchNorm (``modules/batchnorm.py``); a
  subclass of TorchRec's EC / EBC with its own ``forward`` that reads a grouped feature is
  refused (it would read the IKJT as the batch).
* ``convert``, unsharded: every EC / EBC is swapped for its dedup-aware version (TorchRec's EC
  would misread an IKJT; its EBC reads it but expands slowly on CPU). Sharded: nothing is
  swapped, since DMP's default sharders shard only TorchRec's exact module types; the modules
  reading a group get their outputs gathered from the aligned IKJT's carrier rows
  (``modules/gather.py``). Then the towers get their hooks (``modules/tower.py``). State-dict
  keys never change: swapped modules share the originals' submodules, towers are hooks.
* ``wrap_loader``: the loader yields IKJT batches (``DedupLoader``; aligned when sharded) whose
  KJT model code reads as the plain batch (``recd_plugin.sparse.dedup_kjt``), each on the route
  the group decision asks for: its first training steps time each group both ways, and a group
  stays deduplicated only where it pays (``recd_plugin.transforms.route``; ``route = "dedup"``
  keeps every group unmeasured). The decision is kept with the model (:func:`decider_of`):
  another loader wrapped for it (``recd_plugin.wrap(config, loader, model)``) follows it.
"""

from __future__ import annotations

import weakref
from typing import Any, Dict, List, Optional

from torch import nn
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection

from recd_plugin._ranks import say
from recd_plugin.config import RecDConfig
from recd_plugin.errors import DedupSpecError, UnsupportedModelError, did_you_mean
from recd_plugin.modules import tower as _tower
from recd_plugin.modules.base import DedupModule
from recd_plugin.modules.batchnorm import check_tower_layers
from recd_plugin.modules.swap import (custom_forward_modules, dedup_class, gathered_paths, model_features,
                                      subclass_refused, swap_modules)
from recd_plugin.modules.tower import DedupContext
from recd_plugin.technique import Technique, Undo, all_or_nothing, register_technique
from recd_plugin.transforms.dedup import DedupLoader
from recd_plugin.transforms.route import RouteDecider

#: model -> its group decision (one per ``apply``), for the loaders wrapped for it later.
_DECIDERS: "weakref.WeakKeyDictionary[nn.Module, RouteDecider]" = weakref.WeakKeyDictionary()


def decider_of(model: nn.Module) -> Optional[RouteDecider]:
    """The group decision ``apply`` attached to ``model`` (None if it has none)."""
    return _DECIDERS.get(model)


@register_technique
class RecD(Technique):
    """In-batch deduplication of the flag's feature groups (order 20: after FAE's hot/cold
    layout, whose modules read IKJTs themselves and are left alone by the swap)."""

    config_type = RecDConfig
    name = "recd"
    order = 20
    converted_types = (DedupModule,)
    config: RecDConfig

    def __init__(self, config: RecDConfig, flag: RecDConfig, sharded: bool) -> None:
        super().__init__(config, flag, sharded)
        self.decider = RouteDecider([g.name for g in config.groups], measure=config.measures_routes())
        if config.route == "measure" and not config.measures_routes():
            self.decider.why_not_measured = "probe_batches = 0 in the flag"

    def check(self, model: nn.Module) -> None:
        config = self.config
        known = model_features(model)
        for g in config.groups:
            for f in g.features:
                if f not in known:
                    raise DedupSpecError(
                        f"group {g.name!r} names feature {f!r}, which no embedding table of the "
                        f"model reads{did_you_mean(f, sorted(known))}; model features: {sorted(known)}"
                    )
        grouped = {f for g in config.groups for f in g.all_features}
        for path, m, reads in custom_forward_modules(model, config):
            why = [f"reads grouped feature {f!r}" for f in sorted(reads & grouped)]
            if why:
                raise subclass_refused(path, m, why[0])
        modules = dict(model.named_modules())
        for path in config.towers:
            _check_tower(config, modules, path)
            random = random_modules(modules[path], path)
            if random and config.tower_randomness == "refuse":
                raise UnsupportedModelError(
                    f"recd tower {path!r} draws randomness in training ({', '.join(random)}): on unique rows it "
                    "draws once per session instead of once per sample, so losses would differ from plugin-off "
                    "(tower_randomness = refuse in the flag). Fix: set those modules' p to 0, or leave the tower "
                    "out of the flag (or allow it: tower_randomness = allow; docs/recd.md explains the effect)")

    def convert(self, model: nn.Module) -> List[Undo]:
        decider = self.decider
        ctx = DedupContext.attach(model, self.config.spec, pad_over_ranks=self.sharded, observer=decider.observe)
        _DECIDERS[model] = decider
        with all_or_nothing([ctx.detach, lambda: _DECIDERS.pop(model, None)]) as undo:
            if self.sharded:
                from recd_plugin.modules.gather import OutputGather  # sharded mode only

                undo.append(OutputGather.attach(model, ctx, gathered_paths(model, self.config)).remove)
            else:
                undo.extend(_swap_embedding_modules(model))
            undo.extend(_hook_towers(model, self.config, ctx, self.sharded))
        decider.announce()
        for path in self.config.towers:
            random = random_modules(model.get_submodule(path), path)
            if random:
                say(f"recd-plugin: tower {path!r} draws randomness once per session, not per sample, on "
                    f"deduplicated batches: {', '.join(random)} (statistically a different dropout; docs/recd.md; "
                    "tower_randomness = refuse makes this an error)")
        return undo

    def wrap_loader(self, loader: Any, model: Optional[nn.Module]) -> Any:
        config = self.config
        decider = decider_of(model) if model is not None else None
        follow = decider is not None  # a later loader of a converted model: follows its decision
        return DedupLoader(loader, config.spec, config.verify_batches, config.in_workers, aligned=self.sharded,
                           router=decider or self.decider, follow=follow, where=config.batch_kjt)


def random_modules(tower: nn.Module, path: str) -> List[str]:
    """The modules of ``tower`` that draw randomness in training: dropout layers and attention
    with dropout (``path.sub (Dropout p=0.1)``)."""
    found = []
    for name, m in tower.named_modules():
        p = getattr(m, "p", None) if isinstance(m, nn.modules.dropout._DropoutNd) else getattr(m, "dropout", None)
        if isinstance(m, (nn.modules.dropout._DropoutNd, nn.MultiheadAttention)) and isinstance(p, float) and p > 0:
            found.append(f"{path + '.' + name if name else path} ({type(m).__name__} p={p:g})")
    return found


def _check_tower(config: RecDConfig, modules: Dict[str, nn.Module], path: str) -> None:
    if path not in modules or path == "":
        raise UnsupportedModelError(
            f"recd tower {path!r} is not a submodule of the model"
            f"{did_you_mean(path, [p for p in modules if p])}; pass a path from model.named_modules()"
        )
    inner = [other for other in config.towers if other != path and other.startswith(path + ".")]
    if inner:
        raise UnsupportedModelError(
            f"recd towers {path!r} and {inner[0]!r} are nested; name only the outer one "
            "(its submodules then run on unique rows too)"
        )
    if isinstance(modules[path], (EmbeddingBagCollection, EmbeddingCollection)):
        raise UnsupportedModelError(
            f"recd tower {path!r} is an embedding module; towers are dense modules "
            "(embedding modules are deduplicated automatically)"
        )
    group = config.spec.group(config.towers[path])
    outside = sorted(model_features(modules[path]) - set(group.all_features))
    if outside:
        raise UnsupportedModelError(
            f"recd tower {path!r} reads feature {outside[0]!r}, which is not in group "
            f"{group.name!r}: a tower runs once per unique {group.name!r} row, so it may only "
            f"read that group's features {list(group.all_features)}"
        )
    check_tower_layers(modules[path], path)


def _swap_embedding_modules(model: nn.Module) -> List[Undo]:
    """Every EC / EBC becomes its dedup-aware version: each one sees the IKJT, even those that
    read no grouped feature (TorchRec's EBC would still run its slow CPU expansion)."""
    replacement: Dict[int, nn.Module] = {}  # one replacement per module object, at every name
    for _, m in model.named_modules(remove_duplicate=False):
        dedup_cls = dedup_class(m)  # None: not an EC / EBC, or a subclass with its own forward (checked)
        if dedup_cls is not None and id(m) not in replacement:
            replacement[id(m)] = dedup_cls.from_module(m)
    return [swap_modules(model, replacement)]


def _hook_towers(model: nn.Module, config: RecDConfig, ctx: DedupContext, sharded: bool) -> List[Undo]:
    with all_or_nothing([]) as undo:  # a later tower refused: the earlier ones' hooks go too
        for path, group in config.towers.items():
            undo.append(_tower.dedup_tower(model.get_submodule(path), ctx, group, path, config.verify_batches,
                                           always=sharded).remove)
    return undo
