"""One way to turn a matplotlib figure into PNG bytes, shared by the analysis report and the study."""

from __future__ import annotations

import io
from pathlib import Path


def fig_png(fig, path=None, bbox_tight: bool = True) -> bytes:
    """PNG bytes of `fig` at 72 dpi (small enough to embed in an HTML report); also written to `path` when
    given. The figure is closed (reports draw dozens; pyplot would keep them all alive)."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=72, **({"bbox_inches": "tight"} if bbox_tight else {}))
    plt.close(fig)
    if path:
        Path(path).write_bytes(buf.getvalue())
    return buf.getvalue()
