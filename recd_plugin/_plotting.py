"""Figures for the plugin's tooling (the analyze report, the FAE coverage plot), drawn without
touching process-wide state.

::

    from recd_plugin._plotting import figure
    fig, ax = figure(figsize=(6, 3.6))
    ax.plot([1, 2], [3, 4])
    fig.savefig("out.png", dpi=100)

Why not ``matplotlib.pyplot``: pyplot keeps global figures and needs a backend chosen for the
whole process (``matplotlib.use("Agg")``), which would change the user's own plotting in the
training process. A ``matplotlib.figure.Figure`` built directly renders PNGs with the Agg
canvas and is freed like any object. matplotlib is an optional extra
(``pip install 'recd-plugin[analyze]'``); without it, ``figure`` raises
``OptionalDependencyError`` naming that command.
"""

from __future__ import annotations

from typing import Any, Tuple

from recd_plugin.errors import OptionalDependencyError


def require_matplotlib(what: str = "plots") -> None:
    """Raise ``OptionalDependencyError`` naming the install command when matplotlib is missing
    (commands call it first, before reading any data)."""
    import importlib

    try:
        importlib.import_module("matplotlib.figure")
    except ImportError as e:
        raise OptionalDependencyError(
            f"{what} need matplotlib, which recd-plugin installs only with its analyze extra: "
            "pip install 'recd-plugin[analyze]' (or pip install matplotlib)") from e


def figure(nrows: int = 1, ncols: int = 1, **kwargs: Any) -> Tuple[Any, Any]:
    """(Figure, axes) as ``pyplot.subplots`` returns them, without pyplot."""
    require_matplotlib()
    from matplotlib.figure import Figure

    fig = Figure(**kwargs)
    return fig, fig.subplots(nrows, ncols)
