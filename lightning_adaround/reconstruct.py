"""Per layer: stream its calibration inputs, hold some out, and build its reconstruction objective.

The one place that decides between the minibatch and the moments form, so the optimiser
loop and the public API stay the same for every layer type.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import chain
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from lightning_adaround.cache import CachePlan, ChunkStore
from lightning_adaround.blocks import Block
from lightning_adaround.capture import Call, InputCapture, LayerData, check_finite, layer_targets
from lightning_adaround.capture import float_weights as float_weights_in
from lightning_adaround.config import AdaRoundConfig
from lightning_adaround.layers import OutputOps, call_in_dtype, compute_dtype, output_channel_dim, run_with_weight
from lightning_adaround.moments import LayerMoments, moments_supported, patch_dim
from lightning_adaround.objective import (
    BlockData, BlockObjective, MinibatchObjective, MomentsObjective, ReconstructionObjective,
)


@dataclass
class LayerObjective:
    objective: ReconstructionObjective
    num_samples: int
    eval_samples: int
    ops: Optional[OutputOps]
    note: str = ""
    cache_bytes: int = 0  # what this layer kept: cached activations, or moments plus held-out samples


class _Holdout:
    """Splits streamed batches so that ``floor(seen * fraction)`` samples are held out so far."""

    def __init__(self, fraction: float, generator: torch.Generator) -> None:
        self.fraction = fraction
        self.generator = generator
        self.seen = 0

    def split(self, n: int) -> tuple[Tensor, Tensor]:
        held = math.floor((self.seen + n) * self.fraction) - math.floor(self.seen * self.fraction)
        self.seen += n
        perm = torch.randperm(n, generator=self.generator)
        return perm[held:].sort().values, perm[:held].sort().values


def _rows_per_sample(layer: nn.Module, sample: Tensor) -> int:
    """Rows of one sample the weight multiplies: tokens for Linear, output positions for conv."""
    if isinstance(layer, nn.Linear):
        return max(1, sample[:1].numel() // layer.in_features)
    with torch.no_grad():
        out = run_with_weight(layer, sample[:1], layer.weight.to(compute_dtype(layer.weight.dtype)))
    return max(1, out.numel() // out.shape[1])


def choose_form(
    loss_form: str, layer: nn.Module, ops: Optional[OutputOps], batch_size: int, first_input: Tensor,
) -> tuple[str, Optional[OutputOps], str]:
    """``(form, ops used in the loss, note for the summary)`` for one layer.

    ``auto`` takes moments when the layer supports it, no activation was asked for
    explicitly, and one step costs less: ``out * d^2`` against ``3 * rows_per_step * d * out``.
    """
    if loss_form == "minibatch":
        return "minibatch", ops, ""
    if not moments_supported(layer):
        note = "transposed conv: minibatch form" if loss_form == "moments" else ""
        return "minibatch", ops, note
    explicit_activation = ops is not None and not ops.detected and ops.activation is not None
    if loss_form == "auto":
        if explicit_activation:
            return "minibatch", ops, ""
        rows_per_step = batch_size * _rows_per_sample(layer, first_input)
        if patch_dim(layer) > 3 * rows_per_step:
            return "minibatch", ops, ""
    if ops is None:
        return "moments", None, ""
    kept = OutputOps(batchnorm=ops.batchnorm, detected=ops.detected) if ops.channel_scale() is not None else None
    dropped = [type(m).__name__ for m in (ops.activation, ops.batchnorm if kept is None else None) if m is not None]
    note = f"{'/'.join(dropped)} left out of the loss (moments form)" if dropped else ""
    return "moments", kept, note


class _Cache:
    """One layer's (or block's) cached tensors by key; where they live is chosen at the first batch."""

    def __init__(self, plan: CachePlan, num_batches: int) -> None:
        self.plan = plan
        self.num_batches = num_batches
        self.stores: dict[str, ChunkStore] = {}
        self.tier: Optional[str] = None
        self.note = ""

    def add(self, pieces: list[tuple[str, Tensor]]) -> None:
        if self.tier is None:
            estimate = self.num_batches * sum(self.plan.stored_bytes(t) for _, t in pieces)
            self.tier = self.plan.tier_for(estimate)
            if self.tier != self.plan.tier_for(0):
                self.note = f"cached on {self.tier} (about {estimate / 2**20:.0f} MiB)"
        for key, t in pieces:
            if key not in self.stores:
                self.stores[key] = self.plan.store(self.tier, self.num_batches, exact=not t.is_floating_point())
            self.stores[key].add(t)

    def tensors(self, name: str) -> dict[str, Tensor]:
        return {key: store.tensor(name) for key, store in self.stores.items() if store.shapes}

    @staticmethod
    def nbytes(data: dict[str, Tensor]) -> int:
        return sum(t.numel() * t.element_size() for t in data.values())


def build_layer_objective(
    capture: InputCapture,
    name: str,
    layer: nn.Module,
    rounded: dict[str, nn.Module],
    float_weights: dict[str, Tensor],
    ops: Optional[OutputOps],
    config: AdaRoundConfig,
    generator: torch.Generator,
    device: torch.device,
    cache_device: torch.device,
) -> Optional[LayerObjective]:
    """Everything one layer's optimisation needs, or ``None`` when no batch reaches the layer."""
    pairs = capture.pairs(name, layer, rounded, float_weights)
    first = next(pairs, None)
    if first is None:
        return None
    form, used_ops, note = choose_form(config.loss_form, layer, ops, config.batch_size, first[0])
    weight = float_weights[name]
    holdout = _Holdout(config.holdout_fraction, generator)
    moments = LayerMoments(layer, device) if form == "moments" else None
    cache = _Cache(CachePlan(
        device, config.device_cache_bytes, config.host_cache_bytes, config.cache_dir, config.cache_dtype,
        skip_device=config.cache_on_cpu,
    ), len(capture.batches))
    for rounded_input, float_input in chain([first], pairs):
        keep, held = holdout.split(rounded_input.shape[0])
        pieces = []
        if held.numel():
            pieces += [("eval_in", rounded_input[held]), ("eval_out", layer_targets(layer, float_input[held], weight, used_ops))]
        if moments is not None:
            same = float_input is rounded_input
            moments.add(rounded_input[keep], None if same else float_input[keep])
        else:
            pieces += [("train_in", rounded_input[keep]), ("train_out", layer_targets(layer, float_input[keep], weight, used_ops))]
        cache.add(pieces)
    data = cache.tensors(name)
    note = "; ".join(filter(None, [note, cache.note]))
    evaluation = LayerData(data["eval_in"], data["eval_out"]) if "eval_in" in data else None
    # Errors are reported on the held-out samples, or on the training ones when none are held out.
    if moments is not None:
        objective: ReconstructionObjective = MomentsObjective(layer, moments, weight, evaluation, used_ops, device)
        train_samples = moments.samples
    else:
        train = LayerData(data["train_in"], data["train_out"])
        objective = MinibatchObjective(
            layer, train, evaluation or train, config.batch_size, used_ops, generator, device,
        )
        train_samples = train.num_samples
    eval_samples = evaluation.num_samples if evaluation is not None else train_samples
    cache_bytes = _Cache.nbytes(data)
    if moments is not None:
        cache_bytes += moments.nbytes()
    return LayerObjective(objective, train_samples, eval_samples, used_ops, note, cache_bytes)


