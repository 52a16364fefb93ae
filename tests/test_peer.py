"""Tests of the import-time peer-requirement check (recd_plugin/_peer.py).

Nothing is uninstalled: the version lookup is monkeypatched to describe fake environments.
"""

from __future__ import annotations

import pickle
import re
import warnings
from pathlib import Path
from typing import Dict, Optional

import pytest

from recd_plugin import _peer
from recd_plugin.errors import PeerRequirementError, RecDError

REPO = Path(__file__).resolve().parents[1]

GOOD = {"torch": "2.13.0+cpu", "torchrec": "1.8.0", "fbgemm-gpu-cpu": "1.8.0"}


def fake_env(
    monkeypatch: pytest.MonkeyPatch,
    versions: Dict[str, str],
    importable: Optional[set] = None,
) -> None:
    """Pretend exactly ``versions`` are installed (and ``importable`` modules exist)."""
    monkeypatch.delenv(_peer.SKIP_ENV_VAR, raising=False)
    monkeypatch.setattr(_peer, "_installed_version", lambda dist: versions.get(dist))
    monkeypatch.setattr(_peer, "_module_present", lambda mod: mod in (importable or set()))


def check_no_warnings() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _peer.check_peer_requirements()


def test_real_environment_passes() -> None:
    # The environment the tests run in has the pinned stack, so the real check passes.
    _peer.check_peer_requirements()


