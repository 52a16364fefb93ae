"""The ``--model`` config of ``recd-plugin analyze``: tables, DES operators, world size.

A small TOML (or JSON, same keys) file describing the model's sparse side::

    # model.toml
    world_size = 2           # ranks (table-wise sharding)
    batch_size = 1024        # samples per rank and step
    embedding_dim = 16       # default dim of the tables below
    operators = ["fm", "wide", "first_layer"]   # what reads the pooled embeddings
    mlp = [32, 16]           # dense MLP widths; mlp[0] is the first layer's H (first_layer)
    dense_features = 13      # dense inputs of the first layer
    [tables]
    C1 = {}                  # a table named like its feature; rows from the data
    C2 = {dim = 16, rows = 583}
    items = {feature = "item_id", dim = 32}

``tables`` may also be a list of feature names (``tables = ["C1", "C2"]``) or ``"all"``
(every sparse feature of the data, the default without ``--model``). ``operators``: any of
``fm`` (factorization machine, all dims equal), ``wide`` (linear term: a 1-dim table per
field) and ``first_layer`` (``mlp[0]``-wide first dense layer over [dense, e_1..e_F]).
``pooling`` per table (mean ids per sample) defaults to the value measured on the data.

Every table must name a feature of the data: the analysis measures that feature's accesses,
so a config for another data set stops with an AnalyzeError naming the table.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from recd_plugin.errors import AnalyzeError, did_you_mean

OPERATORS = ("fm", "wide", "first_layer")
_KEYS = {"world_size", "batch_size", "embedding_dim", "operators", "mlp", "dense_features", "tables"}
_TABLE_KEYS = {"feature", "rows", "dim", "pooling"}


@dataclass
class TableSpec:
    name: str
    feature: str
    rows: int
    dim: int
    pooling: Optional[float] = None  # mean ids per sample; None: measured on the data


@dataclass
class ModelConfig:
    """The model's sparse side as the analysis needs it (see the module docstring)."""

    tables: Dict[str, TableSpec]
    operators: List[str] = field(default_factory=lambda: ["fm", "wide"])
    mlp: List[int] = field(default_factory=list)
    dense_features: int = 0
    world_size: int = 2
    batch_size: int = 1024
    source: str = "default"

    @property
    def hidden(self) -> int:
        """H, the first dense layer's width (0 without ``first_layer``)."""
        return self.mlp[0] if "first_layer" in self.operators and self.mlp else 0


def _read(path: Path) -> Dict[str, Any]:
    if not path.exists():
        raise AnalyzeError(f"--model {path}: no such file; write a TOML or JSON model config "
                           "(docs/analyze.md, section 'Model config')")
    text = path.read_text()
    try:
        if path.suffix == ".json":
            return json.loads(text)
        import tomllib

        return tomllib.loads(text)
    except (ValueError, json.JSONDecodeError) as e:
        kind = "JSON" if path.suffix == ".json" else "TOML"
        raise AnalyzeError(f"--model {path}: not valid {kind} ({e})") from e


def default_config(features: List[str], cardinalities: Dict[str, int], dim: int = 16) -> ModelConfig:
    """Every feature its own table of ``dim``, FM + wide, 2 ranks, batch 1024 per rank."""
    return ModelConfig(tables={f: TableSpec(f, f, cardinalities[f], dim) for f in features},
                       source=f"default: every sparse feature a table of dim {dim}, FM + wide, 2 ranks, "
                              "batch 1024 per rank (give --model to describe your model)")


def load_model_config(path: Optional[str], features: List[str], cardinalities: Dict[str, int]) -> ModelConfig:
    """Parse ``path`` (None: :func:`default_config`) and check it against the data's features."""
    if path is None:
        return default_config(features, cardinalities)
    raw = _read(Path(path))
    unknown = set(raw) - _KEYS
    if unknown:
        k = sorted(unknown)[0]
        raise AnalyzeError(f"--model {path}: unknown key {k!r}{did_you_mean(k, sorted(_KEYS))}; "
                           f"allowed: {sorted(_KEYS)}")
    dim = int(raw.get("embedding_dim", 16))
    spec = raw.get("tables", "all")
    if spec == "all":
        spec = {f: {} for f in features}
    elif isinstance(spec, list):
        spec = {str(f): {} for f in spec}
    if not isinstance(spec, dict) or not spec:
        raise AnalyzeError(f"--model {path}: 'tables' must be a non-empty table, a list of feature names or \"all\"")
    tables = {}
    for name, t in spec.items():
        bad = set(t) - _TABLE_KEYS
        if bad:
            raise AnalyzeError(f"--model {path}: table {name!r} has unknown key(s) {sorted(bad)}; "
                               f"allowed: {sorted(_TABLE_KEYS)}")
        feature = str(t.get("feature", name))
        if feature not in features:
            raise AnalyzeError(f"--model {path}: table {name!r} reads feature {feature!r}, which is not a "
                               f"sparse feature of the data{did_you_mean(feature, features)}; the data has "
                               f"{features}. Name a data column, or give 'feature = \"COLUMN\"'")
        rows = int(t.get("rows", cardinalities[feature]))
        if rows < cardinalities.get(feature, 0):
            raise AnalyzeError(f"--model {path}: table {name!r} has {rows} rows but the data's {feature!r} "
                               f"needs {cardinalities[feature]}; raise 'rows' or drop it (read from the data)")
        pooling = t.get("pooling")
        tables[name] = TableSpec(name, feature, rows, int(t.get("dim", dim)),
                                 None if pooling is None else float(pooling))
    operators = [str(o) for o in raw.get("operators", ["fm", "wide"])]
    for o in operators:
        if o not in OPERATORS:
            raise AnalyzeError(f"--model {path}: unknown operator {o!r}{did_you_mean(o, OPERATORS)}; "
                               f"DES substitutes {list(OPERATORS)}")
    mlp = [int(h) for h in raw.get("mlp", [])]
    if mlp and "first_layer" not in operators:
        raise AnalyzeError(f"--model {path}: 'mlp' is given but 'first_layer' is not among the operators; "
                           "DES substitutes the MLP's first layer: add \"first_layer\" to operators")
    if "first_layer" in operators and not mlp:
        raise AnalyzeError(f"--model {path}: operator 'first_layer' needs its width: give mlp = [H, ...]")
    if "fm" in operators and len({t.dim for t in tables.values()}) > 1:
        raise AnalyzeError(f"--model {path}: the FM needs one embedding dim for all its tables, got "
                           f"{sorted({t.dim for t in tables.values()})}")
    cfg = ModelConfig(tables=tables, operators=operators, mlp=mlp, dense_features=int(raw.get("dense_features", 0)),
                      world_size=int(raw.get("world_size", 2)), batch_size=int(raw.get("batch_size", 1024)),
                      source=str(path))
    if cfg.world_size < 2:
        raise AnalyzeError(f"--model {path}: world_size must be >= 2 (DES changes what crosses ranks), "
                           f"got {cfg.world_size}")
    if cfg.batch_size < 1:
        raise AnalyzeError(f"--model {path}: batch_size must be >= 1, got {cfg.batch_size}")
    return cfg
