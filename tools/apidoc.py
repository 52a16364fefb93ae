"""Generate the API reference (docs/api/*.md) from the docstrings, with ``inspect`` only.

::

    make apidoc                                  # same as:
    python tools/apidoc.py docs/api

One page per public module (``MODULES``): the module docstring (the user manual of that
module), then every public class and function with its signature and docstring; classes list
their public methods and properties. Public means: in the module's ``__all__`` when it has
one, else every name not starting with ``_`` that the module itself defines. ``index.md``
links the pages. The pages are generated: edit the docstrings, not the pages.
"""

from __future__ import annotations

import importlib
import inspect
import re
import sys
from pathlib import Path
from typing import Any, List, Optional

MODULES = [
    "recd_plugin", "recd_plugin.config", "recd_plugin.technique", "recd_plugin.plugin", "recd_plugin.errors",
    "recd_plugin.sparse.ikjt", "recd_plugin.sparse.dedup_kjt", "recd_plugin.transforms.dedup",
    "recd_plugin.transforms.route", "recd_plugin.modules.swap",
    "recd_plugin.modules.recd", "recd_plugin.modules.dedup_ec", "recd_plugin.modules.dedup_ebc", "recd_plugin.modules.tower",
    "recd_plugin.modules.gather", "recd_plugin.modules.batchnorm",
    "recd_plugin.sparse.ids",
    "recd_plugin.data", "recd_plugin.data.criteo", "recd_plugin.data.builtin", "recd_plugin.storage",
    "recd_plugin.fae.profile", "recd_plugin.fae.hotset", "recd_plugin.fae.access", "recd_plugin.fae.trace",
    "recd_plugin.fae.coverage", "recd_plugin.fae.hints", "recd_plugin.fae.hotcold", "recd_plugin.fae.schedule",
    "recd_plugin.fae.technique", "recd_plugin.fae.config",
    "recd_plugin.des", "recd_plugin.des.technique", "recd_plugin.des.config", "recd_plugin.sharding", "recd_plugin.sharding.planner", "recd_plugin.sharding.checkpoint",
    "recd_plugin.sharding.position", "recd_plugin.bench.comm",
    "recd_plugin.analyze", "recd_plugin.analyze.command", "recd_plugin.analyze.sources", "recd_plugin.analyze.recd",
    "recd_plugin.analyze.fae", "recd_plugin.analyze.model", "recd_plugin.analyze.des",
    "recd_plugin.analyze.advice", "recd_plugin.analyze.route", "recd_plugin.analyze.check",
    "recd_plugin.analyze.measured",
]


def _public(module: Any) -> List[str]:
    names = getattr(module, "__all__", None)
    if names is not None:
        return list(names)
    return [n for n, obj in vars(module).items() if not n.startswith("_")
            and (inspect.isclass(obj) or inspect.isfunction(obj)) and getattr(obj, "__module__", None) == module.__name__]


def _signature(obj: Any) -> str:
    try:
        return str(inspect.signature(obj))
    except (TypeError, ValueError):
        return "(...)"


def _doc(obj: Any) -> str:
    return inspect.getdoc(obj) or "(no docstring)"


def _member(name: str, obj: Any) -> List[str]:
    if inspect.isclass(obj):
        bases = [b.__name__ for b in obj.__bases__ if b is not object]
        out = [f"### class `{name}`" + (f" ({', '.join(bases)})" if bases else ""), "",
               f"```python\n{name}{_signature(obj)}\n```", "", _doc(obj), ""]
        for m, attr in vars(obj).items():
            if m.startswith("_"):
                continue
            if isinstance(attr, property):
                out += [f"- **`{m}`** (property): {(inspect.getdoc(attr) or '').splitlines()[0] if attr.__doc__ else ''}"]
            elif inspect.isfunction(attr) or isinstance(attr, (classmethod, staticmethod)):
                fn = attr.__func__ if isinstance(attr, (classmethod, staticmethod)) else attr
                first = (inspect.getdoc(fn) or "").split("\n\n")[0].replace("\n", " ")
                out += [f"- **`{m}{_signature(fn)}`**" + (f": {first}" if first else "")]
        return out + [""]
    if callable(obj):
        return [f"### `{name}{_signature(obj)}`", "", _doc(obj), ""]
    # functions inside values print as their names: a repr's memory address would change the
    # generated page on every run
    text = re.sub(r"<function (\S+) at 0x[0-9a-f]+>", r"\1", repr(obj))
    return [f"### `{name}`", "", f"`{text}`"[:300], ""]


def page(module_name: str) -> Optional[str]:
    """The markdown page of one module (None when it does not import)."""
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # a module that does not import gets no page, and the run says so
        print(f"apidoc: skipped {module_name}: {type(e).__name__}: {e}", file=sys.stderr)
        return None
    lines = [f"# `{module_name}`", "", "_Generated from the docstrings by `make apidoc`; do not edit._", "",
             inspect.getdoc(module) or "", "", "## API", ""]
    for name in _public(module):
        obj = getattr(module, name, None)
        if obj is not None:
            lines += _member(name, obj)
    return "\n".join(lines).rstrip() + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    out = Path(argv[0] if argv else "docs/api")
    out.mkdir(parents=True, exist_ok=True)
    index = ["# API reference", "", "Generated from the docstrings by `make apidoc` "
             "(`python tools/apidoc.py docs/api`). One page per public module.", ""]
    for name in MODULES:
        text = page(name)
        if text is None:
            continue
        (out / f"{name}.md").write_text(text)
        first = (inspect.getdoc(importlib.import_module(name)) or "").split("\n")[0]
        index.append(f"- [`{name}`]({name}.md): {first}")
    (out / "index.md").write_text("\n".join(index) + "\n")
    for stale in sorted(set(out.glob("recd_plugin*.md")) - {out / f"{name}.md" for name in MODULES}):
        stale.unlink()  # a module that moved or left MODULES: its old page would mislead
        print(f"removed {stale} (module no longer documented)")
    print(f"wrote {len(index) - 4} pages and {out / 'index.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
