"""AdaRoundCallback with real Trainers, real loggers and both Lightning namespaces."""

from __future__ import annotations

import csv
import dataclasses
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_adaround import AdaRoundConfig

FAST = dict(iterations=40, batch_size=16)  # AdaRoundConfig fields
CONFIG_FIELDS = {f.name for f in dataclasses.fields(AdaRoundConfig)}


def make_classes(pl):
    """A BoringModel-style module and datamodule for namespace ``pl``."""

    class Boring(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = nn.functional.cross_entropy(self(x), y)
            self.log("train_loss", loss)
            return loss

        def validation_step(self, batch, batch_idx):
            x, y = batch
            self.log("val_loss", nn.functional.cross_entropy(self(x), y))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    class BoringData(pl.LightningDataModule):
        def __init__(self, calibration_size: int = 0):
            super().__init__()
            g = torch.Generator().manual_seed(0)
            x = torch.randn(256, 16, generator=g)
            self.data = TensorDataset(x, (x[:, 0] > 0).long() + 2 * (x[:, 1] > 0).long())
            self.calibration_size = calibration_size

        def train_dataloader(self):
            return DataLoader(self.data, batch_size=32, shuffle=True)

        def val_dataloader(self):
            return DataLoader(self.data, batch_size=64)

    class BoringDataWithCalibration(BoringData):
        def calibration_dataloader(self):
            return DataLoader(TensorDataset(self.data.tensors[0][:40]), batch_size=8)

    return Boring, BoringData, BoringDataWithCalibration


def make_callback(cls, num_calibration_samples=128, **kwargs):
    """``cls`` with the FAST settings: the AdaRoundConfig fields among ``kwargs`` go into its ``config=``."""
    config = AdaRoundConfig(**{**FAST, **{k: v for k, v in kwargs.items() if k in CONFIG_FIELDS}})
    rest = {k: v for k, v in kwargs.items() if k not in CONFIG_FIELDS}
    return cls(config=config, num_calibration_samples=num_calibration_samples, **rest)


def trainer_kwargs(tmp_path, **kwargs):
    base = dict(
        default_root_dir=tmp_path, max_epochs=1, enable_progress_bar=False,
        enable_model_summary=False, accelerator="cpu", devices=1,
    )
    base.update(kwargs)
    return base


def assert_on_grid(module: nn.Module, result) -> None:
    assert result.layers, "no layer was rounded"
    for name, layer in result.layers.items():
        weight = module.get_submodule(name).weight.detach()
        assert torch.equal(weight, layer.dequantized_weight().to(weight.dtype)), name


def read_csv_metrics(log_dir: Path) -> list[dict[str, str]]:
    with open(log_dir / "metrics.csv") as f:
        return list(csv.DictReader(f))


def test_fit_end_rounds_after_last_checkpoint_and_logs_to_csv(namespace, tmp_path):
    pl, Callback = namespace
    Boring, BoringData, _ = make_classes(pl)
    model = Boring()
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    logger = pl.loggers.CSVLogger(tmp_path, name="csv")
    cb = make_callback(Callback, bits=4, log_every_n_steps=10)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[ckpt, cb], logger=logger))
    trainer.fit(model, datamodule=BoringData())

    assert set(cb.result.layers) == {"net.0", "net.2"}
    assert_on_grid(model, cb.result)
    # last.ckpt was written in on_train_end, before rounding: it holds the float weights.
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)["state_dict"]["net.0.weight"]
    assert not torch.equal(saved, model.net[0].weight.detach())

    rows = read_csv_metrics(Path(logger.log_dir))
    first = [int(r["step"]) for r in rows if r.get("adaround/net.0/recon_loss")]
    second = [int(r["step"]) for r in rows if r.get("adaround/net.2/recon_loss")]
    assert len(first) == len(second) == 40 // 10 + 1  # every 10 steps plus the last one
    assert min(second) > max(first), "the step must keep increasing across layers"
    for key in ("reg_loss", "beta", "nearest_mse", "adaround_mse", "seconds", "bits"):
        assert any(r.get(f"adaround/net.2/{key}") for r in rows), key
    betas = [float(r["adaround/net.0/beta"]) for r in rows if r.get("adaround/net.0/beta")]
    assert betas[-1] == pytest.approx(2.0)


