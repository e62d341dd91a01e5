"""Resuming from ``checkpoint_dir``: fault injection, a killed process, damaged files, other runs refused.

Every resumed run must give exactly the integer weights (and model weights) of an uninterrupted
run. Run with ``-s`` to see how many interruptions were tried.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import random
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_adaround.io.checkpoint as checkpoint_module
from lightning_adaround import AdaRoundConfig, AdaRoundObserver, RoundingStopped, adaround
from lightning_adaround.io.checkpoint import MANIFEST

sys.path.insert(0, str(Path(__file__).resolve().parent))
import resume_case  # noqa: E402
import sigterm_case  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
REAL_WRITE = checkpoint_module._atomic_write
LAYERS = ["0", "2", "5", "7"]


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU(), nn.Flatten(),
        nn.Linear(4 * 2 * 2, 8), nn.ReLU(), nn.Linear(8, 3),
    )


def _data(seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(16, 2, 6, 6, generator=g) for _ in range(3)]


def _config(**kwargs) -> AdaRoundConfig:
    options = dict(iterations=30, batch_size=8, lr=1e-2, log_every_n_steps=1, loss_form="minibatch")
    options.update(kwargs)
    return AdaRoundConfig(**options)


def _assert_same_result(result, reference, model, reference_model) -> None:
    assert list(result.layers) == list(reference.layers)
    assert result.unreached == reference.unreached
    for name, ref in reference.layers.items():
        got = result.layers[name]
        assert torch.equal(got.integer_weight, ref.integer_weight), name
        assert torch.equal(got.scale, ref.scale) and torch.equal(got.zero_point, ref.zero_point), name
        assert got.adaround_mse == ref.adaround_mse, name
    for (name, p), (_, q) in zip(model.state_dict().items(), reference_model.state_dict().items()):
        assert torch.equal(p, q), name


def _reference(config: AdaRoundConfig, data=None):
    model = _model()
    return adaround(model, data or _data(), config), model


def _finished(folder: Path) -> list[str]:
    manifest = folder / MANIFEST
    return [e["name"] for e in json.loads(manifest.read_text())["layers"]] if manifest.exists() else []


# ------------------------------------------------------------------------------ fault injection


class _Injected(Exception):
    pass


class _Interrupt(AdaRoundObserver):
    """Raises ``error`` at a chosen hook: a step of a layer, or a layer's start or end."""

    def __init__(self, hook: str, layer: int, step: int, error: type[BaseException]) -> None:
        self.hook, self.layer, self.step, self.error = hook, LAYERS[layer], step, error

    def on_layer_start(self, name, index, iterations):
        if self.hook == "layer_start" and name == self.layer:
            raise self.error("injected")

    def on_step(self, name, step, metrics):
        if self.hook == "step" and name == self.layer and step == self.step:
            raise self.error("injected")

    def on_layer_end(self, result):
        if self.hook == "layer_end" and result.name == self.layer:
            raise self.error("injected")


def _failing_writes(fail_at: int, after: bool, error: type[BaseException]):
    """``_atomic_write`` that raises on its ``fail_at``-th call, before or after really writing."""
    calls = {"n": 0}

    def write(path, data):
        calls["n"] += 1
        if calls["n"] == fail_at and not after:
            raise error("injected")
        REAL_WRITE(path, data)
        if calls["n"] == fail_at and after:
            raise error("injected")

    return write


