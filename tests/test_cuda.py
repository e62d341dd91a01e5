"""AdaRound on a CUDA device: the core's loss forms, the callback in real GPU Trainers, half
precision, cache tiers, seeded reruns, export and a one-GPU DDP run.

Every case runs only where ``torch.cuda.is_available()`` (the module-level skip). For a dry run of
the same case bodies on a machine without a GPU, set ``LIGHTNING_ADAROUND_TEST_DEVICE=cpu``: the
skip is lifted, the cases run on the CPU, and the few that need a CUDA-only feature are skipped
(``precision="16-mixed"`` becomes ``"bf16-mixed"``, which Lightning allows on a CPU).

    PYTHONPATH=. python -m pytest tests/test_cuda.py -q                                   # on a GPU
    LIGHTNING_ADAROUND_TEST_DEVICE=cpu OMP_NUM_THREADS=1 python -m pytest tests/test_cuda.py -q  # dry run

Everything here is synthetic (random weights and inputs, torch-generated): no scikit-learn,
TensorBoard or matplotlib, so it runs on a bare GPU machine.
"""

from __future__ import annotations

import copy
import csv
import json
import os
import signal
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

# cuBLAS reads this when its first handle is made: bit-identical minibatch reruns under
# torch.use_deterministic_algorithms need it (before any CUDA work in this process).
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from lightning_adaround import AdaRoundConfig, PerTensor, adaround, export_quantized, load_quantized  # noqa: E402

HERE = Path(__file__).resolve().parent
DEVICE = torch.device(os.environ.get("LIGHTNING_ADAROUND_TEST_DEVICE") or "cuda")
ON_CUDA = DEVICE.type == "cuda"
ACCELERATOR = "gpu" if ON_CUDA else "cpu"
MIXED_16 = "16-mixed" if ON_CUDA else "bf16-mixed"  # Lightning refuses 16-mixed on a CPU

pytestmark = pytest.mark.skipif(ON_CUDA and not torch.cuda.is_available(), reason="needs CUDA")

# Enough iterations to pass the warm start (20%) into the regularized, annealed phase.
ITERATIONS = 120
QUALITY_ITERATIONS = 500


# ----------------------------------------------------------------------------- models and data


def small_cnn(seed: int = 0) -> nn.Module:
    """Conv-ReLU-Conv-ReLU-Linear on 3x8x8 inputs (three layers, a strided conv)."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, stride=2), nn.ReLU(),
        nn.Flatten(), nn.Linear(16 * 3 * 3, 10),
    ).eval()


class Residual(nn.Module):
    """A residual block with two convolutions: a block for ``reconstruction="block"``."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, width, 3, padding=1))

    def forward(self, x):
        return torch.relu(x + self.body(x))


def residual_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), Residual(16), Residual(16),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    ).eval()


def images(n: int = 256, size: int = 8, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g)


def batches(dtype: torch.dtype = torch.float32, n: int = 256, size: int = 8) -> list[torch.Tensor]:
    """Calibration batches of 32, already on the test device (as a user's GPU loader gives them)."""
    return [b.to(DEVICE, dtype) for b in images(n, size).split(32)]


def labelled(n: int = 256, size: int = 8) -> TensorDataset:
    x = images(n, size)
    y = (x.mean((1, 2, 3)) > 0).long() + 2 * (x[:, 0, 0, 0] > 0).long()
    return TensorDataset(x, y)


def device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def same_device(a: torch.device, b: torch.device) -> bool:
    return a.type == b.type and (a.type != "cuda" or (a.index or 0) == (b.index or 0))


def assert_on_grid(model: nn.Module, result) -> None:
    """Every rounded weight equals its integers times its float32 scale, cast to the model's dtype."""
    assert result.layers, "no layer was rounded"
    for name, layer in result.layers.items():
        weight = model.get_submodule(name).weight.detach()
        assert layer.scale.dtype == torch.float32, name
        assert torch.equal(weight.cpu(), layer.dequantized_weight().to(weight.dtype)), f"{name} is not on its grid"


