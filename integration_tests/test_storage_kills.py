"""``preprocess(overwrite=True)`` killed at every step, and its recovery killed at every step.

A child process replaces a dataset (old -> new) and calls ``os._exit`` at its k-th filesystem
mutation (mkdir, fsync, rename, replace, unlink, rmdir: every step of writing, of the
journaled commit and of deleting the old copy), for every k until the run completes. After
each kill the next open must read exactly the old or exactly the new dataset (never none,
never a mix), and the next preprocess must succeed and leave no temp directory behind. Where
the kill left no dataset at the path (between the commit's two renames), the recovery that an
open runs is itself killed at each of its steps, and the open after that must still find a
complete dataset.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Iterator, List, Tuple

import pytest
from two_ranks import HANG_GUARD_S, ROOT

from recd_plugin.data import generate_sessions, storage_roles
from recd_plugin.storage import DedupReader, StorageError, StorageSpec, preprocess

KILLED = 77  # a job's exit status when the injected kill fired
SPEC = StorageSpec(**storage_roles())

#: A job server: imports the plugin once (seconds), then runs each job read from stdin
#: ("OUT KILL_AT preprocess|open") in a forked process, so that each of the many kill points
#: costs a fork instead of an interpreter start. A job counts its filesystem mutations and calls
#: os._exit at the KILL_AT-th: no cleanup, no finally, what a SIGKILL leaves.
SERVER = r"""
import os, signal, sys
from pathlib import Path
from recd_plugin.data import generate_sessions, storage_roles
from recd_plugin.storage import StorageSpec, preprocess, read_manifest

def job(out, kill_at, what):
    signal.alarm(HANG_GUARD_S)  # a hung job dies instead of hanging the test
    calls = [0]
    def counted(f):
        def step(*args, **kwargs):
            calls[0] += 1
            if calls[0] == kill_at:
                os._exit(KILLED)
            return f(*args, **kwargs)
        return step
    table = generate_sessions(num_users=30, num_items=40, seed=2)
    for name in ("mkdir", "fsync", "rename", "replace", "unlink", "rmdir"):
        setattr(os, name, counted(getattr(os, name)))
    if what == "preprocess":
        preprocess(table, out, StorageSpec(**storage_roles()), overwrite=True, progress=False)
    else:
        read_manifest(out)
    sys.stdout.write(f"STEPS {calls[0]}\n")
    sys.stdout.flush()
    os._exit(0)

for line in sys.stdin:
    out, kill_at, what = line.split()
    pid = os.fork()
    if pid == 0:
        job(Path(out), int(kill_at), what)
    _, status = os.waitpid(pid, 0)
    sys.stdout.write(f"EXIT {os.waitstatus_to_exitcode(status)}\n")
    sys.stdout.flush()
""".replace("KILLED", str(KILLED)).replace("HANG_GUARD_S", str(int(HANG_GUARD_S)))


class Jobs:
    """The job server's client: ``run`` returns (exit status, steps counted if it completed)."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", SERVER], cwd=ROOT, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)

    def run(self, out: Path, kill_at: int, what: str) -> Tuple[int, int]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(f"{out} {kill_at} {what}\n")
        self.proc.stdin.flush()
        steps = -1
        for line in self.proc.stdout:
            key, value = line.split()
            if key == "STEPS":
                steps = int(value)
            elif key == "EXIT":
                assert int(value) in (0, KILLED), f"job {what} (kill at {kill_at}) failed with status {value}"
                return int(value), steps
        raise AssertionError(f"the job server died (status {self.proc.wait()})")

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=HANG_GUARD_S)


@pytest.fixture
def jobs() -> Iterator[Jobs]:
    j = Jobs()
    yield j
    j.close()


def signature(path: Path) -> List[bytes]:
    return [b.sparse_features.values().numpy().tobytes() + b.labels.numpy().tobytes()
            for b in DedupReader(path, 64)]


def hidden(parent: Path) -> List[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_overwrite_killed_at_every_step_leaves_old_or_new(tmp_path: Path, jobs: Jobs) -> None:
    old_ds, new_ds = tmp_path / "old", tmp_path / "new"
    preprocess(generate_sessions(num_users=25, num_items=40, seed=1), old_ds, SPEC, progress=False)
    new_table = generate_sessions(num_users=30, num_items=40, seed=2)  # the jobs' table
    preprocess(new_table, new_ds, SPEC, progress=False)
    old, new = signature(old_ds), signature(new_ds)
    assert old != new

    root = tmp_path / "root"
    out = root / "ds"
    mid_swap = []  # kill points that left no dataset at `out`
    kill_at = 0
    while True:
        kill_at += 1
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir()
        shutil.copytree(old_ds, out)
        status, steps = jobs.run(out, kill_at, "preprocess")
        if status == 0:  # the run got past its last step: every step has been killed once
            assert signature(out) == new and hidden(root) == [] and steps == kill_at - 1
            break
        if not out.exists():
            mid_swap.append(kill_at)
            shutil.copytree(root, tmp_path / f"state-{kill_at}", symlinks=True)
        got = signature(out)  # the next open: recovers, then reads
        assert got in (old, new), f"killed at step {kill_at}: the dataset at the path is neither old nor new"
        preprocess(new_table, out, SPEC, overwrite=True, progress=False)
        assert signature(out) == new and hidden(root) == [], f"killed at step {kill_at}: {hidden(root)}"
    assert kill_at > 10 and mid_swap, "the kill points must include the commit's two renames"

    for k in mid_swap[:1]:  # the recovery itself, killed at each of its steps
        recover_at = 0
        while True:
            recover_at += 1
            shutil.rmtree(root)
            shutil.copytree(tmp_path / f"state-{k}", root, symlinks=True)
            status, _ = jobs.run(out, recover_at, "open")
            assert signature(out) == new, f"recovery killed at step {recover_at}"
            # a recovery killed while holding the writers' lock may leave its (empty, unlocked)
            # file; the next preprocess removes it
            assert hidden(root) in ([], [".ds.lock"])
            if status == 0:
                break


def test_fresh_preprocess_killed_leaves_nothing_a_reader_accepts(tmp_path: Path, jobs: Jobs) -> None:
    out = tmp_path / "ds"
    status, _ = jobs.run(out, 6, "preprocess")  # while writing data files
    assert status == KILLED and not out.exists() and hidden(tmp_path)  # a stale temp dir
    with pytest.raises(StorageError, match="no such dataset directory.*preprocess"):
        DedupReader(out, 64)
    preprocess(generate_sessions(num_users=30, num_items=40, seed=2), out, SPEC, progress=False)
    assert hidden(tmp_path) == []