@pytest.mark.parametrize("loss_form", ["minibatch", "auto"])
def test_every_interrupted_run_resumes_to_the_uninterrupted_result(loss_form, tmp_path, monkeypatch):
    """Interrupt at random layers, steps and hooks (exceptions, Ctrl-C, failed writes) many times."""
    config = _config(loss_form=loss_form)
    reference, reference_model = _reference(config)
    rng = random.Random(loss_form)
    data = _data()
    model = _model()
    float_state = {k: v.clone() for k, v in model.state_dict().items()}
    interruptions = completed = resumed = campaign = attempts = 0
    kinds: dict[str, int] = {}
    last_completed = False
    folder = tmp_path / "run0"
    while interruptions < 20 or not last_completed:
        attempts += 1
        assert attempts < 200
        hook = rng.choice(["step", "step", "layer_start", "layer_end", "write_before", "write_after"])
        error = rng.choice([_Injected, KeyboardInterrupt])
        observer = _Interrupt(hook, rng.randrange(4), rng.randrange(30), error)
        finished_before = _finished(folder)
        if hook.startswith("write"):
            monkeypatch.setattr(
                checkpoint_module, "_atomic_write",
                _failing_writes(rng.randrange(1, 9), hook == "write_after", error),
            )
        last_completed = False
        try:
            result = adaround(model, data, config, observer=observer, checkpoint_dir=folder)
        except (_Injected, KeyboardInterrupt) as err:
            assert str(err) == "injected"
            interruptions += 1
            kind = f"{hook}/{type(err).__name__}"
            kinds[kind] = kinds.get(kind, 0) + 1
            for key, value in model.state_dict().items():  # the model holds its float weights again
                assert torch.equal(value, float_state[key]), key
            assert _finished(folder)[:len(finished_before)] == finished_before  # nothing finished was lost
            continue
        finally:
            monkeypatch.setattr(checkpoint_module, "_atomic_write", REAL_WRITE)
        assert result.restored == finished_before
        _assert_same_result(result, reference, model, reference_model)
        completed += 1
        resumed += bool(result.restored)  # finished with layers read back from the checkpoint
        last_completed = True
        campaign += 1
        folder = tmp_path / f"run{campaign}"  # a fresh run
        model.load_state_dict(float_state)
    assert completed >= 3 and resumed >= 3
    print(
        f"\n[{loss_form}] {interruptions} interruptions ({dict(sorted(kinds.items()))}), "
        f"{completed} completed runs ({resumed} of them resumed from saved layers) equal to the reference"
    )


def test_a_finished_checkpoint_restores_every_layer(tmp_path):
    config = _config()
    reference, reference_model = _reference(config)
    model = _model()
    first = adaround(model, _data(), config, checkpoint_dir=tmp_path)
    assert first.restored == []
    model = _model()
    again = adaround(model, _data(), config, checkpoint_dir=tmp_path)
    assert again.restored == LAYERS
    _assert_same_result(again, reference, model, reference_model)
    assert "from checkpoint" in again.summary_table()


def test_settings_that_change_no_weight_may_change_on_resume(tmp_path):
    config = _config()
    reference, reference_model = _reference(config)
    with pytest.raises(_Injected):
        adaround(_model(), _data(), config, observer=_Interrupt("layer_start", 2, 0, _Injected), checkpoint_dir=tmp_path)
    model = _model()
    result = adaround(model, _data(), _config(device_cache_bytes=0, host_cache_bytes=10**9, log_every_n_steps=7), checkpoint_dir=tmp_path)
    assert result.restored == LAYERS[:2]
    _assert_same_result(result, reference, model, reference_model)


@pytest.mark.parametrize("here, resumes", [(1.0, True), (0.5, False), (None, False)])
def test_a_checkpoint_from_before_a_setting_existed_resumes_at_its_default(tmp_path, here, resumes):
    """A checkpoint written before ``upstream_correction`` existed lacks it: it counts as its default
    then (1, which rounds as before), not today's (``None``), so a run with any other value is refused."""
    config = _config(upstream_correction=1.0)  # how the library rounded before the setting existed
    reference, reference_model = _reference(config)
    _interrupted_after_three_layers(tmp_path, config)
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    del manifest["fingerprint"]["settings"]["upstream_correction"]
    (tmp_path / MANIFEST).write_text(json.dumps(manifest))
    model = _model()
    if resumes:
        result = adaround(model, _data(), _config(upstream_correction=here), checkpoint_dir=tmp_path)
        assert result.restored == LAYERS[:3]
        _assert_same_result(result, reference, model, reference_model)
    else:
        with pytest.raises(ValueError, match=f"upstream_correction is 1.0 there and {here} here"):
            adaround(model, _data(), _config(upstream_correction=here), checkpoint_dir=tmp_path)


def test_unreached_layers_are_remembered(tmp_path):
    class WithUnused(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.fc1, self.unused, self.fc2 = nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, 2)

        def forward(self, x):
            return self.fc2(torch.relu(self.fc1(x)))

    data = [torch.randn(16, 4)]
    first = adaround(WithUnused(), data, _config(), checkpoint_dir=tmp_path)
    assert first.unreached == ["unused"] and _finished(tmp_path) == ["fc1", "fc2", "unused"]
    again = adaround(WithUnused(), data, _config(), checkpoint_dir=tmp_path)
    assert again.unreached == ["unused"] and again.restored == ["fc1", "fc2"]


