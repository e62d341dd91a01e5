"""A one-figure report of a rounding run: per-layer error (nearest vs AdaRound) and loss curves.

matplotlib is optional: without it :func:`report_figure` raises a clear ImportError and the
callback skips the report with a warning.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Union

from lightning_adaround.result import AdaRoundResult

_LEGEND_LIMIT = 12


def report_figure(result: AdaRoundResult) -> Any:
    """A matplotlib Figure: left, reconstruction MSE per layer; right, each layer's loss curve."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise ImportError(
            "the AdaRound report needs matplotlib: pip install matplotlib (or the 'examples' extra)."
        ) from err

    layers = list(result.layers.values())
    fig, (errors, curves) = plt.subplots(1, 2, figsize=(13, 5), constrained_layout=True)
    positions = range(len(layers))
    width = 0.4
    errors.bar([p - width / 2 for p in positions], [r.nearest_mse for r in layers], width,
               label="round to nearest", color="#c0504d")
    errors.bar([p + width / 2 for p in positions], [r.adaround_mse for r in layers], width,
               label="AdaRound", color="#4f81bd")
    errors.set_yscale("log")
    errors.set_xticks(list(positions))
    errors.set_xticklabels([r.name for r in layers], rotation=60 if len(layers) > 6 else 0,
                           ha="right" if len(layers) > 6 else "center", fontsize=8)
    errors.set_ylabel("held-out reconstruction MSE (log)")
    errors.set_title("Per-layer reconstruction error")
    errors.legend()
    errors.grid(axis="y", which="both", alpha=0.3)

    few = len(layers) <= 10
    cmap = plt.get_cmap("tab10" if few else "viridis")
    for i, r in enumerate(layers):
        if not r.history:
            continue
        steps = [h[0] for h in r.history]
        recon = [max(h[1], 1e-30) for h in r.history]
        label = r.name if len(layers) <= _LEGEND_LIMIT else None
        colour = cmap(i) if few else cmap(0.85 * i / max(len(layers) - 1, 1))
        curves.plot(steps, recon, color=colour, label=label, linewidth=1.2)
    curves.set_yscale("log")
    curves.set_xlabel("step")
    curves.set_ylabel("reconstruction loss (log)")
    title = "Reconstruction loss per layer"
    if len(layers) > _LEGEND_LIMIT:
        title += " (colour: layer order, early = dark)"
    elif any(r.history for r in layers):
        curves.legend(fontsize=8, ncol=2)
    curves.set_title(title)
    curves.grid(which="both", alpha=0.3)
    bits = sorted({r.bits for r in layers})
    fig.suptitle(f"AdaRound: {len(layers)} layers, W{'/'.join(map(str, bits))}")
    return fig


def save_report(result: AdaRoundResult, path: Union[str, Path]) -> Path:
    """Write the report figure as a PNG at ``path`` and return it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = report_figure(result)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
