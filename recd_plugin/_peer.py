"""Import-time check of recd-plugin's *peer requirements*: torch, torchrec and fbgemm.

recd-plugin deliberately does **not** declare torch, torchrec, fbgemm-gpu(-cpu), torchmetrics,
tensordict or torchx as pip dependencies: those come in CPU and CUDA builds that must match
each other and the user's driver, and pip would happily "fix" a missing one by pulling a CUDA
torch (or the CUDA fbgemm-gpu on top of fbgemm-gpu-cpu). Installing the plugin must never
replace or add any of them. Instead they are peers, documented in docs/install.md and checked
here, when ``recd_plugin`` is imported, so that a missing or too-old peer fails at once with a
message that says what to install, rather than deep inside a training step.

The check reads installed-distribution metadata (``importlib.metadata``) and never imports
torch itself, so it costs a few milliseconds. Set ``RECD_PLUGIN_SKIP_PEER_CHECK=1`` to skip it
(e.g. torch built from source without package metadata, or a vendored TorchRec).
"""

from __future__ import annotations

import os
import re
import textwrap
import warnings
from importlib import metadata
from importlib.util import find_spec
from typing import Dict, List, Optional, Sequence, Tuple

from recd_plugin.errors import PeerRequirementError

__all__ = ["check_peer_requirements", "PeerRequirementError", "SKIP_ENV_VAR"]

#: Environment variable that disables the check when set to 1/true/yes/on.
SKIP_ENV_VAR = "RECD_PLUGIN_SKIP_PEER_CHECK"

# ---- supported ranges (minimum inclusive) ----
TORCH_MIN = "2.6"
TORCHREC_MIN = "1.2"
FBGEMM_MIN = "1.2"

#: Distribution names that provide each peer (first one is the canonical name).
TORCH_DISTRIBUTIONS: Tuple[str, ...] = ("torch",)
TORCHREC_DISTRIBUTIONS: Tuple[str, ...] = (
    "torchrec",
    "torchrec-nightly",
    "torchrec-nightly-cpu",
)
#: Any of these provides the ``fbgemm_gpu`` embedding kernels TorchRec needs. ``fbgemm-gpu-genai``
#: is deliberately absent: it ships only the generative-AI kernels (FP8 GEMM, comms), not the
#: table-batched embedding operators, so on its own it does not satisfy TorchRec.
FBGEMM_DISTRIBUTIONS: Tuple[str, ...] = (
    "fbgemm-gpu",
    "fbgemm-gpu-cpu",
    "fbgemm-gpu-rocm",
    "fbgemm-gpu-nightly",
    "fbgemm-gpu-nightly-cpu",
)
#: The CUDA and CPU builds both install the same ``fbgemm_gpu`` package folder; having both
#: means one overwrote the other's files (and uninstalling either breaks the survivor).
FBGEMM_CONFLICTING: Tuple[str, str] = ("fbgemm-gpu", "fbgemm-gpu-cpu")

# The two tested stacks; tests/test_peer.py checks them against requirements/.
#: The default pinned CPU stack: requirements/cpu.txt + requirements/torchrec.txt (`make test`).
CPU_STACK_PINS: Dict[str, str] = {
    "torch": "2.13.0+cpu",
    "fbgemm-gpu-cpu": "1.8.0",
    "tensordict": "0.15.3",
    "torchmetrics": "1.0.3",
    "torchrec": "1.8.0",
}
#: The current TorchRec release: requirements/latest.txt + requirements/torchrec-latest.txt
#: (`make test-latest`).
LATEST_STACK_PINS: Dict[str, str] = {
    "torch": "2.14.1",
    "fbgemm-gpu-cpu": "1.9.0",
    "tensordict": "0.15.3",
    "torchmetrics": "1.0.3",
    "torchrec": "1.9.2",
}


def _tested(name: str) -> str:
    return " and ".join(dict.fromkeys(p[name].split("+")[0] for p in (CPU_STACK_PINS, LATEST_STACK_PINS)))


TORCH_TESTED = _tested("torch")              # "2.13.0 and 2.14.1"
TORCHREC_TESTED = _tested("torchrec")        # "1.8.0 and 1.9.2"
FBGEMM_TESTED = _tested("fbgemm-gpu-cpu")    # "1.8.0 and 1.9.0"

