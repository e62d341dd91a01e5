"""The PNG report: honest axes, labelled curves, and where it goes (file and every logger that takes images).

The figure tests read the matplotlib objects back; the logger tests run real Trainers with real
loggers and read the files those loggers wrote (TensorBoard event files, W&B's offline run folder,
MLflow's file store).
"""

from __future__ import annotations

import io
import logging
import math
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

pytest.importorskip("matplotlib")
import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from lightning_adaround import AdaRoundCallback, AdaRoundConfig  # noqa: E402
from lightning_adaround.io.report import report_figure  # noqa: E402
from lightning_adaround.result import AdaRoundResult, LayerResult  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------- the figure, from a known result


def _layer(name: str, nearest: float, adaround: float, num_samples: int = 200, eval_samples: int = 50,
           iterations: int = 100) -> LayerResult:
    history = []
    for step in list(range(0, iterations, 10)) + [iterations - 1]:
        on = step >= 20
        beta = 2.0 + 9.0 * (1 + math.cos(math.pi * (step - 20) / 79)) if on else 20.0
        history.append((step, nearest * (0.5 + step / iterations), 100.0 - step if on else 0.0, beta))
    return LayerResult(
        name=name, bits=4, scale=torch.ones(1), zero_point=torch.zeros(1), qmin=-8, qmax=7, axis=0,
        integer_weight=torch.zeros(1, dtype=torch.int8), nearest_mse=nearest, adaround_mse=adaround,
        iterations=iterations, seconds=0.1, num_samples=num_samples, eval_samples=eval_samples, history=history,
    )


def _result(**kwargs) -> AdaRoundResult:
    # net.0: a 1.8x gain (ratio 0.556); net.2: a 10x gain; net.4: AdaRound worse (ratio 1.2)
    layers = [_layer("net.0", 1.8e-3, 1.0e-3, **kwargs), _layer("net.2", 1e-5, 1e-6, **kwargs),
              _layer("net.4", 1e-2, 1.2e-2, **kwargs)]
    return AdaRoundResult(layers={r.name: r for r in layers})


def _texts(fig) -> str:
    """Every string drawn on the figure: titles, labels, tick labels, legends, free text."""
    return "\n".join(t.get_text() for t in fig.findobj(matplotlib.text.Text))


def _axes_titled(fig, words: str):
    found = [ax for ax in fig.axes if words in ax.get_title()]
    assert len(found) == 1, [ax.get_title() for ax in fig.axes]
    return found[0]


def test_ratio_panel_is_linear_from_zero_with_a_reference_line_at_one():
    fig = report_figure(_result())
    try:
        ax = _axes_titled(fig, "Error ratio AdaRound / round-to-nearest")
        assert ax.get_xscale() == "linear" and ax.get_xlim()[0] == 0.0
        widths = [bar.get_width() for bar in ax.patches]
        assert widths == pytest.approx([1.0 / 1.8, 0.1, 1.2])  # a bar's length is the ratio itself
        assert any(list(line.get_xdata()) == [1.0, 1.0] for line in ax.get_lines()), "no 1.0 reference line"
        assert [t.get_text() for t in ax.get_yticklabels()] == ["net.0", "net.2", "net.4"]
        texts = {t.get_text() for t in ax.texts}
        assert {"0.56", "0.10", "1.20"} <= texts
        # AdaRound worse than nearest is drawn in another colour than better
        assert ax.patches[2].get_facecolor() != ax.patches[0].get_facecolor() == ax.patches[1].get_facecolor()
        # the absolute errors are points on a log axis (no bars whose length would mean nothing)
        mse = _axes_titled(fig, "Error per layer")
        assert mse.get_xscale() == "log" and not mse.patches
    finally:
        plt.close(fig)


def test_figure_says_the_errors_are_held_out():
    fig = report_figure(_result(num_samples=200, eval_samples=50))
    try:
        text = _texts(fig)
        assert "held-out MSE ratio" in text and "held-out reconstruction MSE" in text
        assert "50 held-out calibration samples" in text and "training samples" not in text
    finally:
        plt.close(fig)


