"""The package's layering: imports between subpackages go one way, down the data flow.

Every module of ``recd_plugin`` is parsed with ``ast``; every import counts: at module level,
inside functions, under ``if TYPE_CHECKING``, and ``importlib.import_module("recd_plugin...")``
with a literal name. A cycle hidden by an import inside a function is still a cycle: it only
moves the failure from import time to the first call, and the layers stop telling a reader
what depends on what. The layers, lowest first, are ``LAYERS`` below (README's "Repository
layout" shows the same); a subpackage may import only subpackages of strictly lower layers.
A lower layer that must reach up (e.g. the converter registry in ``modules/swap.py`` running
FAE's converter) is inverted: the upper layer registers itself with the lower one.

Then, in a fresh interpreter: ``import recd_plugin`` (and a plain ``apply``, sharded mode
included) loads neither the sharding code nor the tooling nor matplotlib.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Set, Tuple

import pytest

import recd_plugin
from recd_plugin.errors import ConfigError

PACKAGE = Path(recd_plugin.__file__).parent
ROOT = "recd_plugin"

#: Lowest first. A name is a subpackage (folder) or a top-level module of recd_plugin;
#: "recd_plugin" is the package's own __init__.py (the public API). Names in one layer may
#: not import each other (FAE and DES are independent techniques; so are the tools).
LAYERS: List[Tuple[str, ...]] = [
    ("errors",),                                      # exception classes
    ("_peer", "_ranks", "_rng", "_fx_warning", "_plotting"),  # peer check, ranks, random states, warnings, figures
    ("sparse",),                                      # the IKJT
    ("config",),                                      # the flag
    ("technique",),                                   # the technique registry (dispatch by config type)
    ("data",),                                        # sample data sources, Batch helpers
    ("storage",),                                     # deduplicated Parquet layout and reader
    ("transforms",),                                  # dataloader transform: Batch -> IKJT batch
    ("modules",),                                     # dedup modules, towers, the converter registry
    ("fae", "des"),                                   # techniques beside RecD
    ("sharding",),                                    # DMP: sharders, planner hints, checkpoints
    ("plugin",),                                      # apply / wrap / remove
    ("recd_plugin",),                                 # the public API (recd_plugin/__init__.py)
    ("analyze", "bench"),                             # tooling: the runtime never imports it
    ("cli",),                                         # the recd-plugin command
]
LAYER_OF: Dict[str, int] = {name: i for i, names in enumerate(LAYERS) for name in names}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES: Dict[str, Path] = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _resolve(name: str) -> Optional[str]:
    """The recd_plugin module an imported dotted name stands for (``recd_plugin.fae.HotSet``
    -> ``recd_plugin.fae``); None outside the package."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str, path: Path) -> Iterator[Tuple[str, int]]:
    """(imported recd_plugin module, line) for every import in ``path``, at any depth."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        names: List[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            # `from pkg import sub` imports the module pkg.sub; `from pkg import name`, pkg
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        elif (isinstance(node, ast.Call) and isinstance(node.func, (ast.Attribute, ast.Name))
              and getattr(node.func, "attr", getattr(node.func, "id", None)) in ("import_module", "__import__")
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            names = [node.args[0].value]
        for name in names:
            if name == ROOT or name.startswith(ROOT + "."):
                target = _resolve(name)
                if target is not None and target != module:
                    yield target, node.lineno


def _unit(module: str) -> str:
    """The layer unit of a module: its subpackage or top-level module; ROOT for __init__."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ROOT


EDGES: Dict[Tuple[str, str], List[str]] = {}  # (module, imported module) -> where
for _mod, _path in MODULES.items():
    for _target, _line in _imports(_mod, _path):
        EDGES.setdefault((_mod, _target), []).append(f"{_path.relative_to(PACKAGE.parent)}:{_line}")


def _unit_edges() -> Dict[Tuple[str, str], List[str]]:
    out: Dict[Tuple[str, str], List[str]] = {}
    for (a, b), where in EDGES.items():
        if _unit(a) != _unit(b):
            out.setdefault((_unit(a), _unit(b)), []).extend(f"{w} ({a} -> {b})" for w in where)
    return out


def _find_cycle(edges: Set[Tuple[str, str]]) -> Optional[List[str]]:
    """One cycle of the directed graph as [a, b, ..., a], or None."""
    graph: Dict[str, List[str]] = {}
    for a, b in sorted(edges):
        graph.setdefault(a, []).append(b)
    state: Dict[str, int] = {}  # 1: on the current path, 2: done
    path: List[str] = []

    def visit(node: str) -> Optional[List[str]]:
        state[node] = 1
        path.append(node)
        for nxt in graph.get(node, []):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            found = visit(start)
            if found:
                return found
    return None


def test_the_graph_sees_the_package() -> None:
    """Guards the test itself: it finds the modules and the imports it is meant to check."""
    assert {"recd_plugin.plugin", "recd_plugin.sharding.planner", "recd_plugin.fae.profile"} <= set(MODULES)
    assert ("recd_plugin.plugin", "recd_plugin.modules.swap") in EDGES
    assert ("recd_plugin.fae.command", "recd_plugin.fae.coverage") in EDGES  # inside a function
    assert ("recd_plugin.sharding.checkpoint", "recd_plugin.sharding.ckpt_files") in EDGES  # from pkg import mod