def test_validate_pass_rounds_under_inference_mode_and_reports_rounded_metrics(namespace, tmp_path):
    pl, Callback = namespace
    Boring, BoringData, _ = make_classes(pl)
    model, dm = Boring(), BoringData()
    cb = make_callback(Callback, bits=3, run_on="validate")
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[cb], logger=False))
    assert trainer.predict_loop.inference_mode  # the default Trainer(inference_mode=True)
    float_loss = trainer.validate(model, datamodule=dm, verbose=False)  # noqa: F841 (rounds first)
    assert_on_grid(model, cb.result)
    x, y = dm.data.tensors
    with torch.no_grad():
        expected = nn.functional.cross_entropy(model(x), y).item()
    assert float_loss[0]["val_loss"] == pytest.approx(expected, rel=1e-5)
    assert all(p.requires_grad for p in model.parameters()), "parameters must stay trainable"


def test_tensorboard_event_files_hold_the_curves(tmp_path):
    import lightning.pytorch as pl
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from lightning_adaround import AdaRoundCallback

    Boring, BoringData, _ = make_classes(pl)
    logger = pl.loggers.TensorBoardLogger(tmp_path, name="tb")
    cb = make_callback(AdaRoundCallback, log_every_n_steps=5)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[cb], logger=logger))
    trainer.fit(Boring(), datamodule=BoringData())
    events = EventAccumulator(logger.log_dir)
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for layer in ("net.0", "net.2"):
        for key in ("recon_loss", "reg_loss", "beta", "nearest_mse", "adaround_mse"):
            assert f"adaround/{layer}/{key}" in tags
    recon = events.Scalars("adaround/net.2/recon_loss")
    assert len(recon) == 40 // 5 + 1
    assert [e.step for e in recon] == sorted(e.step for e in recon)


def test_explicit_loader_bounds_the_samples_read(namespace, tmp_path):
    pl, Callback = namespace
    Boring, BoringData, _ = make_classes(pl)
    dm = BoringData()
    loader = DataLoader(dm.data, batch_size=25)
    cb = make_callback(Callback, calibration_data=loader, num_calibration_samples=60)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[cb], logger=False))
    trainer.fit(Boring(), train_dataloaders=DataLoader(dm.data, batch_size=32))
    layer = cb.result.layers["net.0"]
    assert layer.num_samples + layer.eval_samples == 60


def test_without_datamodule_the_trainers_loader_is_used(namespace, tmp_path):
    pl, Callback = namespace
    Boring, BoringData, _ = make_classes(pl)
    dm = BoringData()
    cb = make_callback(Callback, num_calibration_samples=None)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[cb], logger=False))
    trainer.fit(Boring(), train_dataloaders=DataLoader(TensorDataset(*(t[:100] for t in dm.data.tensors)), batch_size=32))
    layer = cb.result.layers["net.2"]
    assert layer.num_samples + layer.eval_samples == 100


def test_datamodule_calibration_dataloader_is_preferred(namespace, tmp_path):
    pl, Callback = namespace
    Boring, _, WithCalibration = make_classes(pl)
    cb = make_callback(Callback)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[cb], logger=False))
    trainer.fit(Boring(), datamodule=WithCalibration())
    layer = cb.result.layers["net.0"]
    assert layer.num_samples + layer.eval_samples == 40  # its 40 samples, not the 256 of train


def test_checkpoint_round_trip_restores_the_rounded_model_and_the_result(namespace, tmp_path):
    pl, Callback = namespace
    Boring, BoringData, _ = make_classes(pl)
    model = Boring()
    keys_before = list(model.state_dict())
    cb = make_callback(Callback)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[cb], logger=False))
    trainer.fit(model, datamodule=BoringData())
    path = tmp_path / "rounded.ckpt"
    trainer.save_checkpoint(path)

    assert list(model.state_dict()) == keys_before
    reloaded = Boring.load_from_checkpoint(path)
    assert_on_grid(reloaded, cb.result)
    state = torch.load(path, weights_only=False)["callbacks"]
    fresh = make_callback(Callback)
    fresh.load_state_dict(next(iter(state.values())))
    assert set(fresh.result.layers) == set(cb.result.layers)
    for name, layer in cb.result.layers.items():
        assert torch.equal(fresh.result.layers[name].integer_weight, layer.integer_weight)
        assert torch.equal(fresh.result.layers[name].scale, layer.scale)
        assert fresh.result.layers[name].bits == layer.bits


