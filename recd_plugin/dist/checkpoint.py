"""Sharded checkpoints every N steps with torch.distributed.checkpoint (DCP), and resume.

A job that torchrun / TorchX restarts (``--max-restarts``, ``torchx run ... --max_retries``)
calls :meth:`Checkpointer.resume` at start: the last *complete* checkpoint is loaded into the
(already sharded) model and optimizer, and the data position saved with it is returned, so
the loop continues with the next unseen batch: nothing skipped, nothing repeated.

Each checkpoint is a DCP directory ``step-00000012/`` (every rank writes its own shards) plus
``position.json``; ``latest`` names the newest complete one and is replaced atomically by
rank 0 only after every rank has finished writing, so a job killed mid-save resumes from the
previous checkpoint, never from a partial one.

Example (every rank)::

    ckpt = Checkpointer("/ckpt/run1", every=100)
    position = ckpt.resume(model, optimizer) or {"epoch": 0, "batch": 0}
    for step, batch in ...:
        ...train...
        ckpt.maybe_save(step + 1, model, optimizer, {"epoch": e, "batch": i + 1})
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, Optional, Union

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn

from recd_plugin.errors import RecDError

LATEST = "latest"


class CheckpointError(RecDError, RuntimeError):
    """A checkpoint that cannot be written or read back."""


class Checkpointer:
    """Save every ``every`` steps into ``directory``; resume from its newest complete checkpoint."""

    def __init__(self, directory: Union[str, "os.PathLike[str]"], every: int) -> None:
        if every < 1:
            raise CheckpointError(f"checkpoint interval must be >= 1 step, got {every}")
        self.directory = Path(directory)
        self.every = every

    @staticmethod
    def _state(model: nn.Module, optimizer: Any) -> Dict[str, Any]:
        return {"model": model.state_dict(), "optim": optimizer.state_dict()}

    def maybe_save(self, step: int, model: nn.Module, optimizer: Any, position: Dict[str, Any]) -> bool:
        """Save if ``step`` (steps done so far) is a multiple of ``every``; True if saved."""
        if step % self.every:
            return False
        self.save(step, model, optimizer, position)
        return True

    def save(self, step: int, model: nn.Module, optimizer: Any, position: Dict[str, Any]) -> Path:
        path = self.directory / f"step-{step:08d}"
        dcp.save(self._state(model, optimizer), checkpoint_id=str(path))
        rank0 = not dist.is_initialized() or dist.get_rank() == 0
        if rank0:
            (path / "position.json").write_text(json.dumps({"step": step, **position}))
        if dist.is_initialized():
            dist.barrier()  # every rank has written its shards
        if rank0:
            tmp = self.directory / (LATEST + ".tmp")
            tmp.write_text(path.name)
            os.replace(tmp, self.directory / LATEST)
        if dist.is_initialized():
            dist.barrier()
        return path

    def latest(self) -> Optional[Path]:
        marker = self.directory / LATEST
        if not marker.is_file():
            return None
        path = self.directory / marker.read_text().strip()
        if not (path / "position.json").is_file():
            raise CheckpointError(f"{marker} names {path.name}, which is incomplete (no position.json); "
                                  f"delete {marker} to start over, or point it at an older step-* directory")
        return path

    def resume(self, model: nn.Module, optimizer: Any) -> Optional[Dict[str, Any]]:
        """Load the newest complete checkpoint into ``model`` and ``optimizer`` (in place);
        returns its position dict (``step`` and what was saved), or None when there is none."""
        path = self.latest()
        if path is None:
            return None
        init_state = getattr(optimizer, "init_state", None)
        if callable(init_state):
            init_state()  # lazily created optimizer state (Adam moments) must exist to be loaded into
        state = self._state(model, optimizer)
        try:
            dcp.load(state, checkpoint_id=str(path))
        except Exception as e:  # DCP raises several types for missing/mismatched entries
            raise CheckpointError(f"cannot load checkpoint {path}: {e}; it was written by a different model or "
                                  "sharding plan, or is damaged: start from an empty checkpoint directory") from e
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optim"])
        return json.loads((path / "position.json").read_text())
