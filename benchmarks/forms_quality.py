"""Quality and memory of the two loss forms, side by side in one run.

    python benchmarks/forms_quality.py                # digits CNN, W2 and W3 (a few minutes)
    python benchmarks/forms_quality.py --minilm       # + MiniLM W4 per-channel and its memory

Digits: the CNN of ``examples/digits.py`` trained once, then rounded per-channel with the
moments form, the minibatch form without an activation in the loss, and the minibatch form
with the ReLU/BatchNorm in the loss; test accuracy (360 real digits) and agreement with the
full-precision predictions. MiniLM: cosine similarity of held-out embeddings to full
precision for both forms at equal iterations, and the peak memory of the moments form with
1x and 4x the calibration chunks (each in a fresh process).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

from bench import measure_in_fresh_process, print_table, reset_peak_memory, status_kib  # noqa: E402  (same folder)
from lightning_adaround import AdaRoundConfig, adaround, round_to_nearest  # noqa: E402

FORMS = [("moments", "moments", False), ("minibatch", "minibatch", False), ("minibatch + ReLU", "minibatch", True)]


def _predictions(net: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return net.eval()(x).argmax(-1)


def digits_rows(iterations: int) -> list[dict[str, object]]:
    import lightning as L

    from digits import DigitsClassifier, DigitsDataModule

    L.seed_everything(0, verbose=False)
    dm = DigitsDataModule()
    model = DigitsClassifier()
    L.Trainer(max_epochs=15, logger=False, enable_progress_bar=False, enable_model_summary=False,
              enable_checkpointing=False).fit(model, datamodule=dm)
    x_test, y_test = dm.splits["test"].tensors
    calibration = [b[0] for b in dm.calibration_dataloader()]
    fp = _predictions(model.net, x_test)
    rows = [{"model": "digits CNN", "bits": "-", "form": "full precision", "accuracy": float((fp == y_test).float().mean()),
             "agreement": 1.0, "seconds": 0.0}]
    for bits in (2, 3):
        nearest = copy.deepcopy(model.net)
        round_to_nearest(nearest, AdaRoundConfig(bits=bits))
        pred = _predictions(nearest, x_test)
        rows.append({"model": "digits CNN", "bits": bits, "form": "nearest", "accuracy": float((pred == y_test).float().mean()),
                     "agreement": float((pred == fp).float().mean()), "seconds": 0.0})
        for label, form, activation in FORMS:
            net = copy.deepcopy(model.net)
            config = AdaRoundConfig(bits=bits, iterations=iterations, loss_form=form, include_activation=activation)
            start = time.perf_counter()
            adaround(net, calibration, config)
            seconds = time.perf_counter() - start
            pred = _predictions(net, x_test)
            rows.append({"model": "digits CNN", "bits": bits, "form": label,
                         "accuracy": float((pred == y_test).float().mean()),
                         "agreement": float((pred == fp).float().mean()), "seconds": seconds})
    return rows


def minilm_rows(iterations: int, chunks: int) -> list[dict[str, object]]:
    import minilm

    rows = []
    for form in ("moments", "minibatch"):
        report = minilm.main(["--quiet", "--iterations", str(iterations), "--calibration-samples", str(chunks), "--loss-form", form])
        rows.append({"model": "MiniLM W4", "bits": 4, "form": form, "accuracy": "-",
                     "agreement": report["adaround"], "seconds": report["adaround_seconds"],
                     "nearest cosine": report["nearest"]})
    return rows


def _memory_case(chunks: int, carry: bool) -> dict[str, object]:
    """In a child process: resident high-water mark added by rounding MiniLM in moments form."""
    import minilm

    reset_peak_memory()
    report = minilm.main(["--quiet", "--iterations", "20", "--calibration-samples", str(chunks), "--loss-form", "moments",
                          *([] if carry else ["--no-carry"])])
    return {"chunks": chunks, "carry": carry, "peak MiB": status_kib("VmHWM") / 1024, "cosine @20 it": report["adaround"]}


def minilm_memory_rows(chunks: int) -> list[dict[str, object]]:
    return [measure_in_fresh_process(__file__, [n, carry]) for carry in (False, True) for n in (chunks, 4 * chunks)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=1000)
    parser.add_argument("--minilm", action="store_true", help="also MiniLM (about 15 minutes on 2 cores)")
    parser.add_argument("--minilm-iterations", type=int, default=500)
    parser.add_argument("--minilm-chunks", type=int, default=128)
    parser.add_argument("--memory-case", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_case:
        print(json.dumps(_memory_case(*json.loads(args.memory_case))))
        return
    print_table(f"Digits CNN, per-channel, {args.iterations} iterations per layer", digits_rows(args.iterations), 4)
    if args.minilm:
        print_table(f"MiniLM, W4 per-channel, {args.minilm_iterations} iterations, {args.minilm_chunks} chunks "
                    "(agreement = cosine to full precision)", minilm_rows(args.minilm_iterations, args.minilm_chunks), 4)
        print_table("MiniLM moments form: peak resident memory vs calibration size",
                    minilm_memory_rows(args.minilm_chunks), 4)


if __name__ == "__main__":
    main()
