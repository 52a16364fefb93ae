"""Keep torch.fx's ``is_fx_tracing`` warning out of the plugin's output, and only there.

Why: torch 2.13+ logs "is_fx_tracing will return true for both fx.symbolic_trace and
torch.export ..." once per process, the first time anything builds a TorchRec data type
(``KeyedJaggedTensor`` and ``JaggedTensor`` have an fx metaclass that asks
``is_fx_tracing()``). The plugin builds them in every process it touches (DataLoader workers,
ranks, the CLI), so the warning, which is addressed to code that calls ``is_fx_tracing``
itself, was printed again and again with no action for the user.

``install`` wraps torch's once-per-process warning function: a call made while a
``recd_plugin`` frame is on the stack returns without logging and without using up torch's
"once", so a call from the user's own code still gets torch's warning. A torch without that
function is left alone.
"""

from __future__ import annotations

import sys


def _from_plugin() -> bool:
    frame = sys._getframe(2)
    while frame is not None:
        name = frame.f_globals.get("__name__", "")
        if name == "recd_plugin" or name.startswith("recd_plugin."):
            return True
        frame = frame.f_back  # type: ignore[assignment]
    return False


def install() -> None:
    """Idempotent."""
    import torch.fx._symbolic_trace as trace

    original = getattr(trace, "is_fx_tracing_warning", None)
    if original is None or getattr(original, "_recd_plugin", False):
        return

    def is_fx_tracing_warning() -> None:
        if not _from_plugin():
            original()

    is_fx_tracing_warning._recd_plugin = True  # type: ignore[attr-defined]
    trace.is_fx_tracing_warning = is_fx_tracing_warning