def assert_not_worse_than_nearest(result, slack: float) -> None:
    for name, layer in result.layers.items():
        assert layer.adaround_mse == layer.adaround_mse and layer.nearest_mse == layer.nearest_mse, name  # not NaN
        assert layer.adaround_mse <= slack * layer.nearest_mse + 1e-9, (
            name, layer.loss_form, layer.nearest_mse, layer.adaround_mse)


def integer_weights(result) -> dict[str, torch.Tensor]:
    return {name: layer.integer_weight for name, layer in result.layers.items()}


def assert_same_integers(a, b) -> None:
    assert set(a.layers) == set(b.layers)
    for name in a.layers:
        assert torch.equal(a.layers[name].integer_weight, b.layers[name].integer_weight), name


@contextmanager
def deterministic():
    """cuDNN/cuBLAS picks deterministic kernels (warn only where an op has none)."""
    previous = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    benchmark = torch.backends.cudnn.benchmark
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
        torch.backends.cudnn.benchmark = benchmark


def config(**kwargs) -> AdaRoundConfig:
    options = dict(bits=3, iterations=ITERATIONS, batch_size=16, log_every_n_steps=20)
    options.update(kwargs)
    return AdaRoundConfig(**options)


# ----------------------------------------------------------------------------- the core, three loss forms


@pytest.mark.parametrize("form", ["minibatch", "moments", "block"])
def test_loss_forms_round_on_the_device(form):
    """Weights on the grid, the model back on its device, held-out error no worse than nearest.

    The moments form steps through the regularized phase with ``soft_backward``'s
    ``addcmul``, whose scalar must not be a CPU tensor on CUDA.
    """
    model = (residual_net() if form == "block" else small_cnn()).to(DEVICE)
    options = dict(reconstruction="block") if form == "block" else dict(loss_form=form)
    # 500 steps at lr 1e-2: converged (regularizer near 0), so the held-out comparison is reliable
    # (measured on CPU: AdaRound / nearest 0.44-0.77 on the inner layers, 0.998-1.005 on the first)
    result = adaround(model, batches(n=512), config(iterations=QUALITY_ITERATIONS, lr=1e-2, **options))
    assert same_device(device_of(model), DEVICE)
    assert_on_grid(model, result)
    if form == "block":
        assert {layer.block for layer in result.layers.values()} >= {"2", "3"}, result.summary_table()
    else:
        assert {layer.loss_form for layer in result.layers.values()} == {form}
    for layer in result.layers.values():
        assert layer.history and layer.history[-1][0] == QUALITY_ITERATIONS - 1, layer.name
        assert any(reg > 0 for _, _, reg, _ in layer.history), f"the regularizer never ran in {layer.name}"
    assert_not_worse_than_nearest(result, slack=1.05)


def test_model_on_the_cpu_rounds_on_the_device_and_goes_back():
    """``device=`` computes there; the model returns to where it was."""
    model = small_cnn()
    cpu_batches = [b.cpu() for b in batches()]
    result = adaround(model, cpu_batches, config(loss_form="moments"), device=DEVICE)
    assert device_of(model).type == "cpu"
    assert_on_grid(model, result)


# ----------------------------------------------------------------------------- the callback in GPU Trainers


def lightning_classes():
    import lightning.pytorch as pl

    class Classifier(pl.LightningModule):
        def __init__(self, kind: str = "plain") -> None:
            super().__init__()
            torch.manual_seed(0)
            if kind == "cbr":  # Conv-BatchNorm-ReLU6: folding, then equalization for per-tensor grids
                self.net = nn.Sequential(
                    nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU6(),
                    nn.Conv2d(16, 16, 3, stride=2, bias=False), nn.BatchNorm2d(16), nn.ReLU6(),
                    nn.Flatten(), nn.Linear(16 * 3 * 3, 4),
                )
            else:
                self.net = nn.Sequential(
                    nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, stride=2), nn.ReLU(),
                    nn.Flatten(), nn.Linear(16 * 3 * 3, 4),
                )

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.cross_entropy(self(x), y)

        def validation_step(self, batch, batch_idx):
            x, y = batch
            self.log("val_loss", nn.functional.cross_entropy(self(x), y))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05)

    return pl, Classifier


