"""A one-figure report of a rounding run: per-layer error (nearest vs AdaRound) and training curves.

What the figure shows, and what it does not:

- Left, the AdaRound / round-to-nearest error ratio per layer on a linear axis that starts at 0,
  with a reference line at 1.0: a bar at 0.55 is a 1.8x smaller error, and it looks like one.
- Middle, both errors per layer as points on a log axis (no bars: a bar on a log axis has no
  honest baseline), so magnitudes that differ by orders of magnitude across layers stay readable.
- These errors are the final, hard-rounded weights' reconstruction MSE on held-out calibration
  samples, or on the training samples when none were held out (``eval_samples == num_samples``);
  the figure says which.
- Right, what the optimizer saw: the relaxed (soft-rounded) reconstruction loss on calibration
  minibatches, and the rounding regularizer with its beta schedule. The regularizer pushes every
  weight to the grid late in each layer, which is why the reconstruction term usually rises there;
  the caption under the figure says so.

matplotlib is optional: without it :func:`report_figure` raises a clear ImportError and the
callback skips the report with a warning.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional, Union

from lightning_adaround.result import AdaRoundResult, LayerResult

_LEGEND_LIMIT = 10  # more layers than this: colour by layer order with a colour bar instead of a legend
_NEAREST, _ADAROUND = "#c0504d", "#4f81bd"

CAPTION = (
    "Left and middle: the final (hard-rounded) weights' reconstruction MSE of each layer's output, {where}. "
    "Right: what the optimizer saw, per logged step within each layer. \"recon_loss\" is the relaxed "
    "(soft-rounded) reconstruction loss {data}, not the error at left (nor on its scale). "
    "After the warm start the rounding regularizer is switched on and beta anneals from {beta_hi} to {beta_lo}: "
    "it pushes every weight to an end of its rounding interval (regularizer -> 0), so the reconstruction term "
    "usually rises late in a layer. That rise is the cost of rounding, already counted in the errors at left."
)


def _error_basis(layers: list[LayerResult]) -> tuple[str, str]:
    """(short label, caption phrase) for what the per-layer errors were measured on."""
    measured = [r for r in layers if r.num_samples > 0]
    if not measured:
        return "", "on the calibration samples"
    held = [r for r in measured if r.eval_samples != r.num_samples]
    counts = sorted({r.eval_samples for r in measured})
    if len(held) == len(measured):
        n = f"{counts[0]} " if len(counts) == 1 else ""
        return "held-out", f"on {n}held-out calibration samples that were not used to train the rounding"
    if not held:
        n = f"{counts[0]} " if len(counts) == 1 else ""
        return "training", (f"on the {n}training samples (nothing was held out: too few calibration samples "
                            "or holdout_fraction=0), so they flatter AdaRound")
    return "held-out*", ("on held-out calibration samples; layers marked * had nothing held out, "
                         "their errors are on the training samples")


def _training_data(layers: list[LayerResult]) -> tuple[str, str]:
    """(panel title phrase, caption phrase) for what ``recon_loss`` was computed on, by loss form."""
    forms = {r.loss_form for r in layers if r.history}
    if forms == {"moments"}:
        return "all training samples (moments form)", "on all training samples at once (the moments form)"
    if forms <= {"minibatch"}:
        return "calibration minibatches", "on calibration minibatches"
    return "minibatches or moments", "on calibration minibatches (or all training samples, moments form)"


def _units(layers: list[LayerResult]) -> list[tuple[str, LayerResult]]:
    """One curve per optimised unit: a block's layers share one history, plotted once under the block's name."""
    seen: set[str] = set()
    units = []
    for r in layers:
        if not r.history:
            continue
        if r.block:
            if r.block in seen:
                continue
            seen.add(r.block)
        units.append((r.block or r.name, r))
    return units


def _ratio(r: LayerResult) -> float:
    return r.adaround_mse / r.nearest_mse if r.nearest_mse > 0 else float("nan")


def report_figure(result: AdaRoundResult) -> Any:
    """A matplotlib Figure: per-layer error ratio and errors (left), training curves (right), and a caption."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
        from matplotlib.cm import ScalarMappable
        from matplotlib.colors import Normalize
        from matplotlib.lines import Line2D
        from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
    except ImportError as err:
        raise ImportError(
            "the AdaRound report needs matplotlib: pip install matplotlib (or the 'examples' extra)."
        ) from err

    layers = list(result.layers.values())
    n = len(layers)
    basis, where = _error_basis(layers)
    mixed = basis == "held-out*"
    row = 0.24  # inches per layer on the left panels
    height = max(7.0, row * n + 3.2)
    fig = plt.figure(figsize=(16, height), layout="constrained")
    caption_h = 1.0
    grid = fig.add_gridspec(3, 3, height_ratios=[1, 1, caption_h * 2 / max(height - caption_h, 1)],
                            width_ratios=[1.0, 1.0, 1.35])
    ratio_ax = fig.add_subplot(grid[0:2, 0])
    mse_ax = fig.add_subplot(grid[0:2, 1], sharey=ratio_ax)
    recon_ax = fig.add_subplot(grid[0, 2])
    reg_ax = fig.add_subplot(grid[1, 2], sharex=recon_ax)
    caption_ax = fig.add_subplot(grid[2, :])
    caption_ax.axis("off")

    # Left: the ratio, linear from 0, 1.0 marked.
    y = list(range(n))
    names = [r.name + ("*" if mixed and r.num_samples and r.eval_samples == r.num_samples else "") for r in layers]
    ratios = [_ratio(r) for r in layers]
    finite = [q for q in ratios if math.isfinite(q)]
    top = max([1.0, *finite]) * 1.18
    colours = [_ADAROUND if math.isfinite(q) and q <= 1.0 else _NEAREST for q in ratios]
    ratio_ax.barh(y, [q if math.isfinite(q) else 0.0 for q in ratios], height=0.7, color=colours)
    ratio_ax.axvline(1.0, color="black", linewidth=1.0, linestyle="--")
    fontsize = 8 if n <= 20 else 7
    for i, q in enumerate(ratios):
        text = f"{q:.2f}" if math.isfinite(q) else "n/a (nearest MSE 0)"
        ratio_ax.text((q if math.isfinite(q) else 0.0) + top * 0.01, i, text, va="center", fontsize=fontsize,
                      bbox=dict(facecolor="white", edgecolor="none", pad=0.5, alpha=0.8))
    ratio_ax.set_xlim(0, top)
    ratio_ax.set_yticks(y)
    ratio_ax.set_yticklabels(names, fontsize=fontsize)
    ratio_ax.set_ylim(n - 0.5, -0.5)  # first layer on top
    label = f"{basis} " if basis else ""
    ratio_ax.set_xlabel(f"{label}MSE ratio, AdaRound / nearest (linear)")
    ratio_ax.set_title("Error ratio AdaRound / round-to-nearest\n(< 1: AdaRound better; red: worse)")
    ratio_ax.grid(axis="x", alpha=0.3)

    # Middle: both errors as points on a log axis.
    for i, r in enumerate(layers):
        if r.nearest_mse > 0 and r.adaround_mse > 0:
            mse_ax.plot([r.nearest_mse, r.adaround_mse], [i, i], color="0.7", linewidth=1.0, zorder=1)
    mse_ax.scatter([max(r.nearest_mse, 1e-30) for r in layers], y, color=_NEAREST, marker="o", s=28,
                   label="round to nearest", zorder=2)
    mse_ax.scatter([max(r.adaround_mse, 1e-30) for r in layers], y, color=_ADAROUND, marker="D", s=24,
                   label="AdaRound", zorder=3)
    mse_ax.set_xscale("log")
    positive = [v for r in layers for v in (r.nearest_mse, r.adaround_mse) if v > 0]
    decades = math.log10(max(positive) / min(positive)) if positive else 0.0
    mse_ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0) if decades < 1.5 else (1.0,)))
    mse_ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.0e}"))
    mse_ax.xaxis.set_minor_formatter(NullFormatter())
    mse_ax.tick_params(axis="y", labelleft=False)
    mse_ax.set_xlabel(f"{label}reconstruction MSE (log scale)")
    mse_ax.set_title("Error per layer\n(log axis; read ratios at left)", pad=24)
    mse_ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2, fontsize=8, frameon=False,
                  borderaxespad=0.2, handletextpad=0.3)
    mse_ax.grid(axis="x", which="major", alpha=0.3)

    # Right: the relaxed training loss, the regularizer and beta.
    units = _units(layers)
    few = len(units) <= _LEGEND_LIMIT
    cmap = plt.get_cmap("tab10" if few else "viridis")
    order = {r.name: i for i, r in enumerate(layers)}
    for k, (unit, r) in enumerate(units):
        colour = cmap(k) if few else cmap(order[r.name] / max(n - 1, 1))
        steps = [h[0] for h in r.history]
        recon_ax.plot(steps, [max(h[1], 1e-30) for h in r.history], color=colour, linewidth=1.2,
                      label=unit if few else None)
        peak = max((h[2] for h in r.history), default=0.0)
        if peak > 0:
            reg_ax.plot(steps, [h[2] / peak for h in r.history], color=colour, linewidth=1.2)
    recon_ax.set_yscale("log")
    recon_ax.set_ylabel("relaxed recon_loss (log)")
    data_title, data_caption = _training_data(layers)
    recon_ax.set_title(f"Training loss: soft-rounded weights, {data_title}")
    recon_ax.grid(which="major", alpha=0.3)
    recon_ax.tick_params(axis="x", labelbottom=False)
    if units and few:
        recon_ax.legend(fontsize=7, ncol=2 if len(units) > 5 else 1, title="layer", title_fontsize=7)
    elif units:
        bar = fig.colorbar(ScalarMappable(Normalize(0, max(n - 1, 1)), cmap),
                           cax=recon_ax.inset_axes([1.015, 0.0, 0.025, 1.0]))
        bar.set_label("layer index (0 = top row at left)")
    if not units:
        recon_ax.text(0.5, 0.5, "no training curves (restored or loaded layers)", ha="center", va="center",
                      transform=recon_ax.transAxes)

    reg_ax.set_ylim(-0.03, 1.05)
    reg_ax.set_xlabel("step within the layer")
    reg_ax.set_ylabel("regularizer / its peak (0: all on the grid)")
    reg_ax.set_title("Rounding regularizer and beta schedule")
    reg_ax.grid(alpha=0.3)
    beta_lo, beta_hi = None, None
    if units:
        r = units[0][1]
        betas = [h[3] for h in r.history]
        beta_lo, beta_hi = min(betas), max(betas)
        beta_ax = reg_ax.twinx()
        beta_ax.plot([h[0] for h in r.history], betas, color="black", linestyle="--", linewidth=1.2)
        beta_ax.set_ylabel("beta (dashed)")
        warm = next((h[0] for h in r.history if h[2] > 0), None)
        if warm:
            reg_ax.axvspan(0, warm, color="0.85", alpha=0.6, zorder=0)
            reg_ax.text(warm / 2, 0.5, "warm start:\nregularizer off", ha="center", va="center", fontsize=7)
        reg_ax.legend(handles=[Line2D([], [], color="0.3", label="regularizer (one line per layer)"),
                               Line2D([], [], color="black", linestyle="--", label="beta")],
                      fontsize=7, loc="upper right")

    caption = CAPTION.format(
        where=where,
        data=data_caption,
        beta_hi=f"{beta_hi:g}" if beta_hi is not None else "beta_start",
        beta_lo=f"{beta_lo:g}" if beta_lo is not None else "beta_end",
    )
    caption_ax.text(0.0, 1.0, caption, ha="left", va="top", fontsize=9, wrap=True, transform=caption_ax.transAxes)

    bits = sorted({r.bits for r in layers})
    title = f"AdaRound report: {n} layers, W{'/'.join(map(str, bits))}"
    if finite:
        geo = math.exp(sum(math.log(q) for q in finite if q > 0) / max(len([q for q in finite if q > 0]), 1))
        title += f"; error ratio AdaRound/nearest: geometric mean {geo:.2f}"
    if basis:
        title += f" ({basis.rstrip('*')} errors)"
    fig.suptitle(title, fontsize=13)
    return fig


