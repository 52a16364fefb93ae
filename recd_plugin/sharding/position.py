"""Where training stands in its data, in terms that do not depend on the world size.

A checkpoint records the data position *globally*: the epoch, how many samples of it all ranks
together have consumed, and the seed of the data order. Elastic launches restart a job at
another world size; re-splitting the global position over the new ranks (:func:`split_batches`)
continues with the first sample not trained on, at any world size: nothing repeated, nothing
skipped. What cannot be re-split (another data order, a batch size that does not divide the
consumed samples) is refused with a :class:`~recd_plugin.errors.CheckpointError` naming the fix.

The epoch's data is one global sequence of batches of ``batch_size`` samples (batch ``g``
holds samples ``[g * batch_size, (g + 1) * batch_size)`` of the epoch's order); rank ``r`` of
``world`` takes batches ``start + r``, ``start + r + world``, ...::

    position = ckpt.resume(model, optimizer) or Position(seed=args.seed)
    start = position.first_batch(batch_size, seed=args.seed)       # global batch index
    mine = split_batches(start, n_batches, rank, world)              # this rank's batches
    ...after k steps of this epoch...
    Position(step, epoch, samples=(start + k * world) * batch_size, seed=args.seed)
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Dict, Optional

from recd_plugin.errors import CheckpointError

_INT_FIELDS = ("step", "epoch", "samples", "seed")


@dataclass(frozen=True)
class Position:
    """The training position a checkpoint records; every rank passes the same one.

    ``step``: optimizer steps taken. ``epoch``: the epoch in progress. ``samples``: samples of
    that epoch consumed by all ranks together, in the epoch's global order (so the position is
    the same whatever the world size). ``seed``: the seed of the data order (a resumed job
    must read the data in the same order). ``extra``: anything else the loop needs back,
    JSON-serializable (checked when the position is made, before a checkpoint is written)."""

    step: int = 0
    epoch: int = 0
    samples: int = 0
    seed: int = 0
    extra: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        problem = _problem({f.name: getattr(self, f.name) for f in fields(self)})
        if problem:
            raise CheckpointError(f"checkpoint position: {problem}; pass Position(step=..., epoch=..., samples=..., "
                                  "seed=...) with integers >= 0 and 'extra' a dict of plain JSON values "
                                  "(e.g. int(tensor.item()), not the tensor)")

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, allow_nan=False)

    @classmethod
    def from_json(cls, text: bytes, where: str) -> "Position":
        """Parse a ``position.json`` (as written by :meth:`to_json`); anything else, binary
        data included, is a CheckpointError naming ``where``."""
        fix = ("it was edited or damaged: resume from another checkpoint (write its step-* name into the "
               "directory's 'latest'), or start from an empty checkpoint directory")
        try:
            data = json.loads(text.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            raise CheckpointError(f"{where} is not valid JSON ({e}); {fix}") from None
        names = {f.name for f in fields(cls)}
        if not isinstance(data, dict) or set(data) != names:
            got = sorted(data) if isinstance(data, dict) else type(data).__name__
            raise CheckpointError(f"{where} must be an object with the fields {sorted(names)}, got {got}; {fix}")
        problem = _problem(data)  # first, to report the file's problem with the file's fix
        if problem:
            raise CheckpointError(f"{where}: {problem}; {fix}")
        return cls(**data)

    def first_batch(self, batch_size: int, seed: int) -> int:
        """The global index of the first batch of ``batch_size`` samples of ``epoch`` not trained on
        yet, for a job whose data order has ``seed``. Refuses (CheckpointError) what cannot be
        re-split: another data order, or a batch size that does not divide ``samples``."""
        if seed != self.seed:
            raise CheckpointError(f"the checkpoint was saved with data order seed {self.seed}, this job uses {seed}: "
                                  f"resume with seed {self.seed} (another order would repeat and skip samples), "
                                  "or start from an empty checkpoint directory")
        if batch_size < 1 or self.samples % batch_size:
            raise CheckpointError(f"the checkpoint was saved after {self.samples} samples of epoch {self.epoch}, "
                                  f"which is not a whole number of batches of {batch_size}: resume with a batch size "
                                  f"that divides {self.samples} (e.g. the saved job's), so no sample is repeated "
                                  "or skipped")
        return self.samples // batch_size


def _problem(values: Dict[str, Any]) -> Optional[str]:
    """What is wrong with a position's field ``values``, or None."""
    for name in _INT_FIELDS:
        value = values[name]
        # bool is an int subclass; a position of True steps is a bug, not a position
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            return f"{name!r} must be an integer >= 0, got {value!r}"
    if not isinstance(values["extra"], dict):
        return f"'extra' must be a dict, got {type(values['extra']).__name__}"
    try:  # now, so a bad position stops before any checkpoint file is written
        json.dumps(values["extra"], allow_nan=False)
    except (TypeError, ValueError) as e:
        return f"'extra' is not JSON-serializable ({e})"
    return None


def split_batches(start: int, stop: int, rank: int, world: int) -> range:
    """The global batch indices rank ``rank`` of ``world`` trains on, from ``start`` to ``stop``
    (exclusive): ``start + rank``, ``start + rank + world``, ... Every rank gets the same count
    (sharded models run collectives in every step), so the last ``(stop - start) % world``
    batches are left out, as a drop-last loader would."""
    whole = max(stop - start, 0) // world * world
    return range(start + rank, start + whole, world)
