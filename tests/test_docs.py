"""The documentation is tested: its code runs, its reference is current, its site builds strictly.

- Every ```python block in README.md and docs/*.md runs as its own test (id ``file:line``).
  Blocks in docs/ are self-contained. README blocks use ``model``, ``dm`` and
  ``calibration_batches`` without defining them; ``README_SETUP`` supplies them (see
  ``_readme_namespace``). Blocks run in a temporary working directory, so logs and
  checkpoints they write land there.
- Every ```yaml block that names ``lightning_adaround.AdaRoundCallback`` is a LightningCLI
  config file: it fits a small model with it, and each ``config:`` value must reach the
  callback's ``AdaRoundConfig``. Other fences (bash, text, other yaml) are not executed.
- docs/configuration.md must equal what docs/gen_config_reference.py generates.
- Every error message quoted in docs/troubleshooting.md is produced by the library as quoted.
- ``mkdocs build --strict`` succeeds, and fails on a broken link, anchor or nav entry.
"""

from __future__ import annotations

import importlib.util
import itertools
import os
import re
import runpy
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
DOC_FILES = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]


# --------------------------------------------------------------------------- code blocks

def python_blocks(path: Path) -> list[tuple[int, str]]:
    """``(line of the opening fence, source)`` for each top-level ```python block in ``path``."""
    return code_blocks(path, ("python", "py"))


def code_blocks(path: Path, languages: tuple[str, ...]) -> list[tuple[int, str]]:
    """``(line of the opening fence, source)`` for each top-level block fenced as one of ``languages``."""
    blocks, current, start, fence_lang = [], None, 0, None
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if current is None:
            match = re.match(r"^```\s*([\w+-]*)", line)
            if match:
                fence_lang = match.group(1).lower()
                current, start = [], number
        elif line.startswith("```"):
            if fence_lang in languages:
                blocks.append((start, "\n".join(current) + "\n"))
            current = None
        else:
            current.append(line)
    assert current is None, f"{path.name}: unclosed code fence opened on line {start}"
    return blocks


def _readme_namespace() -> dict[str, Any]:
    """What README.md's blocks use without defining: ``model``, ``dm``, ``calibration_batches``.

    ``dm`` is the digits datamodule of examples/digits.py (1,797 real 8x8 digits). ``model``
    is that example's ``DigitsClassifier`` with a one-layer head named ``fc`` in place of the
    CNN: the README's blocks use the default of 10,000 iterations per layer, so a single layer
    to round keeps each rounding run to seconds, and ``layer_bits={"fc": 8}`` matches it.
    ``calibration_batches`` is a list of 4 batches of 64 digit images (inputs only).
    """
    from digits import DigitsClassifier, DigitsDataModule

    class ReadmeDigits(DigitsClassifier):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Flatten()
            self.fc = nn.Linear(64, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.net(x))

    torch.manual_seed(0)
    dm = DigitsDataModule()
    dm.setup()
    calibration_batches = [x for x, _ in itertools.islice(dm.calibration_dataloader(), 4)]
    return {"model": ReadmeDigits(), "dm": dm, "calibration_batches": calibration_batches}


# Per-file context for blocks that use names they do not define.
README_SETUP: dict[str, Callable[[], dict[str, Any]]] = {"README.md": _readme_namespace}
# README blocks round with the default 10,000 iterations: seconds each, so marked slow.
SLOW_FILES = {"README.md"}


def _block_params() -> list[Any]:
    params = []
    for path in DOC_FILES:
        rel = path.relative_to(ROOT).as_posix()
        for line, source in python_blocks(path):
            marks = [pytest.mark.slow] if rel in SLOW_FILES else []
            params.append(pytest.param(rel, line, source, id=f"{rel}:{line}", marks=marks))
    return params


