"""What ``pip install recd-plugin`` gets: the wheel built from this tree, installed into an
empty folder and used from outside the checkout.

The wheel must carry every package of ``recd_plugin`` (pyproject.toml lists them), the
published benchmark results that ``recd-plugin analyze`` compares with, and the example
models the benchmarks train (``examples/`` as ``recd_plugin/bench/examples/``), and nothing
of the repository's tooling (``tools/``, ``tests/``, ``docs/``). Built with
``--no-build-isolation`` (no network: the venv's setuptools) from a copy of the tree with
build outputs and caches left out, so a stale ``build/`` folder cannot add files.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE_PACKAGES = {"recd_plugin.bench.examples.movielens", "recd_plugin.bench.examples.criteo"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", ".venv*", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", ".hypothesis", "out",
        "analyze_out"))
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp / "dist"), str(src)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (built,) = (tmp / "dist").glob("recd_plugin-*.whl")
    return built


def test_pyproject_lists_every_package():
    import tomllib

    from setuptools import find_packages

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = set(find_packages(str(ROOT), include=["recd_plugin*", "torchx_components*"]))
    assert listed - EXAMPLE_PACKAGES == found, "add the new package to [tool.setuptools] packages in pyproject.toml"


def test_the_wheel_carries_the_package_results_and_example_models(wheel: Path):
    names = set(zipfile.ZipFile(wheel).namelist())
    for want in ("recd_plugin/__init__.py", "recd_plugin/sharding/checkpoint.py", "recd_plugin/bench/results/models.json",
                 "recd_plugin/bench/examples/movielens/model.py", "recd_plugin/bench/examples/criteo/models.py",
                 "recd_plugin/bench/examples/criteo/recd.toml", "torchx_components/recd.py"):
        assert want in names, want
    for name in names:
        assert name.split("/")[0] in {"recd_plugin", "torchx_components"} or ".dist-info/" in name, name
    assert not any(n.endswith("apidoc.py") for n in names)  # a developer tool, in tools/


def test_benchmark_models_and_published_results_load_from_the_installed_wheel(wheel: Path, tmp_path: Path):
    target = tmp_path / "site"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    script = """
import recd_plugin, torch
from recd_plugin.analyze.measured import measured
from recd_plugin.bench import dedup, des_sides
assert recd_plugin.__file__.startswith(TARGET), recd_plugin.__file__
movielens, criteo = dedup._example(), des_sides.example_models()
for m in (movielens, criteo):
    assert m.__file__.startswith(TARGET), m.__file__
card = {f: 10 for f in ("user_id", "user_age", "user_gender", "user_occupation", "user_zip", "history",
                        "item_id", "item_genres", "item_year")}
model = movielens.TwoTower(card, light=True)
assert len(list(model.parameters())) > 0 and hasattr(criteo, "SessionDLRM")
assert measured("models")[0]["model"] == "dlrm"  # the published results, from the wheel
print("ok")
""".replace("TARGET", repr(str(target)))
    env = dict(os.environ, PYTHONPATH=str(target))
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout[-2000:] + proc.stderr[-3000:]