def test_figure_says_the_errors_are_training_errors_when_nothing_was_held_out():
    fig = report_figure(_result(num_samples=40, eval_samples=40))
    try:
        text = _texts(fig)
        assert "held-out" not in text
        assert "training MSE ratio" in text and "training reconstruction MSE" in text
        assert "40 training samples (nothing was held out" in text
    finally:
        plt.close(fig)


def test_curves_are_labelled_as_the_relaxed_training_loss_with_the_regularizer_and_beta():
    fig = report_figure(_result())
    try:
        recon = _axes_titled(fig, "Training loss")
        assert "soft-rounded" in recon.get_title() and "calibration minibatches" in recon.get_title()
        assert "relaxed recon_loss" in recon.get_ylabel()
        assert [line.get_label() for line in recon.get_lines()] == ["net.0", "net.2", "net.4"]
        reg = _axes_titled(fig, "Rounding regularizer and beta")
        assert len(reg.get_lines()) == 3  # one regularizer line per layer, each scaled to its peak
        assert max(max(line.get_ydata()) for line in reg.get_lines()) == pytest.approx(1.0)
        twins = [ax for ax in fig.axes if ax is not reg and ax.bbox.bounds == reg.bbox.bounds]
        assert twins and twins[0].get_ylabel().startswith("beta")
        assert max(twins[0].get_lines()[0].get_ydata()) == pytest.approx(20.0)
        caption = _texts(fig)
        assert "reconstruction loss on calibration minibatches, not the error at left" in caption
        assert "the reconstruction term usually rises late in a layer" in caption
        assert "beta anneals from 20 to 2" in caption
    finally:
        plt.close(fig)


def _drawn_tick_labels(ax):
    """The tick labels matplotlib draws (major and minor): inside the view limits, on the side(s) shown."""
    labels = []
    for axis in (ax.xaxis, ax.yaxis):
        low, high = sorted(axis.get_view_interval())
        span = (high - low) * 1e-6
        for tick in axis.get_major_ticks() + axis.get_minor_ticks():
            if not low - span <= tick.get_loc() <= high + span:
                continue
            labels += [lab for lab in (tick.label1, tick.label2) if lab.get_visible() and lab.get_text()]
    return labels


# the errors of a real 3-bit run of the digits CNN: about one decade, where a log axis labels minor ticks
DIGITS = [(2.35e-2, 1.74e-2), (3.58e-2, 1.37e-2), (1.61e-1, 5.02e-2), (3.42e-2, 1.40e-2), (1.87e-1, 9.22e-2)]
WIDE = [(10.0 ** -(1 + i % 5), 0.6 * 10.0 ** -(1 + i % 5)) for i in range(40)]  # four decades


def test_curves_of_the_moments_form_say_all_training_samples():
    result = _result()
    for r in result.layers.values():
        r.loss_form = "moments"
    fig = report_figure(result)
    try:
        assert "all training samples (moments form)" in _axes_titled(fig, "Training loss").get_title()
        assert "minibatch" not in _texts(fig)
    finally:
        plt.close(fig)