@pytest.mark.parametrize("rel, line, source", _block_params())
def test_python_block_runs(rel, line, source, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # lightning_logs/, checkpoints, exported files
    namespace: dict[str, Any] = {"__name__": "__main__"}
    if rel in README_SETUP:
        namespace.update(README_SETUP[rel]())
    code = compile(source, f"{rel}:{line}", "exec")
    try:
        exec(code, namespace)
    finally:  # a block that starts a process group must not leave it to the next test
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def test_every_page_has_blocks_collected():
    """Guards the fence parser: the pages with examples really yield python (and CLI YAML) blocks."""
    for name in ("README.md", "docs/index.md", "docs/quickstart.md", "docs/export.md"):
        assert python_blocks(ROOT / name), name
    assert any(rel == "docs/quickstart.md" for rel, _, _ in (p.values for p in _cli_yaml_params()))


def _cli_yaml_params() -> list[Any]:
    return [
        pytest.param(path.relative_to(ROOT).as_posix(), line, source, id=f"{path.relative_to(ROOT).as_posix()}:{line}")
        for path in DOC_FILES for line, source in code_blocks(path, ("yaml", "yml"))
        if "lightning_adaround.AdaRoundCallback" in source
    ]


def _cli_classes():
    """The model and datamodule of the quickstart's examples (layers ``net.0`` and ``net.2``)."""
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    class Classifier(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            return nn.functional.cross_entropy(self(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-2)

    class RandomData(L.LightningDataModule):
        def train_dataloader(self):
            g = torch.Generator().manual_seed(0)
            x = torch.randn(128, 16, generator=g)
            return DataLoader(TensorDataset(x, (x[:, 0] > 0).long()), batch_size=32)

    return Classifier, RandomData


def _yaml_value_matches(value: Any, got: Any) -> bool:
    """A YAML value against the config field it set: objects by import path / class_path, the rest by value."""
    if isinstance(value, dict) and "class_path" in value:
        fields = value.get("init_args", {})
        return type(got).__name__ == value["class_path"].rsplit(".", 1)[-1] and all(
            getattr(got, k) == v for k, v in fields.items()
        )
    if isinstance(value, list):
        return len(value) == len(got) and all(_yaml_value_matches(v, g) for v, g in zip(value, got))
    if isinstance(got, type):
        return value.rsplit(".", 1)[-1] == got.__name__
    if isinstance(got, torch.dtype):
        return value == str(got)
    return value == got


@pytest.mark.parametrize("rel, line, source", _cli_yaml_params())
def test_lightning_cli_yaml_block_runs(rel, line, source, tmp_path, monkeypatch):
    import yaml
    from lightning.pytorch.cli import LightningCLI

    from lightning_adaround import AdaRoundCallback

    monkeypatch.chdir(tmp_path)
    path = tmp_path / "config.yaml"
    path.write_text(source, encoding="utf-8")
    overrides = ["--trainer.max_epochs=1", "--trainer.logger=false", "--trainer.enable_progress_bar=false",
                 f"--trainer.default_root_dir={tmp_path}"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cli = LightningCLI(*_cli_classes(), args=["fit", "--config", str(path), *overrides],
                           save_config_kwargs={"overwrite": True})
    written = [c["init_args"] for c in yaml.safe_load(source)["trainer"]["callbacks"]
               if c["class_path"] == "lightning_adaround.AdaRoundCallback"]
    built = [c for c in cli.trainer.callbacks if isinstance(c, AdaRoundCallback)]
    assert len(built) == len(written) >= 1
    for init_args, callback in zip(written, built):
        assert callback.result is not None and callback.result.layers, f"{rel}:{line}: nothing was rounded"
        for name, value in init_args.get("config", {}).items():
            assert _yaml_value_matches(value, getattr(callback.config, name)), (name, value)
        for name, value in init_args.items():
            if name != "config":
                assert getattr(callback, name) == value, (name, value)


# --------------------------------------------------------------------------- generated reference

def test_configuration_reference_is_current():
    generator = runpy.run_path(str(DOCS / "gen_config_reference.py"), run_name="gen_config_reference")
    expected = generator["render"]()
    committed = (DOCS / "configuration.md").read_text(encoding="utf-8")
    assert committed == expected, (
        "docs/configuration.md is stale (a docstring, default or parameter changed): "
        "run `python docs/gen_config_reference.py` and commit the result."
    )


def test_generator_rejects_an_undocumented_parameter():
    generator = runpy.run_path(str(DOCS / "gen_config_reference.py"), run_name="gen_config_reference")
    doc = """Summary.

        Args:
            a: First.
            b, c: Two at once,
                continued.

        Returns:
            Nothing.
        """
    params = {"a": ("int", "1"), "b": ("", "2"), "c": ("str", "'x'")}
    lines = generator["render_params"]("f", doc, params)
    assert lines[1] == "- **`b`** (default `2`); **`c`** (`str`, default `'x'`): Two at once, continued."
    with pytest.raises(generator["DocError"], match=r"undocumented parameters \['d'\]"):
        generator["render_params"]("f", doc, {**params, "d": ("int", "0")})


# --------------------------------------------------------------------------- troubleshooting

def _raises(fn: Callable[[], Any]) -> BaseException:
    try:
        fn()
    except Exception as err:  # noqa: BLE001 - the message is what is checked
        return err
    raise AssertionError("expected an exception")


def _distributed():
    import lightning_adaround.distributed

    return lightning_adaround.distributed


def _tiny() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2))


def _seeded(make: Callable[[], nn.Module], seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return make()


def _in_empty_folder(fn: Callable[[], Any]) -> Callable[[], Any]:
    """Run ``fn`` in a fresh temporary working directory: checkpoint paths in messages read 'ckpt'."""
    def run() -> Any:
        previous = os.getcwd()
        with tempfile.TemporaryDirectory() as folder:
            os.chdir(folder)
            try:
                return fn()
            finally:
                os.chdir(previous)
    return run


def _checkpoint_cases() -> dict[str, Callable[[], Any]]:
    from lightning_adaround import AdaRoundCallback, AdaRoundConfig, adaround

    fast = AdaRoundConfig(iterations=2)
    x = [torch.randn(16, 8, generator=torch.Generator().manual_seed(0))]

    def other_run():
        adaround(_seeded(_tiny), x, fast, checkpoint_dir="ckpt")
        adaround(_seeded(_tiny), x, AdaRoundConfig(bits=3, iterations=2), checkpoint_dir="ckpt")

    def other_model_and_data():
        adaround(_seeded(_tiny), x, fast, checkpoint_dir="ckpt")
        adaround(_seeded(_tiny, 1), [x[0] + 1], fast, checkpoint_dir="ckpt")

    def unreadable_manifest():
        os.mkdir("ckpt")
        with open("ckpt/manifest.json", "w") as f:
            f.write("{not json")
        adaround(_seeded(_tiny), x, fast, checkpoint_dir="ckpt")

    def other_order():
        class Two(nn.Module):
            def __init__(self):
                super().__init__()
                self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

        adaround(_seeded(Two), x, fast, forward_fn=lambda m, b: m.b(m.a(b)), checkpoint_dir="ckpt")
        adaround(_seeded(Two), x, fast, forward_fn=lambda m, b: m.a(m.b(b)), checkpoint_dir="ckpt")

    def a_file():
        open("ckpt", "w").close()
        adaround(_seeded(_tiny), x, fast, checkpoint_dir="ckpt")

    def damaged():
        adaround(_seeded(_tiny), x, fast, checkpoint_dir="ckpt")
        with open("ckpt/layer-0000.pt", "r+b") as f:
            f.write(b"damaged")
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the warning is raised, so its message can be checked
            adaround(_seeded(_tiny), x, fast, checkpoint_dir="ckpt")

    cases = {
        "checkpoint other run": other_run,
        "checkpoint other model and data": other_model_and_data,
        "checkpoint manifest": unreadable_manifest,
        "checkpoint order": other_order,
        "checkpoint a file": a_file,
        "checkpoint damaged (warning)": damaged,
        "checkpoint type": lambda: adaround(_tiny(), x, fast, checkpoint_dir=3),
        "checkpoint type callback": lambda: AdaRoundCallback(checkpoint_dir=3),
    }
    return {name: _in_empty_folder(fn) for name, fn in cases.items()}


def _bad_weight_cases() -> dict[str, Callable[[], Any]]:
    from lightning_adaround import AdaRoundConfig, adaround
    from lightning_adaround.grid.quant import choose_grid

    fast = AdaRoundConfig(iterations=2)
    x = [torch.randn(4, 8)]

    def with_weight(index: int, value: float) -> nn.Module:
        model = _seeded(_tiny)
        with torch.no_grad():
            model[index].weight[0, 0] = value
        return model

    def parametrized(old: bool = False) -> nn.Module:
        model = _seeded(_tiny)
        if old:  # several layers, and the deprecated hooks
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                nn.utils.weight_norm(model[0])
            nn.utils.spectral_norm(model[2])
        else:
            nn.utils.parametrizations.weight_norm(model[2])
        return model

    def overflow(loss_form: str):
        model = _seeded(lambda: nn.Sequential(nn.Linear(8, 2)))
        with torch.no_grad():
            model[0].weight.mul_(1e30)
        data = [torch.randn(8, 8, generator=torch.Generator().manual_seed(0)) * 1e10]
        adaround(model, data, AdaRoundConfig(iterations=2, loss_form=loss_form))

    return {
        "nan weight": lambda: adaround(with_weight(0, float("nan")), x, fast),
        "huge weight": lambda: adaround(with_weight(2, 1e38), x, fast),
        "empty weight": lambda: adaround(nn.Sequential(nn.Linear(0, 2)), [torch.randn(4, 0)], fast),
        "parametrized weight": lambda: adaround(parametrized(), x, fast),
        "parametrized weights": lambda: adaround(parametrized(old=True), x, fast),
        "grid of nan": lambda: choose_grid(torch.tensor([1.0, float("nan")]), 4),
        "grid of nothing": lambda: choose_grid(torch.zeros(0, 3), 4),
        "overflow nearest": lambda: overflow("minibatch"),
        "exclude unmatched (warning)": lambda: as_warning_error(
            lambda: adaround(_seeded(_tiny), [torch.randn(16, 8)], AdaRoundConfig(iterations=2, exclude=["fc*"]))),
        "nothing held out (warning)": lambda: as_warning_error(
            lambda: adaround(_seeded(_tiny), [torch.randn(3, 8)], fast)),
        "overflow loss": lambda: overflow("moments"),
    }


def _error_cases() -> list[Any]:
    from lightning_adaround import AdaRoundCallback, AdaRoundConfig, PerChannel, adaround, round_to_nearest

    fast = dict(iterations=2)
    x = [torch.randn(4, 8)]

    def datamodule_fails():
        class BrokenData:
            def train_dataloader(self):
                raise RuntimeError("setup() was not called")

        cb = AdaRoundCallback()
        cb.calibration_batches(SimpleNamespace(datamodule=BrokenData()), None)

    def no_data():
        cb = AdaRoundCallback()
        cb.calibration_batches(
            SimpleNamespace(datamodule=None, train_dataloader=None, val_dataloaders=None), None,
        )

    def sharded():
        FSDPStrategy = type("FSDPStrategy", (), {})
        AdaRoundCallback().setup(SimpleNamespace(strategy=FSDPStrategy()), None, "fit")

    def nan_input():
        adaround(_tiny(), [torch.full((4, 8), float("nan"))], AdaRoundConfig(**fast))

    def shapes_differ():
        conv = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten())
        config = AdaRoundConfig(loss_form="minibatch", **fast)
        adaround(conv, [torch.randn(2, 1, 8, 8), torch.randn(2, 1, 9, 9)], config)

    cases = {
        "bits float": lambda: AdaRoundConfig(bits=4.0),
        "bits range": lambda: AdaRoundConfig(bits=9),
        "layer_bits range": lambda: AdaRoundConfig(layer_bits={"fc": 16}),
        "scale_method": lambda: AdaRoundConfig(scale_method="max"),
        "output scale without data": lambda: round_to_nearest(_tiny(), AdaRoundConfig(scale_method="output")),
        "loss_form": lambda: AdaRoundConfig(loss_form="exact"),
        "granularity str": lambda: AdaRoundConfig(granularity="per_channel"),
        "iterations": lambda: AdaRoundConfig(iterations=0),
        "lr": lambda: AdaRoundConfig(lr=0.0),
        "upstream_correction": lambda: AdaRoundConfig(upstream_correction=1.5),
        "reg_lambda": lambda: AdaRoundConfig(reg_lambda=-1.0),
        "warm_start": lambda: AdaRoundConfig(warm_start=1.0),
        "holdout": lambda: AdaRoundConfig(holdout_fraction=1.0),
        "beta": lambda: AdaRoundConfig(beta_start=2.0, beta_end=20.0),
        "layers str": lambda: AdaRoundConfig(layers="fc"),
        "cache budget": lambda: AdaRoundConfig(host_cache_bytes=-1),
        "cache dtype": lambda: AdaRoundConfig(cache_dtype=torch.int8),
        "cache dir": lambda: AdaRoundConfig(cache_dir="/no/such/dir"),
        "run_on": lambda: AdaRoundCallback(run_on="test"),
        "bits twice callback": lambda: AdaRoundCallback(bits=3, config=AdaRoundConfig(iterations=20)),
        "config type callback": lambda: AdaRoundCallback(config={"bits": 4}),
        "num_calibration_samples": lambda: AdaRoundCallback(num_calibration_samples=0),
        "forward_fn": lambda: AdaRoundCallback(forward_fn="model"),
        "empty": lambda: adaround(_tiny(), [], AdaRoundConfig(**fast)),
        "no layer": lambda: adaround(_tiny(), x, AdaRoundConfig(layers=["head*"], **fast)),
        "layer_types": lambda: adaround(_tiny(), x, AdaRoundConfig(layer_types=(nn.ReLU,), **fast)),
        "forward failed": lambda: adaround(_tiny(), [torch.randn(4, 5)], AdaRoundConfig(**fast)),
        "batch type": lambda: adaround(_tiny(), ["some text"], AdaRoundConfig(**fast)),
        "axis": lambda: adaround(_tiny(), x, AdaRoundConfig(granularity=PerChannel(axis=3), **fast)),
        "moments activation": lambda: adaround(
            _tiny(), x, AdaRoundConfig(loss_form="moments", **fast), activations={"0": torch.relu},
        ),
        "nan": nan_input,
        "shapes": shapes_differ,
        "callback empty": lambda: AdaRoundCallback(calibration_data=[]).calibration_batches(None, None),
        "datamodule fails": datamodule_fails,
        "no data": no_data,
        "sharded": sharded,
        "no process group": lambda: _distributed().distributed_adaround(_tiny(), x, AdaRoundConfig(**fast)),
        "shard rank": lambda: _distributed().shard_calibration(x, 2, 2),
        **_bad_weight_cases(),
        **_checkpoint_cases(),
    }
    cases.update(_export_error_cases())
    cases.update(_fold_cases())
    cases.update(_block_cases())
    cases.update(_equalize_cases())
    return [pytest.param(trigger, id=name) for name, trigger in cases.items()]


class _TwoArgBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x, scale=1.0):
        if isinstance(x, tuple):  # called with its input wrapped in a tuple
            (x,) = x
        return self.b(torch.relu(self.a(x))) * scale


class _AsDict(nn.Module):
    def forward(self, x):
        return {"y": x}


class _WithBlock(nn.Module):
    """A model whose ``block`` can be called twice, with a per-batch scalar, or return a dict."""

    def __init__(self, how: str = ""):
        super().__init__()
        self.block = _TwoArgBlock()
        self.how = how

    def forward(self, x):
        if self.how == "twice":
            return self.block(self.block(x))
        if self.how == "tuple":
            return self.block((x,))
        if self.how == "scale":
            return self.block(x, x.sum())
        return self.block(x)


def _block_cases() -> dict[str, Callable[[], Any]]:
    """Block reconstruction's errors and warning (raised as an error so its text can be checked)."""
    from lightning_adaround import AdaRoundCallback, AdaRoundConfig, adaround

    x = [torch.randn(8, 8, generator=torch.Generator().manual_seed(i)) for i in range(2)]

    def run(blocks=None, how="", **kwargs):
        config = AdaRoundConfig(iterations=2, reconstruction="block", blocks=blocks, **kwargs.pop("config", {}))
        adaround(_seeded(lambda: _WithBlock(how)), x, config, **kwargs)

    def no_block_found():
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            adaround(_tiny(), x, AdaRoundConfig(iterations=2, reconstruction="block"))

    fisher = {"block_loss": "fisher"}
    return {
        "block: reconstruction": lambda: AdaRoundConfig(reconstruction="blocks"),
        "block: block_loss": lambda: AdaRoundConfig(reconstruction="block", block_loss="kl"),
        "block: blocks str": lambda: AdaRoundConfig(reconstruction="block", blocks="features.*"),
        "block: not block mode": lambda: AdaRoundConfig(blocks=["features.*"]),
        "block: fisher without task_loss": lambda: run(["block"], config=fisher),
        "block: no match": lambda: run(["features.*"]),
        "block: run of a non-sequential": lambda: run(["block[0:2]"]),
        "block: run out of range": lambda: adaround(
            _tiny(), x, AdaRoundConfig(iterations=2, reconstruction="block", blocks=["[1:5]"]),
        ),
        "block: no layer": lambda: adaround(
            _tiny(), x, AdaRoundConfig(iterations=2, reconstruction="block", blocks=["1"]),
        ),
        "block: overlap": lambda: run(["block", "block.a"]),
        "block: called twice": lambda: run(["block"], "twice"),
        "block: input not a tensor": lambda: run(["block"], "tuple"),
        "block: changing argument": lambda: run(["block"], "scale"),
        "block: output not a tensor": lambda: adaround(
            nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), _AsDict()), x,
            AdaRoundConfig(iterations=2, reconstruction="block", blocks=["[0:4]"]),
        ),
        "block: shapes": lambda: adaround(
            nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Conv2d(2, 2, 3)),
            [torch.randn(2, 1, 8, 8), torch.randn(2, 1, 9, 9)],
            AdaRoundConfig(iterations=2, reconstruction="block", blocks=["[0:3]"]),
        ),
        "block: nan": lambda: adaround(
            _seeded(_WithBlock), [torch.full((4, 8), float("nan"))],
            AdaRoundConfig(iterations=2, reconstruction="block", blocks=["block"]),
        ),
        "block: fisher zero": lambda: run(["block"], config=fisher, task_loss=lambda out, batch: (out * 0).sum()),
        "block: fisher unused": lambda: run(
            ["block"], config=fisher, task_loss=lambda out, batch: torch.ones((), requires_grad=True) * batch.sum(),
        ),
        "block: fisher not scalar": lambda: run(["block"], config=fisher, task_loss=lambda out, batch: out),
        "block: none found (warning)": no_block_found,
        "block: task_loss callback": lambda: AdaRoundCallback(task_loss="cross_entropy"),
    }


