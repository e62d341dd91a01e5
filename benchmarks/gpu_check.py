"""One prepared check for a machine with a GPU: the CUDA tests, a CPU-suite selection, a timing table.

    PYTHONPATH=. python benchmarks/gpu_check.py --out $OUT/gpu_check.txt          # about 5-8 minutes on an H200
    PYTHONPATH=. python benchmarks/gpu_check.py --quick                            # smaller timing shapes
    PYTHONPATH=. python benchmarks/gpu_check.py --device cpu --quick               # dry run without a GPU

1. Tests, in two subprocesses at once: ``pytest tests/test_cuda.py`` (the CUDA cases; with
   ``--device cpu`` they run on the CPU through ``LIGHTNING_ADAROUND_TEST_DEVICE=cpu``) and a
   selection of the CPU suite most likely to break on another torch version (functional_call,
   memory-mapped caches, inference mode, Lightning hooks, gloo DDP, ONNX export). Files whose
   optional packages are missing (scikit-learn, hypothesis, onnxscript, ...) are left out and
   named. Each run has a hard timeout; its log also goes next to ``--out``.
2. Timing on the device, in this process: one step of each form against the irreducible layer
   work (``bench.irreducible_step``: the layer's forward plus weight gradient with a fixed weight)
   for ``bench.layer_cases``; then whole ``adaround()`` runs of the speed CNN (``bench.model_cases``)
   and a ResNet-18-shaped net (BasicBlock [2, 2, 2, 2], random weights, BatchNorm statistics from
   a few train-mode passes, synthetic images), minibatch and moments forms (and block
   reconstruction for ResNet-18), float32 and bf16: seconds, per-step time, that time over the
   irreducible step of all layers, peak GPU memory. A case that fails prints its error in the
   table; the whole section stops at a hard time guard.

Everything printed also goes to ``--out``. The exit status is 1 when a test failed, a test run
timed out, or a timing case failed; the table is printed either way.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import os
import signal
import subprocess
import sys
import time
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # before any CUDA work here

import torch  # noqa: E402
from torch import nn  # noqa: E402

import bench  # noqa: E402  (the speed CNN, the layer cases, the irreducible step, the table printer)
from lightning_adaround import AdaRoundConfig, adaround  # noqa: E402
from lightning_adaround.data.unit import Unit, UnitData  # noqa: E402
from lightning_adaround.model.layers import SUPPORTED_LAYER_TYPES  # noqa: E402
from lightning_adaround.grid.loss import BetaSchedule  # noqa: E402
from lightning_adaround.data.moments import LayerMoments  # noqa: E402
from lightning_adaround.engine.objective import MinibatchObjective, MomentsObjective  # noqa: E402
from lightning_adaround.engine.optimize import optimize_rounding  # noqa: E402
from lightning_adaround.grid.quant import PerChannel, choose_grid  # noqa: E402
from lightning_adaround.grid.rounding import RoundingVariable  # noqa: E402

# (file, packages it needs beyond torch/lightning/pytest); run with LIGHTNING_ADAROUND_QUICK=1
CPU_SELECTION: list[tuple[str, tuple[str, ...]]] = [
    ("tests/test_rounding.py", ()),
    ("tests/test_moments.py", ()),
    ("tests/test_layers.py", ()),
    ("tests/test_cache.py", ()),
    ("tests/test_chain.py", ()),
    ("tests/test_quant.py", ()),
    ("tests/test_loss.py", ()),
    ("tests/test_model_intact.py", ()),
]
CPU_SELECTION_FULL_ONLY: list[tuple[str, tuple[str, ...]]] = [
    ("tests/test_api.py", ()),
    ("tests/test_resume.py", ()),
    ("tests/test_callback.py", ()),  # its optional-package cases are deselected below when missing
    ("tests/test_bad_inputs.py", ("hypothesis",)),
    ("tests/test_ddp.py", ()),
    ("tests/test_export.py", ("sklearn", "hypothesis", "onnx", "onnxscript", "onnxruntime")),
]
# -k terms for cases that need a package that may be missing on a bare GPU machine
OPTIONAL_CASES = [
    ("tensorboard", "tensorboard"), ("matplotlib", "report_png"), ("rich", "RichProgressBar"),
    ("jsonargparse", "lightning_cli"), ("pytorch_lightning", "pytorch_lightning"),
]


# ----------------------------------------------------------------------------- output to console and file


class Tee:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(path, "w", buffering=1)
        self.console = sys.stdout

    def write(self, text: str) -> int:
        self.console.write(text)
        self.file.write(text)
        return len(text)

    def flush(self) -> None:
        self.console.flush()
        self.file.flush()


def has(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


# ----------------------------------------------------------------------------- 1. tests


def start_pytest(args: list[str], log: Path, extra_env: dict[str, str]) -> subprocess.Popen:
    env = dict(os.environ, **extra_env)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    env.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    command = [sys.executable, "-m", "pytest", *args, "-q", "-p", "no:cacheprovider", "-rfE", "--durations=8"]
    handle = open(log, "w")
    handle.write("$ " + " ".join(command) + "\n")
    handle.flush()
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT,
                            start_new_session=True)  # its own process group: a timeout kills DDP children too
    proc._log_handle = handle  # type: ignore[attr-defined]
    return proc


def finish_pytest(proc: subprocess.Popen, deadline: float) -> tuple[Optional[int], bool]:
    """(return code, timed out)."""
    timed_out = False
    try:
        proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        timed_out = True
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
    proc._log_handle.close()  # type: ignore[attr-defined]
    return proc.returncode, timed_out


def summary_line(text: str) -> str:
    for line in reversed(text.strip().splitlines()):
        if any(word in line for word in ("passed", "failed", "error", "no tests ran", "skipped")):
            return line.strip("= ").strip()
    return "(no pytest summary line)"


def run_tests(args: argparse.Namespace, out: Path) -> list[dict[str, Any]]:
    selection = CPU_SELECTION + ([] if args.quick else CPU_SELECTION_FULL_ONLY)
    files, left_out = [], []
    for path, needs in selection:
        missing = [m for m in needs if not has(m)]
        (left_out.append(f"{path} (needs {', '.join(missing)})") if missing else files.append(path))
    deselect = [term for module, term in OPTIONAL_CASES if not has(module)]
    cpu_args = list(files) + (["-k", " and ".join(f"not {t}" for t in deselect)] if deselect else [])
    cuda_env = {"LIGHTNING_ADAROUND_TEST_DEVICE": "cpu"} if args.device == "cpu" else {}
    runs = [
        ("CUDA tests (tests/test_cuda.py)", ["tests/test_cuda.py"], cuda_env, args.cuda_test_timeout, "cuda_tests"),
        ("CPU-suite selection", cpu_args, {"LIGHTNING_ADAROUND_QUICK": "1"}, args.cpu_test_timeout, "cpu_tests"),
    ]
    print("\n== 1. Tests ==")
    if left_out:
        print("left out of the CPU selection (missing packages): " + "; ".join(left_out))
    if deselect:
        print(f"CPU selection deselects cases needing missing packages: -k '{cpu_args[-1]}'")
    started = []
    for title, pytest_args, env, timeout, tag in runs:
        log = out.with_name(f"{out.stem}.{tag}.log")
        started.append((title, log, timeout, start_pytest(pytest_args, log, env), time.monotonic()))
    rows = []
    for title, log, timeout, proc, t0 in started:
        rc, timed_out = finish_pytest(proc, t0 + timeout)
        seconds = time.monotonic() - t0
        text = log.read_text(errors="replace")
        print(f"\n---- {title}: rc={rc}{' TIMED OUT after %d s' % timeout if timed_out else ''}, {seconds:.0f} s "
              f"(log: {log.name}) ----")
        print(text.rstrip())
        ok = rc == 0 and not timed_out
        rows.append({"run": title, "result": "ok" if ok else ("TIMEOUT" if timed_out else f"FAILED rc={rc}"),
                     "summary": summary_line(text), "seconds": seconds})
    return rows


# ----------------------------------------------------------------------------- 2. timing


class SectionTimeout(BaseException):
    """The section's hard time guard (a BaseException, so a case's ``except Exception`` lets it through)."""


@contextmanager
def time_guard(seconds: float):
    def expire(signum, frame):
        raise SectionTimeout(f"over its {seconds:.0f} s time guard")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.01))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_sync(fn: Callable[[], Any], repeat: int, device: torch.device) -> float:
    """Seconds per call, after one warm-up call; the device finishes its queue before each clock read."""
    fn()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) / repeat


class BasicBlock(nn.Module):
    """ResNet's two-3x3-conv block with a 1x1 projection shortcut when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + identity)