def test_running_fit_again_does_not_round_twice(namespace, tmp_path):
    pl, Callback = namespace
    Boring, BoringData, _ = make_classes(pl)
    model, dm = Boring(), BoringData()
    cb = make_callback(Callback)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[cb], logger=False))
    trainer.fit(model, datamodule=dm)
    first = cb.result
    weights = model.net[0].weight.detach().clone()
    with pytest.warns(UserWarning, match="not rounding twice"):
        trainer.fit(model, datamodule=dm)  # max_epochs already reached: no training, fit end again
    assert cb.result is first
    assert torch.equal(model.net[0].weight.detach(), weights)


@pytest.mark.parametrize("bar", ["TQDMProgressBar", "RichProgressBar"])
def test_progress_bar_and_summary_table(tmp_path, capsys, caplog, bar):
    import lightning.pytorch as pl

    from lightning_adaround import AdaRoundCallback

    Boring, BoringData, _ = make_classes(pl)
    cb = make_callback(AdaRoundCallback)
    progress = getattr(pl.callbacks, bar)()
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[cb, progress], logger=False, enable_progress_bar=True))
    trainer.fit(Boring(), datamodule=BoringData())
    out = capsys.readouterr()
    text = out.out + out.err
    assert "AdaRound net.2" in text
    assert ("80/80" in text) if bar == "TQDMProgressBar" else ("100%" in text)  # 2 layers x 40 steps
    summary = caplog.text  # rank_zero_info goes through Lightning's logger
    assert "AdaRound per-layer summary" in summary and "nearest MSE" in summary and "net.2" in summary

    cb = make_callback(AdaRoundCallback)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[cb], logger=False, enable_progress_bar=False))
    trainer.fit(Boring(), datamodule=BoringData())
    out = capsys.readouterr()
    assert "AdaRound net" not in out.out + out.err


@pytest.mark.parametrize("bar", ["TQDMProgressBar", "RichProgressBar"])
def test_progress_bar_counts_the_steps_each_unit_takes_by_default(tmp_path, capsys, bar):
    """``iterations=None``: each unit's count is known only as it starts (1,000 for these Linear
    layers); the bar is resized then and ends at the steps taken."""
    import lightning.pytorch as pl

    from lightning_adaround import AdaRoundCallback

    Boring, BoringData, _ = make_classes(pl)
    cb = make_callback(AdaRoundCallback, iterations=None)
    progress = getattr(pl.callbacks, bar)()
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[cb, progress], logger=False, enable_progress_bar=True))
    trainer.fit(Boring(), datamodule=BoringData())
    text = "".join(capsys.readouterr())
    assert {r.iterations for r in cb.result.layers.values()} == {1000}
    assert ("2000/2000" in text) if bar == "TQDMProgressBar" else ("100%" in text)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(run_on="sometimes"), "run_on='sometimes'"),
        (dict(bits=9), "bits=9"),
        (dict(bits=1), "bits=1"),
        (dict(num_calibration_samples=0), "num_calibration_samples=0"),
        (dict(bits=3, config=AdaRoundConfig(iterations=20)), r"bits=3 and a config with bits=4.*AdaRoundConfig\(bits=3"),
    ],
)
def test_bad_options_fail_in_init(kwargs, match):
    from lightning_adaround import AdaRoundCallback

    with pytest.raises(ValueError, match=match):
        AdaRoundCallback(**kwargs)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(granularity="per_row"), TypeError, "granularity='per_row'"),
        (dict(iterations=0), ValueError, "iterations=0"),
        (dict(reg_lambda=-1.0), ValueError, "reg_lambda=-1.0"),
        (dict(scale_method="max"), ValueError, "scale_method='max'"),
        (dict(log_every_n_steps=0), ValueError, "log_every_n_steps=0"),
    ],
)
def test_bad_rounding_options_fail_when_the_config_is_built(kwargs, error, match):
    """Rounding options reach the callback through ``config=``; the config checks them when built."""
    from lightning_adaround import AdaRoundCallback

    with pytest.raises(error, match=match):
        AdaRoundCallback(config=AdaRoundConfig(**kwargs))


