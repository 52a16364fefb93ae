"""DES's section of the flag: ``DESConfig`` (``[recd.des]`` in TOML, ``des.*`` in a flag string).

Registered as the flag's ``des`` section by DES's technique (``des/technique.py``), so
``RecDConfig`` parses it and ``recd_plugin.apply`` dispatches it to DES.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, List, Mapping, Optional

from recd_plugin.config import check_keys
from recd_plugin.errors import ConfigError, did_you_mean

_DES_KEYS = {"modules", "sharding"}
_DES_SHARDING = ("table_wise", "row_wise")


@dataclass
class DESConfig:
    """DES's part of the flag: ``des.modules`` (paths of the model's
    ``recd_plugin.des.DESEmbeddingOperators``; default: every one) and ``des.sharding``
    (``table_wise``, the default, or ``row_wise``: how the planner may shard their tables).

    Unsharded, DES operators are their plain math and nothing changes; under
    ``DistributedModelParallel`` the named modules are sharded the DES way (each rank computes
    the operators' partial results on the rows it owns; only partials cross the network):
    ``recd_plugin.sharding.for_dmp`` adds DES's sharder and the planner constraints."""

    #: How to build one, for error messages.
    EXAMPLE: ClassVar[str] = "DESConfig(modules=['sparse'])"
    modules: Optional[List[str]] = None
    sharding: str = "table_wise"

    def __post_init__(self) -> None:
        if isinstance(self.modules, str):
            self.modules = [self.modules]
        if self.modules is not None and not (isinstance(self.modules, (list, tuple)) and self.modules
                                             and all(isinstance(m, str) and m for m in self.modules)):
            raise ConfigError(f"recd des 'modules' must be a non-empty list of module paths, got {self.modules!r}; "
                              "e.g. des.modules = [\"sparse\"] (omit it: every DESEmbeddingOperators of the model)")
        if self.modules is not None:
            self.modules = list(self.modules)
        if self.sharding not in _DES_SHARDING:
            raise ConfigError(f"recd des 'sharding' must be one of {list(_DES_SHARDING)}, got {self.sharding!r}"
                              f"{did_you_mean(str(self.sharding), list(_DES_SHARDING))}")

    def describe(self) -> str:
        """One line for ``recd-plugin check-flag``."""
        return f"{self.sharding}, modules {self.modules or '(every DESEmbeddingOperators)'}"

    @classmethod
    def from_dict(cls, data: Any) -> "DESConfig":
        if data is True:  # `des = true` in TOML: DES on, defaults
            data = {}
        if not isinstance(data, Mapping):
            raise ConfigError("recd 'des' must be a table: des.sharding = \"table_wise\" (or des = true)")
        check_keys(data, _DES_KEYS, "recd des")
        return cls(modules=data.get("modules"), sharding=data.get("sharding", "table_wise"))