TaskLoss = Callable[[Any, Any], Tensor]  # task_loss(model output, batch) -> scalar


def build_block_objective(
    capture: InputCapture,
    block: Block,
    rounded: dict[str, nn.Module],
    float_weights: dict[str, Tensor],
    config: AdaRoundConfig,
    generator: torch.Generator,
    device: torch.device,
    task_loss: Optional[TaskLoss] = None,
) -> Optional[LayerObjective]:
    """A block's objective: its input in the rounded model, its output in the float model.

    The cache holds the block's input, its other per-sample arguments and its float output
    (plus, with ``task_loss``, the Fisher weights of that output), not every inner layer's.
    """
    first_name, first_module = block.first
    holdout = _Holdout(config.holdout_fraction, generator)
    cache = _Cache(CachePlan(
        device, config.device_cache_bytes, config.host_cache_bytes, config.cache_dir, config.cache_dtype,
        skip_device=config.cache_on_cpu,
    ), len(capture.batches))
    arguments: Optional[_BlockArguments] = None
    for index, rounded_call, float_call in capture.calls(first_name, first_module, rounded, float_weights):
        x = rounded_call[0][0].detach()
        if arguments is None:
            arguments = _BlockArguments(block.name, rounded_call, x.shape)
        per_sample = arguments.per_sample(rounded_call, x.shape)
        with torch.no_grad():
            target = block.output(call_in_dtype(block.module, *float_call, {}, compute_dtype(x.dtype))).detach()
        check_finite(
            f"block {block.name!r}", [("input", x), ("full-precision output", target)],
            fix="round its layers with reconstruction='layer'",
        )
        keep, held = holdout.split(x.shape[0])
        pieces = [("train_in", x[keep]), ("train_out", target[keep])]
        pieces += [(f"train_{key}", t[keep]) for key, t in per_sample.items()]
        if task_loss is not None:
            pieces.append(("train_fisher", _output_gradient(capture, block, rounded, float_weights, task_loss, index)[keep].square()))
        if held.numel():
            pieces += [("eval_in", x[held]), ("eval_out", target[held])]
            pieces += [(f"eval_{key}", t[held]) for key, t in per_sample.items()]
        cache.add(pieces)
    if arguments is None:
        return None
    data = cache.tensors(block.name)
    fisher = data.get("train_fisher")
    if fisher is not None:
        mean = float(fisher.double().mean())
        if not math.isfinite(mean) or mean <= 0:
            raise ValueError(
                f"the task-loss gradient at the output of block {block.name!r} is {'zero' if mean == 0 else mean} on "
                "the calibration data, so the Fisher weights are undefined; check task_loss (does it depend on the "
                "model output?) or use block_loss='mse'."
            )
        fisher = fisher.div_(mean)  # mean weight 1: the regularizer keeps its balance against the MSE
    train = arguments.data(data, "train", fisher)
    evaluation = arguments.data(data, "eval") if "eval_in" in data else train
    channel_dim = output_channel_dim(block.layer_module(block.layers[-1]))
    objective = BlockObjective(block, train, evaluation, config.batch_size, channel_dim, generator, device)
    note = "; ".join(filter(None, [f"block {block.name} ({len(block.layers)} layers)", cache.note]))
    return LayerObjective(objective, train.num_samples, evaluation.num_samples, None, note, _Cache.nbytes(data))