def test_bits_is_a_shortcut_for_the_configs_bits():
    from lightning_adaround import AdaRoundCallback

    assert AdaRoundCallback().config == AdaRoundConfig()
    assert AdaRoundCallback(bits=3).config == AdaRoundConfig(bits=3)
    config = AdaRoundConfig(bits=3, iterations=20, beta_start=16.0)
    assert AdaRoundCallback(config=config).config is config
    assert AdaRoundCallback(bits=3, config=config).config is config  # the same width twice is fine
    with pytest.raises(TypeError, match="must be an AdaRoundConfig"):
        AdaRoundCallback(config={"bits": 4})
    with pytest.raises(TypeError, match="iterations"):
        AdaRoundCallback(iterations=20)  # every rounding option but bits lives in the config


def test_the_config_is_frozen_and_replace_checks_again():
    config = AdaRoundConfig(bits=3, exclude=["fc"], layer_bits={"conv": 8})
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.bits = 9  # would bypass the check
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.log_every_n_steps = 0
    changed = dataclasses.replace(config, iterations=20)
    assert (changed.bits, changed.iterations, changed.exclude, changed.layer_bits) == (3, 20, ("fc",), {"conv": 8})
    with pytest.raises(ValueError, match="bits=9"):
        dataclasses.replace(config, bits=9)
    given = {"conv": 8}
    kept = AdaRoundConfig(layer_bits=given)
    given["conv"] = 16  # the caller's dict is not the config's
    assert kept.layer_bits == {"conv": 8}


def test_no_calibration_data_is_a_clear_error(tmp_path):
    import lightning.pytorch as pl

    from lightning_adaround import AdaRoundCallback

    Boring, _, _ = make_classes(pl)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, logger=False))
    with pytest.raises(ValueError, match="calibration_data="):
        make_callback(AdaRoundCallback).round_model(trainer, Boring())


@pytest.mark.parametrize("data, match", [([], "no batch"), (["some text"], "forward_fn")])
def test_empty_or_unusable_calibration_data_fails_before_work(tmp_path, data, match):
    import lightning.pytorch as pl

    from lightning_adaround import AdaRoundCallback

    Boring, BoringData, _ = make_classes(pl)
    model = Boring()
    cb = make_callback(AdaRoundCallback, calibration_data=data, run_on="validate")
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[cb], logger=False))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        trainer.validate(model, datamodule=BoringData(), verbose=False)
    assert cb.result is None
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_sharded_strategy_is_refused_in_setup():
    from types import SimpleNamespace

    from lightning.pytorch.strategies import FSDPStrategy

    from lightning_adaround import AdaRoundCallback

    with pytest.raises(ValueError, match="FSDPStrategy"):
        AdaRoundCallback().setup(SimpleNamespace(strategy=FSDPStrategy()), None, "fit")


def test_lightning_cli_configures_the_callback(tmp_path):
    import lightning.pytorch as pl
    from lightning.pytorch.cli import LightningCLI

    Boring, BoringData, _ = make_classes(pl)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cli = LightningCLI(
            Boring, BoringData,
            args=[
                "fit", "--trainer.max_epochs=1", f"--trainer.default_root_dir={tmp_path}",
                "--trainer.logger=false", "--trainer.enable_progress_bar=false",
                "--trainer.callbacks+=lightning_adaround.AdaRoundCallback",
                "--trainer.callbacks.config.bits=3", "--trainer.callbacks.config.iterations=20",
                "--trainer.callbacks.num_calibration_samples=64",
                "--trainer.callbacks.config.granularity=lightning_adaround.PerTensor",
            ],
            save_config_kwargs={"overwrite": True},
        )
    from lightning_adaround import AdaRoundCallback

    (cb,) = [c for c in cli.trainer.callbacks if isinstance(c, AdaRoundCallback)]
    assert cb.config.bits == 3 and cb.config.iterations == 20
    assert {layer.bits for layer in cb.result.layers.values()} == {3}
    assert all(layer.axis is None for layer in cb.result.layers.values())  # per-tensor
    assert_on_grid(cli.model, cb.result)


