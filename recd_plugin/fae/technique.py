"""FAE as a registered technique (``recd_plugin/technique.py``), for the flag's ``fae`` section
(``FAEConfig``): the hot set, checked against the model, then

* unsharded: the hot set's tables converted to the hot/cold layout (``fae/hotcold.py``), and
  the loader's batches regrouped into all-hot and mixed ones within ``fae.window`` batches
  (``HotBatchScheduler``). Only where the hot tier is faster memory than the tables': tables
  of a cpu model have none (both tiers would be host memory, and the split lookup costs more
  than the one it replaces), so FAE then leaves the model and loader as they are and prints one
  line saying so (``fae.force_layout = true`` builds the layout anyway, e.g. to test it);
* sharded (``DistributedModelParallel``): the model is left as it is (DMP shards TorchRec's own
  modules, not the hot/cold one) and the hot set reaches the planner instead, as placement
  hints (:meth:`FAE.planner_hints`, from ``fae/hints.py``): on GPUs the same hot set does what
  the hot/cold layout does on one process. Regrouping batches would then only reorder them.

Order 10: before RecD's swap, which leaves the hot/cold modules alone (they read IKJTs themselves).
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

from torch import nn
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from recd_plugin._ranks import say
from recd_plugin.fae.config import FAEConfig
from recd_plugin.errors import UnsupportedModelError, did_you_mean
from recd_plugin.fae.hints import hot_set_constraints
from recd_plugin.fae.hotcold import HotColdEmbeddingBagCollection, convert_hot_cold, ebc_tables
from recd_plugin.fae.hotset import HotSet, TableShape
from recd_plugin.fae.schedule import HotBatchScheduler
from recd_plugin.modules.swap import (custom_forward_modules, embedding_tables, model_tables, subclass_refused,
                                      table_configs)
from recd_plugin.technique import PlannerHints, Technique, Undo, register_technique


def load_hot_set(fae: FAEConfig) -> HotSet:
    """The ``HotSet`` at ``fae.hot_set``, read once per config (apply's check, conversion,
    loader step and planner hints share it)."""
    if fae._loaded is None:
        fae._loaded = HotSet.load(fae.hot_set)
    return fae._loaded


@register_technique
class FAE(Technique):
    """Hot rows in fast memory, cold rows in host memory, all-hot batch scheduling."""

    config_type = FAEConfig
    name = "fae"
    order = 10
    converted_types = (HotColdEmbeddingBagCollection,)
    config: FAEConfig

    def check(self, model: nn.Module) -> None:
        """The hot set loads and matches the model's tables (a stale one is refused here), and
        no module the layout would swap has a ``forward`` of its own (unsharded only)."""
        hot = load_hot_set(self.config)
        hot.check_tables({t: shape for m in model.modules() if isinstance(m, EmbeddingBagCollection)
                          for t, shape in ebc_tables(m).items()})  # with the weights' element size
        for t in self.config.tables or []:
            if t not in hot.tables:
                raise UnsupportedModelError(f"fae.tables names {t!r}, which the hot set does not have "
                                            f"(it has {sorted(hot.tables)}){did_you_mean(t, list(hot.tables))}")
        if self.sharded:
            return  # the model stays as it is; the hot set becomes planner hints
        for path, m, _ in custom_forward_modules(model, self.flag):
            held = [c.name for c in table_configs(m) if c.name in hot.tables]
            if held:
                raise subclass_refused(path, m, f"holds table {held[0]!r} of the fae hot set")

    def no_fast_tier(self, model: nn.Module) -> bool:
        """Unsharded, every table of the hot set is in host memory (a cpu model): the hot/cold
        layout has no faster tier to put the hot rows in."""
        if self.config.force_layout:
            return False
        hot = load_hot_set(self.config)
        names = set(self.config.tables or hot.tables)
        devices = {p.device.type for m in model.modules() if isinstance(m, EmbeddingBagCollection)
                   for c in table_configs(m) if c.name in names for p in m.embedding_bags[c.name].parameters()}
        return devices == {"cpu"}

    def convert(self, model: nn.Module) -> List[Undo]:
        if self.sharded:
            return []
        if self.no_fast_tier(model):
            say("recd-plugin: fae left on TorchRec's plain path: the hot set's tables are in host memory (a cpu "
                "model), so the hot/cold layout has no faster tier for the hot rows and would only split each "
                "lookup in two; on cuda it keeps the hot rows in HBM (fae.force_layout=true builds it anyway)")
            return []
        return [convert_hot_cold(model, load_hot_set(self.config), self.config.tables)]

    def wrap_loader(self, loader: Any, model: Optional[nn.Module]) -> Any:
        if self.sharded or model is None or self.no_fast_tier(model):
            return loader
        hot = load_hot_set(self.config)
        features = {f: t for t, fs in embedding_tables(model).items() for f in fs if t in hot.tables}
        return HotBatchScheduler(loader, hot, features, window=self.config.window or None)

    def planner_hints(self, model: nn.Module, compute_device: str,
                      fused_params: Optional[Dict[str, Any]] = None) -> PlannerHints:
        """Tables whose hot share of rows is at least one half stay whole in HBM (``FUSED``),
        the others get ``FUSED_UVM_CACHING`` at their hot share of rows as cache load factor;
        on a cuda topology only (a cpu one has no HBM / host-memory tiers)."""
        hot = load_hot_set(self.config)
        hot.check_tables({n: TableShape(c.num_embeddings, c.embedding_dim)  # a stale hot set is refused,
                          for n, c in model_tables(model).items()})          # as apply refuses it
        hints = PlannerHints()
        if compute_device != "cuda":
            hints.notes.append(f"fae: no placement hints on {compute_device} (no HBM / host-memory tiers; on cuda "
                               "the hot set places mostly-hot tables in HBM and caches the others at their hot share)")
            return hints
        for t, hint in hot_set_constraints(hot, self.config.tables).items():
            share = hot.num_hot(t) / hot.tables[t].num_embeddings
            hints.constraints[t] = hint
            hints.explain[t] = (f"fae: {share:.1%} of rows hot -> whole in HBM" if hint.cache_params is None else
                                f"fae: {share:.1%} of rows hot -> UVM cache, load factor "
                                f"{hint.cache_params.load_factor:.3f}")
        return hints