def warm_batchnorms(model: nn.Module) -> None:
    """Running statistics from a few train-mode passes, so folding has real numbers to fold."""
    model.train()
    with torch.no_grad():
        for x in images(128).split(32):
            model(x.to(device_of(model)))
    model.eval()


def make_callback(config: Optional[AdaRoundConfig] = None, **kwargs):
    from lightning_adaround import AdaRoundCallback

    class Recording(AdaRoundCallback):
        """Notes where the module was when rounding started and where it was left."""

        def round_model(self, trainer, pl_module):
            before = device_of(pl_module)
            result = super().round_model(trainer, pl_module)
            self.devices = (before, device_of(pl_module), trainer.strategy.root_device)
            return result

    options = dict(
        config=config or AdaRoundConfig(bits=4, iterations=60, batch_size=16, log_every_n_steps=10),
        num_calibration_samples=128, calibration_data=DataLoader(labelled(), batch_size=32), verbose=False,
        report=False,
    )
    options.update(kwargs)
    return Recording(**options)


def make_trainer(pl, tmp_path, callback, **kwargs):
    options = dict(
        accelerator=ACCELERATOR, devices=1, max_steps=2, default_root_dir=tmp_path,
        logger=pl.loggers.CSVLogger(tmp_path, name="csv"), callbacks=[callback],
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
    )
    options.update(kwargs)
    return pl.Trainer(**options)


