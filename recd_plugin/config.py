"""The plugin's one flag: a ``RecDConfig`` read from a flag string, ``$RECD_PLUGIN`` or TOML.

All three spell the same schema: plugin-wide settings, then a section per technique (RecD's
``groups`` and ``towers``, ``fae``, ``des``), each one config type (the ``RecDConfig`` itself,
:class:`FAEConfig`, :class:`DESConfig`) that ``recd_plugin.apply`` dispatches to the technique
registered for it (``recd_plugin/technique.py``). In TOML (a file of its own, or a ``[recd]``
table in your project's config)::

    [recd]
    verify_batches = 1              # compare the first N batches' ids exactly (0 off, -1 all)
    probe_batches = 4               # measure groups on N batches first; keep only those that pay (0: keep all)
    in_workers = true               # build IKJTs inside DataLoader workers
    # sharded = true                # model goes under DistributedModelParallel (default: auto)

    [recd.groups.user]              # one feature group: deduplicated together
    key = "session_id"              # samples with equal key are duplicates (omit: by content)
    features = ["user_id", "user_age", "history"]

    [recd.towers]                   # module path in the model -> group it reads
    "user_tower" = "user"

    [recd.fae]                      # FAE: hot rows in fast memory
    hot_set = "out/hot.npz"         # written by `recd-plugin profile`

    [recd.des]                      # DES: the model's DESEmbeddingOperators sharded the DES way
    sharding = "table_wise"         # or "row_wise"

As one flag string, the same keys as dotted paths separated by ``;`` (lists with ``,``)::

    --recd "groups.user.key=session_id; groups.user.features=user_id,user_age,history;
            towers.user_tower=user"
    --recd @recd.toml               # or a path to a TOML file
    --recd off                      # plugin off: model and loader are left untouched

``RecDConfig.load(flag)`` takes the flag if given, else ``$RECD_PLUGIN`` (so a launcher such
as ``torchx run recd.train`` can switch the plugin on without touching the script), else off.
A ``pathlib.Path`` flag is read as a TOML file.

Built in code, ``RecDConfig(groups=[FeatureGroup(...)], ...)`` is on (as a flag naming groups
is) and checked by the same rules when built: a bad value raises ``ConfigError`` there, never
at the first batch. ``RecDConfig()`` is off. ``FAEConfig(...)`` and ``DESConfig(...)`` are on
when built and may be given to ``apply`` alone (torchao's ``quantize_(model, config)`` style).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

from recd_plugin.errors import ConfigError, DedupSpecError, did_you_mean
from recd_plugin.sparse.ikjt import DedupSpec, FeatureGroup

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

ENV_VAR = "RECD_PLUGIN"
_OFF = {"", "0", "off", "false", "no", "none"}
_TOP_KEYS = {"enabled", "groups", "towers", "verify_batches", "in_workers", "sharded", "fae", "des", "probe_batches"}
_FAE_KEYS = {"hot_set", "tables", "window", "force_layout"}
_DES_KEYS = {"modules", "sharding"}
_DES_SHARDING = ("table_wise", "row_wise")
_GROUP_KEYS = {"key", "features"}
_INT = re.compile(r"-?[0-9]+")  # ASCII only: str.isdigit() also passes '²' and '--5' to int()


@dataclass
class RecDConfig:
    """Everything the plugin needs; ``RecDConfig()`` is the plugin switched off.

    Every field is checked when the config is built (``ConfigError`` naming the field and the
    fix); an enabled config also passes :meth:`validate`.
    """

    #: None: on when ``groups`` or ``fae`` is given (as a flag that names them is), else off.
    enabled: Optional[bool] = None
    groups: List[FeatureGroup] = field(default_factory=list)
    towers: Dict[str, str] = field(default_factory=dict)
    verify_batches: int = 1
    in_workers: bool = True
    #: ``apply`` measures every group on this many loader batches first and leaves on TorchRec's
    #: plain path each group whose dedup would not pay (``modules/probe.py``); 0 keeps all.
    probe_batches: int = 4
    #: The model will be sharded by DistributedModelParallel: keep TorchRec's own embedding
    #: modules (DMP's default sharders shard only their exact types), feed them aligned IKJTs
    #: and gather their outputs. None: decide at ``apply`` time (see ``is_sharded``).
    sharded: Optional[bool] = None
    #: FAE: hot rows in fast memory (see :class:`FAEConfig`); None: off.
    fae: Optional["FAEConfig"] = None
    #: DES: the model's DES operator modules sharded the DES way (see :class:`DESConfig`); None: off.
    des: Optional["DESConfig"] = None
    #: Set by ``apply``: u per group its probe measured (summed over ranks); the planner hints
    #: of ``recd_plugin.sharding.for_dmp`` read it instead of measuring again.
    probed_unique_fraction: Dict[str, float] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Why here and not only in the parsers: a config built in code used to skip every
        # check (verify_batches='x' failed at the first batch) and stayed off with groups.
        if self.enabled is None:
            self.enabled = bool(self.groups) or self.fae is not None or self.des is not None
        if self.enabled:
            self.validate()
        else:
            self._check_fields()
        self.groups, self.towers = list(self.groups), dict(self.towers)

    def is_sharded(self) -> bool:
        """``sharded``, or when unset: does this process run under torch.distributed (initialized,
        at any world size, or launched by torchrun / TorchX, which set ``LOCAL_RANK``)?

        Why any world size: a 1-process DistributedModelParallel job (``torchrun
        --nproc_per_node 1``, TorchX ``-j 1x1``) shards too, and DMP's default sharders shard
        only TorchRec's exact module types. Sharded mode is also right for a model that ends up
        not sharded: TorchRec's modules read the aligned IKJTs, and their outputs are gathered.
        """
        if self.sharded is not None:
            return self.sharded
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return True
        return "LOCAL_RANK" in os.environ or "TORCHELASTIC_RUN_ID" in os.environ

    @property
    def spec(self) -> DedupSpec:
        return DedupSpec(tuple(self.groups))

    def parts(self) -> List[Any]:
        """The technique configs this flag switches on, one per section: the RecD groups
        (this config itself, when it names groups), ``fae``, ``des``. ``recd_plugin.apply``
        builds the technique registered for each part's type (``recd_plugin/technique.py``)."""
        if not self.enabled:
            return []
        return ([self] if self.groups else []) + [p for p in (self.fae, self.des) if p is not None]

    # -- readers ---------------------------------------------------------------------------

    @classmethod
    def load(cls, flag: Optional[Union[str, "os.PathLike[str]"]] = None,
             env: Optional[Mapping[str, str]] = None) -> "RecDConfig":
        """From ``flag`` if not None, else from ``$RECD_PLUGIN``, else off."""
        if flag is None:
            flag = (os.environ if env is None else env).get(ENV_VAR)
        return cls() if flag is None else cls.from_string(flag)

    @classmethod
    def from_string(cls, text: Union[str, "os.PathLike[str]"]) -> "RecDConfig":
        """Parse the flag string (dotted ``key=value`` pairs, ``@file.toml``, or ``off``); a
        ``pathlib.Path`` is read as a TOML file."""
        if isinstance(text, os.PathLike):
            return cls.from_toml(text)
        if not isinstance(text, str):
            hint = " (decode it first: flag.decode())" if isinstance(text, (bytes, bytearray)) else ""
            raise ConfigError(
                f"recd flag must be a string, got {type(text).__name__} {text!r}{hint}; pass "
                "'groups.user.key=session_id; groups.user.features=user_id,history', '@recd.toml' or 'off'"
            )
        text = text.strip()
        if text.lower() in _OFF:
            return cls()
        if text.startswith("@") or text.endswith(".toml"):
            return cls.from_toml(text.lstrip("@"))
        tree: Dict[str, Any] = {}
        for item in filter(None, (part.strip() for part in text.split(";"))):
            if "=" not in item:
                raise ConfigError(
                    f"recd flag item {item!r} is not key=value; example: "
                    "'groups.user.key=session_id; groups.user.features=user_id,history'"
                )
            path, value = (s.strip() for s in item.split("=", 1))
            parts = path.split(".")
            if parts[0] == "towers" and len(parts) > 1:  # module paths contain dots
                parts = ["towers", ".".join(parts[1:])]
            node = tree
            for p in parts[:-1]:
                node = node.setdefault(p, {})
                if not isinstance(node, dict):
                    raise ConfigError(f"recd flag sets {path!r} below a plain value")
            if not all(parts) or not value:
                raise ConfigError(f"recd flag item {item!r} has an empty name or value")
            if parts[-1] in node:
                raise ConfigError(f"recd flag sets {path!r} twice; give each key once (lists: a,b,c)")
            node[parts[-1]] = _parse_value(value)
        return cls.from_dict(tree)

    @classmethod
    def from_toml(cls, path: Union[str, "os.PathLike[str]"]) -> "RecDConfig":
        """Read a TOML file (UTF-8): its ``[recd]`` table if it has one, else the whole file."""
        path = Path(path)
        try:
            with path.open("rb") as f:
                data = tomllib.load(f)
        except FileNotFoundError:
            raise ConfigError(f"recd config file {str(path)!r} does not exist") from None
        except OSError as e:
            raise ConfigError(f"recd config file {str(path)!r} cannot be read ({e.strerror}); "
                              "pass a TOML file: --recd @path/to/recd.toml") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"recd config file {str(path)!r} is not valid TOML: {e}") from None
        except UnicodeDecodeError as e:  # TOML is UTF-8 by definition; tomllib raises this raw
            raise ConfigError(
                f"recd config file {str(path)!r} is not UTF-8 text (byte {e.object[e.start]:#04x} at "
                f"offset {e.start}); TOML files must be UTF-8: save it as UTF-8, e.g. "
                f"iconv -f latin1 -t utf-8 {path.name} > fixed.toml"
            ) from None
        except ValueError as e:  # open() refuses a path with a NUL byte
            raise ConfigError(f"recd config file path {str(path)!r} is not a valid path ({e}); "
                              "pass a TOML file: --recd @path/to/recd.toml") from None
        return cls.from_dict(data.get("recd", data))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "RecDConfig":
        """Validate the schema above; every mistake names the key and how to fix it."""
        if not isinstance(data, Mapping):  # e.g. `recd = 5` in a TOML file
            raise ConfigError(
                f"recd config must be a table of settings, got {type(data).__name__} {data!r}; write "
                "[recd] followed by e.g. groups.user.features = [\"user_id\"] (see docs/recd.md)"
            )
        _no_unknown(data, _TOP_KEYS, "recd")
        groups_data = data.get("groups", {})
        if not isinstance(groups_data, Mapping):
            raise ConfigError("recd 'groups' must be a table of groups: groups.<name>.features = [...]")
        groups = []
        for name, g in groups_data.items():
            if not isinstance(g, Mapping):
                raise ConfigError(f"recd group {name!r} must be a table with 'features' and optional 'key'")
            _no_unknown(g, _GROUP_KEYS, f"recd group {name!r}")
            features = g.get("features", [])
            features = [features] if isinstance(features, str) else features
            key = g.get("key")
            if not isinstance(features, list) or not all(isinstance(f, str) for f in features):
                raise ConfigError(f"recd group {name!r}: 'features' must be a list of feature names")
            if key is not None and not isinstance(key, str):
                raise ConfigError(f"recd group {name!r}: 'key' must be a feature name")
            try:
                groups.append(FeatureGroup(str(name), tuple(features), key))
            except DedupSpecError as e:
                raise ConfigError(str(e)) from None
        towers = data.get("towers", {})
        if not isinstance(towers, Mapping):
            raise ConfigError(_TOWERS_HELP)
        # The values' types are checked by __post_init__ (one place for the parsers and code).
        return cls(
            enabled=data.get("enabled", True),  # a flag that is not 'off' means on
            groups=groups,
            towers=dict(towers),
            verify_batches=data.get("verify_batches", 1),
            in_workers=data.get("in_workers", True),
            probe_batches=data.get("probe_batches", 4),
            sharded=data.get("sharded"),
            fae=FAEConfig.from_dict(data["fae"]) if "fae" in data else None,
            des=DESConfig.from_dict(data["des"]) if "des" in data else None,
        )

    def _check_fields(self) -> None:
        """Each field's type and range, as the flag spells them (what a parser cannot catch
        for a config built in code)."""
        if not isinstance(self.enabled, bool):
            raise ConfigError(f"recd 'enabled' must be true or false, got {self.enabled!r}")
        if not isinstance(self.groups, (list, tuple)) or not all(isinstance(g, FeatureGroup) for g in self.groups):
            raise ConfigError(
                f"RecDConfig.groups must be a list of FeatureGroup, got {self.groups!r}; e.g. "
                "groups=[FeatureGroup('user', ['user_id', 'history'], key='session_id')]"
            )
        if not isinstance(self.towers, Mapping) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in self.towers.items()):
            raise ConfigError(_TOWERS_HELP)
        verify = self.verify_batches
        if not isinstance(verify, int) or isinstance(verify, bool) or verify < -1:
            raise ConfigError(f"recd 'verify_batches' must be an integer >= 0, or -1 for every batch; got {verify!r}")
        probe = self.probe_batches
        if not isinstance(probe, int) or isinstance(probe, bool) or probe < 0:
            raise ConfigError(f"recd 'probe_batches' must be an integer >= 0 (0: keep every group), got {probe!r}")
        if not isinstance(self.in_workers, bool):
            raise ConfigError(f"recd 'in_workers' must be true or false, got {self.in_workers!r}")
        if self.sharded is not None and not isinstance(self.sharded, bool):
            raise ConfigError("recd 'sharded' must be true or false (omit it: decided from torch.distributed), "
                              f"got {self.sharded!r}")
        if self.fae is not None and not isinstance(self.fae, FAEConfig):
            raise ConfigError(f"RecDConfig.fae must be an FAEConfig or None, got {self.fae!r}; "
                              "e.g. fae=FAEConfig(hot_set='out/hot.npz')")
        if self.des is not None and not isinstance(self.des, DESConfig):
            raise ConfigError(f"RecDConfig.des must be a DESConfig or None, got {self.des!r}; "
                              "e.g. des=DESConfig(modules=['sparse'])")

    def validate(self) -> None:
        """Checks that need no model: fields well typed, groups exist, are disjoint, and
        towers name them."""
        self._check_fields()
        if not self.groups and self.fae is None and self.des is None:
            raise ConfigError(
                "recd is on but names no feature group, no fae hot set and no des section; add one, e.g. "
                "'groups.user.key=session_id; groups.user.features=user_id,history', 'fae.hot_set=out/hot.npz' "
                "or 'des.sharding=table_wise'"
            )
        try:
            spec = self.spec
        except DedupSpecError as e:
            raise ConfigError(str(e)) from None
        names = [g.name for g in spec.groups]
        for module, group in self.towers.items():
            if group not in names:
                raise ConfigError(
                    f"recd tower {module!r} reads group {group!r}, which is not defined"
                    f"{did_you_mean(group, names)}; groups are {names}"
                )


