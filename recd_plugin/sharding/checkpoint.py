"""Sharded checkpoints every N steps with torch.distributed.checkpoint (DCP), and resume.

A job that torchrun / TorchX restarts (``--max-restarts``, ``torchx run ... --max_retries``),
at the same or another world size, calls :meth:`Checkpointer.resume` at start: the last
*complete* checkpoint is loaded into the (already sharded) model and optimizer, and the
:class:`~recd_plugin.sharding.position.Position` saved with it is returned: the global data
position, which :func:`~recd_plugin.sharding.position.split_batches` re-splits over the new ranks,
so the loop continues with the first unseen sample: nothing skipped, nothing repeated.

What it guarantees (docs/distributed.md, "Checkpoint and resume"):

- *Complete state.* Model and optimizer state, for plain ``torch.optim`` optimizers (their
  lazily created moments too) and TorchRec's keyed and fused ones, unsharded and under DMP;
  a resumed run continues exactly as an uninterrupted one.
- *Atomic saves.* Files go into a hidden temporary directory, are fsynced and renamed into
  place, and ``latest`` is replaced last (:mod:`.ckpt_files`): a process killed at any point
  leaves the previous checkpoint the one a resume finds.
- *Verified reads.* A sha256 of every file is recorded when written and checked when read
  (``verify=False`` skips the content hashes for speed; sizes are still checked).
- *All or nothing.* Keys, shapes, the optimizer type and its configuration (all
  hyperparameters but the learning rate) are checked against the checkpoint,
  and it is read into a staged copy first (:mod:`.ckpt_state`): a failed resume leaves the
  model and optimizer untouched. Every failure, DCP's ``CheckpointException`` (a
  ``BaseException``) included, is a :class:`CheckpointError` naming the fix, raised on every
  rank alike.

Example (every rank)::

    ckpt = Checkpointer("/ckpt/run1", every=100)
    position = ckpt.resume(model, optimizer) or Position(seed=seed)
    start = position.first_batch(batch_size, seed)     # global batch to continue from
    for ...:
        ...train step...
        ckpt.maybe_save(step, model, optimizer, Position(epoch=e, samples=done * batch_size, seed=seed))
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from pathlib import Path
from typing import Any, Callable, List, Optional, Tuple, TypeVar, Union

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException

from recd_plugin.sharding import ckpt_files as files
from recd_plugin.sharding import ckpt_state as states
from recd_plugin.sharding.position import Position, split_batches
from recd_plugin.errors import CheckpointError

__all__ = ["Checkpointer", "CheckpointError", "Position", "split_batches"]

T = TypeVar("T")
LATEST = files.LATEST


class Checkpointer:
    """Save every ``every`` steps into ``directory``; resume from its newest complete checkpoint.

    ``verify``: check every file's sha256 when resuming (default). ``False`` reads each shard
    once instead of twice, for speed; sizes and the manifest are still checked, a flipped bit
    inside a shard then goes unnoticed."""

    def __init__(self, directory: Union[str, "os.PathLike[str]"], every: int, verify: bool = True) -> None:
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise CheckpointError(f"checkpoint interval must be an integer >= 1 step, got {every!r}")
        self.directory = Path(directory)
        self.every = every
        self.verify = bool(verify)

    def maybe_save(self, step: int, model: nn.Module, optimizer: Optional[torch.optim.Optimizer],
                   position: Position) -> bool:
        """Save if ``step`` (steps done so far) is a multiple of ``every``; True if saved."""
        if step % self.every:
            return False
        self.save(step, model, optimizer, position)
        return True

    def save(self, step: int, model: nn.Module, optimizer: Optional[torch.optim.Optimizer],
             position: Position) -> Path:
        """Write checkpoint ``step-{step:08d}`` (every rank, collectively) and make it the latest.
        ``position`` (its ``step`` set to ``step``) must be the same on every rank; it is
        checked before anything is written. ``optimizer=None`` saves the weights only."""
        rank, world = _rank_world()
        name = files.step_name(step) if isinstance(step, int) and not isinstance(step, bool) and step >= 0 else ""
        # Everything that can be refused is checked on every rank before any file is written.
        text, state = _together(lambda: self._checked_save(step, name, model, optimizer, position))
        if len(set(_gather(text))) > 1:
            raise CheckpointError("ranks passed different checkpoint positions; pass the global one (the same on "
                                  "every rank: samples consumed by all ranks together)")
        tmp = files.temp_dir(self.directory, name)
        _together(lambda: self._begin(name, text) if rank == 0 else None)
        _dcp("save to", tmp, lambda: dcp.save(state, storage_writer=FileSystemWriter(tmp), no_dist=world == 1))
        listing = _gather(_together(lambda: sorted(p.name for p in tmp.iterdir()) if rank == 0 else None))[0]
        # Each rank hashes a share of the files, so each byte is read once.
        digests = _gather(_together(lambda: {n: files.file_digest(tmp / n) for n in listing[rank::world]}))
        _together(lambda: self._commit(tmp, step, world, model, optimizer, digests) if rank == 0 else None)
        return self.directory / name

    def _checked_save(self, step: int, name: str, model: nn.Module, optimizer: Optional[torch.optim.Optimizer],
                      position: Position) -> Tuple[str, dict]:
        if not name:
            raise CheckpointError(f"checkpoint step must be an integer >= 0, got {step!r}")
        if not isinstance(position, Position):
            raise CheckpointError(f"checkpoint position must be a recd_plugin.sharding.Position, got "
                                  f"{type(position).__name__}; build one: Position(epoch=..., samples=..., seed=...)")
        try:
            latest = files.read_latest(self.directory)
        except CheckpointError:
            latest = None  # a damaged latest: this save replaces it
        if latest == name:
            raise CheckpointError(f"step {step} is already the latest checkpoint in {self.directory}; save each "
                                  "step once (a resumed job counts on from the step it resumed)")
        return dataclasses.replace(position, step=step).to_json(), states.state_to_save(
            model, states.optimizers(model, optimizer))

    def _begin(self, name: str, position: str) -> None:
        """Rank 0: a fresh temporary directory holding the position, before the shards."""
        files.write_durably(files.prepare(self.directory, name) / files.POSITION, position.encode())

    def _commit(self, tmp: Path, step: int, world: int, model: nn.Module,
                optimizer: Optional[torch.optim.Optimizer], digests: List[dict]) -> None:
        parts = states.optimizers(model, optimizer)
        files.write_manifest(tmp, step, world, states.signature(parts), {k: v for d in digests for k, v in d.items()},
                             states.configuration(parts))
        files.publish(tmp, self.directory, files.step_name(step))

    def latest(self) -> Optional[Path]:
        """The newest complete checkpoint (checked: ``latest`` names a directory holding a
        manifest), or None when nothing was saved yet."""
        name = files.read_latest(self.directory)
        return None if name is None else self.directory / name

    def resume(self, model: nn.Module, optimizer: Optional[torch.optim.Optimizer]) -> Optional[Position]:
        """Load the newest complete checkpoint into ``model`` and ``optimizer`` (in place, every
        rank); returns its Position, or None when there is none. ``optimizer=None`` loads the
        weights only. On any failure nothing is changed and every rank raises CheckpointError."""
        rank, world = _rank_world()
        path = _gather(_together(self.latest))[0]  # rank 0's reading, so every rank loads the same one
        if path is None:
            return None
        manifest = _together(lambda: self._checked_manifest(path, rank, world))
        parts = states.optimizers(model, optimizer)
        position, staged = _together(lambda: self._staged(path, manifest, model, parts))
        _dcp("load", path, lambda: dcp.load(staged, storage_reader=FileSystemReader(path), no_dist=world == 1))
        _together(lambda: states.check_groups(model, parts, staged))
        _together(lambda: states.apply(model, parts, staged))
        return position

    def _checked_manifest(self, path: Path, rank: int, world: int) -> dict:
        manifest = files.read_manifest(path)
        names = sorted(manifest["files"])
        # Every rank reads the small files itself (DCP's metadata, the position); the shards
        # are split between the ranks, so each byte is hashed once.
        everyone = [n for n in names if n in (files.POSITION, files.DCP_METADATA)]
        shards = [n for n in names if n not in everyone]
        problems = files.check_files(path, manifest, everyone + shards[rank::world], content=self.verify)
        if problems:
            raise CheckpointError(f"checkpoint {path} is damaged: {'; '.join(problems)}; "
                                  f"{files.fix(path.parent, path.name)}")
        return manifest

    def _staged(self, path: Path, manifest: dict, model: nn.Module, parts: states.Parts) -> Tuple[Position, dict]:
        if files.POSITION not in manifest["files"]:
            raise CheckpointError(f"{path} has no {files.POSITION}; {files.fix(path.parent, path.name)}")
        position = Position.from_json((path / files.POSITION).read_bytes(), str(path / files.POSITION))
        metadata = _dcp("read the metadata of", path, lambda: FileSystemReader(path).read_metadata())
        unlisted = sorted({info.relative_path for info in (metadata.storage_data or {}).values()}
                          - set(manifest["files"]))
        if unlisted:  # DCP would read them unverified
            raise CheckpointError(f"{path}: {unlisted} are not in its manifest; {files.fix(path.parent, path.name)}")
        try:
            return position, states.stage(model, parts, metadata, manifest["optimizer"],
                                          manifest.get("optimizer_config"))
        except CheckpointError as e:
            raise CheckpointError(f"cannot resume from {path}: {e}") from None


def _rank_world() -> Tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def _together(fn: Callable[[], T]) -> T:
    """Run ``fn`` on every rank; if it failed on any, raise that CheckpointError on every rank
    alike (a rank that raised alone would leave the others waiting in the next collective)."""
    try:
        result, error = fn(), None
    except CheckpointError as e:
        result, error = None, str(e)
    except OSError as e:  # the file system refused: a plugin error that names the path
        result, error = None, (f"{e.filename or ''}: {e.strerror or e}; check that the checkpoint directory is "
                               "readable, writable and has free space (the previous checkpoint is untouched)")
    except Exception as e:  # anything else must still reach the other ranks, or they would hang
        result, error = None, f"{type(e).__name__}: {e}"
    errors = [(r, err) for r, err in enumerate(_gather(error)) if err]
    if errors:
        r, err = errors[0]
        raise CheckpointError(err if len(errors) == 1 and r == _rank_world()[0] else f"rank {r}: {err}")
    return result  # type: ignore[return-value]


def _gather(obj: T) -> List[T]:
    """Every rank's (small, picklable) ``obj``, in rank order."""
    rank, world = _rank_world()
    if world == 1:
        return [obj]
    out: List[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out


def _dcp(what: str, path: Path, call: Callable[[], T]) -> T:
    """A DCP call whose failures, on any rank, become a CheckpointError naming the fix: DCP
    raises CheckpointException, a BaseException that ``except Exception`` does not catch."""
    try:
        with warnings.catch_warnings():
            # no_dist (one process): DCP warns that it assumes one process, which is the intent
            warnings.filterwarnings("ignore", message="torch.distributed is .*uninitialized")
            return call()
    except CheckpointException as e:
        failures = getattr(e, "failures", {}) or {}
        inner = {r: f[0] for r, f in failures.items()}  # rank -> (exception, its stack summary)
        for exc in inner.values():
            if not isinstance(exc, Exception):
                raise exc from None  # a KeyboardInterrupt / SystemExit stays one
        detail = "; ".join(f"rank {r}: {type(exc).__name__}: {exc}" for r, exc in sorted(inner.items())) or str(e)
        raise _dcp_error(what, path, detail) from None
    except Exception as e:
        raise _dcp_error(what, path, f"{type(e).__name__}: {e}") from e


def _dcp_error(what: str, path: Path, detail: str) -> CheckpointError:
    if what == "save to":
        fix = "check that the directory is writable and has free space; the previous checkpoint is untouched"
    else:
        fix = ("the checkpoint is damaged or was written by another model or sharding; "
               + files.fix(path.parent, path.name))
    return CheckpointError(f"could not {what} checkpoint {path}: {detail[:2000]}; {fix}")
