"""The reconstruction term: how far the layer's output with a candidate weight is from the target.

An objective is anything with ``step_loss(weight)`` (a differentiable scalar for one
optimisation step) and ``mse(weight)`` (a plain number for reporting), so the optimiser
loop does not care how the term is computed.
"""

from __future__ import annotations

from typing import Callable, Optional, Protocol

import torch
from torch import Tensor, nn

from lightning_adaround.capture import LayerData
from lightning_adaround.layers import output_channel_dim, run_with_weight


class ReconstructionObjective(Protocol):
    form: str

    def step_loss(self, weight: Tensor) -> Tensor:
        """Reconstruction term for one step (summed over output channels, averaged over the rest)."""
        ...

    def mse(self, weight: Tensor) -> float:
        """Mean squared error per output element on the evaluation samples."""
        ...


class MinibatchObjective:
    """The paper's procedure: each step a random minibatch of cached samples, one forward.

    Samples are drawn without replacement from a fresh permutation per pass over the data,
    so every calibration sample reaches the optimiser equally often (give or take one).
    """

    form = "minibatch"

    def __init__(
        self,
        layer: nn.Module,
        train: LayerData,
        evaluation: LayerData,
        batch_size: int,
        activation: Optional[Callable[[Tensor], Tensor]],
        generator: torch.Generator,
        device: torch.device,
    ) -> None:
        self.layer = layer
        self.train = train
        self.evaluation = evaluation
        self.batch_size = min(batch_size, train.num_samples)
        self.activation = activation
        self.generator = generator
        self.device = device
        self.channel_dim = output_channel_dim(layer)
        self._order = torch.empty(0, dtype=torch.long)
        self._cursor = 0

    def _next_indices(self) -> Tensor:
        idx = self._order[self._cursor:self._cursor + self.batch_size]
        self._cursor += idx.numel()
        if idx.numel() < self.batch_size:  # pass finished: the rest comes from a fresh permutation
            self._order = torch.randperm(self.train.num_samples, generator=self.generator)
            self._cursor = self.batch_size - idx.numel()
            idx = torch.cat([idx, self._order[:self._cursor]])
        return idx

    def _output(self, inputs: Tensor, weight: Tensor) -> Tensor:
        out = run_with_weight(self.layer, inputs, weight)
        return self.activation(out) if self.activation is not None else out

    def step_loss(self, weight: Tensor) -> Tensor:
        idx = self._next_indices()
        x = self.train.inputs[idx.to(self.train.inputs.device)].to(self.device, non_blocking=True)
        y = self.train.targets[idx.to(self.train.targets.device)].to(self.device, non_blocking=True)
        return (self._output(x, weight) - y).pow(2).sum(dim=self.channel_dim).mean()

    @torch.no_grad()
    def mse(self, weight: Tensor, chunk: int = 256) -> float:
        data = self.evaluation
        total, count = 0.0, 0
        for start in range(0, data.num_samples, chunk):
            x = data.inputs[start:start + chunk].to(self.device)
            y = data.targets[start:start + chunk].to(self.device)
            err = self._output(x, weight) - y
            total += float(err.double().pow(2).sum())
            count += err.numel()
        return total / max(count, 1)
