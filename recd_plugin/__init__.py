"""recd-plugin: RecD deduplication, FAE hot-row placement and DES for existing TorchRec training.

The public API. In a TorchRec training script::

    import recd_plugin
    config = recd_plugin.RecDConfig.load(args.recd)      # --recd flag / $RECD_PLUGIN / TOML
    model, loader = recd_plugin.apply(config, model, loader)

Building blocks, for users who wire things themselves: ``build_ikjt`` / ``expand`` (IKJT),
``DedupLoader`` / ``DedupCollate`` (dataloader transform), ``DedupEmbeddingCollection`` and
``dedup_tower`` (dedup-aware modules). See docs/recd.md. FAE: ``recd_plugin.fae``
(``HotSet``, ``profile_accesses``, ``convert_hot_cold``, ``HotBatchScheduler``); DES:
``recd_plugin.des`` (``FactorizationMachine``, ``WideLinear``, ``FirstDenseLayer``,
``DESSharder``); sharded training: ``recd_plugin.sharding`` (``sharders``, ``constraints``,
``Checkpointer``). See docs/getting-started.md.
"""

import importlib
from typing import Any, List

from recd_plugin._peer import check_peer_requirements

check_peer_requirements()  # before torch is imported: a clear message instead of a crash

from recd_plugin import _fx_warning  # noqa: E402

_fx_warning.install()  # torch.fx's is_fx_tracing notice is not for our users (see _fx_warning.py)

from recd_plugin.config import ENV_VAR, RecDConfig  # noqa: E402
from recd_plugin.des.config import DESConfig  # noqa: E402
from recd_plugin.fae.config import FAEConfig  # noqa: E402
from recd_plugin.errors import (  # noqa: E402
    AnalyzeError,
    CheckpointError,
    ConfigError,
    DedupSpecError,
    DESError,
    HotSetError,
    MalformedBatchError,
    NotDeduplicableError,
    PeerRequirementError,
    RecDError,
    ShardingError,
    StorageError,
    UnsupportedModelError,
)
from recd_plugin.modules.dedup_ebc import DedupEmbeddingBagCollection  # noqa: E402
from recd_plugin.modules.dedup_ec import DedupEmbeddingCollection  # noqa: E402
from recd_plugin.modules.tower import DedupContext, dedup_tower  # noqa: E402
from recd_plugin.plugin import apply, decisions, remove, wrap  # noqa: E402
from recd_plugin.technique import TECHNIQUES, PlannerHints, Technique, register_technique, unregister_technique  # noqa: E402
from recd_plugin.sparse.ikjt import (  # noqa: E402
    DedupSpec,
    FeatureGroup,
    build_ikjt,
    expand,
    inverse_index,
    is_ikjt,
    unique_rows,
)
from recd_plugin.sparse.dedup_kjt import DedupKJT, is_dedup  # noqa: E402
from recd_plugin.transforms.dedup import DedupCollate, DedupLoader, DedupStats, dedup_batch  # noqa: E402
from recd_plugin.transforms.route import GroupDecision  # noqa: E402

__version__ = "0.1.0"

#: Subpackages that ``import recd_plugin`` leaves unloaded (it stays lean: no sharding code
#: for an unsharded job) but that ``recd_plugin.<name>`` reaches on first use (PEP 562), as
#: the docs write them. The tooling (analyze, bench, cli) is not here: it sits above the API.
_LAZY_SUBPACKAGES = ("data", "sharding", "storage")


def __getattr__(name: str) -> Any:
    """Import a lazy subpackage on first attribute access (``recd_plugin.sharding.for_dmp``)."""
    if name in _LAZY_SUBPACKAGES:
        # import_module also sets the attribute on this package, so this runs once per name
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> List[str]:
    return sorted(set(globals()) | set(_LAZY_SUBPACKAGES))


__all__ = [
    "apply", "remove", "wrap", "decisions", "GroupDecision", "RecDConfig", "FAEConfig", "DESConfig", "ENV_VAR",
    "Technique", "TECHNIQUES", "PlannerHints", "register_technique", "unregister_technique",
    "FeatureGroup", "DedupSpec", "build_ikjt", "expand", "inverse_index", "unique_rows", "is_ikjt",
    "DedupKJT", "is_dedup",
    "DedupLoader", "DedupCollate", "DedupStats", "dedup_batch",
    "DedupEmbeddingCollection", "DedupEmbeddingBagCollection", "DedupContext", "dedup_tower",
    "RecDError", "ConfigError", "DedupSpecError", "MalformedBatchError", "NotDeduplicableError",
    "PeerRequirementError", "UnsupportedModelError", "check_peer_requirements",
    "AnalyzeError", "CheckpointError", "DESError", "HotSetError", "ShardingError", "StorageError",
]
