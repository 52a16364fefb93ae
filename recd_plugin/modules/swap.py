"""Model surgery shared by the techniques: find a model's embedding modules and tables, swap
modules with undo, and the checks every technique needs before any of them runs.

``check_model(model, techniques)`` checks the whole model first (already sharded? any
embedding module at all?), then each technique's own ``check`` (``recd_plugin/technique.py``),
so a bad config changes nothing. The techniques' conversions use :func:`swap_modules`, which
returns the undo: state-dict keys never change, because a swapped-in module shares the
original's submodules.
"""

from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Sequence, Set, Tuple, Type

from torch import nn
from torchrec.modules.embedding_configs import BaseEmbeddingConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection

from recd_plugin.config import RecDConfig
from recd_plugin.errors import UnsupportedModelError
from recd_plugin.modules.base import DedupModule
from recd_plugin.modules.dedup_ebc import DedupEmbeddingBagCollection
from recd_plugin.modules.dedup_ec import DedupEmbeddingCollection
from recd_plugin.technique import Technique, Undo

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


def model_tables(model: nn.Module, kinds: Tuple[type, ...] = (EmbeddingBagCollection, EmbeddingCollection)
                 ) -> Dict[str, BaseEmbeddingConfig]:
    """{table name: its TorchRec config} over every module of ``kinds`` in ``model`` (default:
    every EC / EBC, at any depth, subclasses included): the one listing of a model's tables."""
    return {c.name: c for m in model.modules() if isinstance(m, kinds) for c in table_configs(m)}


def embedding_tables(model: nn.Module) -> Dict[str, List[str]]:
    """{table name: its feature names} over every EC / EBC of ``model``."""
    return {name: list(c.feature_names) for name, c in model_tables(model).items()}


def model_features(model: nn.Module) -> Set[str]:
    """Sparse feature names read by the model's TorchRec embedding modules."""
    return {f for c in model_tables(model).values() for f in c.feature_names}


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


def set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    """Put ``module`` at ``path`` (a name from ``model.named_modules()``) of ``model``."""
    parent_path, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent_path) if parent_path else model, name, module)


def swap_modules(model: nn.Module, replacement: Mapping[int, nn.Module]) -> Undo:
    """Put ``replacement[id(m)]`` in place of every submodule ``m`` it names, at every path the
    module has (a module shared under several names gets the same replacement). Returns the
    undo: the originals back at their paths, in the training mode the model was switched to
    since (``model.train()`` / ``eval()`` reached only the replacements)."""
    swapped = [(p, m) for p, m in model.named_modules(remove_duplicate=False) if id(m) in replacement]
    for p, m in swapped:
        set_submodule(model, p, replacement[id(m)])

    def undo() -> None:
        for p, m in swapped:
            m.train(replacement[id(m)].training)
            set_submodule(model, p, m)

    return undo


def check_model(model: nn.Module, techniques: Sequence[Technique]) -> None:
    """Every problem the techniques can have with this model, raised before anything changes."""
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
    if not model_features(model):
        raise UnsupportedModelError(
            "the model has no torchrec EmbeddingBagCollection or EmbeddingCollection; "
            "recd-plugin deduplicates their inputs, so there is nothing to speed up"
        )
    for t in techniques:  # each technique's own checks (e.g. FAE's hot set against the tables)
        t.check(model)