def test_good_stack_passes_silently(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_env(monkeypatch, GOOD)
    check_no_warnings()


def test_cuda_stack_passes(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_env(monkeypatch, {"torch": "2.9.0+cu128", "torchrec": "1.4.0", "fbgemm-gpu": "1.4.1"})
    check_no_warnings()


def test_nightly_stack_passes(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_env(
        monkeypatch,
        {
            "torch": "2.14.0.dev20260101+cu128",
            "torchrec-nightly": "2026.1.1",
            "fbgemm-gpu-nightly": "2026.1.1",
        },
    )
    check_no_warnings()


def test_missing_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_env(monkeypatch, {k: v for k, v in GOOD.items() if k != "torch"})
    with pytest.raises(PeerRequirementError) as info:
        _peer.check_peer_requirements()
    msg = str(info.value)
    assert "needs torch >=2.6" in msg
    assert "it is not installed" in msg
    assert info.value.package == "torch"
    assert info.value.found is None
    assert info.value.required == ">=2.6"


def test_old_torch_names_found_and_needed_versions(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_env(monkeypatch, {**GOOD, "torch": "2.5.1+cu121"})
    with pytest.raises(PeerRequirementError) as info:
        _peer.check_peer_requirements()
    msg = str(info.value)
    assert "torch >=2.6" in msg
    assert "version 2.5.1+cu121 is installed" in msg
    assert f"tested with {_peer.TORCH_TESTED}" in msg


def test_old_torchrec(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_env(monkeypatch, {**GOOD, "torchrec": "1.1.0"})
    with pytest.raises(PeerRequirementError, match=r"torchrec >=1\.2.*version 1\.1\.0"):
        _peer.check_peer_requirements()


def test_missing_torchrec(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_env(monkeypatch, {k: v for k, v in GOOD.items() if k != "torchrec"})
    with pytest.raises(PeerRequirementError, match="torchrec >=1.2.*not installed"):
        _peer.check_peer_requirements()


def test_missing_fbgemm(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_env(monkeypatch, {k: v for k, v in GOOD.items() if k != "fbgemm-gpu-cpu"})
    with pytest.raises(PeerRequirementError) as info:
        _peer.check_peer_requirements()
    assert "fbgemm-gpu (or fbgemm-gpu-cpu) >=1.2" in str(info.value)
    assert "not installed" in str(info.value)


def test_genai_alone_is_not_enough_and_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    env = {k: v for k, v in GOOD.items() if k != "fbgemm-gpu-cpu"}
    fake_env(monkeypatch, {**env, "fbgemm-gpu-genai": "1.8.0"})
    with pytest.raises(PeerRequirementError, match="fbgemm-gpu-genai 1.8.0 is installed"):
        _peer.check_peer_requirements()


def test_message_gives_cpu_command_and_gpu_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_env(monkeypatch, {})
    with pytest.raises(PeerRequirementError) as info:
        _peer.check_peer_requirements()
    msg = str(info.value)
    assert "python -m pip install torch==2.13.0+cpu" in msg
    assert "python -m pip install --no-deps torchrec==1.8.0" in msg
    assert "fbgemm-gpu-cpu==1.8.0" in msg
    assert "https://pytorch.org/torchrec" in msg
    assert "CUDA torch" in msg
    assert _peer.SKIP_ENV_VAR in msg


def test_error_types() -> None:
    assert issubclass(PeerRequirementError, ImportError)
    assert issubclass(PeerRequirementError, RecDError)


def test_error_survives_pickling(monkeypatch: pytest.MonkeyPatch) -> None:
    # Errors cross process boundaries (torch.multiprocessing, torchx workers).
    fake_env(monkeypatch, {})
    with pytest.raises(PeerRequirementError) as info:
        _peer.check_peer_requirements()
    clone = pickle.loads(pickle.dumps(info.value))
    assert str(clone) == str(info.value)
    assert clone.package == "torch"


def test_skip_env_var(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_env(monkeypatch, {})
    monkeypatch.setenv(_peer.SKIP_ENV_VAR, "1")
    _peer.check_peer_requirements()  # no error


def test_skip_env_var_zero_does_not_skip(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_env(monkeypatch, {})
    monkeypatch.setenv(_peer.SKIP_ENV_VAR, "0")
    with pytest.raises(PeerRequirementError):
        _peer.check_peer_requirements()


def test_both_fbgemm_builds_warn_not_raise(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_env(monkeypatch, {**GOOD, "fbgemm-gpu": "1.8.0"})
    with pytest.warns(RuntimeWarning, match="both fbgemm-gpu 1.8.0 and fbgemm-gpu-cpu 1.8.0"):
        _peer.check_peer_requirements()


def test_torchrec_fbgemm_release_mismatch_warns(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_env(monkeypatch, {**GOOD, "fbgemm-gpu-cpu": "1.9.0"})
    with pytest.warns(RuntimeWarning, match=r"usually paired with fbgemm-gpu 1\.8\.x"):
        _peer.check_peer_requirements()


def test_importable_without_metadata_warns(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_env(monkeypatch, {k: v for k, v in GOOD.items() if k != "torch"}, importable={"torch"})
    with pytest.warns(RuntimeWarning, match="no torch distribution metadata"):
        _peer.check_peer_requirements()


@pytest.mark.parametrize(
    "found, minimum, ok",
    [
        ("2.6", "2.6", True),
        ("2.6.0", "2.6", True),
        ("2.6.0a0+gitabc", "2.6", True),
        ("2.5.99", "2.6", False),
        ("2.13.0+cpu", "2.6", True),
        ("10.0", "2.6", True),
        ("1.10.0", "1.2", True),
        ("1.1.9", "1.2", False),
        ("weird", "1.2", True),
    ],
)
def test_version_comparison(found: str, minimum: str, ok: bool) -> None:
    assert _peer._at_least(found, minimum) is ok


def test_check_does_not_import_torch() -> None:
    # The check must stay cheap and must not initialise torch/CUDA as a side effect.
    import subprocess
    import sys

    # Register a bare `recd_plugin` package so that recd_plugin/__init__.py (which may import
    # torch for other reasons) does not run; only _peer.py and errors.py are loaded.
    code = (
        "import sys, types; pkg = types.ModuleType('recd_plugin'); "
        f"pkg.__path__ = [{str(REPO / 'recd_plugin')!r}]; sys.modules['recd_plugin'] = pkg; "
        "from recd_plugin import _peer; _peer.check_peer_requirements(); "
        "print(sorted(m for m in ('torch', 'torchrec', 'fbgemm_gpu') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO
    )
    assert out.stdout.strip() == "[]"


def _pins(path: Path) -> Dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        m = re.match(r"^\s*([A-Za-z0-9_.\-]+)\s*==\s*([^\s;#]+)", line)
        if m:
            pins[m.group(1).lower().replace("_", "-")] = m.group(2)
    return pins


@pytest.mark.parametrize("pins, files", [
    (_peer.CPU_STACK_PINS, ("cpu.txt", "torchrec.txt")),
    (_peer.LATEST_STACK_PINS, ("latest.txt", "torchrec-latest.txt")),
], ids=["default", "latest"])
def test_tested_stacks_match_requirements_files(pins: Dict[str, str], files: tuple) -> None:
    paths = [REPO / "requirements" / f for f in files]
    if not all(p.exists() for p in paths):
        pytest.skip("requirements/ not present (installed package, not a checkout)")
    pinned = {k: v for p in paths for k, v in _pins(p).items()}
    for name, version in pins.items():
        assert pinned.get(name) == version, (files, name, version, pinned.get(name))
    for tested, name in [(_peer.TORCH_TESTED, "torch"), (_peer.TORCHREC_TESTED, "torchrec"),
                         (_peer.FBGEMM_TESTED, "fbgemm-gpu-cpu")]:
        assert pinned[name].split("+")[0] in tested.split(" and "), (name, tested)


def test_install_doc_names_both_tested_stacks() -> None:
    doc = (REPO / "docs" / "install.md").read_text()
    for pins in (_peer.CPU_STACK_PINS, _peer.LATEST_STACK_PINS):
        for name in ("torch", "torchrec", "fbgemm-gpu-cpu"):
            assert f"{name} {pins[name].split('+')[0]}" in doc, (name, pins[name])


def test_running_stack_is_one_of_the_tested_ones() -> None:
    """The suite runs on one of the two tested stacks (make test / make test-latest)."""
    from importlib import metadata

    try:
        running = {n: metadata.version(n).split("+")[0] for n in ("torch", "torchrec", "fbgemm-gpu-cpu")}
    except metadata.PackageNotFoundError:
        pytest.skip("not the project's CPU stack (e.g. a CUDA fbgemm-gpu): nothing to compare")
    stacks = [{n: p[n].split("+")[0] for n in running} for p in (_peer.CPU_STACK_PINS, _peer.LATEST_STACK_PINS)]
    assert running in stacks, (running, stacks)


def test_pyproject_never_pulls_the_users_torch_stack() -> None:
    """Installing the plugin must not add or replace torch, fbgemm, torchrec or CUDA packages."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    from pathlib import Path

    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
    declared = list(project.get("dependencies", []))
    for extra in project.get("optional-dependencies", {}).values():
        declared += extra
    names = [re.split(r"[\s<>=!~;\[]", d, maxsplit=1)[0].lower() for d in declared]
    forbidden = ("torch", "torchrec", "fbgemm", "nvidia", "torchmetrics", "tensordict", "torchx", "triton")
    assert names and not [n for n in names if n.startswith(forbidden)], names


def test_fx_tracing_warning_silenced_only_where_the_plugin_triggers_it() -> None:
    """torch.fx's once-per-process is_fx_tracing notice: not printed for the plugin's own
    KJT building, still printed (once) for the user's."""
    script = (
        "import torch, recd_plugin\n"
        "from recd_plugin import DedupSpec, FeatureGroup, build_ikjt\n"
        "import sys\n"
        "from recd_plugin.data import generate_sessions, TableBatches\n"
        "b = TableBatches(generate_sessions(num_users=4, seed=0), 8)[0]\n"
        "build_ikjt(b.sparse_features, DedupSpec([FeatureGroup('u', ['user_id'], key='session_id')]))\n"
        "sys.stderr.write('PLUGIN-DONE\\n'); sys.stderr.flush()\n"
        "from torchrec.sparse.jagged_tensor import JaggedTensor\n"
        "JaggedTensor(values=torch.ones(2), lengths=torch.tensor([1, 1]))\n"
    )
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    plugin_part, marker, user_part = proc.stderr.partition("PLUGIN-DONE")
    assert marker, proc.stderr[-3000:]
    assert "is_fx_tracing will return true" not in plugin_part, plugin_part[-3000:]
    assert user_part.count("is_fx_tracing will return true") == 1, user_part[-3000:]
