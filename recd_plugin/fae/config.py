"""FAE's section of the flag: ``FAEConfig`` (``[recd.fae]`` in TOML, ``fae.*`` in a flag string).

Registered as the flag's ``fae`` section by FAE's technique (``fae/technique.py``), so
``RecDConfig`` parses it and ``recd_plugin.apply`` dispatches it to FAE.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, ClassVar, List, Mapping, Optional

from recd_plugin.config import check_keys
from recd_plugin.errors import ConfigError

_FAE_KEYS = {"hot_set", "tables", "window", "force_layout"}


@dataclass
class FAEConfig:
    """FAE's part of the flag: ``fae.hot_set`` (the ``.npz`` written by ``recd-plugin
    profile``), optional ``fae.tables`` (a subset of its tables), ``fae.window`` (regroup
    samples into all-hot and mixed batches within this many batches; 0 classifies only) and
    ``fae.force_layout`` (build the hot/cold layout even where it cannot pay: tables on a cpu
    model have no faster tier for the hot rows, so without it FAE leaves them as they are)."""

    #: How to build one, for error messages.
    EXAMPLE: ClassVar[str] = "FAEConfig(hot_set='out/hot.npz')"
    hot_set: str
    tables: Optional[List[str]] = None
    window: int = 0
    force_layout: bool = False
    #: The ``HotSet`` once read (``recd_plugin.fae.technique.load_hot_set``: FAE reads it, the
    #: config only names it, so this layer never imports FAE).
    _loaded: Any = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.hot_set, (str, os.PathLike)) or not str(self.hot_set):
            raise ConfigError("recd fae needs 'hot_set': the .npz written by `recd-plugin profile ... --out DIR`, "
                              f"got {self.hot_set!r}")
        self.hot_set = os.fspath(self.hot_set)
        if isinstance(self.tables, str):
            self.tables = [self.tables]
        if self.tables is not None and not (isinstance(self.tables, (list, tuple))
                                            and all(isinstance(t, str) for t in self.tables)):
            raise ConfigError(f"recd fae 'tables' must be a list of table names, got {self.tables!r}")
        if self.tables is not None:
            self.tables = list(self.tables)
        window = self.window
        if not isinstance(window, int) or isinstance(window, bool) or window < 0:
            raise ConfigError(f"recd fae 'window' must be an integer >= 0 (0: classify batches only), got {window!r}")
        if not isinstance(self.force_layout, bool):
            raise ConfigError(f"recd fae 'force_layout' must be true or false, got {self.force_layout!r}")

    def describe(self) -> str:
        """One line for ``recd-plugin check-flag``."""
        return f"hot set {self.hot_set}, tables {self.tables or '(all of the hot set)'}, window {self.window}"

    @classmethod
    def from_dict(cls, data: Any) -> "FAEConfig":
        if not isinstance(data, Mapping):
            raise ConfigError("recd 'fae' must be a table: fae.hot_set = \"out/hot.npz\"")
        check_keys(data, _FAE_KEYS, "recd fae")
        if not isinstance(data.get("hot_set"), str):  # a TOML path is a string (no PathLike here)
            raise ConfigError("recd fae needs 'hot_set': the .npz written by `recd-plugin profile ... --out DIR`")
        return cls(hot_set=data["hot_set"], tables=data.get("tables"), window=data.get("window", 0),
                   force_layout=data.get("force_layout", False))