def save_report(result: AdaRoundResult, path: Union[str, Path]) -> Path:
    """Write the report figure as a PNG at ``path`` and return it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = report_figure(result)
    try:
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)
    return path


def report_file(trainer: Any) -> tuple[Optional[Path], str]:
    """Where the callback writes the PNG: ``(path or None, where it came from)``.

    The first logger's ``log_dir`` (TensorBoard, CSV: one folder per version), as
    ``adaround_report.png``; else the first logger's local ``save_dir`` (W&B, an MLflow file store),
    which runs share, as ``adaround_report-<run id>.png``; else the Trainer's ``default_root_dir``
    when it was given, as ``adaround_report.png``. Never the process's current working directory
    itself: Lightning fills ``default_root_dir`` with ``os.getcwd()`` when it was not given, and a
    logger may default to ``"."``; with nothing else, no file (``None``).
    """
    candidates: list[tuple[str, str, str]] = []
    for logger in getattr(trainer, "loggers", []) or []:
        for attribute in ("log_dir", "save_dir"):
            try:
                value = getattr(logger, attribute, None)
            except Exception:  # a logger whose property needs something it lacks
                value = None
            if isinstance(value, (str, Path)) and str(value) and "://" not in str(value):
                name = "adaround_report.png"
                if attribute == "save_dir":
                    try:
                        version = getattr(logger, "version", None)
                    except Exception:
                        version = None
                    if isinstance(version, (str, int)) and str(version):
                        name = f"adaround_report-{version}.png"
                candidates.append((str(value), name, f"{type(logger).__name__}.{attribute}"))
                break
    root = getattr(trainer, "_default_root_dir", None) or getattr(trainer, "default_root_dir", None)
    if root and "://" not in str(root):
        candidates.append((str(root), "adaround_report.png", "Trainer(default_root_dir=...)"))
    cwd = Path.cwd().resolve()
    for folder, name, source in candidates:
        if Path(folder).expanduser().resolve() == cwd:
            continue
        return Path(folder).expanduser() / name, source
    return None, "no logger folder and no Trainer(default_root_dir=...) other than the working directory"