def run_callback(tmp_path, run_on: str, kind: str = "plain", precision=None, **callback_kwargs):
    """One Trainer run (fit with two steps, or validate); returns (model, callback, metrics rows)."""
    pl, Classifier = lightning_classes()
    model = Classifier(kind)
    if kind == "cbr" and run_on == "validate":
        warm_batchnorms(model)
    callback = make_callback(run_on=run_on, **callback_kwargs)
    extra = {} if precision is None else dict(precision=precision)
    trainer = make_trainer(pl, tmp_path, callback, **extra)
    data = labelled()
    if run_on == "validate":
        trainer.validate(model, dataloaders=DataLoader(data, batch_size=64), verbose=False)
    else:
        trainer.fit(model, train_dataloaders=DataLoader(data, batch_size=32, shuffle=True))
    assert callback.result is not None and callback.result.layers
    with open(Path(trainer.logger.log_dir) / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    return model, callback, rows


def assert_logged(rows: list[dict[str, str]], result) -> None:
    for name in result.layers:
        for key in ("recon_loss", "reg_loss", "beta", "nearest_mse", "adaround_mse"):
            assert any(r.get(f"adaround/{name}/{key}") for r in rows), f"adaround/{name}/{key} not in metrics.csv"


@pytest.mark.parametrize("run_on", ["fit_end", "validate"])
def test_callback_in_a_gpu_trainer(tmp_path, run_on):
    model, callback, rows = run_callback(tmp_path, run_on)
    assert set(callback.result.layers) == {"net.0", "net.2", "net.5"}
    assert_on_grid(model, callback.result)
    assert_logged(rows, callback.result)
    before, after, root = callback.devices
    assert same_device(root, DEVICE)
    assert same_device(after, before), "the module must be left where the Trainer had it"
    if run_on == "validate":  # the module is on the device in a validate pass (Lightning's teardown moves it back later)
        assert same_device(before, DEVICE)
        assert any(r.get("val_loss") for r in rows)
        assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("run_on", ["fit_end", "validate"])
def test_callback_per_tensor_folds_and_equalizes_on_the_device(tmp_path, run_on):
    """Conv-BN-ReLU6: BatchNorms folded, channel ranges equalized (ReLU6 -> per-channel clips), rounded.

    Under validate the module is on the GPU while equalization runs.
    """
    per_tensor = AdaRoundConfig(bits=4, iterations=60, batch_size=16, log_every_n_steps=10, granularity=PerTensor())
    model, callback, rows = run_callback(tmp_path, run_on, kind="cbr", config=per_tensor)
    assert all(layer.axis is None for layer in callback.result.layers.values())
    assert_on_grid(model, callback.result)
    assert_logged(rows, callback.result)
    x = images(16).to(device_of(model))
    with torch.no_grad():
        assert torch.isfinite(model(x)).all()


# ----------------------------------------------------------------------------- half precision


@pytest.mark.parametrize("precision, run_on", [
    ("bf16-true", "fit_end"), ("bf16-true", "validate"), (MIXED_16, "fit_end"), (MIXED_16, "validate"),
])
def test_callback_half_precision_trainer(tmp_path, precision, run_on):
    """The rounded weight is in the model's dtype and equals the float32 grid value cast to it."""
    model, callback, rows = run_callback(tmp_path, run_on, precision=precision)
    dtype = torch.bfloat16 if precision.endswith("-true") else torch.float32
    for name in callback.result.layers:
        assert model.get_submodule(name).weight.dtype == dtype, name
    assert_on_grid(model, callback.result)
    assert_logged(rows, callback.result)


@pytest.mark.parametrize("form", ["minibatch", "moments"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_model_in_the_core(dtype, form):
    """Rounding runs in float32 whatever the model's dtype; the weights are written back in it."""
    model = small_cnn().to(DEVICE, dtype)
    result = adaround(model, batches(dtype), config(loss_form=form))
    assert same_device(device_of(model), DEVICE)
    assert all(p.dtype == dtype for p in model.parameters())
    assert_on_grid(model, result)
    for layer in result.layers.values():
        assert layer.adaround_mse == layer.adaround_mse and layer.adaround_mse < float("inf")
    with torch.no_grad():
        assert torch.isfinite(model(batches(dtype)[0]).float()).all()


# ----------------------------------------------------------------------------- cache tiers, seeds


def test_cache_tiers_give_identical_rounding(tmp_path):
    """Device, pinned host memory and a memory-mapped file: the same integer weights (same seed)."""
    tiers = {
        "device": dict(device_cache_bytes=2**40),
        "host": dict(device_cache_bytes=0),
        "disk": dict(device_cache_bytes=0, host_cache_bytes=0, cache_dir=str(tmp_path)),
    }
    results = {}
    with deterministic():
        for tier, options in tiers.items():
            model = small_cnn().to(DEVICE)
            results[tier] = adaround(model, batches(), config(loss_form="minibatch", **options))
            assert_on_grid(model, results[tier])
    assert_same_integers(results["device"], results["host"])
    assert_same_integers(results["device"], results["disk"])
    for name, layer in results["disk"].layers.items():
        assert "cached on disk" in layer.note, (name, layer.note)
        if ON_CUDA:
            assert "cached on host" in results["host"].layers[name].note, (name, results["host"].layers[name].note)
            assert "cached on" not in results["device"].layers[name].note, (name, results["device"].layers[name].note)
    assert os.listdir(tmp_path) == []  # the mapped files are unlinked


def test_moments_form_rerun_is_bit_identical():
    """One matmul per step: the same integers on a rerun without deterministic mode."""
    first = adaround(small_cnn().to(DEVICE), batches(), config(loss_form="moments"))
    second = adaround(small_cnn().to(DEVICE), batches(), config(loss_form="moments"))
    assert_same_integers(first, second)
    for name in first.layers:
        assert first.layers[name].adaround_mse == second.layers[name].adaround_mse, name


@pytest.mark.parametrize("reconstruction", ["layer", "block"])
def test_minibatch_rerun_is_bit_identical_under_deterministic_algorithms(reconstruction):
    make = residual_net if reconstruction == "block" else small_cnn
    options = dict(reconstruction="block") if reconstruction == "block" else dict(loss_form="minibatch")
    with deterministic():
        first = adaround(make().to(DEVICE), batches(), config(seed=3, **options))
        second = adaround(make().to(DEVICE), batches(), config(seed=3, **options))
    assert_same_integers(first, second)


# ----------------------------------------------------------------------------- export


def test_export_round_trip_of_a_device_rounded_model(tmp_path):
    model = small_cnn().to(DEVICE)
    result = adaround(model, batches(), config(bits=4, loss_form="auto"))
    path = tmp_path / "model.pt"
    export_quantized(model, result, path)
    target = small_cnn(seed=123).to(DEVICE)  # other weights, same architecture
    loaded = load_quantized(target, path)
    assert same_device(device_of(target), DEVICE)
    for key, value in model.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key
    for name, layer in result.layers.items():
        assert torch.equal(loaded.layers[name].integer_weight, layer.integer_weight), name
        assert torch.equal(loaded.layers[name].scale, layer.scale), name
    x = batches()[0]
    with deterministic(), torch.no_grad():
        assert torch.equal(target(x), model(x))
    # the half-precision model's file restores the same integers into a bf16 model
    half = small_cnn().to(DEVICE, torch.bfloat16)
    load_quantized(half, path)
    assert_on_grid(half, loaded)


def test_onnx_export_of_a_device_rounded_model(tmp_path):
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    from lightning_adaround import export_onnx

    model = small_cnn().to(DEVICE)
    result = adaround(model, batches(), config(bits=4, loss_form="moments"))
    x = batches()[0][:4]
    onnx_model = export_onnx(model, result, tmp_path / "m.onnx", (x,), input_names=["x"])
    assert sum(n.op_type == "DequantizeLinear" for n in onnx_model.graph.node) == len(result.layers)
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {"x": x.cpu().numpy()})
    with torch.no_grad():  # on the CPU in plain float32: no TF32 convolutions in the reference
        expected = copy.deepcopy(model).cpu()(x.cpu())
    assert torch.allclose(torch.from_numpy(out), expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))


# ----------------------------------------------------------------------------- one-GPU DDP, in a subprocess


def run_ddp_case(tmp_path: Path, timeout: int = 240, **opts) -> tuple[int, str]:
    """``tests/cuda_ddp_case.py`` in its own process (and process group), killed if it hangs."""
    out = tmp_path / "out"
    out.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "MASTER_ADDR", "LOCAL_RANK", "WORLD_SIZE",
                                                            "RANK", "NODE_RANK")}
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent), env.get("PYTHONPATH", "")])
    proc = subprocess.Popen(
        [sys.executable, str(HERE / "cuda_ddp_case.py"), json.dumps({"out": str(out), "device": DEVICE.type, **opts})],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"cuda_ddp_case.py {opts} hung for {timeout} s:\n{output[-4000:]}")
    return proc.returncode, output


def test_one_gpu_ddp_trainer_rounds_on_the_grid(tmp_path):
    """``Trainer(strategy="ddp", devices=1)`` (NCCL on a GPU) rounds at fit end; then the same
    process group runs ``distributed_adaround`` directly (NCCL collectives on the device)."""
    rc, output = run_ddp_case(tmp_path)
    assert rc == 0, output[-6000:]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["backend"] == ("nccl" if ON_CUDA else "gloo"), report
    assert report["world_size"] == 1, report
    assert report["fit"]["layers"] == ["net.0", "net.2", "net.5"], report
    for case in ("fit", "distributed_minibatch", "distributed_moments"):
        assert report[case]["on_grid"], (case, report[case])
        assert report[case]["finite"], (case, report[case])
    assert report["distributed_moments"]["forms"] == ["moments"], report
    assert report["distributed_minibatch"]["forms"] == ["minibatch"], report
    assert any(f.name == "metrics.csv" for f in (tmp_path / "out").rglob("metrics.csv"))
    assert "adaround/net.2/recon_loss" in next((tmp_path / "out").rglob("metrics.csv")).read_text()
