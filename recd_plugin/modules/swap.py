"""Model converters: walk a model and apply the config's module changes in place.

Like torchtitan's model converters, each technique registers a named converter;
``check_model`` checks the whole model against the config first (so a bad config changes
nothing, the registered converters' own checks included), then ``convert`` runs every
registered converter in their declared ``order``. Each converter returns undo
callbacks, so ``unconvert`` puts the model back exactly; a converter that still refuses (a
check only its own construction can make) has the earlier ones undone before the error
propagates, so a refused ``apply`` leaves no hook or swapped module behind. State-dict keys never change: swapped modules share the originals'
submodules, and towers are hooks on the user's own modules.

A new technique is one more ``@register_converter("name", order=..., check=...)`` function,
registered by the technique's own package: this module never imports a technique (FAE's
hot/cold converter is registered by ``recd_plugin/fae/convert.py``), so the layers stay one-way.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Set, Tuple, Type

from torch import nn
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection

from recd_plugin.config import RecDConfig
from recd_plugin.errors import ConfigError, DedupSpecError, UnsupportedModelError, did_you_mean
from recd_plugin.modules.base import DedupModule
from recd_plugin.modules.batchnorm import check_tower_layers
from recd_plugin.modules.dedup_ebc import DedupEmbeddingBagCollection
from recd_plugin.modules.dedup_ec import DedupEmbeddingCollection
from recd_plugin.modules.tower import DedupContext, dedup_tower

Undo = Callable[[], None]
Converter = Callable[[nn.Module, RecDConfig, DedupContext], List[Undo]]
Check = Callable[[nn.Module, RecDConfig], None]
#: name -> converter, in the order ``convert`` runs them (by ``order``, then registration).
CONVERTERS: Dict[str, Converter] = {}
#: name -> the converter's own check, run by ``check_model`` before anything changes.
CHECKS: Dict[str, Check] = {}
_ORDER: Dict[str, int] = {}
#: Order of a converter registered without one: after the built-in ones.
DEFAULT_ORDER = 100


def register_converter(name: str, order: int = DEFAULT_ORDER,
                       check: Optional[Check] = None) -> Callable[[Converter], Converter]:
    """Register ``fn`` as converter ``name``: ``convert`` runs the converters by ascending
    ``order`` (built in: FAE's hot/cold layout 10, the RecD swap 20, output gather 30, towers
    40); ``check(model, config)``, if given, runs in ``check_model`` and raises before
    anything changes."""
    def register(fn: Converter) -> Converter:
        if name in CONVERTERS:
            # A silent overwrite would switch a technique off (or run it twice under two names).
            old = CONVERTERS[name]
            raise ConfigError(f"converter {name!r} is already registered (by {old.__module__}.{old.__qualname__}); "
                              f"pick another name, or unregister_converter({name!r}) first")
        CONVERTERS[name], _ORDER[name] = fn, order
        ranked = sorted(CONVERTERS.items(), key=lambda item: _ORDER.get(item[0], DEFAULT_ORDER))
        CONVERTERS.clear()
        CONVERTERS.update(ranked)
        if check is not None:
            CHECKS[name] = check
        return fn
    return register


def unregister_converter(name: str) -> None:
    """Remove converter ``name`` and its check (KeyError naming the registered ones if absent)."""
    if name not in CONVERTERS:
        raise KeyError(f"no converter {name!r}; registered: {list(CONVERTERS)}")
    del CONVERTERS[name]
    _ORDER.pop(name, None)
    CHECKS.pop(name, None)


#: TorchRec module -> its dedup-aware replacement. TorchRec's EC would misread an IKJT; its EBC
#: reads it correctly but expands slowly on CPU (see dedup_ebc.py). Subclasses that keep
#: TorchRec's forward are replaced too (``DedupModule.dedup_type``).
DEDUP_MODULES: Dict[type, Type[DedupModule]] = {
    EmbeddingCollection: DedupEmbeddingCollection,
    EmbeddingBagCollection: DedupEmbeddingBagCollection,
}


def dedup_class(module: nn.Module) -> Optional[Type[DedupModule]]:
    """The dedup class that can stand in for ``module``; None for other modules and for
    subclasses of TorchRec's EC / EBC that override ``forward``."""
    return next((d for d in DEDUP_MODULES.values() if d.replaces(module)), None)