def resnet18(size: int, num_classes: int = 1000, seed: int = 0) -> nn.Module:
    """ResNet-18's shape (BasicBlock x [2, 2, 2, 2], 21 layers to round) as one ``nn.Sequential`` chain.

    Random weights; BatchNorm statistics averaged over four train-mode passes of synthetic images.
    """
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(3, 2, 1)]
    cin = 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
        cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, num_classes)]
    model = nn.Sequential(*layers)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for bn in norms:
        bn.momentum = None  # a cumulative average over the passes below
    model.train()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for _ in range(4):
            model(torch.randn(8, 3, size, size, generator=g))
    for bn in norms:
        bn.momentum = 0.1
    return model.eval()


def layer_inputs(model: nn.Module, batch: torch.Tensor) -> dict[str, tuple[nn.Module, torch.Tensor]]:
    """Each supported layer's input on one batch of the float model (for the irreducible step)."""
    seen: dict[str, tuple[nn.Module, torch.Tensor]] = {}

    def keep(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple) -> None:  # returns None: the forward's arguments stay as they are
            seen.setdefault(name, (module, args[0].detach()))
        return hook

    handles = [
        module.register_forward_pre_hook(keep(name))
        for name, module in model.named_modules() if isinstance(module, SUPPORTED_LAYER_TYPES)
    ]
    try:
        with torch.no_grad():
            model(batch)
    finally:
        for h in handles:
            h.remove()
    return seen