def test_every_subpackage_has_a_layer() -> None:
    units = {_unit(m) for m in MODULES}
    assert not units - set(LAYER_OF), f"add these to LAYERS (and README's layout): {sorted(units - set(LAYER_OF))}"
    assert not set(LAYER_OF) - units, f"LAYERS names what the package no longer has: {sorted(set(LAYER_OF) - units)}"


def test_subpackage_imports_are_acyclic() -> None:
    where = _unit_edges()
    cycle = _find_cycle(set(where))
    assert cycle is None, "import cycle between subpackages: " + " -> ".join(cycle) + "\n" + "\n".join(
        f"  {a} -> {b}: {where[(a, b)][0]}" for a, b in zip(cycle, cycle[1:]))


def test_every_import_goes_down_the_layers() -> None:
    wrong = [f"{a} (layer {LAYER_OF[a]}) imports {b} (layer {LAYER_OF[b]}): {where[0]}"
             for (a, b), where in sorted(_unit_edges().items())
             if a in LAYER_OF and b in LAYER_OF and LAYER_OF[a] <= LAYER_OF[b]]
    assert not wrong, "imports against the layers (lowest first: " + ", ".join(
        "/".join(names) for names in LAYERS) + "):\n" + "\n".join(wrong)


def test_no_module_cycle_inside_a_subpackage() -> None:
    """Within fae/ (where coverage.py and profile.py used to import each other) and every other
    folder: modules import each other one way too."""
    for unit in sorted({_unit(m) for m in MODULES}):
        inside = {(a, b) for a, b in EDGES if _unit(a) == unit == _unit(b)}
        cycle = _find_cycle(inside)
        assert cycle is None, f"import cycle inside {unit}/: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_cycles() -> None:
    assert _find_cycle({("a", "b"), ("b", "c"), ("c", "a")}) == ["a", "b", "c", "a"]
    assert _find_cycle({("a", "b"), ("a", "c"), ("b", "c")}) is None


# ------------------------------------------------------------------------------------------
# What `import recd_plugin` and a plain `apply` load.

_NOT_LOADED = ("recd_plugin.sharding", "recd_plugin.analyze", "recd_plugin.bench", "recd_plugin.cli", "matplotlib")


def _loaded_after(code: str) -> List[str]:
    out = subprocess.run([sys.executable, "-c", code + "\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"],
                         capture_output=True, text=True, timeout=300, cwd=Path(__file__).parent)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _unwanted(modules: List[str]) -> List[str]:
    return [m for m in modules if any(m == n or m.startswith(n + ".") for n in _NOT_LOADED)]


def test_import_loads_neither_sharding_nor_tooling_nor_matplotlib() -> None:
    loaded = _loaded_after("import recd_plugin")
    assert "recd_plugin.plugin" in loaded
    assert not _unwanted(loaded)


def test_apply_loads_no_sharding_code_unsharded_or_in_sharded_mode() -> None:
    """``apply`` decides sharded mode (``config.is_sharded()``) without the sharding package:
    sharded mode keeps TorchRec's modules and gathers outputs (``modules/gather.py``); the
    sharders and planner hints are loaded only by a script that asks for them."""
    loaded = _loaded_after(
        "import recd_plugin\n"
        "from conftest import RecModel, session_batch\n"
        "for sharded in ('false', 'true'):\n"
        "    config = recd_plugin.RecDConfig.from_string('groups.user.key=session_id; '\n"
        "        'groups.user.features=user_id,history; towers.user_tower=user; probe_batches=0; sharded=' + sharded)\n"
        "    model, loader = recd_plugin.apply(config, RecModel(), [session_batch(0), session_batch(1)])\n"
        "    for batch in loader:\n"
        "        model(batch).sum().backward()\n"
        "    recd_plugin.remove(model)\n")
    assert "recd_plugin.modules.gather" in loaded
    assert not _unwanted(loaded)


def test_techniques_run_in_declared_order_whoever_registers_them() -> None:
    """FAE's technique is registered from fae/ after RecD's from modules/, yet runs first:
    the order is declared, not the order of imports; dispatch is by config type."""
    from dataclasses import dataclass

    from recd_plugin import DESConfig, FAEConfig, RecDConfig
    from recd_plugin.technique import TECHNIQUES, Technique, register_technique, technique_for, unregister_technique

    assert [c.name for c in TECHNIQUES.values()] == ["fae", "recd", "des"]
    assert [t.__name__ for t in TECHNIQUES] == ["FAEConfig", "RecDConfig", "DESConfig"]
    assert technique_for(DESConfig()).name == "des"

    @dataclass
    class LateConfig:
        pass

    class Late(Technique):
        config_type, name, order = LateConfig, "late_but_early", 15

    try:
        register_technique(Late)
        assert [c.name for c in TECHNIQUES.values()] == ["fae", "late_but_early", "recd", "des"]

        class Again(Technique):
            config_type, name = LateConfig, "another_name"

        with pytest.raises(ConfigError, match="'another_name' .*already registered"):
            register_technique(Again)  # never a silent overwrite: same config type
        with pytest.raises(ConfigError, match="already registered"):
            register_technique(type("Same", (Technique,), {"config_type": FAEConfig, "name": "x"}))
    finally:
        unregister_technique("late_but_early")
    assert [c.name for c in TECHNIQUES.values()] == ["fae", "recd", "des"]
    with pytest.raises(ConfigError, match="no technique is registered for LateConfig"):
        technique_for(LateConfig())
    assert technique_for(RecDConfig()).name == "recd"