def _fold_cases() -> dict[str, Callable[[], Any]]:
    """fold_batchnorm's errors, and its warnings raised as errors so their text can be checked."""
    from lightning_adaround import fold_batchnorm

    def as_error(make_model: Callable[[], nn.Module]) -> Callable[[], Any]:
        def run():
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                fold_batchnorm(make_model())
        return run

    class Side(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.BatchNorm1d(8)
            self.fc = nn.Linear(8, 4)

        def forward(self, x):
            return self.fc(self.norm(x))

    no_stats = lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False))  # noqa: E731
    parametrized = lambda: nn.Sequential(  # noqa: E731
        torch.nn.utils.parametrizations.weight_norm(nn.Conv2d(3, 4, 3)), nn.BatchNorm2d(4))
    return {
        "fold: no feeding layer (warning)": as_error(Side),
        "fold: parametrized layer (warning)": as_error(parametrized),
        "fold: cannot fold (warning)": as_error(no_stats),
        "fold: unknown name": lambda: fold_batchnorm(no_stats(), pairs=[("conv", "1")]),
        "fold: not a batchnorm": lambda: fold_batchnorm(no_stats(), pairs=[("1", "0")]),
    }


def _equalize_cases() -> dict[str, Callable[[], Any]]:
    """equalize_layers' errors and warnings (as errors), the equalize and bias_correction options."""
    from lightning_adaround import AdaRoundCallback, AdaRoundConfig, equalize_layers

    def as_error(make_model: Callable[[], nn.Module], **kwargs: Any) -> Callable[[], Any]:
        def run():
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                equalize_layers(make_model(), **kwargs)
        return run

    class Relu6Call(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x):
            return self.b(nn.functional.relu6(self.a(x)))

    def shared_relu6() -> nn.Module:
        act = nn.ReLU6()
        return nn.Sequential(nn.Conv2d(3, 4, 3), act, nn.Conv2d(4, 4, 1), act)

    def between(*middle: nn.Module, first: Any = None, second: Any = None) -> Callable[[], nn.Module]:
        return lambda: nn.Sequential(first or nn.Conv2d(3, 4, 3), *middle, second or nn.Conv2d(4, 4, 1))

    linear = lambda: nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 2))  # noqa: E731
    return {
        "equalize: shared relu6 (warning)": as_error(shared_relu6),
        "equalize: relu6 call (warning)": as_error(Relu6Call),
        "equalize: unfolded (warning)": as_error(between(nn.BatchNorm2d(4), nn.ReLU())),
        "equalize: no statistics (warning)": as_error(between(nn.BatchNorm2d(4, track_running_stats=False), nn.ReLU())),
        "equalize: silu (warning)": as_error(between(nn.SiLU())),
        "equalize: transposed (warning)": as_error(between(nn.ReLU(), first=nn.ConvTranspose2d(3, 4, 3))),
        "equalize: reshape (warning)": as_error(between(nn.ReLU(), second=nn.Linear(4, 2))),
        "equalize: channels (warning)": as_error(linear, pairs=[("0", "0")]),
        "equalize: unknown name": as_error(linear, pairs=[("fc", "2")]),
        "equalize: not a layer": as_error(linear, pairs=[("0", "1")]),
        "equalize: parametrized (warning)": as_error(between(nn.ReLU(), second=nn.utils.parametrizations.weight_norm(
            nn.Conv2d(4, 4, 1)))),
        "equalize option": lambda: AdaRoundCallback(config=AdaRoundConfig(equalize="yes")),
        "equalize config option": lambda: AdaRoundConfig(equalize="yes"),
        "fold_batchnorm option": lambda: AdaRoundConfig(fold_batchnorm="yes"),
        "bias_correction option": lambda: AdaRoundConfig(bias_correction="yes"),
    }


