"""What a rounding run did, per layer: grid, integer weights, errors, time.

Kept small and plain (tensors on CPU, numbers) so it can be logged, printed, checkpointed
and exported without the model at hand.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import Tensor

from lightning_adaround.grid.quant import expand_groups, group_size_of


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

    @property
    def group_size(self) -> Optional[int]:
        """Inputs per scale of a ``PerGroup`` grid (scale ``(out, G)``); ``None`` per tensor or per channel.

        Read from the shapes (see ``quant.group_count``), so results and files need no extra field.
        """
        return group_size_of(self.scale.shape, self.integer_weight.shape)

    def dequantized_weight(self) -> Tensor:
        """``(integer_weight - zero_point) * scale``: the weight written into the model, bit for bit."""
        group_size = self.group_size
        scale, zero_point = self.scale, self.zero_point
        if group_size is not None:
            shape = self.integer_weight.shape
            scale, zero_point = expand_groups(scale, shape, group_size), expand_groups(zero_point, shape, group_size)
        return (self.integer_weight.float() - zero_point) * scale

    def state(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "LayerResult":
        return cls(**state)


# why a module kept float weights (``FloatModule.kind``)
UNSUPPORTED = "unsupported"  # a type the library does not round (Embedding, LSTM, MultiheadAttention...)
EXCLUDED = "excluded"  # a supported layer left out by ``layers``, ``exclude`` or ``layer_types``
UNREACHED = "unreached"  # a selected layer no calibration batch called
NOT_CALLED = "not called"  # a selected layer whose weight the forward pass reads without calling the layer
NORM_OR_BIAS = "norm/bias"  # only 1-D parameters (norm scales, biases): normally kept in float
FLOAT_KINDS = (UNSUPPORTED, EXCLUDED, UNREACHED, NOT_CALLED, NORM_OR_BIAS)


@dataclass
class FloatModule:
    """A module that owns parameters none of which were rounded, and why."""

    type: str  # the module's class name
    kind: str  # one of ``FLOAT_KINDS``
    reason: str  # why, in a few words
    advice: str = ""  # what to do about it
    parameters: int = 0  # elements of its own (not its children's) parameters
    largest_matrix: int = 0  # elements of its largest 2-D+ parameter (0: vectors only)

    def __str__(self) -> str:
        return f"{self.reason}: {self.advice}" if self.advice else self.reason


@dataclass
class AdaRoundResult:
    layers: dict[str, LayerResult] = field(default_factory=dict)
    unreached: list[str] = field(default_factory=list)
    restored: list[str] = field(default_factory=list)  # layers read back from checkpoint_dir, not recomputed
    folded: list[tuple[str, str]] = field(default_factory=list)  # (layer, BatchNorm) pairs folded before rounding
    equalized: list[tuple[str, str]] = field(default_factory=list)  # (layer1, layer2) pairs equalized before rounding
    # every module that owns parameters and kept them all in float: name -> type, kind and reason
    float_modules: dict[str, FloatModule] = field(default_factory=dict)

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
        if any(r.bias_shift is not None for r in self.layers.values()):  # bias correction ran
            header = header[:-1] + ("bias shift",) + header[-1:]
            shifts = [_shift_cell(r) for r in self.layers.values()]
            rows = [row[:-1] + (shift,) + row[-1:] for row, shift in zip(rows, shifts)]
        return "\n".join(_table(header, rows) + self._float_section())

    def _float_section(self) -> list[str]:
        """The "left in float" section: one row per module with a weight matrix, norm/bias-only ones counted."""
        found = dict(self.float_modules)
        for name in self.unreached:  # a result saved before float_modules existed
            found.setdefault(name, FloatModule("-", UNREACHED, "unreached: no calibration batch called it"))
        if not found:
            return []
        listed = {n: m for n, m in found.items() if m.kind != NORM_OR_BIAS}
        small = {n: m for n, m in found.items() if m.kind == NORM_OR_BIAS}
        total = sum(m.parameters for m in found.values())
        lines = ["", f"left in float: {len(found)} module{'s' if len(found) != 1 else ''}, {total:,} parameters not rounded"]
        advice: list[str] = []  # numbered once each, below the table
        rows = []
        for n, m in listed.items():
            if m.advice and m.advice not in advice:
                advice.append(m.advice)
            mark = f" [{advice.index(m.advice) + 1}]" if m.advice else ""
            rows.append((n, m.type, f"{m.parameters:,}" if m.parameters else "-", m.reason + mark))
        if rows:
            lines += _table(("module", "type", "parameters", "why"), rows)
        if small:
            counts: dict[str, int] = {}
            for m in small.values():
                counts[m.type] = counts.get(m.type, 0) + 1
            kinds = ", ".join(f"{c} {t}" for t, c in counts.items())
            lines.append(
                f"norm/bias parameters only (normally kept in float): {kinds} "
                f"({sum(m.parameters for m in small.values()):,} parameters)"
            )
        lines += [f"[{i}] {text}" for i, text in enumerate(advice, start=1)]
        return lines

    def state_dict(self) -> dict[str, Any]:
        return {
            "layers": {name: r.state() for name, r in self.layers.items()},
            "unreached": list(self.unreached),
            "restored": list(self.restored),
            "folded": [list(pair) for pair in self.folded],
            "equalized": [list(pair) for pair in self.equalized],
            "float_modules": {name: dict(m.__dict__) for name, m in self.float_modules.items()},
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> "AdaRoundResult":
        return cls(
            layers={n: LayerResult.from_state(s) for n, s in state["layers"].items()},
            unreached=list(state.get("unreached", [])),
            restored=list(state.get("restored", [])),
            folded=[tuple(pair) for pair in state.get("folded", [])],
            equalized=[tuple(pair) for pair in state.get("equalized", [])],
            float_modules={name: FloatModule(**m) for name, m in state.get("float_modules", {}).items()},
        )


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    """Left-aligned columns under a header and a rule."""
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(header)]
    lines = [
        "  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip(),
        "  ".join("-" * w for w in widths),
    ]
    return lines + ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]


def _shift_cell(r: LayerResult) -> str:
    """Max ``|shift|`` added to the bias, or only measured for a layer without one."""
    if r.bias_shift_max is None:
        return "-"
    return f"{r.bias_shift_max:.2e}" + ("" if r.bias_corrected else " (no bias)")


def compact_integer(weight_int: Tensor, qmin: int, qmax: int) -> Tensor:
    """Integer weights in the smallest dtype that holds ``[qmin, qmax]`` (int8 or uint8)."""
    dtype = torch.uint8 if qmin >= 0 else torch.int8
    return weight_int.detach().round().to(torch.int16).clamp(qmin, qmax).to(dtype).cpu()