def table_configs(module: nn.Module) -> list:
    """The table configs of an EC / EBC."""
    if isinstance(module, EmbeddingBagCollection):
        return module.embedding_bag_configs()
    return module.embedding_configs()


def embedding_tables(model: nn.Module) -> Dict[str, List[str]]:
    """{table name: its feature names} over every EC / EBC of ``model``."""
    return {c.name: list(c.feature_names) for m in model.modules()
            if isinstance(m, (EmbeddingBagCollection, EmbeddingCollection)) for c in table_configs(m)}


def model_features(model: nn.Module) -> Set[str]:
    """Sparse feature names read by the model's TorchRec embedding modules."""
    return {
        f
        for m in model.modules()
        if isinstance(m, (EmbeddingBagCollection, EmbeddingCollection))
        for c in table_configs(m)
        for f in c.feature_names
    }


def check_model(model: nn.Module, config: RecDConfig) -> None:
    """Every problem a config can have with this model, raised before anything changes."""
    for name, m in model.named_modules():
        if type(m).__module__.startswith("torchrec.distributed"):
            raise UnsupportedModelError(
                f"module {name or 'model'!r} ({type(m).__name__}) is already sharded; call "
                "recd_plugin.apply() on the unsharded model (before DistributedModelParallel)"
            )
    if isinstance(model, (EmbeddingBagCollection, EmbeddingCollection)):
        raise UnsupportedModelError(
            "apply the plugin to the model that contains the embedding module, not to the "
            "embedding module itself (it is swapped in its parent)"
        )
    known = model_features(model)
    if not known:
        raise UnsupportedModelError(
            "the model has no torchrec EmbeddingBagCollection or EmbeddingCollection; "
            "recd-plugin deduplicates their inputs, so there is nothing to speed up"
        )
    for name in CONVERTERS:  # each technique's own checks (e.g. FAE's hot set against the tables)
        if name in CHECKS:
            CHECKS[name](model, config)
    for g in config.groups:
        for f in g.features:
            if f not in known:
                raise DedupSpecError(
                    f"group {g.name!r} names feature {f!r}, which no embedding table of the "
                    f"model reads{did_you_mean(f, sorted(known))}; model features: {sorted(known)}"
                )
    _check_subclasses(model, config)
    modules = dict(model.named_modules())
    for path in config.towers:
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


def _check_subclasses(model: nn.Module, config: RecDConfig) -> None:
    """Refuse a subclass of TorchRec's EC / EBC with its own ``forward`` outside towers that
    reads a grouped feature: it would get the IKJT (TorchRec's EC reads the unique rows as the
    batch), and swapping it instead would skip the user's forward."""
    grouped = {f for g in config.groups for f in g.all_features}
    for path, m, reads in custom_forward_modules(model, config):
        why = [f"reads grouped feature {f!r}" for f in sorted(reads & grouped)]
        if why:
            raise subclass_refused(path, m, why[0])


def custom_forward_modules(model: nn.Module, config: RecDConfig) -> List[Tuple[str, nn.Module, Set[str]]]:
    """(path, module, features it reads) of every subclass of TorchRec's EC / EBC outside the
    configured towers that overrides ``forward``: the plugin cannot swap such a module."""
    return [(path, m, reads) for path, m, reads in outside_towers(model, config)
            if not isinstance(m, DedupModule) and dedup_class(m) is None]


def subclass_refused(path: str, m: nn.Module, why: str) -> UnsupportedModelError:
    """The error for a module of ``custom_forward_modules`` that the config would change
    (``why``: e.g. "reads grouped feature 'history'")."""
    base = next(b for b in DEDUP_MODULES if isinstance(m, b)).__name__
    return UnsupportedModelError(
        f"module {path!r} ({type(m).__name__}) subclasses TorchRec's {base} and overrides "
        f"forward(), and it {why}: the plugin cannot put its own module in its place "
        "without skipping your forward, and left as it is the module would read the "
        f"deduplicated batch. Fix: keep the extra logic in a wrapper module around a plain "
        f"{base} (or use TorchRec's forward), or leave that feature / table out of the flag."
    )