def _export_error_cases() -> dict[str, Callable[[], Any]]:
    """The messages of lightning_adaround.io.export and .onnx_export, on a tiny rounded model."""
    import copy
    import tempfile
    from unittest import mock

    from lightning_adaround import (
        AdaRoundConfig, adaround, export_onnx, export_quantized, load_quantized, use_float_weights,
    )
    from lightning_adaround.io.onnx_export import quantize_initializers

    def rounded(**kwargs):
        torch.manual_seed(0)
        model = _tiny()
        return model, adaround(model, [torch.randn(4, 8)], AdaRoundConfig(iterations=2, **kwargs))

    def load_edited(edit=None, target=None, raw=None):
        model, result = rounded()
        with tempfile.TemporaryDirectory() as folder:
            path = f"{folder}/model.pt"
            export_quantized(model, result, path)
            if edit is not None:
                payload = torch.load(path, weights_only=True)
                edit(payload)
                torch.save(payload, path)
            if raw is not None:
                with open(path, "wb") as f:
                    f.write(raw)
            load_quantized(target if target is not None else copy.deepcopy(model), path)

    def onnx_graph(opset=18, initializers=()):
        from onnx import helper

        graph = helper.make_graph([], "g", [], [], initializer=list(initializers))
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])

    def fp16_initializer():
        from onnx import TensorProto, helper

        return helper.make_tensor("0.weight", TensorProto.FLOAT16, [4, 8], [0.0] * 32)

    def onnx_missing():
        with mock.patch.dict(sys.modules, {"onnx": None}):
            export_onnx(*rounded(), "model.onnx", torch.randn(1, 8))

    wider = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 3))
    return {
        "export result type": lambda: export_quantized(_tiny(), None, "model.pt"),
        "export layer missing": lambda: export_quantized(nn.Linear(8, 4), rounded()[1], "model.pt"),
        "export layer shape": lambda: export_quantized(wider, rounded()[1], "model.pt"),
        "load unreadable": lambda: load_edited(raw=b"not a torch file"),
        "load format": lambda: load_edited(lambda p: p.pop("format")),
        "load version": lambda: load_edited(lambda p: p.update(version=2)),
        "load damaged": lambda: load_edited(lambda p: p["layers"]["0"].update(data=p["layers"]["0"]["data"][:-1])),
        "load does not fit": lambda: load_edited(target=nn.Sequential(nn.Linear(8, 4))),
        "load shape": lambda: load_edited(target=wider),
        "no float weights": lambda: use_float_weights(*rounded()),
        "onnx missing": onnx_missing,
        "onnx kwargs": lambda: export_onnx(*rounded(), "model.onnx", torch.randn(1, 8), dynamo=False),
        "onnx opset": lambda: export_onnx(*rounded(), "model.onnx", torch.randn(1, 8), opset_version=13),
        "onnx old graph": lambda: quantize_initializers(onnx_graph(opset=11), rounded()[1]),
        "onnx no initializer": lambda: quantize_initializers(onnx_graph(), rounded()[1]),
        "onnx initializer type": lambda: quantize_initializers(onnx_graph(initializers=[fp16_initializer()]), rounded()[1]),
    }