def _cli(pl, tmp_path, callback: dict, run: bool):
    """A LightningCLI whose YAML config file puts ``callback`` (class_path/init_args) in trainer.callbacks."""
    import yaml
    from lightning.pytorch.cli import LightningCLI

    Boring, BoringData, _ = make_classes(pl)
    path = tmp_path / "config.yaml"
    trainer = dict(max_epochs=1, default_root_dir=str(tmp_path), logger=False, enable_progress_bar=False,
                   enable_checkpointing=False, callbacks=[callback])
    path.write_text(yaml.safe_dump({"trainer": trainer}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return LightningCLI(Boring, BoringData, args=["fit", "--config", str(path)] if run else ["--config", str(path)],
                            run=run, save_config_kwargs={"overwrite": True})


def _the_callback(cli):
    from lightning_adaround import AdaRoundCallback

    (cb,) = [c for c in cli.trainer.callbacks if isinstance(c, AdaRoundCallback)]
    return cb


def test_lightning_cli_yaml_rounds_with_bits_and_a_config(tmp_path):
    """The YAML of the issue: ``bits`` beside a ``config`` given by class_path, grid axis and beta included."""
    import lightning.pytorch as pl

    config = {"class_path": "lightning_adaround.AdaRoundConfig", "init_args": {
        "iterations": 10, "batch_size": 16, "beta_start": 16,
        "granularity": {"class_path": "lightning_adaround.PerChannel", "init_args": {"axis": 0}},
        "layer_types": ["torch.nn.Linear"], "layer_bits": {"net.0": 8},
    }}
    cli = _cli(pl, tmp_path, {"class_path": "lightning_adaround.AdaRoundCallback",
                              "init_args": {"bits": 4, "num_calibration_samples": 64, "config": config}}, run=True)
    cb = _the_callback(cli)
    from lightning_adaround import PerChannel

    assert cb.config == AdaRoundConfig(
        bits=4, iterations=10, batch_size=16, beta_start=16.0, granularity=PerChannel(axis=0),
        layer_types=(nn.Linear,), layer_bits={"net.0": 8},
    )
    assert cb.num_calibration_samples == 64
    assert {name: layer.bits for name, layer in cb.result.layers.items()} == {"net.0": 8, "net.2": 4}
    assert all(layer.axis == 0 for layer in cb.result.layers.values())
    assert_on_grid(cli.model, cb.result)
    for bad in ({"bits": 3, "config": config}, {"config": {"granularity": "per_tensor"}}):  # refused, before any work
        with pytest.raises((SystemExit, ValueError)):
            _cli(pl, tmp_path, {"class_path": "lightning_adaround.AdaRoundCallback", "init_args": bad}, run=False)


def test_every_config_field_is_reachable_from_lightning_cli_yaml(tmp_path):
    """A non-default value for every AdaRoundConfig field, written as YAML (the plain-mapping form)."""
    import lightning.pytorch as pl

    from lightning_adaround import PerTensor

    yaml_values = {
        "bits": 3, "symmetric": False, "granularity": {"class_path": "lightning_adaround.PerTensor"},
        "scale_method": "minmax", "loss_form": "minibatch", "reconstruction": "block", "blocks": ["net"],
        "block_loss": "fisher", "iterations": 10, "batch_size": 8, "lr": 0.01, "upstream_correction": 0.5,
        "reg_lambda": 0.02,
        "warm_start": 0.1, "beta_start": 16.0, "beta_end": 3.0, "include_activation": False,
        "holdout_fraction": 0.0, "device_cache_bytes": 1000, "host_cache_bytes": 2000,
        "cache_dir": str(tmp_path), "cache_dtype": "torch.bfloat16", "carry_activations": False, "seed": 7,
        "layers": ["net.*"], "exclude": ["net.1"], "layer_types": ["torch.nn.Linear", "torch.nn.Conv2d"],
        "layer_bits": {"net.0": 8}, "log_every_n_steps": 5, "keep_float_weights": True,
        "fold_batchnorm": False, "equalize": True, "bias_correction": "auto", "learn_scale": True, "scale_lr": 0.002,
    }
    assert set(yaml_values) == CONFIG_FIELDS, "a new AdaRoundConfig field needs a YAML value here"
    cli = _cli(pl, tmp_path, {"class_path": "lightning_adaround.AdaRoundCallback",
                              "init_args": {"config": yaml_values, "run_on": "validate", "verbose": False}}, run=False)
    cb = _the_callback(cli)
    expected = dict(yaml_values, granularity=PerTensor(), cache_dtype=torch.bfloat16, exclude=("net.1",),
                    layer_types=(nn.Linear, nn.Conv2d))
    got = {name: getattr(cb.config, name) for name in CONFIG_FIELDS}
    assert {k: got[k] for k in expected if got[k] != expected[k]} == {}, "fields the YAML did not set"
    assert cb.run_on == "validate" and cb.verbose is False


def test_report_png_is_saved_and_logged_to_tensorboard(tmp_path):
    import lightning.pytorch as pl
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from lightning_adaround import AdaRoundCallback

    Boring, BoringData, _ = make_classes(pl)
    logger = pl.loggers.TensorBoardLogger(tmp_path, name="tb")
    cb = make_callback(AdaRoundCallback, log_every_n_steps=5)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[cb], logger=logger))
    trainer.fit(Boring(), datamodule=BoringData())
    png = Path(logger.log_dir) / "adaround_report.png"
    assert cb.report_path == str(png)
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0})
    events.Reload()
    assert "adaround/report" in events.Tags()["images"]


