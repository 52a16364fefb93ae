"""Crash-safe commit of a finished dataset directory into place, and recovery after a kill.

A new dataset is written into a hidden temp directory next to ``out`` and moved into place
only when complete. Without an old ``out`` that is one atomic rename. Replacing an old ``out``
(``overwrite=True``) takes two renames (POSIX has no portable atomic swap of two
directories): ``out -> .out.old-*`` then ``.out.tmp-* -> out``. A process killed between them
would leave no dataset at ``out``, so the swap is journaled:

1. ``.out.commit`` (JSON: the temp and old names) is written and fsynced *before* the first
   rename, and removed only after the old copy is deleted;
2. :func:`recover` (called by :func:`recd_plugin.storage.read_manifest`, hence by every reader,
   and by :func:`recd_plugin.storage.preprocess`) replays an unfinished journal forward: the
   new copy is complete by construction (its manifest was written before the journal), so
   the swap is always finished, never undone. Every step is idempotent, so a recovery that is
   itself killed is finished by the next one.

A reader therefore always finds a complete dataset at ``out``: the old one until the commit,
the new one after it, never none and never a mix.

``.out.lock`` serializes writers and recovery (``fcntl.flock``: released by the kernel when its
holder dies, so a killed run never leaves a stale lock; the file is deleted on release). A
preprocess holds it for its whole run; under it, temp and old directories left by killed runs of
the same ``out`` cannot belong to a live writer and are deleted (:func:`clean_stale`).

Example::

    with writer_lock(out):              # StorageError if another preprocess writes `out`
        recover(out); clean_stale(out)
        tmp = temp_dir(out)             # ... write the dataset and its manifest into tmp ...
        commit(tmp, out)
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
import time
import uuid
from pathlib import Path
from typing import Dict, Iterator

from recd_plugin.errors import StorageError

_POLL_S = 0.05  # how often a reader re-checks a journal whose commit is still running


def _sibling(out: Path, suffix: str) -> Path:
    out = Path(os.path.abspath(out))  # "ds/", "." and "a/../ds" name their real parent and name
    return out.parent / f".{out.name}.{suffix}"


def journal_path(out: Path) -> Path:
    return _sibling(out, "commit")


def lock_path(out: Path) -> Path:
    return _sibling(out, "lock")


def temp_dir(out: Path) -> Path:
    """A fresh hidden temp directory name for a new copy of ``out`` (not created)."""
    return _sibling(out, f"tmp-{uuid.uuid4().hex[:8]}")


def _fsync_dir(directory: Path) -> None:
    # A rename is durable only once its directory entry is: without this a power loss after
    # "commit" could bring back the journal-less state with no dataset.
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _flock(out: Path) -> Iterator[bool]:
    """Try to hold ``.out.lock`` exclusively (never waits); yields whether it is held.

    The lock file is deleted on release, so no run leaves it behind. That is safe because a
    holder checks, after locking, that the path still names the file it locked: a run that
    opened the file just before the previous holder deleted it sees the mismatch and retries
    on a fresh file instead of believing it holds a lock nobody else can see.
    """
    path = lock_path(out)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
            yield False
            return
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        yield True
    finally:
        path.unlink(missing_ok=True)  # while still held: see the docstring
        os.close(fd)  # closing releases the lock


@contextlib.contextmanager
def writer_lock(out: Path) -> Iterator[None]:
    """Be the only writer of ``out`` for the block (StorageError if another run holds it)."""
    lock_path(out).parent.mkdir(parents=True, exist_ok=True)
    with _flock(out) as held:
        if not held:
            raise StorageError(f"{out}: another preprocess is writing this dataset right now (it holds "
                               f"{lock_path(out)}); wait for it to finish, or choose another out_dir")
        yield


def _read_journal(out: Path) -> Dict[str, str]:
    path = journal_path(out)
    try:
        j = json.loads(path.read_text())
        names = {k: str(j[k]) for k in ("new", "old")}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise StorageError(f"{path}: unreadable commit journal ({e!r}) of an interrupted preprocess; move the "
                           f"complete copy (the hidden .{out.name}.tmp-* or .old-* directory holding manifest.json) "
                           f"to {out}, delete {path}, or re-run preprocess after deleting it") from e
    for name in names.values():  # only names of our own siblings: a journal never moves anything else
        if not re.fullmatch(rf"\.{re.escape(out.name)}\.(tmp|old)-[0-9a-f]{{8}}", name):
            raise StorageError(f"{path}: commit journal names {name!r}, not a temp directory of {out.name}; "
                               f"delete {path} and re-run preprocess")
    return names


def _roll_forward(out: Path, names: Dict[str, str]) -> None:
    """Finish the journaled swap from whatever step it was stopped at (idempotent)."""
    out = Path(os.path.abspath(out))
    new, old = out.parent / names["new"], out.parent / names["old"]
    if new.is_dir():
        if out.exists():
            os.rename(out, old)
        os.rename(new, out)
    elif not out.exists() and old.is_dir():  # the new copy vanished (deleted by hand): keep the old one
        os.rename(old, out)
    _fsync_dir(out.parent)
    shutil.rmtree(old, ignore_errors=True)
    journal_path(out).unlink(missing_ok=True)
    _fsync_dir(out.parent)


def commit(tmp: Path, out: Path) -> None:
    """Move the complete dataset ``tmp`` (manifest written) to ``out``, replacing an old ``out``.

    Call under :func:`writer_lock`. Survives a kill at any point (see the module docstring).
    """
    out = Path(os.path.abspath(out))
    if not out.exists():
        os.rename(tmp, out)  # one atomic rename: nothing to journal
        _fsync_dir(out.parent)
        return
    names = {"new": tmp.name, "old": _sibling(out, f"old-{uuid.uuid4().hex[:8]}").name}
    staged = _sibling(out, "commit.tmp")
    with open(staged, "w") as f:
        json.dump(names, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(staged, journal_path(out))
    _fsync_dir(out.parent)
    _roll_forward(out, names)


def recover(out: Path) -> None:
    """Finish a commit into ``out`` that a killed process left half done (no-op without one).

    Cheap when there is nothing to do (one ``stat``). While a live writer is committing, waits
    for it (a commit is a few renames) instead of racing it.
    """
    out = Path(os.path.abspath(out))
    while journal_path(out).exists():
        try:
            with _flock(out) as held:
                if held:
                    if journal_path(out).exists():
                        _roll_forward(out, _read_journal(out))
                    return
        except OSError as e:
            raise StorageError(f"{out}: an interrupted preprocess left {journal_path(out)} and it cannot be "
                               f"finished here ({e}); open the dataset once with write access to "
                               f"{out.parent}, or re-run preprocess") from e
        time.sleep(_POLL_S)


def clean_stale(out: Path) -> None:
    """Delete temp / old copies of ``out`` left by killed runs. Call under :func:`writer_lock`
    after :func:`recover` (which needs the copy its journal names)."""
    out = Path(os.path.abspath(out))
    pattern = re.compile(rf"\.{re.escape(out.name)}\.(tmp-[0-9a-f]{{8}}|old-[0-9a-f]{{8}}|commit\.tmp)")
    if not out.parent.is_dir():
        return
    for p in out.parent.iterdir():
        if pattern.fullmatch(p.name):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
