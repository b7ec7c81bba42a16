"""Plots are PNG files: matplotlib's Agg backend needs no screen."""
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)


def new_figure(width: float = 6.0, height: float = 4.0, ncols: int = 1):
    """A figure and its axes (one axis, or a list of `ncols`)."""
    return plt.subplots(1, ncols, figsize=(width, height))


def save_figure(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