def _normalizing_module(pl):
    """A module whose on_after_batch_transfer normalizes the input (and counts the batches it sees)."""

    class Normalizing(pl.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
            self.transfers = 0

        def forward(self, x):
            return self.net(x)

        def on_after_batch_transfer(self, batch, dataloader_idx):
            self.transfers += 1
            x, y = batch
            return (x - 1.0) / 2.0, y  # applied twice, the inputs would be (x - 3) / 4

        def validation_step(self, batch, batch_idx):
            x, y = batch
            self.log("val_loss", nn.functional.cross_entropy(self(x), y))

    return Normalizing


class _TransfersDuringRounding:
    """Placed after the AdaRoundCallback: on_validation_start runs when rounding is done, before any
    validation batch is fetched, so the module's count is the rounding's alone."""

    def __init__(self, Callback):
        outer = self

        class Recorder(Callback):
            def on_validation_start(self, trainer, pl_module):
                outer.count = pl_module.transfers

        self.callback = Recorder()
        self.count = None


def _calibration(generator_seed=0):
    g = torch.Generator().manual_seed(generator_seed)
    x = 2.0 * torch.randn(32, 16, generator=g) + 1.0
    return DataLoader(TensorDataset(x, (x[:, 0] > 1).long()), batch_size=8)


@pytest.mark.parametrize("device_cache_bytes", [None, 0])
def test_transfer_hooks_run_once_per_calibration_batch_with_a_host_cache(tmp_path, device_cache_bytes):
    """Lightning's transfer hooks (a normalization here) run once per batch, also when the cache lives on
    the host and batches go back and forth (a plain tensor move after the first transfer)."""
    import lightning.pytorch as pl
    from lightning.pytorch.strategies import SingleDeviceStrategy

    from lightning_adaround import AdaRoundCallback

    data = _calibration()
    results = {}
    for device in ("cpu", torch.device("cpu", 0)):  # cpu:0 is not the host cache's device: batches are moved
        module = _normalizing_module(pl)()
        recorder = _TransfersDuringRounding(pl.Callback)
        cb = make_callback(AdaRoundCallback, run_on="validate", calibration_data=data, device_cache_bytes=device_cache_bytes,
                           num_calibration_samples=32, verbose=False, report=False)
        trainer = pl.Trainer(**trainer_kwargs(
            tmp_path, callbacks=[cb, recorder.callback], logger=False, devices="auto",
            strategy=SingleDeviceStrategy(device=torch.device(device)),
        ))
        trainer.validate(module, dataloaders=data, verbose=False)
        assert recorder.count == len(data), (device, recorder.count)
        results[str(device)] = cb.result
    for name, layer in results["cpu"].layers.items():  # the same inputs whichever way they travelled
        assert torch.equal(layer.integer_weight, results["cpu:0"].layers[name].integer_weight), name


def test_fisher_task_loss_sees_each_batch_transferred_once(tmp_path):
    import lightning.pytorch as pl

    from lightning_adaround import AdaRoundCallback

    data = _calibration()
    module = _normalizing_module(pl)()
    recorder = _TransfersDuringRounding(pl.Callback)
    seen = []

    def task_loss(output, batch):
        seen.append(float(batch[0].mean()))
        return nn.functional.cross_entropy(output, batch[1])

    cb = make_callback(AdaRoundCallback, run_on="validate", calibration_data=data, num_calibration_samples=32,
                       reconstruction="block", blocks=["net"], block_loss="fisher", task_loss=task_loss,
                       verbose=False, report=False)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[cb, recorder.callback], logger=False))
    trainer.validate(module, dataloaders=data, verbose=False)
    assert recorder.count == len(data)
    normalized = [float(((x - 1.0) / 2.0).mean()) for x, _ in data]
    assert seen and all(min(abs(m - n) for n in normalized) < 1e-5 for m in seen)  # normalized once, not twice