def irreducible_per_step(model: nn.Module, batch: torch.Tensor, device: torch.device, repeat: int) -> tuple[float, int]:
    """(seconds of one irreducible step of every layer together, number of layers)."""
    total = 0.0
    inputs = layer_inputs(model, batch)
    for name, (layer, x) in inputs.items():
        weight_was = layer.weight.requires_grad
        layer.requires_grad_(False)
        with torch.no_grad():
            y = layer(x)
        total += timed_sync(bench.irreducible_step(layer, x, y), repeat, device)
        layer.weight.requires_grad_(weight_was)
    return total, len(inputs)


def per_step_rows(device: torch.device, quick: bool, steps: int, rows: list[dict[str, object]]) -> None:
    """``bench.layer_cases`` on the device, float32: one step of each form over the irreducible step.

    Rows are appended to ``rows`` as they are measured, so a time guard keeps the finished ones.
    """
    batch = 32
    for name, layer, shape in bench.layer_cases(quick):
        row: dict[str, object] = {"layer": name}
        try:
            layer = layer.to(device).requires_grad_(False)
            torch.manual_seed(0)
            inputs = torch.randn(4 * batch, *shape, device=device)
            with torch.no_grad():
                targets = layer(inputs)
            t_base = timed_sync(bench.irreducible_step(layer, inputs[:batch], targets[:batch]), steps, device)
            row["irreducible ms"] = 1e3 * t_base
            grid = choose_grid(layer.weight, 4, granularity=PerChannel(), method="minmax")
            data = UnitData(inputs, targets)
            schedule = BetaSchedule(steps)
            objectives = {
                "minibatch": lambda: MinibatchObjective(Unit.of_layer("layer", layer), data, data, batch,
                                                        torch.Generator().manual_seed(0), device),
                "moments": lambda: _moments_objective(layer, inputs, device),
            }
            for form, make in objectives.items():
                try:
                    objective = make()

                    def run(objective=objective):
                        rounding = RoundingVariable(layer.weight, grid)
                        optimize_rounding(rounding, objective, steps, 1e-3, 0.01, schedule)

                    t = timed_sync(run, 1, device) / steps
                    row[f"{form} step ms"] = 1e3 * t
                    row[f"{form} / irreducible"] = t / t_base
                except Exception as err:
                    row[f"{form} step ms"] = f"error: {_short(err)}"
        except Exception as err:
            row["error"] = _short(err)
        rows.append(row)
        print(f"  per-step {name}: done", flush=True)


