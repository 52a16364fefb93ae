"""FAE's part of ``recd_plugin.apply``: the flag's hot set, checked against the model and
converted to the hot/cold layout; in sharded mode (``RecDConfig.is_sharded()``) checked only.

Sharded, the model is left as it is: ``DistributedModelParallel`` shards TorchRec's own
modules, not the hot/cold one. The hot set reaches the planner instead, as placement hints
(``recd_plugin.sharding.for_dmp``, from ``recd_plugin.fae.hints.hot_set_constraints``): the
same hot set does on GPUs what the hot/cold layout does on one process.

Registered with the converter registry of ``recd_plugin/modules/swap.py`` (order 10: before
the RecD swap, which then leaves the hot/cold modules alone, as they read IKJTs themselves),
so the modules layer below never imports FAE. ``recd_plugin.plugin`` imports this module,
which is what registers it.
"""

from __future__ import annotations

from typing import List

from torch import nn
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from recd_plugin.config import FAEConfig, RecDConfig
from recd_plugin.errors import UnsupportedModelError, did_you_mean
from recd_plugin.fae.hotcold import convert_hot_cold, ebc_tables
from recd_plugin.fae.hotset import HotSet
from recd_plugin.modules.swap import Undo, custom_forward_modules, register_converter, subclass_refused, table_configs
from recd_plugin.modules.tower import DedupContext


def load_hot_set(fae: FAEConfig) -> HotSet:
    """The ``HotSet`` at ``fae.hot_set``, read once per config (apply's check, conversion and
    loader share it)."""
    if fae._loaded is None:
        fae._loaded = HotSet.load(fae.hot_set)
    return fae._loaded


def check(model: nn.Module, config: RecDConfig) -> None:
    """The hot set loads and matches the model's tables (a stale one is refused here), and no
    module the layout would swap has a ``forward`` of its own (unsharded only: sharded, no
    module is swapped)."""
    if config.fae is None:
        return
    hot = load_hot_set(config.fae)
    hot.check_tables({t: shape for m in model.modules() if isinstance(m, EmbeddingBagCollection)
                      for t, shape in ebc_tables(m).items()})
    for t in config.fae.tables or []:
        if t not in hot.tables:
            raise UnsupportedModelError(f"fae.tables names {t!r}, which the hot set does not have "
                                        f"(it has {sorted(hot.tables)}){did_you_mean(t, list(hot.tables))}")
    if config.is_sharded():
        return  # the model stays as it is; the hot set becomes planner hints (sharding.for_dmp)
    for path, m, _ in custom_forward_modules(model, config):
        held = [c.name for c in table_configs(m) if c.name in hot.tables]
        if held:
            raise subclass_refused(path, m, f"holds table {held[0]!r} of the fae hot set")


@register_converter("fae_hot_cold", order=10, check=check)
def hot_cold(model: nn.Module, config: RecDConfig, ctx: DedupContext) -> List[Undo]:
    """FAE: the hot set's tables become hot/cold tiers; sharded, nothing changes (the hot set
    becomes planner hints: ``recd_plugin.sharding.for_dmp``)."""
    if config.fae is None or config.is_sharded():
        return []
    return [convert_hot_cold(model, load_hot_set(config.fae), config.fae.tables)]