def test_adaround_steps_continue_after_the_fits_steps_and_two_callbacks_keep_their_own_state(namespace, tmp_path):
    """A W8 first layer and a W4 rest from two callbacks: distinct state keys, steps that only go up."""
    pl, Callback = namespace
    Boring, BoringData, _ = make_classes(pl)
    model = Boring()
    logger = pl.loggers.CSVLogger(tmp_path, name="csv")
    w8 = make_callback(Callback, bits=8, layers=["net.0"], log_every_n_steps=10)
    w4 = make_callback(Callback, bits=4, exclude=["net.0"], log_every_n_steps=10)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[w8, w4], logger=logger, log_every_n_steps=1))
    trainer.fit(model, datamodule=BoringData())
    assert w8.state_key != w4.state_key
    assert w8.result.layers["net.0"].bits == 8 and w4.result.layers["net.2"].bits == 4
    assert_on_grid(model, w8.result)
    assert_on_grid(model, w4.result)

    rows = read_csv_metrics(Path(logger.log_dir))
    fit_steps = [int(r["step"]) for r in rows if r.get("train_loss")]
    first = [int(r["step"]) for r in rows if r.get("adaround/net.0/recon_loss")]
    second = [int(r["step"]) for r in rows if r.get("adaround/net.2/recon_loss")]
    assert fit_steps and first and second
    assert min(first) > max(fit_steps), "AdaRound's curves must start after the fit's steps"
    assert min(second) > max(first), "the second callback must continue after the first"

    path = tmp_path / "both.ckpt"
    trainer.save_checkpoint(path)
    states = torch.load(path, weights_only=False)["callbacks"]
    assert {w8.state_key, w4.state_key} <= set(states)
    fresh8 = make_callback(Callback, bits=8, layers=["net.0"])
    fresh4 = make_callback(Callback, bits=4, exclude=["net.0"])
    fresh8.load_state_dict(states[fresh8.state_key])
    fresh4.load_state_dict(states[fresh4.state_key])
    assert set(fresh8.result.layers) == {"net.0"} and set(fresh4.result.layers) == {"net.2"}