# ------------------------------------------------------------------------------ a killed process


def _sigterm_after_first_layer(script_and_args: list[str], folder: Path, **env: str) -> tuple[int, str]:
    """Run ``tests/<script>``, send it SIGTERM once a layer is in ``folder``; (return code, output)."""
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / script_and_args[0]), *script_and_args[1:]],
        env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), **env),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 120
        while not _finished(folder):  # wait for the first finished layer
            assert process.poll() is None, process.stdout.read().decode()
            assert time.monotonic() < deadline, "no layer finished within 120 s"
            time.sleep(0.02)
        process.send_signal(signal.SIGTERM)
        output = process.communicate(timeout=60)[0].decode()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    return process.returncode, output


def test_a_process_killed_with_sigterm_resumes_to_the_same_result(tmp_path):
    folder = tmp_path / "ckpt"
    returncode, _ = _sigterm_after_first_layer(["resume_case.py", str(folder), "0.005"], folder)
    assert returncode == -signal.SIGTERM
    finished = _finished(folder)
    assert 1 <= len(finished) < 4, finished
    model = resume_case.model()
    result = adaround(model, resume_case.data(), resume_case.config(), checkpoint_dir=folder)
    assert result.restored == finished
    reference_model = resume_case.model()
    reference = adaround(reference_model, resume_case.data(), resume_case.config())
    _assert_same_result(result, reference, model, reference_model)


class _StopAfter(AdaRoundObserver):
    """Asks the run to stop after ``calls`` should_stop questions (about a step each)."""

    def __init__(self, calls: int) -> None:
        self.calls = calls

    def should_stop(self) -> bool:
        self.calls -= 1
        return self.calls < 0


def test_should_stop_ends_the_run_between_steps_and_it_resumes_to_the_same_result(tmp_path):
    model = _model()
    given = copy.deepcopy(model.state_dict())
    with pytest.raises(RoundingStopped, match="stopped on request at step 12 of 30"):
        adaround(model, _data(), _config(), observer=_StopAfter(2 * 31 + 13), checkpoint_dir=tmp_path)
    assert all(torch.equal(given[k], v) for k, v in model.state_dict().items())
    assert _finished(tmp_path) == LAYERS[:2]
    result = adaround(model, _data(), _config(), checkpoint_dir=tmp_path)
    assert result.restored == LAYERS[:2]
    reference, reference_model = _reference(_config())
    _assert_same_result(result, reference, model, reference_model)


def test_a_lightning_run_stops_on_sigterm_and_resumes_to_the_same_result(tmp_path):
    """Lightning catches SIGTERM (a scheduler's preemption, docker stop): the rounding must stop
    between steps, leave the model as given, keep its finished layers, and resume exactly."""
    folder, report = tmp_path / "ckpt", tmp_path / "outcome.txt"
    _, output = _sigterm_after_first_layer(["sigterm_case.py", str(folder), str(report)], folder, SLOW_STEPS="1")
    assert "Received SIGTERM" in output, output[-2000:]
    assert report.read_text() == "stopped, model as given", output[-2000:]
    finished = _finished(folder)
    assert 1 <= len(finished) < 4, finished

    model = sigterm_case.Net()
    cb = sigterm_case.callback(str(folder))
    sigterm_case.trainer(cb).validate(model, sigterm_case.data(), verbose=False)
    assert cb.result.restored == finished
    reference = sigterm_case.callback(str(tmp_path / "reference"))
    reference_model = sigterm_case.Net()
    sigterm_case.trainer(reference).validate(reference_model, sigterm_case.data(), verbose=False)
    _assert_same_result(cb.result, reference.result, model, reference_model)


# ------------------------------------------------------------------------------ damaged files


def _interrupted_after_three_layers(folder: Path, config: AdaRoundConfig) -> None:
    with pytest.raises(_Injected):
        adaround(_model(), _data(), config, observer=_Interrupt("layer_start", 3, 0, _Injected), checkpoint_dir=folder)
    assert _finished(folder) == LAYERS[:3]


