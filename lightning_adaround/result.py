"""What a rounding run did, per layer: grid, integer weights, errors, time.

Kept small and plain (tensors on CPU, numbers) so it can be logged, printed, checkpointed
and exported without the model at hand.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import Tensor


@dataclass
class LayerResult:
    name: str
    bits: int
    scale: Tensor
    zero_point: Tensor
    qmin: int
    qmax: int
    axis: Optional[int]
    integer_weight: Tensor
    nearest_mse: float
    adaround_mse: float
    iterations: int
    seconds: float
    num_samples: int
    eval_samples: int
    loss_form: str = "minibatch"
    with_activation: bool = False
    note: str = ""
    capture_seconds: float = 0.0  # part of ``seconds`` spent collecting calibration inputs
    cache_bytes: int = 0  # cached activations (minibatch) or moments plus held-out samples
    history: list[tuple[int, float, float, float]] = field(default_factory=list)  # (step, recon, reg, beta)
    float_weight: Optional[Tensor] = None  # the full-precision weight, with keep_float_weights=True
    block: str = ""  # the block it was rounded with (its MSEs are the block output's), or "" alone
    # bias_correction=True: the mean output error per output channel (float model minus rounded model)...
    bias_shift: Optional[Tensor] = None
    bias_corrected: bool = False  # ...applied: to the bias, or the following BatchNorm's running_mean (False: only reported)

    @property
    def bias_shift_max(self) -> Optional[float]:
        """The largest ``|bias_shift|`` (``None`` without bias correction)."""
        return float(self.bias_shift.abs().max()) if self.bias_shift is not None and self.bias_shift.numel() else None

    @property
    def improvement(self) -> float:
        """Nearest MSE over AdaRound MSE (>1: AdaRound did better)."""
        return self.nearest_mse / self.adaround_mse if self.adaround_mse > 0 else float("inf")

    def dequantized_weight(self) -> Tensor:
        return (self.integer_weight.float() - self.zero_point) * self.scale

    def state(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "LayerResult":
        return cls(**state)


@dataclass
class AdaRoundResult:
    layers: dict[str, LayerResult] = field(default_factory=dict)
    unreached: list[str] = field(default_factory=list)
    restored: list[str] = field(default_factory=list)  # layers read back from checkpoint_dir, not recomputed
    folded: list[tuple[str, str]] = field(default_factory=list)  # (layer, BatchNorm) pairs folded before rounding
    equalized: list[tuple[str, str]] = field(default_factory=list)  # (layer1, layer2) pairs equalized before rounding

    def summary_table(self) -> str:
        """A plain-text per-layer table: what a user reads at the end of a run."""
        header = ("layer", "bits", "form", "samples", "nearest MSE", "AdaRound MSE", "ratio", "seconds", "note")
        rows = [
            (
                r.name, str(r.bits), r.loss_form, str(r.num_samples), f"{r.nearest_mse:.3e}",
                f"{r.adaround_mse:.3e}", f"{r.improvement:.2f}x", f"{r.seconds:.1f}",
                "; ".join(filter(None, [r.note, "from checkpoint" if r.name in self.restored else ""])),
            )
            for r in self.layers.values()
        ]
        rows += [(name, "-", "-", "0", "-", "-", "-", "-", "unreached: left in float") for name in self.unreached]
        if any(r.bias_shift is not None for r in self.layers.values()):  # bias correction ran
            header = header[:-1] + ("bias shift",) + header[-1:]
            shifts = [_shift_cell(r) for r in self.layers.values()] + ["-"] * len(self.unreached)
            rows = [row[:-1] + (shift,) + row[-1:] for row, shift in zip(rows, shifts)]
        widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(header)]
        lines = [
            "  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip(),
            "  ".join("-" * w for w in widths),
        ]
        lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
        return "\n".join(lines)

    def state_dict(self) -> dict[str, Any]:
        return {
            "layers": {name: r.state() for name, r in self.layers.items()},
            "unreached": list(self.unreached),
            "restored": list(self.restored),
            "folded": [list(pair) for pair in self.folded],
            "equalized": [list(pair) for pair in self.equalized],
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> "AdaRoundResult":
        return cls(
            layers={n: LayerResult.from_state(s) for n, s in state["layers"].items()},
            unreached=list(state.get("unreached", [])),
            restored=list(state.get("restored", [])),
            folded=[tuple(pair) for pair in state.get("folded", [])],
            equalized=[tuple(pair) for pair in state.get("equalized", [])],
        )


def _shift_cell(r: LayerResult) -> str:
    """Max ``|shift|`` added to the bias, or only measured for a layer without one."""
    if r.bias_shift_max is None:
        return "-"
    return f"{r.bias_shift_max:.2e}" + ("" if r.bias_corrected else " (no bias)")


def compact_integer(weight_int: Tensor, qmin: int, qmax: int) -> Tensor:
    """Integer weights in the smallest dtype that holds ``[qmin, qmax]`` (int8 or uint8)."""
    dtype = torch.uint8 if qmin >= 0 else torch.int8
    return weight_int.detach().round().to(torch.int16).clamp(qmin, qmax).to(dtype).cpu()