CPU_INSTALL_HINT = "\n".join(
    [
        "CPU, the tested pinned stack (torchrec goes in with --no-deps: its metadata asks for",
        "the CUDA fbgemm-gpu):",
        f"    python -m pip install torch=={CPU_STACK_PINS['torch']} "
        "--extra-index-url https://download.pytorch.org/whl/cpu",
        f"    python -m pip install fbgemm-gpu-cpu=={CPU_STACK_PINS['fbgemm-gpu-cpu']} "
        f"tensordict=={CPU_STACK_PINS['tensordict']} "
        f"torchmetrics=={CPU_STACK_PINS['torchmetrics']} tqdm pyre-extensions iopath",
        f"    python -m pip install --no-deps torchrec=={CPU_STACK_PINS['torchrec']}",
        "    (from a recd-plugin checkout, `make venv` does all of this in .venv)",
    ]
)
GPU_INSTALL_HINT = "\n".join(
    [
        "GPU: install the torchrec and fbgemm-gpu builds that match your CUDA torch, as",
        "https://pytorch.org/torchrec describes, e.g.",
        "    python -m pip install torchrec fbgemm-gpu "
        "--index-url https://download.pytorch.org/whl/cu<XY>",
        "with cu<XY> the CUDA version of your torch (torch.version.cuda).",
    ]
)
SKIP_HINT = f"(Set {SKIP_ENV_VAR}=1 to skip this check at your own risk.)"


def _installed_version(distribution: str) -> Optional[str]:
    """Version string of an installed distribution, or None if it is not installed.

    The single point through which the check reads the environment (tests monkeypatch it).
    """
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def _module_present(module: str) -> bool:
    """True if ``module`` is importable, found without importing it (tests monkeypatch it)."""
    try:
        return find_spec(module) is not None
    except (ImportError, ValueError):
        return False


_RELEASE_RE = re.compile(r"^\s*v?(\d+(?:\.\d+)*)")


def _release(version: str) -> Tuple[int, ...]:
    """Numeric release part of a PEP 440 version: '2.13.0+cpu' -> (2, 13, 0).

    Pre-release/dev/local parts are ignored on purpose: a '2.6.0a0+git1234' source build or a
    nightly counts as the release it leads up to. Unparseable versions give ().
    """
    match = _RELEASE_RE.match(version)
    if not match:
        return ()
    return tuple(int(p) for p in match.group(1).split("."))


def _at_least(found: str, minimum: str) -> bool:
    """found >= minimum on the release parts ('2.6' == '2.6.0'); unparseable passes."""
    have, need = _release(found), _release(minimum)
    if not have:
        return True  # cannot judge: give it the benefit of the doubt
    width = max(len(have), len(need))
    return have + (0,) * (width - len(have)) >= need + (0,) * (width - len(need))


def _installed_dists(distributions: Sequence[str]) -> List[Tuple[str, str]]:
    out = []
    for dist in distributions:
        version = _installed_version(dist)
        if version is not None:
            out.append((dist, version))
    return out


def _message(package: str, found: Optional[str], needed: str, tested: str, extra: str = "") -> str:
    found_text = f"version {found} is installed" if found else "it is not installed"
    lines = [
        f"recd-plugin needs {package} {needed} (tested with {tested}), but {found_text}.",
    ]
    if extra:
        lines.append(extra)
    lines += [
        "recd-plugin never installs torch/torchrec/fbgemm itself (they are peer requirements, so",
        "that installing the plugin cannot change your GPU stack). Install them with:",
        textwrap.indent(CPU_INSTALL_HINT, "  "),
        textwrap.indent(GPU_INSTALL_HINT, "  "),
        SKIP_HINT,
    ]
    return "\n".join(lines)


def _fail(package: str, found: Optional[str], needed: str, tested: str, extra: str = "") -> None:
    err = PeerRequirementError(_message(package, found, needed, tested, extra))
    # Structured fields for callers that want to react programmatically.
    err.package = package  # type: ignore[attr-defined]
    err.found = found  # type: ignore[attr-defined]
    err.required = needed  # type: ignore[attr-defined]
    raise err