def _moments_objective(layer: nn.Module, inputs: torch.Tensor, device: torch.device) -> MomentsObjective:
    moments = LayerMoments(layer, device)
    moments.add(inputs, None)
    return MomentsObjective(Unit.of_layer("layer", layer), moments, layer.weight.detach(), None, device)


def whole_run_cases(quick: bool) -> list[tuple[str, Callable[[], nn.Module], Callable[[], list[torch.Tensor]], int, tuple[str, ...]]]:
    """(name, model maker, calibration batches maker (CPU, float32), iterations, forms)."""
    speed_name, speed_make, speed_batches = bench.model_cases(quick)[0]
    size, samples = (64, 64) if quick else (224, 256)

    def resnet_batches() -> list[torch.Tensor]:
        g = torch.Generator().manual_seed(2)
        return [torch.randn(32, 3, size, size, generator=g) for _ in range(samples // 32)]

    return [
        (f"speed CNN ({speed_name}, bench.py)", speed_make, lambda: speed_batches, 50 if quick else 500,
         ("minibatch", "moments")),
        (f"ResNet-18 shape {size}px", lambda: resnet18(size), resnet_batches, 30 if quick else 200,
         ("minibatch", "moments", "block")),
    ]


def whole_run_rows(device: torch.device, quick: bool, rows: list[dict[str, object]]) -> None:
    """Whole runs per dtype, model and form; rows appended as they finish (see ``per_step_rows``)."""
    for dtype in (torch.float32, torch.bfloat16):
        for name, make, make_batches, iterations, forms in whole_run_cases(quick):
            dname = str(dtype).replace("torch.", "")
            base: dict[str, object] = {"model": name, "dtype": dname}
            try:
                calibration = [b.to(device, dtype) for b in make_batches()]
                built = make()  # once per case (ResNet-18's BatchNorm passes run on the CPU); copied per run
                reference = copy.deepcopy(built).to(device, dtype)
                irreducible, layers = irreducible_per_step(reference, calibration[0], device, 5 if quick else 20)
                del reference
            except Exception as err:
                rows.append({**base, "form": "-", "status": f"error: {_short(err)}"})
                continue
            for form in forms:
                row = {**base, "form": form, "iterations": iterations,
                       "samples": sum(b.shape[0] for b in calibration), "layers": layers}
                options = dict(reconstruction="block") if form == "block" else dict(loss_form=form)
                start = time.perf_counter()
                try:
                    model = copy.deepcopy(built).to(device, dtype)
                    peak0 = _reset_peak(device)
                    start = time.perf_counter()
                    result = adaround(model, calibration, AdaRoundConfig(bits=4, iterations=iterations, **options))
                    synchronize(device)
                    total = time.perf_counter() - start
                    capture = sum(r.capture_seconds for r in result.layers.values())
                    units = len({r.block or r.name for r in result.layers.values()})
                    step = (total - capture) / (iterations * units)
                    row.update({
                        "units": units, "seconds": total, "capture s": capture, "step ms": 1e3 * step,
                        "irreducible ms (all layers)": 1e3 * irreducible,
                        "steps / irreducible": (total - capture) / (iterations * irreducible),
                        "whole / irreducible": total / (iterations * irreducible),
                        "peak MiB": _peak_mib(device), "before MiB": peak0, "status": "ok",
                    })
                    del model, result
                except Exception as err:
                    row["status"] = f"error: {_short(err)}"
                    traceback.print_exc(file=sys.stdout)
                rows.append(row)
                print(f"  whole run {name} {dname} {form}: {row['status']} ({time.perf_counter() - start:.1f} s)",
                      flush=True)
            del calibration, built
            if device.type == "cuda":
                torch.cuda.empty_cache()


def _reset_peak(device: torch.device) -> object:
    if device.type != "cuda":
        return "-"
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device) / 2**20


def _peak_mib(device: torch.device) -> object:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else "-"


def _short(err: BaseException) -> str:
    text = " ".join(f"{type(err).__name__}: {err}".split())
    return text if len(text) <= 200 else text[:197] + "..."


def run_timing(args: argparse.Namespace, device: torch.device) -> tuple[list[dict[str, object]], list[dict[str, object]], list[str]]:
    per_step: list[dict[str, object]] = []
    whole: list[dict[str, object]] = []
    problems: list[str] = []
    print("\n== 2. Timing ==")
    if device.type == "cuda":
        print(f"device: {torch.cuda.get_device_name(device)}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
              f"cuDNN {torch.backends.cudnn.version()}, TF32 matmul {torch.backends.cuda.matmul.allow_tf32}, "
              f"TF32 conv {torch.backends.cudnn.allow_tf32}")
    else:
        print(f"device: CPU ({torch.get_num_threads()} threads), torch {torch.__version__}: timings say nothing about a GPU")
    t0 = time.monotonic()
    try:
        with time_guard(args.timing_budget):
            per_step_rows(device, args.quick, 10 if args.quick else 50, per_step)
            whole_run_rows(device, args.quick, whole)
    except SectionTimeout as err:
        problems.append(f"timing section stopped {err} after {time.monotonic() - t0:.0f} s; later cases not run")
    except Exception as err:  # a failure outside any case (device unusable?)
        problems.append(f"timing section failed: {_short(err)}")
        traceback.print_exc(file=sys.stdout)
    for row in per_step:
        for key, value in row.items():
            if isinstance(value, str) and value.startswith("error") or key == "error":
                problems.append(f"per-step {row['layer']}: {key} {value}")
    for row in whole:
        if row.get("status") != "ok":
            problems.append(f"whole run {row['model']} {row['dtype']} {row['form']}: {row.get('status')}")
    return per_step, whole, problems


# ----------------------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="gpu_check.txt", help="file that gets the full output (default: gpu_check.txt)")
    parser.add_argument("--quick", action="store_true", help="smaller timing shapes and iterations, fewer CPU tests")
    parser.add_argument("--device", default=None, help="cuda (default when available) or cpu (a dry run)")
    parser.add_argument("--skip-tests", action="store_true", help="timing only")
    parser.add_argument("--skip-timing", action="store_true", help="tests only")
    parser.add_argument("--cuda-test-timeout", type=float, default=200.0, help="seconds (default 200)")
    parser.add_argument("--cpu-test-timeout", type=float, default=200.0, help="seconds, runs beside the CUDA tests")
    parser.add_argument("--timing-budget", type=float, default=None,
                        help="hard guard on the timing section in seconds (default 180, 90 with --quick)")
    args = parser.parse_args()
    if args.timing_budget is None:
        args.timing_budget = 90.0 if args.quick else 180.0
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out = Path(args.out).resolve()
    tee = Tee(out)
    sys.stdout = tee
    sys.stderr = tee  # library warnings and tracebacks belong in the file too
    started = time.monotonic()
    print(f"gpu_check: {' '.join(sys.argv[1:]) or '(no options)'}; device {device}; torch {torch.__version__}; "
          f"python {sys.version.split()[0]}; CUDA available: {torch.cuda.is_available()}")
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: pass --device cpu for a dry run")
        return 2
    test_rows: list[dict[str, Any]] = []
    if not args.skip_tests:
        try:
            test_rows = run_tests(args, out)
        except Exception as err:
            traceback.print_exc(file=sys.stdout)
            test_rows = [{"run": "tests", "result": f"FAILED to run: {_short(err)}", "summary": "", "seconds": 0.0}]
    per_step, whole, problems = ([], [], [])
    if not args.skip_timing:
        per_step, whole, problems = run_timing(args, device)

    print("\n== Summary ==")
    bench.print_table("Tests", test_rows)
    bench.print_table(f"Per step on {device} (float32, minibatch of 32): one AdaRound step over the irreducible step "
                      "(the layer's forward + weight gradient)", per_step)
    bench.print_table(f"Whole adaround() runs on {device} (4 bits, per-channel): 'steps / irreducible' = optimisation "
                      "time over iterations x the irreducible step of every layer; 'whole' includes capture", whole)
    for problem in problems:
        print(f"PROBLEM: {problem}")
    failed = [r for r in test_rows if r["result"] != "ok"]
    print(f"\ngpu_check finished in {time.monotonic() - started:.0f} s: "
          f"{'tests OK' if test_rows and not failed else ('tests not run' if not test_rows else f'{len(failed)} test run(s) FAILED')}, "
          f"{len(problems)} timing problem(s).")
    tee.flush()
    return 1 if failed or problems else 0


if __name__ == "__main__":
    sys.exit(main())
