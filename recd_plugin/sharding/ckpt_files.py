"""The files of a checkpoint directory: content checksums, the manifest, atomic publication.

Torch's distributed checkpoint (DCP) writes raw tensor bytes and trusts them when read: a
flipped bit loads different weights, a truncated shard may too. Here every file of a
checkpoint gets a streamed sha256 and its size in ``manifest.json``, written last, with a
checksum of its own; opening the checkpoint verifies them. A checkpoint is written into a
hidden temporary directory, fsynced, renamed into place, and only then named by ``latest``
(itself replaced atomically), so a process killed at any point leaves the previous checkpoint
the one a resume finds.

Layout::

    DIR/latest                    "step-00000012": the newest complete checkpoint
    DIR/step-00000012/            .metadata, __<rank>_<n>.distcp (DCP), position.json, manifest.json
    DIR/.step-00000016.tmp/       a save in progress (or killed); removed by the next save
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from recd_plugin.errors import CheckpointError

LATEST = "latest"
MANIFEST = "manifest.json"
POSITION = "position.json"
DCP_METADATA = ".metadata"  # DCP's FileSystemWriter names its metadata file so; every rank reads it
FORMAT = "recd-plugin checkpoint 1"
_NAME = re.compile(r"step-\d{8}")
_CHUNK = 1 << 20


def step_name(step: int) -> str:
    return f"step-{step:08d}"


def temp_dir(directory: Path, name: str) -> Path:
    return directory / f".{name}.tmp"


def file_digest(path: Path) -> Dict[str, Any]:
    """``{"bytes": size, "sha256": hex}`` of ``path``, streamed (shards can be larger than memory)."""
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
            size += len(chunk)
    return {"bytes": size, "sha256": digest.hexdigest()}


def fsync(path: Path) -> None:
    """Flush ``path`` (a file, or a directory's entries) to disk: a rename is durable only once
    the directory holding it is synced."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) * path.is_dir())
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(path: Path, data: bytes) -> None:
    """Write ``path`` in place and fsync it (inside a directory not published yet)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def replace_atomically(path: Path, data: bytes) -> None:
    """Replace ``path`` by ``data`` so that a reader sees the old or the new content, never a part."""
    tmp = path.with_name(path.name + ".tmp")
    write_durably(tmp, data)
    os.replace(tmp, path)
    fsync(path.parent)


# ---------------------------------------------------------------------------------- manifest


def _body_digest(body: Dict[str, Any]) -> str:
    # Canonical form: the manifest's own checksum covers every key and value, not its layout.
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def write_manifest(tmp: Path, step: int, world_size: int, optimizer: Dict[str, List[str]],
                   files: Dict[str, Dict[str, Any]], optimizer_config: Optional[Dict[str, Any]] = None) -> None:
    """Write ``manifest.json`` into the unpublished checkpoint ``tmp``: the checksum of every
    file in ``files``, what saved it (optimizer types and, ``optimizer_config``, their
    hyperparameters), and a checksum of the manifest itself."""
    body = {"format": FORMAT, "step": step, "world_size": world_size, "optimizer": optimizer,
            "files": dict(sorted(files.items()))}
    if optimizer_config is not None:  # absent in checkpoints of earlier versions: still readable
        body["optimizer_config"] = optimizer_config
    write_durably(tmp / MANIFEST, json.dumps({**body, "sha256": _body_digest(body)}, indent=1).encode())


def read_manifest(path: Path) -> Dict[str, Any]:
    """The checked manifest of the checkpoint directory ``path`` (without its own checksum)."""
    where = path / MANIFEST
    try:
        data = json.loads(where.read_bytes().decode("utf-8"))
        body = {k: v for k, v in data.items() if k != "sha256"}
        ok = data.get("sha256") == _body_digest(body) and body.get("format") == FORMAT
        files = body.get("files")
        ok = ok and isinstance(files, dict) and all(
            isinstance(v, dict) and isinstance(v.get("bytes"), int) and isinstance(v.get("sha256"), str)
            and _plain_name(k) for k, v in files.items())
        ok = ok and body.get("step") == int(path.name[len("step-"):])
        ok = ok and isinstance(body.get("optimizer_config", {}), dict)
    except FileNotFoundError:
        raise CheckpointError(f"{path} has no {MANIFEST}: it is incomplete, or was written by an older "
                              f"recd-plugin without checksums; {fix(path.parent, path.name)}") from None
    except (OSError, UnicodeDecodeError, ValueError, AttributeError, TypeError):
        ok = False
    if not ok:
        raise CheckpointError(f"{where} is damaged or was edited (not a manifest whose checksum matches its content); "
                              f"{fix(path.parent, path.name)}")
    return body


def _plain_name(name: str) -> bool:
    # A manifest names files inside its own directory only: an edited one must not make us
    # read (or report on) files elsewhere.
    return bool(name) and name not in (".", "..", MANIFEST) and "/" not in name and "\\" not in name


def check_files(path: Path, manifest: Dict[str, Any], names: Sequence[str], content: bool) -> List[str]:
    """Problems of the files ``names`` of checkpoint ``path`` against ``manifest``: missing,
    another size, and (``content``) another sha256."""
    problems = []
    for name in names:
        want = manifest["files"][name]
        try:
            size = (path / name).stat().st_size
            got = file_digest(path / name) if content and size == want["bytes"] else {"bytes": size}
        except OSError as e:
            problems.append(f"{name} cannot be read ({e.strerror or e})")
            continue
        if got["bytes"] != want["bytes"]:
            problems.append(f"{name} has {got['bytes']} bytes, {want['bytes']} were written (truncated or replaced)")
        elif content and got["sha256"] != want["sha256"]:
            problems.append(f"{name} does not match the sha256 recorded when it was written (flipped bits or edited)")
    return problems


# ------------------------------------------------------------------------------------ latest


def read_latest(directory: Path) -> Optional[str]:
    """The checkpoint name in ``directory/latest`` (checked: a step-* directory holding a
    manifest), or None when there is no ``latest`` (nothing saved yet)."""
    marker = directory / LATEST
    try:
        raw = marker.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise CheckpointError(f"cannot read {marker} ({e.strerror or e}); fix its permissions") from None
    try:
        name = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        name = None
    if name is None or not _NAME.fullmatch(name):
        raise CheckpointError(f"{marker} must hold the name of a checkpoint directory (step-NNNNNNNN), got "
                              f"{raw[:40]!r}; it was edited or damaged: {fix(directory, None)}")
    if not (directory / name / MANIFEST).is_file():
        raise CheckpointError(f"{marker} names {name}, which is missing or incomplete (no {MANIFEST}); "
                              f"{fix(directory, name)}")
    return name


def write_latest(directory: Path, name: str) -> None:
    replace_atomically(directory / LATEST, (name + "\n").encode())


def complete_checkpoints(directory: Path) -> List[str]:
    """Names of the step-* directories holding a manifest, oldest first."""
    if not directory.is_dir():
        return []
    return sorted(p.name for p in directory.iterdir() if _NAME.fullmatch(p.name) and (p / MANIFEST).is_file())


def fix(directory: Path, name: Optional[str]) -> str:
    """How to go on without checkpoint ``name`` of ``directory``: an older complete one, or an
    empty directory."""
    older = [n for n in complete_checkpoints(directory) if name is None or n < name]
    back = (f"to resume from the previous one, write {older[-1]!r} into {directory / LATEST}; " if older else "")
    return f"{back}to start over, delete {directory} (or point the job at an empty checkpoint directory)"


# ------------------------------------------------------------------------------------ saving


def prepare(directory: Path, name: str) -> Path:
    """Create the temporary directory of checkpoint ``name`` (rank 0 only), after removing what
    killed saves left behind: their hidden temporary directories."""
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob(".step-*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = temp_dir(directory, name)
    tmp.mkdir()
    return tmp


def publish(tmp: Path, directory: Path, name: str) -> Path:
    """Rename the finished ``tmp`` into ``directory/name`` (durably), then point ``latest`` at it.
    A directory already there is a complete checkpoint that ``latest`` never named (a save
    killed between these two steps): it is replaced."""
    fsync(tmp)  # its files are synced by their writers (DCP's sync_files, write_durably); now its entries
    final = directory / name
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)
    fsync(directory)
    write_latest(directory, name)
    return final