def as_warning_error(run: Callable[[], Any]) -> Any:
    """Run with warnings raised as errors, so a warning's text can be checked like an error's."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return run()


def _normalized(text: str) -> str:
    return " ".join(text.split())


@pytest.mark.parametrize("trigger", _error_cases())
def test_troubleshooting_quotes_the_real_message(trigger):
    message = _normalized(str(_raises(trigger)))
    page = _normalized((DOCS / "troubleshooting.md").read_text(encoding="utf-8"))
    assert message in page, f"docs/troubleshooting.md does not quote this message verbatim:\n{message}"


# --------------------------------------------------------------------------- the site

needs_mkdocs = pytest.mark.skipif(
    importlib.util.find_spec("mkdocs") is None,
    reason="mkdocs is not installed (pip install mkdocs, or the [dev] extra): docs site not built",
)


def _mkdocs_build(config: Path, site: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--clean", "-f", str(config), "-d", str(site)],
        capture_output=True, text=True, timeout=120,
    )


@needs_mkdocs
def test_mkdocs_build_strict(tmp_path):
    build = _mkdocs_build(ROOT / "mkdocs.yml", tmp_path / "site")
    assert build.returncode == 0, build.stdout + build.stderr
    for page in ("index", "quickstart", "how-it-works", "configuration", "choosing-bits",
                 "multi-gpu", "export", "reliability", "troubleshooting", "ptq-toolbox"):
        html = tmp_path / "site" / ("index.html" if page == "index" else f"{page}/index.html")
        assert html.is_file(), page
        text = html.read_text(encoding="utf-8")
        # A fence Markdown did not recognise (e.g. indented in a list) renders as inline code.
        assert not re.search(r"<code>(python|text|bash|yaml)\s", text), f"{page}: a code fence was not parsed"


@needs_mkdocs
@pytest.mark.parametrize(
    "where, breakage, expected",
    [
        ("docs/index.md", "\nSee [a page that does not exist](no-such-page.md).\n", "no-such-page.md"),
        ("docs/index.md", "\nSee [a missing section](quickstart.md#no-such-section).\n", "no-such-section"),
        ("mkdocs.yml", None, "missing-page.md"),
    ],
    ids=["broken-link", "broken-anchor", "missing-nav-file"],
)
def test_mkdocs_strict_fails_on_broken_docs(tmp_path, where, breakage, expected):
    copy = tmp_path / "project"
    shutil.copytree(DOCS, copy / "docs", ignore=shutil.ignore_patterns("__pycache__"))
    config_text = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    if where == "mkdocs.yml":
        config_text = config_text.replace("\nnav:\n", "\nnav:\n  - Missing: missing-page.md\n", 1)
        assert "missing-page.md" in config_text
    else:
        page = copy / where
        page.write_text(page.read_text(encoding="utf-8") + breakage, encoding="utf-8")
    (copy / "mkdocs.yml").write_text(config_text, encoding="utf-8")
    build = _mkdocs_build(copy / "mkdocs.yml", tmp_path / "site")
    assert build.returncode != 0, "strict build passed despite " + expected
    assert expected in build.stdout + build.stderr


def test_the_module_map_lists_every_module():
    """docs/how-it-works.md's module map names each module of the package once, and no other."""
    page = (DOCS / "how-it-works.md").read_text(encoding="utf-8")
    section = page[page.index("## The code: a map of the modules"):]
    listed, folder = set(), ""
    for row in re.findall(r"^\|\s*([^|]*?)\s*\|\s*`(\w+)`\s*\|", section, flags=re.M):
        folder = row[0].strip("`/ ") if row[0].strip() else folder
        listed.add(row[1] if folder in ("", "(top)") else f"{folder}/{row[1]}")
    package = Path(__file__).resolve().parents[1] / "lightning_adaround"
    found = {
        str(p.relative_to(package).with_suffix("")) for p in package.rglob("*.py")
        if p.name != "__init__.py" or p.parent.name == "distributed"
    }
    assert listed == found, (sorted(found - listed), sorted(listed - found))