@pytest.mark.parametrize("errors", [DIGITS, WIDE[:5], WIDE], ids=["5-narrow", "5-wide", "40-wide"])
def test_no_text_overlaps_for_5_and_40_layers(errors, tmp_path):
    """Titles, axis labels and tick labels stay apart and inside the figure, whether the errors span
    about a decade or several."""
    layers = len(errors)
    named = [_layer(f"features.{i // 3}.block.{i % 3}.conv", nearest, adaround)
             for i, (nearest, adaround) in enumerate(errors)]
    fig = report_figure(AdaRoundResult(layers={r.name: r for r in named}))
    try:
        fig.savefig(tmp_path / "r.png", dpi=100)  # lays the figure out
        renderer = fig.canvas.get_renderer()
        figure_box = fig.bbox
        boxes = []
        for ax in fig.axes:
            parts = [ax.title, ax.xaxis.label, ax.yaxis.label] + _drawn_tick_labels(ax)
            for part in parts:
                if part.get_text():
                    box = part.get_window_extent(renderer)
                    assert box.x0 >= figure_box.x0 - 1 and box.x1 <= figure_box.x1 + 1, part.get_text()
                    boxes.append((ax, part.get_text(), box))
        clashes = [(a, b) for i, (_, a, box1) in enumerate(boxes) for _, b, box2 in boxes[i + 1:]
                   if box1.overlaps(box2)]
        assert not clashes
        # one row per layer on the left, each name readable (the 40-layer figure grows taller)
        assert fig.get_figheight() >= 0.24 * layers
    finally:
        plt.close(fig)


# ---------------------------------------------------------------- real Trainers and loggers