@pytest.mark.parametrize("damage, restored", [
    ("flip", LAYERS[:1]), ("truncate", []), ("delete", LAYERS[:2]), ("empty", LAYERS[:1]),
])
def test_a_damaged_layer_file_is_detected_and_redone(tmp_path, damage, restored):
    config = _config()
    reference, reference_model = _reference(config)
    _interrupted_after_three_layers(tmp_path, config)
    path = tmp_path / f"layer-{len(restored):04d}.pt"
    data = path.read_bytes()
    if damage == "flip":
        path.write_bytes(data[:200] + bytes([data[200] ^ 0xFF]) + data[201:])
    elif damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "delete":
        path.unlink()
    else:
        path.write_bytes(b"")
    model = _model()
    with pytest.warns(UserWarning, match=rf"layer-{len(restored):04d}.pt is damaged .*rounding layer"):
        result = adaround(model, _data(), config, checkpoint_dir=tmp_path)
    assert result.restored == restored
    _assert_same_result(result, reference, model, reference_model)
    assert _finished(tmp_path) == LAYERS


def test_a_file_with_the_right_checksum_but_another_layer_is_refused(tmp_path):
    """A manifest edited by hand to point at another layer's file: detected, redone."""
    config = _config()
    _interrupted_after_three_layers(tmp_path, config)
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    manifest["layers"][1]["file"], manifest["layers"][1]["sha256"] = (
        manifest["layers"][0]["file"], manifest["layers"][0]["sha256"],
    )
    (tmp_path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.warns(UserWarning, match="holds another layer"):
        result = adaround(_model(), _data(), config, checkpoint_dir=tmp_path)
    assert result.restored == LAYERS[:1]


@pytest.mark.parametrize("content, words", [
    ("{not json", "JSONDecodeError"),
    ('{"format": "something else"}', "not a lightning-adaround checkpoint"),
    ('{"format": "lightning-adaround checkpoint", "version": 99}', "format version 99"),
    ('{"format": "lightning-adaround checkpoint", "version": 1}', "format version 1"),  # before nearest-where-better
    ('{"format": "lightning-adaround checkpoint", "version": 2}', "format version 2"),  # per-layer hold-out
    ('{"format": "lightning-adaround checkpoint", "version": 3}', "format version 3"),  # one hold-out per run
    ('{"format": "lightning-adaround checkpoint", "version": 4, "fingerprint": {}}', "incomplete"),
])
def test_an_unreadable_manifest_is_a_clear_error(tmp_path, content, words):
    (tmp_path / MANIFEST).write_text(content)
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=words) as info:
        adaround(model, _data(), _config(), checkpoint_dir=tmp_path)
    assert "delete" in str(info.value) and str(tmp_path) in str(info.value)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


# ------------------------------------------------------------------------------ other runs refused


def _other_model() -> nn.Module:
    model = _model()
    with torch.no_grad():
        model[5].bias.add_(1e-3)  # one bias: the fingerprint covers every parameter
    return model


@pytest.mark.parametrize("change, words", [
    (dict(config=_config(bits=3)), "bits is 4 there and 3 here"),
    (dict(config=_config(symmetric=False)), "symmetric is True there and False here"),
    (dict(config=_config(seed=1)), "seed is 0 there and 1 here"),
    (dict(config=_config(iterations=31)), "iterations is 30 there and 31 here"),
    (dict(config=_config(layer_bits={"0": 8})), "layer_bits is {} there and {'0': 8} here"),
    (dict(config=_config(exclude=["7"])), "the selected layers or their weight shapes differ"),
    (dict(model=_other_model), "the model's float weights differ"),
    (dict(data=lambda: _data(seed=2)), "the calibration data differs"),
    (dict(activations={"0": None}), "activations is {} there and {'0': None} here"),
])
def test_a_checkpoint_of_another_run_is_refused(tmp_path, change, words):
    _interrupted_after_three_layers(tmp_path, _config())
    model = change.get("model", _model)()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError) as info:
        adaround(
            model, change.get("data", _data)(), change.get("config", _config()),
            activations=change.get("activations"), checkpoint_dir=tmp_path,
        )
    message = str(info.value)
    assert words in message and "holds a checkpoint of a different run" in message
    assert "Use a new checkpoint_dir, or delete" in message
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert _finished(tmp_path) == LAYERS[:3]  # the refused checkpoint is left as it was