@dataclass
class FAEConfig:
    """FAE's part of the flag: ``fae.hot_set`` (the ``.npz`` written by ``recd-plugin
    profile``), optional ``fae.tables`` (a subset of its tables), ``fae.window`` (regroup
    samples into all-hot and mixed batches within this many batches; 0 classifies only) and
    ``fae.force_layout`` (build the hot/cold layout even where it cannot pay: tables on a cpu
    model have no faster tier for the hot rows, so without it FAE leaves them as they are)."""

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

    @classmethod
    def from_dict(cls, data: Any) -> "FAEConfig":
        if not isinstance(data, Mapping):
            raise ConfigError("recd 'fae' must be a table: fae.hot_set = \"out/hot.npz\"")
        _no_unknown(data, _FAE_KEYS, "recd fae")
        if not isinstance(data.get("hot_set"), str):  # a TOML path is a string (no PathLike here)
            raise ConfigError("recd fae needs 'hot_set': the .npz written by `recd-plugin profile ... --out DIR`")
        return cls(hot_set=data["hot_set"], tables=data.get("tables"), window=data.get("window", 0),
                   force_layout=data.get("force_layout", False))


@dataclass
class DESConfig:
    """DES's part of the flag: ``des.modules`` (paths of the model's
    ``recd_plugin.des.DESEmbeddingOperators``; default: every one) and ``des.sharding``
    (``table_wise``, the default, or ``row_wise``: how the planner may shard their tables).

    Unsharded, DES operators are their plain math and nothing changes; under
    ``DistributedModelParallel`` the named modules are sharded the DES way (each rank computes
    the operators' partial results on the rows it owns; only partials cross the network):
    ``recd_plugin.sharding.for_dmp`` adds DES's sharder and the planner constraints."""

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

    @classmethod
    def from_dict(cls, data: Any) -> "DESConfig":
        if data is True:  # `des = true` in TOML: DES on, defaults
            data = {}
        if not isinstance(data, Mapping):
            raise ConfigError("recd 'des' must be a table: des.sharding = \"table_wise\" (or des = true)")
        _no_unknown(data, _DES_KEYS, "recd des")
        return cls(modules=data.get("modules"), sharding=data.get("sharding", "table_wise"))