def _check_one(
    package: str,
    distributions: Sequence[str],
    module: str,
    minimum: str,
    tested: str,
    extra_if_missing: str = "",
) -> List[Tuple[str, str]]:
    installed = _installed_dists(distributions)
    needed = f">={minimum}"
    if not installed:
        if _module_present(module):
            # Importable but without pip metadata (source build, vendored copy): cannot judge.
            warnings.warn(
                f"recd-plugin: {module} is importable but no {'/'.join(distributions)} "
                f"distribution metadata was found, so its version cannot be checked "
                f"(recd-plugin needs {package} {needed}, tested with {tested}). {SKIP_HINT}",
                RuntimeWarning,
                stacklevel=3,
            )
            return []
        _fail(package, None, needed, tested, extra_if_missing)
    for dist, version in installed:
        if not _at_least(version, minimum):
            _fail(dist, version, needed, tested)
    return installed


def _skip_requested() -> bool:
    return os.environ.get(SKIP_ENV_VAR, "").strip().lower() in {"1", "true", "yes", "on"}


def check_peer_requirements() -> None:
    """Check that torch, torchrec and an fbgemm-gpu build are installed in supported versions.

    Raises:
        PeerRequirementError: a peer is missing or older than supported; the message names the
            package, the version found and needed, and the pip commands that fix it.

    Warns (RuntimeWarning) when both ``fbgemm-gpu`` and ``fbgemm-gpu-cpu`` are installed, when
    fbgemm-gpu and torchrec are from different releases, and when a peer is importable but has
    no package metadata. Does nothing when ``RECD_PLUGIN_SKIP_PEER_CHECK=1``.
    """
    if _skip_requested():
        return

    _check_one("torch", TORCH_DISTRIBUTIONS, "torch", TORCH_MIN, TORCH_TESTED)
    torchrec = _check_one(
        "torchrec", TORCHREC_DISTRIBUTIONS, "torchrec", TORCHREC_MIN, TORCHREC_TESTED
    )
    genai = _installed_version("fbgemm-gpu-genai")
    fbgemm = _check_one(
        "fbgemm-gpu (or fbgemm-gpu-cpu)",
        FBGEMM_DISTRIBUTIONS,
        "fbgemm_gpu",
        FBGEMM_MIN,
        FBGEMM_TESTED,
        extra_if_missing=(
            f"(fbgemm-gpu-genai {genai} is installed, but it only ships the generative-AI "
            "kernels, not the embedding operators TorchRec needs.)"
            if genai
            else ""
        ),
    )

    names = {dist: version for dist, version in fbgemm}
    cuda_dist, cpu_dist = FBGEMM_CONFLICTING
    if cuda_dist in names and cpu_dist in names:
        warnings.warn(
            f"recd-plugin: both {cuda_dist} {names[cuda_dist]} and {cpu_dist} {names[cpu_dist]} "
            "are installed. They install the same `fbgemm_gpu` package, so one has overwritten "
            f"the other. Keep exactly one: `python -m pip uninstall -y {cuda_dist} {cpu_dist}` "
            f"then reinstall {cpu_dist} (CPU-only torch) or {cuda_dist} (CUDA torch).",
            RuntimeWarning,
            stacklevel=2,
        )

    # torchrec and fbgemm-gpu are released in lockstep (torchrec 1.8 <-> fbgemm-gpu 1.8);
    # a mismatch usually loads but fails at the first embedding lookup with a missing operator.
    if torchrec and fbgemm:
        rec_dist, rec_version = torchrec[0]
        fb_dist, fb_version = fbgemm[0]
        rec_mm = (_release(rec_version) + (0, 0))[:2]
        fb_mm = (_release(fb_version) + (0, 0))[:2]
        stable = 0 < rec_mm[0] < 1000 and 0 < fb_mm[0] < 1000  # skip nightlies (2026.x.y)
        if stable and rec_mm != fb_mm:
            warnings.warn(
                f"recd-plugin: {rec_dist} {rec_version} is usually paired with fbgemm-gpu "
                f"{'.'.join(map(str, rec_mm))}.x, but {fb_dist} {fb_version} is installed; "
                "if embedding operators are missing at run time, install matching versions.",
                RuntimeWarning,
                stacklevel=2,
            )