def test_the_data_hash_reads_tensors_arrays_and_plain_values():
    import numpy as np

    from lightning_adaround.io.checkpoint import _hash_batches

    base = [{"x": torch.zeros(2, 3), "ids": np.arange(3), "text": "a", "n": 1}]
    for changed in (
        [{"x": torch.zeros(2, 3), "ids": np.arange(3) + 1, "text": "a", "n": 1}],
        [{"x": torch.ones(2, 3), "ids": np.arange(3), "text": "a", "n": 1}],
        [{"x": torch.zeros(2, 3, dtype=torch.float64), "ids": np.arange(3), "text": "a", "n": 1}],
        [{"x": torch.zeros(3, 2), "ids": np.arange(3), "text": "a", "n": 1}],
        [{"x": torch.zeros(2, 3), "ids": np.arange(3), "text": "b", "n": 1}],
        [{"x": torch.zeros(2, 3), "ids": np.arange(3), "text": "a", "n": 2}],
        base + base,
    ):
        assert _hash_batches(changed) != _hash_batches(base)
    assert _hash_batches(copy.deepcopy(base)) == _hash_batches(base)


def test_a_different_layer_order_is_refused(tmp_path):
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

    data = [torch.randn(16, 8)]
    adaround(Two(), data, _config(), forward_fn=lambda m, x: m.b(m.a(x)), checkpoint_dir=tmp_path)
    with pytest.raises(ValueError, match="finished layer 'a' at position 0 where this run reaches 'b'"):
        adaround(Two(), data, _config(), forward_fn=lambda m, x: m.a(m.b(x)), checkpoint_dir=tmp_path)


def test_checkpoint_dir_must_be_a_folder(tmp_path):
    with pytest.raises(TypeError, match="checkpoint_dir must be a folder path"):
        adaround(_model(), _data(), _config(), checkpoint_dir=3)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        adaround(_model(), _data(), _config(), checkpoint_dir=tmp_path / "file")


def test_files_are_loaded_weights_only(tmp_path, monkeypatch):
    adaround(_model(), _data(), _config(), checkpoint_dir=tmp_path)
    seen = []
    real = torch.load

    def spy(*args, **kwargs):
        seen.append(kwargs.get("weights_only"))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    adaround(_model(), _data(), _config(), checkpoint_dir=tmp_path)
    assert seen == [True] * len(LAYERS)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # no temporary file left


# ------------------------------------------------------------------------------ determinism


@pytest.mark.parametrize("loss_form", ["minibatch", "moments"])
def test_same_seed_same_integer_weights_wherever_the_cache_lives(loss_form):
    results = []
    for budgets in ({}, {"host_cache_bytes": 0}, {}):  # host memory, then a memory-mapped file, on a CPU
        model = _model()
        results.append((adaround(model, _data(), _config(loss_form=loss_form, **budgets)), model))
    for result, model in results[1:]:
        _assert_same_result(result, results[0][0], model, results[0][1])


# ------------------------------------------------------------------------------ the Lightning callback


