"""Shared benchmark plumbing: timing, allocator settings, and the docs/benchmarks.md writer.

Every benchmark regenerates only its own section of docs/benchmarks.md, between
``<!-- bench:NAME:start -->`` and ``<!-- bench:NAME:end -->``; the rest of the file is kept.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch

#: glibc returning freed memory to the OS (trimming the heap, unmapping large blocks) can double
#: the step time of the side with large activations, so an A/B comparison would measure the
#: allocator; both sides run in one process with these settings.
MALLOC_ENV = {"MALLOC_TRIM_THRESHOLD_": str(1 << 30), "MALLOC_MMAP_THRESHOLD_": str(1 << 30)}

DOCS = Path(__file__).resolve().parents[2] / "docs" / "benchmarks.md"


def ensure_allocator_env(argv: List[str]) -> None:
    """Re-exec this process once with MALLOC_ENV set (glibc reads it only at start-up)."""
    if all(os.environ.get(k) == v for k, v in MALLOC_ENV.items()):
        return
    env = dict(os.environ, **MALLOC_ENV)
    os.execve(sys.executable, [sys.executable, "-m", "recd_plugin.bench", *argv], env)


def timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def median(xs: List[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"


def write_section(name: str, markdown: str, path: Optional[Path] = None) -> Path:
    """Replace the ``name`` section of docs/benchmarks.md (append it if absent)."""
    path = path or DOCS
    start, end = f"<!-- bench:{name}:start -->", f"<!-- bench:{name}:end -->"
    text = path.read_text() if path.exists() else (
        "# Benchmarks\n\nEvery number below is written by the benchmark command named in its "
        "section, never by hand. Re-run the command to regenerate the section.\n"
    )
    block = f"{start}\n{markdown.strip()}\n{end}"
    if start in text and end in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def write_json(path: Optional[str], result: Dict[str, Any]) -> None:
    if path:
        Path(path).write_text(json.dumps(result, indent=2) + "\n")


#: Machine-readable results: ``recd_plugin/bench/results/<name>.json``, written with the docs
#: section and shipped in the wheel (``recd-plugin analyze`` compares its predictions with them).
BENCH_JSON_DIR = Path(__file__).resolve().parent / "results"


def free_port() -> int:
    """A free TCP port on localhost, for the spawned ranks' rendezvous."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def publish(name: str, markdown: str, result: Dict[str, Any], json_path: Optional[str], write_docs: bool) -> None:
    """Print a benchmark's table, write its JSON, and regenerate its docs/benchmarks.md section
    (and, with it, ``recd_plugin/bench/results/<name>.json``, the same result as ``--json`` writes)."""
    print(markdown)
    write_json(json_path, result)
    if write_docs and not (DOCS.parents[1] / "pyproject.toml").exists():
        # An installed wheel has no docs/ of its own: never write into site-packages.
        print(f"docs not rewritten: {DOCS.parent} is not in a source checkout of recd-plugin")
        write_docs = False
    if write_docs:
        write_section(name, markdown)
        BENCH_JSON_DIR.mkdir(parents=True, exist_ok=True)
        # default=str: a stray non-JSON value (a numpy scalar) must not lose the section just written
        (BENCH_JSON_DIR / f"{name}.json").write_text(json.dumps(result, indent=2, default=str) + "\n")


def load_example(relative: str, module_name: str) -> Any:
    """Import an example model file (``examples/...``) as a module: the source checkout's, or
    the copy an installed wheel carries in ``recd_plugin/bench/examples/`` (pyproject.toml maps
    the folder there), so the benchmarks run from a plain ``pip install`` too. Loaded by path,
    not imported by package name: an editable install does not map that package."""
    import importlib.util

    inside = relative.split("/", 1)[1]  # "movielens/model.py"
    # The wheel's copy first: a wheel's "checkout" path would be site-packages/examples/, anyone's.
    candidates = [Path(__file__).resolve().parent / "examples" / inside, DOCS.parents[1] / relative]
    path = next((c for c in candidates if c.exists()), None)
    if path is None:
        raise FileNotFoundError(f"example model {relative} not found at {[str(c) for c in candidates]}: "
                                "reinstall recd-plugin (pip install --force-reinstall recd-plugin) or run from "
                                "a source checkout")
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module