def _module_and_data(pl):
    class Small(pl.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.cross_entropy(self(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    g = torch.Generator().manual_seed(0)
    x = torch.randn(128, 16, generator=g)
    data = DataLoader(TensorDataset(x, (x[:, 0] > 0).long()), batch_size=32)
    return Small(), data


def _fit(tmp_path, **trainer_kwargs):
    """A real fit with the callback (AdaRound at the fit's end); returns (callback, trainer)."""
    import lightning.pytorch as pl

    module, data = _module_and_data(pl)
    callback = AdaRoundCallback(config=AdaRoundConfig(bits=4, iterations=30, batch_size=16, log_every_n_steps=5),
                                num_calibration_samples=64, verbose=False)
    kwargs = dict(max_epochs=1, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                  accelerator="cpu", devices=1)
    kwargs.update(trainer_kwargs)
    trainer = pl.Trainer(callbacks=[callback], **kwargs)
    trainer.fit(module, data)
    assert callback.result is not None and len(callback.result.layers) == 2
    return callback, trainer


def _is_png(path: Path, min_width: int = 1000) -> None:
    from PIL import Image

    data = Path(path).read_bytes()
    assert data[:8] == PNG, path
    with Image.open(io.BytesIO(data)) as image:
        assert image.width >= min_width and image.height >= 500, image.size


def test_tensorboard_event_file_holds_the_report_image(tmp_path):
    import lightning.pytorch as pl
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = pl.loggers.TensorBoardLogger(tmp_path, name="tb")
    callback, _ = _fit(tmp_path, logger=logger, default_root_dir=tmp_path)
    assert callback.report_path == str(Path(logger.log_dir) / "adaround_report.png")
    _is_png(Path(callback.report_path))
    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0})
    events.Reload()
    (image,) = events.Images("adaround/report")
    with Image.open(io.BytesIO(image.encoded_image_string)) as decoded:
        assert decoded.size == (image.width, image.height) and image.width >= 1000  # the new 16-inch figure
    assert image.step == callback._log_step


def test_csv_logger_gets_the_png_in_its_version_folder(tmp_path):
    import lightning.pytorch as pl

    logger = pl.loggers.CSVLogger(tmp_path, name="csv")
    callback, _ = _fit(tmp_path, logger=logger, default_root_dir=tmp_path / "root")
    assert callback.report_path == str(Path(logger.log_dir) / "adaround_report.png")
    _is_png(Path(callback.report_path))
    assert not (tmp_path / "root" / "adaround_report.png").exists()


def test_no_logger_and_no_default_root_dir_writes_nothing_in_the_working_directory(tmp_path, monkeypatch, caplog):
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    with caplog.at_level(logging.INFO):
        callback, trainer = _fit(tmp_path, logger=False)
    assert trainer.default_root_dir == str(work)  # Lightning's default: the working directory
    assert callback.report_path is None
    assert list(work.rglob("*.png")) == []
    assert "report PNG not written" in caplog.text and "default_root_dir" in caplog.text


def test_no_logger_with_default_root_dir_writes_the_png_there(tmp_path, monkeypatch):
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    callback, _ = _fit(tmp_path, logger=False, default_root_dir=tmp_path / "runs")
    assert callback.report_path == str(tmp_path / "runs" / "adaround_report.png")
    _is_png(Path(callback.report_path))
    assert list(work.rglob("*.png")) == []


def test_wandb_offline_run_holds_the_report_image(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    import lightning.pytorch as pl

    for name in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb_home"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.chdir(tmp_path)
    logger = pl.loggers.WandbLogger(offline=True, save_dir=str(tmp_path / "wb"), project="adaround-test")
    try:
        callback, _ = _fit(tmp_path, logger=logger)
        run_id = logger.experiment.id
    finally:
        import wandb

        wandb.finish()
    # the image W&B stored for the run (uploaded by `wandb sync`)
    images = list((tmp_path / "wb" / "wandb").glob(f"offline-run-*-{run_id}/files/media/images/adaround/report_*.png"))
    assert len(images) == 1, sorted(str(p) for p in (tmp_path / "wb").rglob("*"))
    _is_png(images[0])
    # the file: in W&B's save_dir, which runs share, under the run's id
    assert callback.report_path == str(tmp_path / "wb" / f"adaround_report-{run_id}.png")
    _is_png(Path(callback.report_path))


def test_mlflow_file_store_run_holds_the_report_artifact(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    import lightning.pytorch as pl

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps the file store behind this opt-in

    store = tmp_path / "mlruns"
    logger = pl.loggers.MLFlowLogger(experiment_name="adaround", tracking_uri=f"file:{store}")
    callback, _ = _fit(tmp_path, logger=logger)
    run_id = logger.run_id
    artifacts = list(store.glob(f"*/{run_id}/artifacts/adaround_report.png"))
    assert len(artifacts) == 1, sorted(str(p) for p in store.rglob("*"))
    _is_png(artifacts[0])
    assert callback.report_path == str(store / f"adaround_report-{run_id}.png")
    _is_png(Path(callback.report_path))
    # the store still reads back: the experiment, its run and the artifact listing
    client = logger.experiment
    assert [a.path for a in client.list_artifacts(run_id)] == ["adaround_report.png"]
    assert client.get_experiment_by_name("adaround") is not None
    assert "adaround" in [e.name for e in client.search_experiments()]  # the PNG in the root broke nothing


def test_a_logger_that_refuses_the_image_costs_a_warning_not_the_result(tmp_path):
    """A real TensorBoard logger whose writer fails on images (a full disk, say): the run still ends."""
    import lightning.pytorch as pl

    class Failing(pl.loggers.TensorBoardLogger):
        @property
        def experiment(self):
            writer = super().experiment

            def add_figure(*args, **kwargs):
                raise OSError("no space left on device")

            writer.add_figure = add_figure
            return writer

    logger = Failing(tmp_path, name="tb")
    with pytest.warns(UserWarning, match="could not send the report to Failing"):
        callback, _ = _fit(tmp_path, logger=logger)
    _is_png(Path(callback.report_path))


def test_a_custom_logger_without_an_experiment_takes_no_image_and_costs_no_warning(tmp_path):
    """Lightning's ``Logger`` base class has no ``experiment``; a user's own logger gets its metrics, no warning."""
    import warnings

    import lightning.pytorch as pl

    class Recording(pl.loggers.Logger):
        name, version = "recording", 0

        def __init__(self) -> None:
            super().__init__()
            self.metrics: list[dict] = []

        def log_hyperparams(self, params, *args, **kwargs) -> None:
            pass

        def log_metrics(self, metrics, step=None) -> None:
            self.metrics.append(dict(metrics))

    logger = Recording()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        callback, _ = _fit(tmp_path, logger=logger, default_root_dir=tmp_path)
    assert not [w for w in caught if "could not send the report" in str(w.message)], [str(w.message) for w in caught]
    assert any(k.startswith("adaround/") for m in logger.metrics for k in m)
    _is_png(Path(callback.report_path))