@register_converter("dedup_embeddings", order=20)
def _swap_embedding_modules(model: nn.Module, config: RecDConfig, ctx: DedupContext) -> List[Undo]:
    """Swap every EC / EBC for its dedup-aware version: each one sees the IKJT, even those
    that read no grouped feature (TorchRec's EBC would still run its slow CPU expansion).

    Sharded mode swaps nothing: DistributedModelParallel shards only TorchRec's exact module
    types, and its sharded EBC pools IKJTs natively, sending only unique rows."""
    undo: List[Undo] = []
    if config.is_sharded() or not config.groups:  # no groups (FAE only): no IKJTs to read
        return undo
    replaced: Dict[int, nn.Module] = {}  # one replacement per module object, at every name
    for path, m in list(model.named_modules(remove_duplicate=False)):
        dedup_cls = dedup_class(m)
        if dedup_cls is None:  # not an EC / EBC, or a subclass with its own forward (checked)
            continue
        new = replaced.setdefault(id(m), dedup_cls.from_module(m))
        _set_submodule(model, path, new)

        def restore(path: str = path, m: nn.Module = m, new: nn.Module = new) -> None:
            m.train(new.training)  # model.train()/eval() after apply() reached only `new`
            _set_submodule(model, path, m)

        undo.append(restore)
    return undo


def outside_towers(model: nn.Module, config: RecDConfig) -> List[Tuple[str, nn.Module, Set[str]]]:
    """(path, module, features it reads) of every EBC / EC outside the configured towers."""
    towers = tuple(p + "." for p in config.towers)
    return [(path, m, {f for c in table_configs(m) for f in c.feature_names}) for path, m in model.named_modules()
            if isinstance(m, (EmbeddingBagCollection, EmbeddingCollection)) and not (path + ".").startswith(towers)]


def gathered_paths(model: nn.Module, config: RecDConfig) -> List[str]:
    """Paths of the EBCs / ECs outside towers that read a grouped feature: in sharded mode
    they keep TorchRec's type and get their outputs gathered (``modules/gather.py``)."""
    grouped = {f for g in config.groups for f in g.all_features}
    return [path for path, _, reads in outside_towers(model, config) if grouped & reads]


@register_converter("gather_outputs", order=30)
def _gather_outputs(model: nn.Module, config: RecDConfig, ctx: DedupContext) -> List[Undo]:
    """Sharded mode: TorchRec's modules read aligned IKJTs; gather their grouped rows."""
    if not config.is_sharded() or not config.groups:
        return []
    from recd_plugin.modules.gather import OutputGather

    return [OutputGather.attach(model, ctx, gathered_paths(model, config)).remove]


@register_converter("dedup_towers", order=40)
def _hook_towers(model: nn.Module, config: RecDConfig, ctx: DedupContext) -> List[Undo]:
    undo: List[Undo] = []
    try:
        for path, group in config.towers.items():
            undo.append(dedup_tower(model.get_submodule(path), ctx, group, path, config.verify_batches,
                                    always=config.is_sharded()).remove)
    except BaseException:  # a later tower refused: the earlier ones' hooks go too
        for u in reversed(undo):
            u()
        raise
    return undo


def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent_path) if parent_path else model, name, module)


def convert(model: nn.Module, config: RecDConfig) -> Callable[[], None]:
    """Apply every registered converter in place; returns a function that undoes them all.
    All or nothing: if a converter raises, what the others did is undone first.

    Call ``check_model(model, config)`` first (``recd_plugin.apply`` does).
    """
    ctx = DedupContext.attach(model, config.spec, pad_over_ranks=config.is_sharded())
    undo: List[Undo] = [ctx.detach]

    def unconvert() -> None:
        for u in reversed(undo):
            u()

    try:
        for fn in CONVERTERS.values():
            undo.extend(fn(model, config, ctx))
    except BaseException:
        # A converter that refuses (e.g. the hot/cold layout on a weighted MEAN table) must
        # not leave the earlier converters' hooks and swaps behind: undo them, then raise.
        unconvert()
        raise
    return unconvert
