"""Leave every random state as it was found: the plugin's own work must not move the user's RNG.

Why: anything drawn after ``apply`` (DistributedModelParallel materializing tables built on
``meta``, dropout, a ``RandomSampler`` without its own generator, a DataLoader's base seed) comes
from the global generators. If the plugin drew from them, or iterated the user's loader, the job
would train from other initial weights or another sample order than plugin-off.
:func:`random_state_kept` restores torch's CPU and CUDA generators, numpy's and Python's, and
the generators of the loader objects it is given (a ``DataLoader``'s ``generator``, its
sampler's and batch sampler's)::

    with random_state_kept(loader):
        for batch in itertools.islice(loader, 4): ...   # the loader's next epoch is unchanged
"""

from __future__ import annotations

import random
from contextlib import contextmanager
from typing import Any, Iterator, List, Tuple

import numpy as np
import torch


def _generators(objects: Tuple[Any, ...]) -> List[torch.Generator]:
    """The ``torch.Generator`` s reachable from ``objects`` through the attributes a DataLoader
    draws from: ``generator``, ``sampler``, ``batch_sampler`` (and ``loader`` of a wrapper)."""
    found: List[torch.Generator] = []
    stack, seen = list(objects), set()
    while stack:
        obj = stack.pop()
        if obj is None or id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Generator):
            found.append(obj)
            continue
        stack += [getattr(obj, attr, None) for attr in ("generator", "sampler", "batch_sampler", "loader")]
    return found


@contextmanager
def random_state_kept(*loaders: Any) -> Iterator[None]:
    """Restore, on exit (also on error), every global random state and the generators of ``loaders``."""
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    numpy_state, python_state = np.random.get_state(), random.getstate()
    generators = [(g, g.get_state()) for g in _generators(loaders)]
    try:
        yield
    finally:
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
        np.random.set_state(numpy_state)
        random.setstate(python_state)
        for g, state in generators:
            g.set_state(state)
