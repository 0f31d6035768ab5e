"""PNG figures without pyplot (no global backend switch, safe in threads and
servers): :func:`figure` gives a matplotlib Figure on an Agg canvas,
:func:`save_png` writes it, turning an unwritable path into a one-line error.
Used by ``surgery diff --plot``, ``surgery units --plot`` and ``surgery tune``."""
from __future__ import annotations

from pathlib import Path

from .checkpoint.files import write_atomic
from .errors import SurgeryError


def figure(figsize: tuple[float, float]):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_png(fig, path: str | Path, dpi: int = 110) -> Path:
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi))
    except OSError as e:
        raise SurgeryError(f"cannot write plot {path}: {e.strerror or e}") from None
    return path
