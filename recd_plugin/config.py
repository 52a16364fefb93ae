"""The plugin's one flag: a ``RecDConfig`` read from a flag string, ``$RECD_PLUGIN`` or TOML.

All three spell the same schema: plugin-wide settings and RecD's ``groups`` and ``towers``, then
a section per other technique (``fae``, ``des``), each one config type (the ``RecDConfig``
itself, ``recd_plugin.FAEConfig``, ``recd_plugin.DESConfig``) that ``recd_plugin.apply``
dispatches to the technique registered for it (``recd_plugin/technique.py``). This module
knows no section: each technique's package registers its section name and config type
(:func:`register_section`, called by ``register_technique``), so the flag grows with the
techniques and a new one edits nothing here. In TOML (a file of its own, or a ``[recd]`` table
in your project's config)::

    [recd]
    verify_batches = 1              # compare the first N batches' ids exactly (0 off, -1 all)
    route = "measure"               # time the first training steps both ways, keep what pays ("dedup": keep all)
    in_workers = true               # build IKJTs inside DataLoader workers
    # batch_kjt = "idlist_features" # the batch's KJT field (default: sparse_features, else its only KJT)
    # tower_randomness = "refuse"   # refuse towers that draw randomness (dropout) per session
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
at the first batch. ``RecDConfig()`` is off. A section is a keyword named after it
(``RecDConfig(fae=FAEConfig(...))``) and read back the same way (``config.fae``: None when
absent). ``FAEConfig(...)`` and ``DESConfig(...)`` are on when built and may be given to
``apply`` alone (torchao's ``quantize_(model, config)`` style).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from recd_plugin.errors import ConfigError, DedupSpecError, did_you_mean
from recd_plugin.sparse.ikjt import DedupSpec, FeatureGroup

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

ENV_VAR = "RECD_PLUGIN"
_OFF = {"", "0", "off", "false", "no", "none"}
_TOP_KEYS = {"enabled", "groups", "towers", "verify_batches", "in_workers", "sharded", "probe_batches", "route",
             "batch_kjt", "tower_randomness"}
ROUTES = ("measure", "dedup")
TOWER_RANDOMNESS = ("allow", "refuse")
_GROUP_KEYS = {"key", "features"}
_INT = re.compile(r"-?[0-9]+")  # ASCII only: str.isdigit() also passes '²' and '--5' to int()

#: section name -> config type, filled by the techniques' packages (``register_section``).
SECTIONS: Dict[str, type] = {}


def register_section(name: str, config_type: type) -> None:
    """Make ``name`` a section of the flag, parsed into ``config_type``: its classmethod
    ``from_dict(table)`` if it has one, else ``config_type(**table)``. Refuses a name that is
    a plugin-wide key or a section already registered for another type."""
    if not isinstance(name, str) or not name.isidentifier() or name.startswith("_"):
        raise ConfigError(f"flag section name {name!r} must be a Python identifier not starting with '_' "
                          "(it is written `name.key=value` in a flag and read back as config.name)")
    if name in {f.name for f in fields(RecDConfig)} or hasattr(RecDConfig, name):  # the plugin-wide keys too
        raise ConfigError(f"flag section {name!r} would shadow the plugin-wide key or RecDConfig attribute {name!r}; "
                          "pick another name")
    if SECTIONS.get(name, config_type) is not config_type:
        raise ConfigError(f"flag section {name!r} is already registered for {SECTIONS[name].__name__}")
    SECTIONS[name] = config_type


def unregister_section(name: str) -> None:
    SECTIONS.pop(name, None)


def section_of(config: Any) -> Optional[str]:
    """The section name registered for ``type(config)`` (or a base class of it), else None."""
    name_of = {t: name for name, t in SECTIONS.items()}
    return next((name_of[base] for base in type(config).__mro__ if base in name_of), None)


@dataclass(init=False)
class RecDConfig:
    """Everything the plugin needs; ``RecDConfig()`` is the plugin switched off.

    ``RecDConfig(enabled=None, groups=(), towers=None, verify_batches=1, in_workers=True,
    probe_batches=4, sharded=None, sections=None, route="measure", batch_kjt=None,
    tower_randomness="allow", **named_sections)``: a technique's section is
    given by its name (``fae=FAEConfig(...)``) or in ``sections``. Every field is checked when
    the config is built (``ConfigError`` naming the field and the fix); an enabled config also
    passes :meth:`validate`.
    """

    #: None: on when ``groups`` or a section is given (as a flag that names them is), else off.
    enabled: Optional[bool] = None
    groups: List[FeatureGroup] = field(default_factory=list)
    towers: Dict[str, str] = field(default_factory=dict)
    verify_batches: int = 1
    in_workers: bool = True
    #: Kept for flags written for earlier releases: 0 is ``route = "dedup"``; other values are ignored.
    probe_batches: int = 4
    #: The model will be sharded by DistributedModelParallel: keep TorchRec's own embedding
    #: modules (DMP's default sharders shard only their exact types), feed them aligned IKJTs
    #: and gather their outputs. None: decide at ``apply`` time (see ``is_sharded``).
    sharded: Optional[bool] = None
    #: {section name: that technique's config}, e.g. ``{"fae": FAEConfig(...)}``; read one as
    #: ``config.fae`` (None when absent).
    sections: Dict[str, Any] = field(default_factory=dict)
    #: "measure": each group is timed both ways on the job's first training steps and kept only
    #: where it pays (``recd_plugin.transforms.route``); "dedup": every group is kept unmeasured.
    route: str = "measure"
    #: Where the batch's KJT is: an attribute or dict key of the loader's batches (default:
    #: ``sparse_features``, else the batch's only KJT field).
    batch_kjt: Optional[str] = None
    #: "allow": towers whose modules draw randomness (dropout) run them once per session and
    #: ``apply`` says which; "refuse": ``apply`` refuses them (equal losses to plugin-off).
    tower_randomness: str = "allow"

    def __init__(self, enabled: Optional[bool] = None, groups: Sequence[FeatureGroup] = (),
                 towers: Optional[Mapping[str, str]] = None, verify_batches: int = 1, in_workers: bool = True,
                 probe_batches: int = 4, sharded: Optional[bool] = None,
                 sections: Optional[Mapping[str, Any]] = None, route: str = "measure",
                 batch_kjt: Optional[str] = None, tower_randomness: str = "allow", **named_sections: Any) -> None:
        self.enabled, self.groups, self.towers = enabled, groups, towers if towers is not None else {}
        self.verify_batches, self.in_workers, self.probe_batches, self.sharded = (
            verify_batches, in_workers, probe_batches, sharded)
        self.route, self.batch_kjt, self.tower_randomness = route, batch_kjt, tower_randomness
        if sections is not None and not isinstance(sections, Mapping):
            raise ConfigError(f"RecDConfig.sections must map section names to configs, got {sections!r}")
        merged = dict(sections or {})
        for name, part in named_sections.items():
            if name not in SECTIONS:
                raise ConfigError(f"RecDConfig got an unknown section or field {name!r}"
                                  f"{did_you_mean(name, sorted(SECTIONS))}; sections: {sorted(SECTIONS)}")
            merged[name] = part  # None: that section off (dataclasses.replace(cfg, fae=None))
        self.sections = {k: v for k, v in merged.items() if v is not None}
        # Why here and not only in the parsers: a config built in code used to skip every
        # check (verify_batches='x' failed at the first batch) and stayed off with groups.
        if self.enabled is None:
            self.enabled = bool(self.groups) or bool(self.sections)
        if self.enabled:
            self.validate()
        else:
            self._check_fields()
        self.groups, self.towers = list(self.groups), dict(self.towers)

    def __setattr__(self, name: str, value: Any) -> None:
        # ``config.fae = FAEConfig(...)`` edits the section (None removes it), as it did when
        # sections were fields; a plain attribute would shadow it and apply would never see it.
        if name in SECTIONS:
            sections = self.__dict__.setdefault("sections", {})
            if value is None:
                sections.pop(name, None)
            else:
                sections[name] = value
        else:
            object.__setattr__(self, name, value)

    def __getattr__(self, name: str) -> Any:
        # ``config.fae``: a registered section not given reads as None (only called when the
        # normal lookup fails, so fields and methods are unaffected).
        if name in SECTIONS:  # never a dunder or a field: register_section refuses those names
            return self.__dict__.get("sections", {}).get(name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

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

    def measures_routes(self) -> bool:
        """Are the groups decided on the job's first training steps (else all kept unmeasured)?"""
        return self.route == "measure" and self.probe_batches != 0

    def parts(self) -> List[Any]:
        """The technique configs this flag switches on, one per section: the RecD groups
        (this config itself, when it names groups), then every section. ``recd_plugin.apply``
        builds the technique registered for each part's type (``recd_plugin/technique.py``)."""
        if not self.enabled:
            return []
        return ([self] if self.groups else []) + list(self.sections.values())

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
        check_keys(data, _TOP_KEYS | set(SECTIONS), "recd")
        groups_data = data.get("groups", {})
        if not isinstance(groups_data, Mapping):
            raise ConfigError("recd 'groups' must be a table of groups: groups.<name>.features = [...]")
        groups = []
        for name, g in groups_data.items():
            if not isinstance(g, Mapping):
                raise ConfigError(f"recd group {name!r} must be a table with 'features' and optional 'key'")
            check_keys(g, _GROUP_KEYS, f"recd group {name!r}")
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
            route=data.get("route", "measure"),
            batch_kjt=data.get("batch_kjt"),
            tower_randomness=data.get("tower_randomness", "allow"),
            sections={name: _section_from_dict(name, data[name]) for name in data if name in SECTIONS},  # flag order
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
        if self.route not in ROUTES:
            raise ConfigError(f"recd 'route' must be one of {list(ROUTES)} (measure: decide each group on the "
                              f"job's first training steps; dedup: keep every group unmeasured), got {self.route!r}")
        if self.batch_kjt is not None and not (isinstance(self.batch_kjt, str) and self.batch_kjt):
            raise ConfigError(f"recd 'batch_kjt' must name the batch's KeyedJaggedTensor field (an attribute or dict "
                              f"key, e.g. batch_kjt=idlist_features), got {self.batch_kjt!r}")
        if self.tower_randomness not in TOWER_RANDOMNESS:
            raise ConfigError(f"recd 'tower_randomness' must be one of {list(TOWER_RANDOMNESS)} (refuse: towers that "
                              f"draw randomness, e.g. dropout, are an error), got {self.tower_randomness!r}")
        if not isinstance(self.in_workers, bool):
            raise ConfigError(f"recd 'in_workers' must be true or false, got {self.in_workers!r}")
        if self.sharded is not None and not isinstance(self.sharded, bool):
            raise ConfigError("recd 'sharded' must be true or false (omit it: decided from torch.distributed), "
                              f"got {self.sharded!r}")
        for name, part in self.sections.items():
            if not isinstance(name, str):
                raise ConfigError(f"RecDConfig.sections keys must be section names {sorted(SECTIONS)}, got {name!r}")
            want = SECTIONS.get(name)
            if want is None:
                raise ConfigError(f"RecDConfig: unknown section {name!r}{did_you_mean(name, sorted(SECTIONS))}; "
                                  f"sections: {sorted(SECTIONS)}")
            if not isinstance(part, want):
                example = getattr(want, "EXAMPLE", f"{want.__name__}(...)")
                raise ConfigError(f"RecDConfig.{name} must be an instance of {want.__name__} or None, got {part!r}; "
                                  f"e.g. {name}={example}")

    def validate(self) -> None:
        """Checks that need no model: fields well typed, groups exist, are disjoint, and
        towers name them."""
        self._check_fields()
        if not self.groups and not self.sections:
            raise ConfigError(
                "recd is on but names no feature group and no technique section; add one, e.g. "
                "'groups.user.key=session_id; groups.user.features=user_id,history', or a section "
                f"of {sorted(SECTIONS)} (e.g. 'fae.hot_set=out/hot.npz' or 'des.sharding=table_wise')"
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


def as_flag(config: Any) -> RecDConfig:
    """The whole flag for ``config``: a ``RecDConfig`` as it is; one technique's config alone
    (``FAEConfig``, ``DESConfig``: torchao style, the type says which technique) as a flag
    holding only that section."""
    if isinstance(config, RecDConfig):
        return config
    name = section_of(config)
    if name is not None:
        return RecDConfig(sections={name: config})
    raise ConfigError(f"recd-plugin takes a RecDConfig (the flag: RecDConfig.load(...)) or one technique's "
                      f"config ({', '.join(t.__name__ for t in SECTIONS.values())}), got "
                      f"{type(config).__name__} {config!r}")


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


def _section_from_dict(name: str, data: Any) -> Any:
    config_type = SECTIONS[name]
    if hasattr(config_type, "from_dict"):
        return config_type.from_dict(data)
    if not isinstance(data, Mapping):
        raise ConfigError(f"recd '{name}' must be a table of settings, got {data!r}")
    try:
        return config_type(**data)
    except TypeError as e:
        raise ConfigError(f"recd {name}: {e}") from None


def check_keys(data: Mapping[str, Any], allowed: set, where: str) -> None:
    """Refuse a key not in ``allowed``, naming the closest allowed one (a section's parser uses it too)."""
    for k in data:
        if k not in allowed:
            raise ConfigError(f"{where}: unknown key {k!r}{did_you_mean(k, sorted(allowed))}; allowed: {sorted(allowed)}")