def test_callback_resumes_in_a_validate_pass(tmp_path):
    import lightning.pytorch as pl

    from lightning_adaround import AdaRoundCallback

    class Tiny(pl.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))

        def forward(self, x):
            return self.net(x)

        def validation_step(self, batch, batch_idx):
            self.log("val_loss", nn.functional.cross_entropy(self(batch[0]), batch[1]))

    class FailingOnce(AdaRoundCallback):
        """Fails in the forward pass that captures the third layer."""

        calls = 0

        def forward_batch(self, module, batch):
            FailingOnce.calls += 1
            if FailingOnce.calls == 22:  # 1 first pass + 6 (net.0) + 12 (net.2) + 3
                raise RuntimeError("node lost")
            return super().forward_batch(module, batch)

    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 8, generator=g)
    dataset = TensorDataset(x, (x[:, 0] > 0).long())
    shuffled = DataLoader(dataset, batch_size=16, shuffle=True)  # the callback reads it with a fixed seed

    def run(callback_class, carry_activations=True, **kwargs):
        model = Tiny()
        config = AdaRoundConfig(bits=3, iterations=20, batch_size=16, log_every_n_steps=5,
                                carry_activations=carry_activations)
        callback = callback_class(
            config=config, run_on="validate", calibration_data=shuffled, verbose=False, report=False, **kwargs,
        )
        trainer = pl.Trainer(
            accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
            default_root_dir=tmp_path, callbacks=[callback],
        )
        trainer.validate(model, dataloaders=DataLoader(dataset, batch_size=32), verbose=False)
        return callback.result, model

    reference, reference_model = run(AdaRoundCallback)
    folder = tmp_path / "adaround-ckpt"
    with pytest.raises(RuntimeError, match="node lost"):
        # full forward passes (counted above); carrying block inputs changes no weight,
        # so the resume below carries them and still matches
        run(FailingOnce, checkpoint_dir=folder, carry_activations=False)
    assert _finished(folder) == ["net.0", "net.2"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result, model = run(AdaRoundCallback, checkpoint_dir=str(folder))
    assert not [w for w in caught if "damaged" in str(w.message)]
    assert result.restored == ["net.0", "net.2"]
    _assert_same_result(result, reference, model, reference_model)


def test_callback_checkpoint_dir_must_be_a_path():
    from lightning_adaround import AdaRoundCallback

    with pytest.raises(TypeError, match="checkpoint_dir must be a folder path"):
        AdaRoundCallback(checkpoint_dir=5)


def test_deepcopy_of_a_model_resumes_like_the_original(tmp_path):
    """What a user does between two attempts: reload the float model; a copy hashes the same."""
    config = _config()
    model = _model()
    _interrupted_after_three_layers(tmp_path, config)
    result = adaround(copy.deepcopy(model), _data(), config, checkpoint_dir=tmp_path)
    assert result.restored == LAYERS[:3]


def test_fit_end_run_resumes_from_the_float_checkpoint_in_a_validate_pass(tmp_path):
    """The documented recipe: a fit-end rounding that failed resumes from last.ckpt in a validate pass."""
    import lightning.pytorch as pl

    from lightning_adaround import AdaRoundCallback

    class Net(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            return nn.functional.cross_entropy(self(batch[0]), batch[1])

        def validation_step(self, batch, batch_idx):
            pass

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    class Data(pl.LightningDataModule):
        def train_dataloader(self):
            g = torch.Generator().manual_seed(0)
            x = torch.randn(64, 8, generator=g)
            return DataLoader(TensorDataset(x, (x[:, 0] > 0).long()), batch_size=16, shuffle=True)

        def val_dataloader(self):
            return self.train_dataloader()

    class FailsInSecondLayer(AdaRoundCallback):
        calls = 0

        def forward_batch(self, module, batch):
            FailsInSecondLayer.calls += 1
            if FailsInSecondLayer.calls == 8:  # 1 first pass + 4 batches for layer net.0, then net.3's capture
                raise RuntimeError("preempted")
            return super().forward_batch(module, batch)

    config = AdaRoundConfig(bits=3, iterations=20, batch_size=16)
    options = dict(config=config, verbose=False, report=False)
    folder = tmp_path / "adaround-ckpt"
    common = dict(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False)
    torch.manual_seed(0)
    checkpoints = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    failing = FailsInSecondLayer(  # counts full passes: no carried block inputs
        config=dataclasses.replace(config, carry_activations=False), checkpoint_dir=folder, verbose=False, report=False,
    )
    trainer = pl.Trainer(max_epochs=2, callbacks=[checkpoints, failing],
                         default_root_dir=tmp_path, **common)
    with pytest.raises(RuntimeError, match="preempted"):
        trainer.fit(Net(), datamodule=Data())
    assert _finished(folder) == ["net.0"]

    def validate(**kwargs):
        model = Net.load_from_checkpoint(tmp_path / "ckpt" / "last.ckpt")
        callback = AdaRoundCallback(run_on="validate", **options, **kwargs)
        pl.Trainer(callbacks=[callback], default_root_dir=tmp_path, **common).validate(
            model, datamodule=Data(), verbose=False,
        )
        return callback.result, model

    result, model = validate(checkpoint_dir=folder)
    assert result.restored == ["net.0"]
    reference, reference_model = validate()
    _assert_same_result(result, reference, model, reference_model)