class _BlockArguments:
    """Which of a block's other arguments are per sample (cached, gathered) and which are fixed.

    Fixed from the first batch: non-tensors and tensors without one row per sample (a shared
    mask, say). Such an argument must be the same in every batch, since one value is used for all.
    """

    def __init__(self, name: str, call: Call, input_shape: torch.Size) -> None:
        self.name = name
        self.input_tail = tuple(input_shape[1:])
        n = input_shape[0]
        args, kwargs = call
        self.fixed_args = [None if _one_row_each(a, n) else a for a in args[1:]]
        self.fixed_kwargs = {k: None if _one_row_each(v, n) else v for k, v in kwargs.items()}

    def per_sample(self, call: Call, input_shape: torch.Size) -> dict[str, Tensor]:
        if tuple(input_shape[1:]) != self.input_tail:
            raise ValueError(
                f"block {self.name!r} received inputs of shapes {self.input_tail} and {tuple(input_shape[1:])} "
                "(per sample) across calibration batches; give calibration batches of one shape (pad them) "
                "or use reconstruction='layer'."
            )
        args, kwargs = call
        n = input_shape[0]
        found = {}
        for where, value, fixed in [
            *((f"a{i}", a, f) for i, (a, f) in enumerate(zip(args[1:], self.fixed_args))),
            *((f"k{k}", v, self.fixed_kwargs.get(k)) for k, v in kwargs.items()),
        ]:
            if _one_row_each(value, n) and fixed is None:
                found[where] = value.detach()
            elif not _same_value(value, fixed):
                raise ValueError(
                    f"block {self.name!r} takes an argument ({where[1:] if where[0] == 'k' else 'position ' + str(int(where[1:]) + 1)}) "
                    "that changes between calibration batches but is not one row per sample, so it cannot be "
                    "cached; name a different block or use reconstruction='layer'."
                )
        return found

    def data(self, tensors: dict[str, Tensor], split: str, fisher: Optional[Tensor] = None) -> BlockData:
        args = tuple(tensors[f"{split}_a{i}"] if f is None else f for i, f in enumerate(self.fixed_args))
        kwargs = {k: tensors[f"{split}_k{k}"] if f is None else f for k, f in self.fixed_kwargs.items()}
        return BlockData(tensors[f"{split}_in"], tensors[f"{split}_out"], args, kwargs, fisher)


def _one_row_each(value: Any, n: int) -> bool:
    return isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] == n


def _same_value(a: Any, b: Any) -> bool:
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return isinstance(a, Tensor) and isinstance(b, Tensor) and a.shape == b.shape and bool(torch.equal(a, b))
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - incomparable objects count as different
        return a is b


def _output_gradient(
    capture: InputCapture, block: Block, rounded: dict[str, nn.Module], float_weight_of: dict[str, Tensor],
    task_loss: TaskLoss, index: int,
) -> Tensor:
    """d task_loss / d block output on batch ``index``, in the full-precision model (BRECQ's Fisher diagonal)."""
    leaves: list[Tensor] = []

    def detach_output(_module: nn.Module, _args: Any, output: Any) -> Any:
        leaf = block.output(output).detach().requires_grad_(True)
        leaves.append(leaf)
        return leaf if isinstance(output, Tensor) else type(output)([leaf, *output[1:]])

    batch = capture.batches[index]
    handle = block.last.register_forward_hook(detach_output)
    try:
        with float_weights_in(rounded, {n: float_weight_of[n] for n in rounded}), torch.enable_grad():
            loss = task_loss(capture.forward_fn(capture.model, batch), batch)
            if not (isinstance(loss, Tensor) and loss.dim() == 0):
                raise TypeError(
                    f"task_loss(output, batch) must return a scalar tensor, got "
                    f"{type(loss).__name__}{tuple(loss.shape) if isinstance(loss, Tensor) else ''}."
                )
            loss.backward()
    finally:
        handle.remove()
    grad = leaves[0].grad if leaves else None
    if grad is None:
        raise ValueError(
            f"task_loss does not depend on the output of block {block.name!r}, so it gives no Fisher weights; "
            "check task_loss or use block_loss='mse'."
        )
    return grad.detach()