@pytest.mark.parametrize("precision", ["bf16-true", "16-true", "bf16-mixed"])
@pytest.mark.parametrize("run_on", ["fit_end", "validate"])
def test_half_precision_trainers_round_on_the_grid_in_the_models_dtype(tmp_path, precision, run_on):
    """The callback feeds batches as the Trainer's loops do (converted to the model's dtype)."""
    import lightning.pytorch as pl
    from lightning_adaround import AdaRoundCallback

    Boring, BoringData, _ = make_classes(pl)
    model, dm = Boring(), BoringData()
    cb = make_callback(AdaRoundCallback, bits=4, run_on=run_on, iterations=60)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[cb], logger=False, precision=precision))
    if run_on == "fit_end":
        trainer.fit(model, datamodule=dm)
    else:
        trainer.validate(model, datamodule=dm, verbose=False)
    expected = {"bf16-true": torch.bfloat16, "16-true": torch.float16}.get(precision, torch.float32)
    assert {p.dtype for p in model.parameters()} == {expected}
    assert_on_grid(model, cb.result)
    for layer in cb.result.layers.values():
        assert layer.scale.dtype == torch.float32
        assert layer.adaround_mse <= layer.nearest_mse * 1.05


class _CountsTraining:
    steps = 0


def _dict_model(pl):
    """A module whose forward takes keyword tensors, trained on (x, y) tuples: the default forward fails."""

    class DictInput(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))

        def forward(self, *, features):
            return self.net(features)

        def training_step(self, batch, batch_idx):
            _CountsTraining.steps += 1
            return nn.functional.cross_entropy(self(features=batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    return DictInput()


def test_fit_mode_reports_a_forward_that_cannot_run_a_calibration_batch_before_training(namespace, tmp_path):
    pl, Callback = namespace
    _, BoringData, _ = make_classes(pl)
    _CountsTraining.steps = 0
    cb = make_callback(Callback)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[cb], logger=False))
    with pytest.raises(ValueError, match="running the model on the first calibration batch failed .*checked before training"):
        trainer.fit(_dict_model(pl), datamodule=BoringData())
    assert _CountsTraining.steps == 0 and trainer.global_step == 0

    # the fix the message names works, and the check keeps the module's train/eval modes
    _CountsTraining.steps = 0
    model = _dict_model(pl)
    cb = make_callback(Callback, forward_fn=lambda module, batch: module(features=batch[0]))
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[cb], logger=False, max_steps=3))
    trainer.fit(model, train_dataloaders=BoringData().train_dataloader())
    assert _CountsTraining.steps == 3 and cb.result is not None


def test_fit_mode_reports_unreadable_calibration_data_before_training(tmp_path):
    import lightning.pytorch as pl
    from lightning_adaround import AdaRoundCallback

    class Broken:
        def __iter__(self):
            raise OSError("the dataset's files are gone")

    Boring, BoringData, _ = make_classes(pl)
    model = Boring()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cb = make_callback(AdaRoundCallback, calibration_data=Broken())
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[cb], logger=False))
    with pytest.raises(ValueError, match="reading the calibration data failed with OSError: the dataset's files are gone"):
        trainer.fit(model, datamodule=BoringData())
    assert trainer.global_step == 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_fewer_calibration_samples_than_asked_warns(tmp_path):
    import lightning.pytorch as pl
    from lightning_adaround import AdaRoundCallback

    Boring, _, _ = make_classes(pl)
    loader = DataLoader(TensorDataset(torch.randn(100, 16)), batch_size=32)
    cb = make_callback(AdaRoundCallback, run_on="validate", calibration_data=loader, num_calibration_samples=1024)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[cb], logger=False))
    with pytest.warns(UserWarning, match="read 100 calibration samples, fewer than num_calibration_samples=1024"):
        trainer.validate(Boring(), dataloaders=DataLoader(TensorDataset(torch.randn(8, 16), torch.zeros(8).long())),
                         verbose=False)
    assert cb.result is not None


def test_the_same_callback_rounds_a_retrained_model_again_and_replaces_its_result(tmp_path):
    import lightning.pytorch as pl
    from lightning_adaround import AdaRoundCallback

    Boring, BoringData, _ = make_classes(pl)
    model, dm = Boring(), BoringData()
    cb = make_callback(AdaRoundCallback)
    pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[cb], logger=False)).fit(model, datamodule=dm)
    first = cb.result
    pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[cb], logger=False)).fit(model, datamodule=dm)  # retrained
    assert cb.result is not first
    assert_on_grid(model, cb.result)