def as_flag(config: Any) -> RecDConfig:
    """The whole flag for ``config``: a ``RecDConfig`` as it is; one technique's config alone
    (``FAEConfig``, ``DESConfig``: torchao style, the type says which technique) as a flag
    holding only that section."""
    if isinstance(config, RecDConfig):
        return config
    if isinstance(config, FAEConfig):
        return RecDConfig(fae=config)
    if isinstance(config, DESConfig):
        return RecDConfig(des=config)
    raise ConfigError(f"recd-plugin takes a RecDConfig (the flag: RecDConfig.load(...)), an FAEConfig or a "
                      f"DESConfig, got {type(config).__name__} {config!r}")


def verify_step(left: int) -> Tuple[bool, int]:
    """(verify this batch?, budget left) for ``verify_batches``: the first N batches, -1 all."""
    return left != 0, left - 1 if left > 0 else left


def _parse_value(value: str) -> Any:
    low = value.lower()
    if low in ("true", "false"):
        return low == "true"
    if _INT.fullmatch(value):
        return int(value)
    if "," in value:
        return [v.strip() for v in value.split(",") if v.strip()]
    return value.strip("\"'")


_TOWERS_HELP = "recd 'towers' must map module paths to group names: towers.user_tower = \"user\""


def _no_unknown(data: Mapping[str, Any], allowed: set, where: str) -> None:
    for k in data:
        if k not in allowed:
            raise ConfigError(f"{where}: unknown key {k!r}{did_you_mean(k, sorted(allowed))}; allowed: {sorted(allowed)}")
