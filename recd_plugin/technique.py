"""Techniques as registered units: one config type each, dispatched by type.

Like torchao's ``quantize_(model, config)``, the type of a config says which technique it
switches on, and building the config means it is on. The plugin's flag (``RecDConfig``) holds
one config per section: RecD's groups and towers (the ``RecDConfig`` itself), ``fae``
(``FAEConfig``) and ``des`` (``DESConfig``); ``RecDConfig.parts()`` lists the ones present.
For each part, ``apply`` builds the :class:`Technique` registered for its type, with the
sharding decided once and passed in, and runs, in the techniques' declared ``order``:

1. ``check(model)`` for every technique: nothing changes before every check has passed;
2. ``convert(model)`` for every technique, each returning undo callbacks; if one refuses,
   what the earlier ones did is undone before the error propagates;
3. ``wrap_loader(loader, model)``: an optional loader step (FAE regroups batches, RecD builds
   IKJTs), applied in order, so a later technique wraps an earlier one's loader;
4. under ``DistributedModelParallel``, ``planner_hints(model, compute_device, fused_params)``:
   extra sharders and ``ParameterConstraints`` that ``recd_plugin.sharding.for_dmp`` merges
   into what it gives DMP and the planner (a field the user set always wins).

A new technique is a config type and one registered class; its ``name`` becomes the flag's
section (``mine.key=value``, ``[recd.mine]``), parsed by the config type's ``from_dict`` (or
its keyword arguments) and read back as ``flag.mine``::

    from recd_plugin.technique import Technique, register_technique

    @register_technique
    class MyTechnique(Technique):
        config_type = MyConfig       # dispatch key; a subclass of it dispatches here too
        name = "mine"
        order = 50                   # built in: FAE 10, RecD 20, DES 30
        def check(self, model): ...  # raise a RecDError subclass naming the fix
        def convert(self, model):
            ...                      # change the model in place
            return [undo]

Registration refuses a config type or name registered already (a silent overwrite would
switch a technique off); ``unregister_technique`` undoes it. This module knows no technique:
each registers itself from its own package, so the layers below never import the ones above.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Dict, Iterator, List, Optional, Tuple, Type, TypeVar

from torch import nn

from recd_plugin.config import RecDConfig, register_section, unregister_section
from recd_plugin.errors import ConfigError

Undo = Callable[[], None]
T = TypeVar("T", bound="Technique")


@dataclass
class PlannerHints:
    """What one technique asks of DMP and its planner (``recd_plugin.sharding.for_dmp``).

    Attributes:
        sharders: extra TorchRec ``ModuleSharder`` s for module types of the technique's own
            (given to both the planner and DMP, before the plugin's EC / EBC sharders).
        constraints: ``{table: ParameterConstraints}`` with only the fields the technique
            wants set; ``for_dmp`` fills a field only where the user's constraints leave it unset.
        explain: ``{table: why}``, one phrase per hinted table for ``ShardingSetup.explain``.
        notes: hints not given, and why.
        runnable: ``{table: {field: values}}``: for tables of a module type the technique's own
            sharder shards, the ``sharding_types`` / ``compute_kernels`` that sharder can run.
            A user's constraint written for TorchRec's module (e.g. ``data_parallel`` for a
            1-dim table) keeps only the values the sharder can run; with none left, the hint's
            values take its place, and a note says so.
    """

    sharders: List[Any] = field(default_factory=list)
    constraints: Dict[str, Any] = field(default_factory=dict)
    explain: Dict[str, str] = field(default_factory=dict)
    notes: List[str] = field(default_factory=list)
    runnable: Dict[str, Dict[str, List[str]]] = field(default_factory=dict)


class Technique:
    """One technique, built for one ``apply`` call from its config part.

    Attributes:
        config: the technique's own config (an instance of ``config_type``).
        flag: the whole flag it came from (plugin-wide settings: ``verify_batches``, ...).
        sharded: the model goes under ``DistributedModelParallel`` (decided once by ``apply``).
    """

    config_type: ClassVar[type]
    name: ClassVar[str]
    order: ClassVar[int] = 100
    #: Module types ``convert`` puts into a model (``remove`` recognizes a converted copy by them).
    converted_types: ClassVar[Tuple[type, ...]] = ()

    def __init__(self, config: Any, flag: RecDConfig, sharded: bool) -> None:
        self.config, self.flag, self.sharded = config, flag, sharded

    def check(self, model: nn.Module) -> None:
        """Raise (a ``RecDError`` naming the fix) if the technique cannot run on ``model``;
        must not change anything."""

    def convert(self, model: nn.Module) -> List[Undo]:
        """Change ``model`` in place; return callbacks that undo it, in the order done."""
        return []

    def wrap_loader(self, loader: Any, model: Optional[nn.Module]) -> Any:
        """The loader this technique's training needs (default: ``loader`` unchanged)."""
        return loader

    def planner_hints(self, model: nn.Module, compute_device: str,
                      fused_params: Optional[Dict[str, Any]] = None) -> PlannerHints:
        """Sharders and constraints for DMP's planner (default: none)."""
        return PlannerHints()


#: config type -> technique class, in declared ``order`` (then registration order).
TECHNIQUES: Dict[type, Type[Technique]] = {}


def register_technique(cls: Type[T]) -> Type[T]:
    """Register ``cls`` for ``cls.config_type`` (a class decorator); refuses duplicates."""
    for attr in ("config_type", "name"):
        if not hasattr(cls, attr):
            raise ConfigError(f"technique {cls.__qualname__} must set the class attribute {attr!r}")
    for other_type, other in TECHNIQUES.items():
        if other_type is cls.config_type or other.name == cls.name:
            raise ConfigError(
                f"technique {cls.name!r} ({cls.config_type.__name__}) is already registered by "
                f"{other.__module__}.{other.__qualname__}; pick another name / config type, or "
                f"unregister_technique({other.name!r}) first")
    if cls.config_type is not RecDConfig:  # RecD's groups and towers are the flag's own keys
        register_section(cls.name, cls.config_type)  # the flag's section: `name.key=value`, [recd.name]
    TECHNIQUES[cls.config_type] = cls
    ranked = sorted(TECHNIQUES.items(), key=lambda item: item[1].order)  # stable: ties keep registration order
    TECHNIQUES.clear()
    TECHNIQUES.update(ranked)
    return cls


def unregister_technique(name: str) -> None:
    """Remove the technique registered as ``name`` (KeyError naming the registered ones if absent)."""
    for config_type, cls in list(TECHNIQUES.items()):
        if cls.name == name:
            del TECHNIQUES[config_type]
            unregister_section(name)
            return
    raise KeyError(f"no technique {name!r}; registered: {[c.name for c in TECHNIQUES.values()]}")


def technique_for(config: Any) -> Type[Technique]:
    """The technique registered for ``type(config)`` or its nearest registered base class."""
    for base in type(config).__mro__:
        if base in TECHNIQUES:
            return TECHNIQUES[base]
    raise ConfigError(
        f"no technique is registered for {type(config).__name__}; registered config types: "
        f"{[t.__name__ for t in TECHNIQUES]} (import the package that registers it)")


def build(flag: RecDConfig, sharded: Optional[bool] = None) -> List[Technique]:
    """One technique per part of ``flag`` (``RecDConfig.parts()``), in declared order."""
    sharded = flag.is_sharded() if sharded is None else sharded
    built = [technique_for(part)(part, flag, sharded) for part in flag.parts()]
    return sorted(built, key=lambda t: t.order)


def undo_all(undo: List[Undo]) -> None:
    """Run undo callbacks in reverse order: the last change is taken back first."""
    for u in reversed(undo):
        u()


@contextmanager
def all_or_nothing(undo: List[Undo]) -> Iterator[List[Undo]]:
    """The block appends an undo callback per change to ``undo``; if it raises, they all run
    (``undo_all``) before the error propagates, so a refusal part-way leaves nothing behind."""
    try:
        yield undo
    except BaseException:
        undo_all(undo)
        raise


def convert_all(model: nn.Module, techniques: List[Technique]) -> Undo:
    """Run every technique's ``convert`` in order; returns one function that undoes them all.
    All or nothing: if one raises, what the earlier ones did is undone first."""
    # A technique that refuses (e.g. the hot/cold layout on a weighted MEAN table) must not
    # leave the earlier ones' hooks and swaps behind.
    with all_or_nothing([]) as undo:
        for t in techniques:
            undo.extend(t.convert(model))
    return lambda: undo_all(undo)
