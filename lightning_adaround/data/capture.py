"""Collecting what one layer sees: its input in the partly rounded model, its float target.

Each pass stops at the layer (a pre-forward hook raises), so nothing past it is computed,
and only that layer's tensors are kept. A layer the first pass saw called more than once per
forward (weight sharing) is the exception: its passes run to the end and keep every call.
"""

from __future__ import annotations

import functools
import math
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from itertools import groupby
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from torch import Tensor, nn

from lightning_adaround.data.calibration import map_tensors, tensors_in
from lightning_adaround.data.chain import BlockChain
from lightning_adaround.model.layers import ForwardFn, forward_with_hooks, positional_call

Call = tuple[tuple, dict]  # a module call's (args, kwargs)


class _StopForward(Exception):
    """Raised by the capture hook to end a forward pass at the layer being captured."""


def default_forward(model: nn.Module, batch: Any) -> Any:
    """A tensor is the input; a tuple/list's first element is; a dict is keyword arguments."""
    if isinstance(batch, Tensor):
        return model(batch)
    if isinstance(batch, (tuple, list)) and batch:
        return model(batch[0])
    if isinstance(batch, dict):
        return model(**batch)
    raise TypeError(
        f"cannot turn a calibration batch of type {type(batch).__name__} into a forward call; "
        "pass forward_fn=lambda model, batch: model(...) to say how."
    )


def execution_order(
    model: nn.Module, layers: Sequence[tuple[str, nn.Module]], batch: Any, forward_fn: ForwardFn
) -> list[str]:
    """Names of ``layers`` in the order one forward pass first calls them."""
    return first_pass(model, layers, batch, forward_fn).order


@dataclass
class FirstPass:
    """What one forward pass showed: the layers' order, how often each was called, which modules ran."""

    order: list[str]  # ``layers`` in the order first called
    calls: dict[str, int]  # layer name -> calls in the pass (more than one: a shared layer)
    ran: set[str]  # names of every module of the model that was called


def first_pass(
    model: nn.Module, layers: Sequence[tuple[str, nn.Module]], batch: Any, forward_fn: ForwardFn
) -> FirstPass:
    """One forward pass over ``batch`` watching ``layers`` (order, call counts) and every module (ran)."""
    seen = FirstPass([], {}, set())
    handles = []
    for name, module in layers:
        def record(_module, _args, name=name):
            if name not in seen.calls:
                seen.order.append(name)
            seen.calls[name] = seen.calls.get(name, 0) + 1
        handles.append(module.register_forward_pre_hook(record))
    for name, module in model.named_modules():
        def ran(_module, _args, name=name):
            seen.ran.add(name)
        try:
            handles.append(module.register_forward_pre_hook(ran))
        except Exception:  # noqa: BLE001 - a module that takes no hooks (scripted) is only not watched
            pass
    forward_with_hooks(model, batch, forward_fn, handles)
    return seen


def call_reaching(module: nn.Module, target: nn.Module, batch: Any, forward_fn: ForwardFn) -> Optional[Call]:
    """``(args, kwargs)`` of ``target``'s first call when ``module`` runs on ``batch``; the pass stops there."""
    seen: list[tuple] = []

    def stop_here(module, args, kwargs):
        seen.append(positional_call(module, args, kwargs))
        raise _StopForward

    try:
        forward_with_hooks(module, batch, forward_fn, [target.register_forward_pre_hook(stop_here, with_kwargs=True)])
    except _StopForward:
        pass
    return seen[0] if seen else None


def every_call(module: nn.Module, target: nn.Module, batch: Any, forward_fn: ForwardFn) -> list[Call]:
    """``(args, kwargs)`` of every call of ``target`` when ``module`` runs on ``batch`` (the whole pass).

    Tensor arguments are copied as they are called with: a later in-place operation of the
    forward pass cannot change what an earlier call saw.
    """
    seen: list[Call] = []

    def keep(value: Any) -> Any:
        return value.detach().clone() if isinstance(value, Tensor) else value

    def record(module, args, kwargs):
        args, kwargs = positional_call(module, args, kwargs)
        seen.append((tuple(keep(a) for a in args), {k: keep(v) for k, v in kwargs.items()}))

    forward_with_hooks(module, batch, forward_fn, [target.register_forward_pre_hook(record, with_kwargs=True)])
    return seen


def parameters_read(
    model: nn.Module, batch: Any, forward_fn: ForwardFn, params: Sequence[Tensor]
) -> Optional[set[int]]:
    """``id``s of those ``params`` that one forward pass hands to a torch function, or ``None`` if the
    pass fails under the watch.

    A layer's weight read by another module's functional call (``nn.MultiheadAttention`` passes
    ``out_proj.weight`` to ``F.multi_head_attention_forward``) shows up here although the layer's
    own forward never runs.
    """
    wanted = {id(p) for p in params}
    found: set[int] = set()

    class Watch(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            found.update(id(t) for t in tensors_in((args, kwargs)) if id(t) in wanted)
            return func(*args, **kwargs)

    try:
        with Watch():
            forward_with_hooks(model, batch, forward_fn, [])
    except Exception:  # noqa: BLE001 - a forward that cannot run watched only loses the detail
        return None
    return found


@contextmanager
def float_weights(modules: dict[str, nn.Module], weights: dict[str, Tensor]) -> Iterator[None]:
    """Temporarily put the float weights back into already rounded layers."""
    saved = {name: modules[name].weight.data for name in weights}
    try:
        for name, w in weights.items():
            modules[name].weight.data = w
        yield
    finally:
        for name, w in saved.items():
            modules[name].weight.data = w


def check_finite(subject: str, tensors: Sequence[tuple[str, Tensor]], fix: str = "exclude this layer") -> None:
    """A clear error naming ``subject`` (``"layer 'x'"``) and which of its tensors holds a NaN/Inf.

    A finite sum means every element is finite (a NaN or Inf would carry into it), in one cheap
    reduction; only a sum that is not (an overflow, or a bad value) is checked element by element.
    """
    for what, t in tensors:
        if t.is_floating_point() and torch.isfinite(t.sum()):
            continue
        if not torch.isfinite(t).all():
            raise ValueError(
                f"the {what} of {subject} contains NaN or Inf on the calibration data; "
                f"check the model and the calibration batches (or {fix})."
            )


class InputCapture:
    """Per layer and batch: the layer's input in the partly rounded model and in the float model.

    By default each input comes from a forward pass that stops at the layer. Layers inside
    a :class:`~lightning_adaround.data.chain.BlockChain` are fed from their block's kept input
    instead, carried one block at a time, so capture stays linear in depth; a layer after a
    chain gets its input from the chain's kept output, the blocks not run again (see
    :meth:`_reach` for how a layer that reads more than that output is found). Both ways give
    bit-identical inputs (the same operations on the same tensors; blocks get copies of the
    kept inputs, so one that changes its input in place changes no kept one).
    """

    def __init__(
        self,
        model: nn.Module,
        batches: Sequence[Any],
        forward_fn: ForwardFn,
        chains: Sequence[BlockChain] = (),
        device: torch.device = torch.device("cpu"),
        cache_device: torch.device = torch.device("cpu"),
        call_counts: Optional[dict[str, int]] = None,
        float_pass_budget: Optional[Callable[[], Optional[int]]] = None,
    ) -> None:
        """``float_pass_budget``: bytes a chain may keep of one block's float-model pass (its layers'
        inputs and its output, for every batch) and of its rounded layers' outputs (``None`` from it:
        no limit), beside the layer's own cache; without it every layer runs its own float-model pass
        and the rounded block up to itself."""
        self.model = model
        self.batches = batches
        self.forward_fn = forward_fn
        self.device = device
        self.cache_device = cache_device
        self.call_counts = dict(call_counts or {})  # module name -> calls per forward (first pass)
        self.float_pass_budget = float_pass_budget
        self._carried = [_CarriedInputs(self, chain) for chain in chains]

    def calls_per_batch(self, name: str) -> int:
        """How often one forward pass calls ``name`` (as the first pass saw it; 1 when not counted)."""
        return max(1, self.call_counts.get(name, 1))

    def inputs(self, name: str, layer: nn.Module) -> Iterator[Tensor]:
        """The layer's input per batch that reaches it, in the model as it is now (bias correction).

        A shared layer's calls in one batch come stacked along the first dim (a Linear's fed with
        different shapes as rows); calls that cannot be stacked (a convolution run at two
        resolutions) come one each.
        """
        for _, found in self.batch_inputs(name, layer):
            yield from _stack_calls(found, isinstance(layer, nn.Linear))

    def batch_inputs(self, name: str, layer: nn.Module) -> Iterator[tuple[int, list[Tensor]]]:
        """Per batch that reaches the layer: the batch's index and the layer's input of each call,
        in the model as it is now (bias correction: the index tells which rows are held out)."""
        for index, group in groupby(self.calls(name, layer, {}, {}), key=lambda c: c[0]):
            found = [call[0][0].detach() for _, call, _ in group]
            check_finite(f"layer {name!r}", [("input", x) for x in found])
            yield index, found

    def calls(
        self,
        name: str,
        module: nn.Module,
        rounded: dict[str, nn.Module],
        float_weight_of: dict[str, Tensor],
        only: Optional[Sequence[int]] = None,
    ) -> Iterator[tuple[int, Call, Call]]:
        """``(batch index, call in the rounded model, call in the float model)`` of ``module``'s first call,
        or of each of its calls when the first pass saw it called more than once (a shared layer: one
        item per call, in call order, several with the same batch index).

        A call is ``(args, kwargs)``; the float call *is* the rounded one while both models agree.
        """
        indices = range(len(self.batches)) if only is None else only
        originals = {n: float_weight_of[n] for n in rounded}
        shared = self.calls_per_batch(name) > 1
        holder = next((c for c in self._carried if c.holds(name)), None) if not shared else None
        chains_before = [c for c in self._carried if c.comes_before(name)] if not shared and holder is None else []
        after = max(chains_before, key=lambda c: c.last_inside) if chains_before else None  # the latest chain
        if after is not None:
            after.finish(rounded, originals)  # before its last block's float pass is let go
        for carried in self._carried:
            carried.release(name)
        if shared:
            yield from self._every_call(name, module, rounded, originals, indices)
            return
        if holder is not None:
            yield from holder.calls(name, module, rounded, originals, indices)
            return
        for index in indices:
            rounded_call = self._reach(name, module, index, after, float_model=False)
            if rounded_call is None:
                continue
            float_call = rounded_call  # nothing rounded yet: both models agree
            if rounded:
                with float_weights(rounded, originals):
                    float_call = self._reach(name, module, index, after, float_model=True)
            yield index, rounded_call, float_call

    def _reach(
        self, name: str, module: nn.Module, index: int, after: Optional["_CarriedInputs"], float_model: bool,
    ) -> Optional[Call]:
        """``module``'s first call on batch ``index`` (in the model as it is: the float model's weights are
        in place with ``float_model``). Past a chain carried to its end (``after``) the chain's blocks
        are not run but hand on its kept output, and NaN from every block but the last: a call that
        holds a NaN, or a pass that fails, read more than the chain's output and takes a real pass
        (as do all later ones past this chain). Each layer's first call, per model, is also checked
        against a real pass bit for bit."""
        batch = self.batches[index]
        if after is None or after.skip_failed:
            return call_reaching(self.model, module, batch, self.forward_fn)
        try:
            with after.blocks_skipped(index, float_model):
                call = call_reaching(self.model, module, batch, self.forward_fn)
        except Exception:  # noqa: BLE001 - the code after the chain needs the blocks' own outputs
            call = None
            after.skip_failed = True
        if call is not None and any(t.is_floating_point() and bool(t.isnan().any()) for t in tensors_in(call)):
            after.skip_failed = True  # the layer read an earlier block's output (or the float model's tail)
        checked = (name, float_model) in after.skip_checked
        if after.skip_failed or not checked:
            real = call_reaching(self.model, module, batch, self.forward_fn)
            if not after.skip_failed and not _same_call(call, real):
                after.skip_failed = True
            if after.skip_failed:
                return real
            if real is not None:
                after.skip_checked.add((name, float_model))
        return call

    def _every_call(
        self, name: str, module: nn.Module, rounded: dict[str, nn.Module], originals: dict[str, Tensor],
        indices: Sequence[int],
    ) -> Iterator[tuple[int, Call, Call]]:
        """Every call of a shared layer, per batch: whole forward passes, in both models."""
        for index in indices:
            batch = self.batches[index]
            rounded_calls = every_call(self.model, module, batch, self.forward_fn)
            float_calls = rounded_calls  # nothing rounded yet: both models agree
            if rounded and rounded_calls:
                with float_weights(rounded, originals):
                    float_calls = every_call(self.model, module, batch, self.forward_fn)
                if len(float_calls) != len(rounded_calls):
                    raise ValueError(
                        f"layer {name!r} is called {len(rounded_calls)} times in the partly rounded model but "
                        f"{len(float_calls)} times in the float model on calibration batch {index}: the number of "
                        "calls depends on the weights, so the calls cannot be paired; leave it in float with "
                        f"exclude=[{name!r}]."
                    )
            for rounded_call, float_call in zip(rounded_calls, float_calls):
                yield index, rounded_call, float_call


def _stack_calls(found: list[Tensor], linear: bool) -> Iterator[Tensor]:
    """One batch's inputs, one per call, as one tensor where the shapes allow."""
    tails = {tuple(x.shape[1:]) for x in found}
    if len(tails) > 1 and linear and len({x.shape[-1] for x in found}) == 1:
        found = [x.reshape(-1, x.shape[-1]) for x in found]
    elif len(tails) > 1:
        yield from found
        return
    yield found[0] if len(found) == 1 else torch.cat(found)


def _call_in(block: nn.Module, module: nn.Module, args: tuple, kwargs: dict) -> Optional[Call]:
    """Run ``block`` until ``module`` is called: ``module``'s first call (the block's own if it is the block)."""
    if block is module:
        return args, kwargs
    return call_reaching(block, module, (args, kwargs), lambda m, call: m(*call[0], **call[1]))


class _CarriedInputs:
    """One chain's kept block inputs, per batch, in the rounded and in the float model.

    The inputs of block ``at`` are kept; a layer in a later block first runs the blocks in
    between (their layers are rounded by then); an earlier one (a model that runs its
    layers out of order) starts again from forward passes that stop at that block.
    ``float_inputs[i] is None`` while the float model's block input equals the rounded one.
    Kept tensors live on the cache device; blocks run on the compute device.

    The float model's side of block ``at`` never changes while its layers are rounded, so one
    float pass of the whole block per batch gives every inner layer's float-model call and the
    block's float output for the step to the next block (when they fit the capture's
    ``float_pass_budget``; else each layer runs the float block up to itself).
    """

    def __init__(self, capture: InputCapture, chain: BlockChain) -> None:
        self.capture = capture
        self.chain = chain
        self.at = -1
        self.calls_at: list[Call] = []  # block ``at``'s (args, kwargs) in the rounded model
        self.float_inputs: list[Optional[Tensor]] = []
        self.float_pass: Optional[_FloatPass] = None  # of block ``at``, once a layer needed it
        self.outputs: Optional[_LayerOutputs] = None  # block ``at``'s rounded layers' outputs, per batch
        self.float_pass_over_budget = False  # a block's pass did not fit: per-layer passes from then on
        # past the last block (``at == len(blocks)``): the rest of its output tuple in the rounded model
        self.tails: list[tuple] = []
        self.skip_checked: set[tuple[str, bool]] = set()  # (layer, float model) checked against a real pass
        self.skip_failed = False  # a layer after the chain read more than the chain's output: real passes
        # position of the chain's last layer in the first pass's order (-1: none)
        inside = [i for i, n in enumerate(capture.call_counts) if chain.block_of(n) is not None]
        self.last_inside = max(inside, default=-1)
        self.disabled = False

    def holds(self, name: str) -> bool:
        return not self.disabled and self.chain.block_of(name) is not None

    def _rounded_inside(self, k: int, rounded: dict[str, nn.Module]) -> bool:
        """Whether block ``k`` holds a rounded layer (then its two models' outputs differ)."""
        return any(self.chain.block_of(n) == k for n in rounded)

    def _keep(self, t: Tensor) -> Tensor:
        return t.detach().to(self.capture.cache_device)

    def _run(self, t: Tensor) -> Tensor:
        """A kept block input as a block's argument: a copy on the compute device, so a block that
        changes its input in place (``x += ...``) cannot change the kept one."""
        return t.to(self.capture.device, copy=True)

    def release(self, name: str) -> None:
        """Drop the kept float pass and layer outputs unless ``name`` is in their block or a later one
        of the chain (whose capture first steps to it with them)."""
        k = self.chain.block_of(name)
        if k is None or k < self.at:
            self.float_pass, self.outputs = None, None

    def _prime(self, k: int, rounded: dict[str, nn.Module], originals: dict[str, Tensor]) -> bool:
        """Forward passes that stop at block ``k``: its call in both models, per batch."""
        capture, block = self.capture, self.chain.blocks[k][1]
        self.calls_at, self.float_inputs, self.float_pass, self.outputs = [], [], None, None
        for batch in capture.batches:
            call = call_reaching(capture.model, block, batch, capture.forward_fn)
            if call is None:
                return False
            self.calls_at.append(((self._keep(call[0][0]),) + tuple(call[0][1:]), call[1]))
            float_input = None
            if rounded:
                with float_weights(rounded, originals):
                    float_input = self._keep(call_reaching(capture.model, block, batch, capture.forward_fn)[0][0])
            self.float_inputs.append(float_input)
        self.at = k
        return True

    @torch.no_grad()
    def _advance(self, rounded: dict[str, nn.Module], originals: dict[str, Tensor]) -> None:
        """Run block ``at`` on its kept inputs: block ``at + 1``'s inputs (the float model's from the
        block's float pass, when one was kept)."""
        block = self.chain.blocks[self.at][1]
        changed = self._rounded_inside(self.at, rounded)
        float_pass, self.float_pass = self.float_pass, None
        outputs, self.outputs = self.outputs, None  # none kept (a block only stepped through): plain passes
        last = self.at == len(self.chain.blocks) - 1
        if last:
            self.tails = []
        for index, (args, kwargs) in enumerate(self.calls_at):
            with outputs.reused(index, (args[1:], kwargs), keep=False) if outputs is not None else nullcontext():
                out = block(self._run(args[0]), *args[1:], **kwargs)
            float_input = self.float_inputs[index]
            if float_pass is not None and float_pass.outputs:
                self.float_inputs[index] = float_pass.outputs[index]
            elif float_input is not None or changed:
                with float_weights(rounded, originals):
                    float_out = block(self._run(self._float_source(index)), *args[1:], **kwargs)
                self.float_inputs[index] = self._keep(self.chain.carry(float_out))
            self.calls_at[index] = ((self._keep(self.chain.carry(out)),) + args[1:], kwargs)
            if last:  # the rest of the chain's output tuple, for layers after the chain
                self.tails.append(map_tensors(tuple(out[1:]), self._keep) if isinstance(out, (tuple, list)) else ())
        self.at += 1

    def comes_before(self, name: str) -> bool:
        """Whether layer ``name`` runs after every layer of this chain (the first pass's order), so its
        calls can come from the chain's kept output instead of running the blocks again."""
        order = list(self.capture.call_counts)
        if self.disabled or self.skip_failed or self.at < 0 or name not in order:
            return False
        return 0 <= self.last_inside < order.index(name)

    def finish(self, rounded: dict[str, nn.Module], originals: dict[str, Tensor]) -> None:
        """Carry the inputs past the last block: the chain's output, per batch, in both models."""
        while self.at < len(self.chain.blocks):
            self._advance(rounded, originals)

    @contextmanager
    def blocks_skipped(self, index: int, float_model: bool) -> Iterator[None]:
        """The chain's blocks replaced, for one pass over batch ``index``, so that the model runs only
        what lies outside the chain: the last returns the chain's kept output (the float model's with
        ``float_model``), every other one NaN in its output's place, and so does the last one's tail
        (the rest of its output tuple) in the float model, where only the rounded model's is kept."""
        rounded_out = self.calls_at[index][0][0]
        float_out = self.float_inputs[index]
        hidden = float_out if float_model and float_out is not None else rounded_out
        tail = self.tails[index] if self.chain.tuple_output else ()
        nan = lambda t: torch.full_like(t, float("nan")) if t.is_floating_point() else t  # noqa: E731
        last_tail = map_tensors(tail, nan) if float_model else map_tensors(tail, self._run)
        wrap = (lambda first, rest: (first, *rest)) if self.chain.tuple_output else (lambda first, rest: first)
        blocks = [block for _, block in self.chain.blocks]
        nan_out = lambda *args, **kwargs: wrap(nan(args[0]), map_tensors(tail, nan))  # noqa: E731
        handed_on = [(block, nan_out) for block in blocks[:-1]]
        handed_on.append((blocks[-1], lambda *args, **kwargs: wrap(self._run(hidden), last_tail)))
        with _forwards_replaced(handed_on):
            yield

    def _float_source(self, index: int) -> Tensor:
        """Block ``at``'s input in the float model on batch ``index``."""
        float_input = self.float_inputs[index]
        return float_input if float_input is not None else self.calls_at[index][0][0]

    def _inner_layers(self) -> dict[str, nn.Module]:
        """Block ``at``'s layers being rounded, in the order the first pass called them."""
        prefix = self.chain.blocks[self.at][0] + "."
        return {n: self.capture.model.get_submodule(n) for n in self.capture.call_counts if n.startswith(prefix)}

    def _room(self, used_elsewhere: int) -> Optional[int]:
        """Bytes the chain may keep of block ``at`` (its float pass and its rounded layers' outputs share
        the capture's ``float_pass_budget``) besides ``used_elsewhere``; ``None``: no limit."""
        budget = self.capture.float_pass_budget() if self.capture.float_pass_budget is not None else 0
        return None if budget is None else max(0, budget - used_elsewhere)

    def _layer_outputs(self) -> "_LayerOutputs":
        """Block ``at``'s kept rounded-layer outputs (made on first use), within what the float pass
        left of the budget; none where the cache is not on the compute device."""
        if self.outputs is None:
            capture = self.capture
            room = lambda: self._room(self.float_pass.nbytes if self.float_pass is not None else 0)  # noqa: E731
            # kept where the cache lives only when that is the compute device: a GPU computes a layer
            # again faster than it copies the output back from the host
            inner = self._inner_layers() if capture.cache_device == capture.device else {}
            inner = {n: m for n, m in inner.items() if capture.calls_per_batch(n) == 1}
            self.outputs = _LayerOutputs(self.chain.blocks[self.at][1], inner, room)
        return self.outputs

    @torch.no_grad()
    def _run_float_pass(self, rounded: dict[str, nn.Module], originals: dict[str, Tensor]) -> Optional["_FloatPass"]:
        """Block ``at`` run whole in the float model on every batch, keeping each inner layer's first
        call and the block's output; ``None`` when that exceeds the budget or there is none.

        A layer's tensor is copied (a later in-place operation of the block cannot change it) once
        per batch however many layers read it (q, k and v), and not at all when it is one the block
        was given unchanged (the kept block input, a mask).
        """
        capture = self.capture
        block = self.chain.blocks[self.at][1]
        inner = self._inner_layers()
        budget = self._room(self.outputs.nbytes if self.outputs is not None else 0)
        if not inner or budget == 0 or self.float_pass_over_budget:
            return None
        kept = _FloatPass([], [], 0)
        for index, (args, kwargs) in enumerate(self.calls_at):
            if index == 1 and budget is not None and kept.nbytes * len(self.calls_at) > budget:
                self.float_pass_over_budget = True  # the other batches would not fit either
                return None
            source = self._float_source(index)
            given = self._run(source)
            known = _KeptTensors([(given, source)] + [(t, t) for t in tensors_in((args[1:], kwargs))])

            def keep(value: Any) -> Any:
                if not isinstance(value, Tensor):
                    return value
                copy = known.get(value)
                if copy is None:
                    copy = known.add(value, value.detach().to(capture.cache_device, copy=True))
                    kept.nbytes += copy.numel() * copy.element_size()
                    if budget is not None and kept.nbytes > budget:
                        raise _StopForward
                return copy

            seen: dict[str, Call] = {}
            handles = []
            try:
                for name, module in inner.items():
                    def record(module, call_args, call_kwargs, name=name):
                        if name not in seen:
                            seen[name] = map_tensors(positional_call(module, call_args, call_kwargs), keep)
                    handles.append(module.register_forward_pre_hook(record, with_kwargs=True))
                with float_weights(rounded, originals):
                    out = block(given, *args[1:], **kwargs)
                kept.outputs.append(keep(self.chain.carry(out)))
            except _StopForward:
                self.float_pass_over_budget = True  # each layer runs its own float pass from now on
                return None
            finally:
                for handle in handles:
                    handle.remove()
            kept.calls.append(seen)
        return kept

    def calls(
        self, name: str, module: nn.Module, rounded: dict[str, nn.Module], originals: dict[str, Tensor],
        indices: Sequence[int],
    ) -> Iterator[tuple[int, Call, Call]]:
        k = self.chain.block_of(name)
        if (self.at < 0 or self.at > k) and not self._prime(k, rounded, originals):
            self.disabled = True  # some batch never reaches the block: plain capture from now on
            yield from self.capture.calls(name, module, rounded, originals, indices)
            return
        while self.at < k:
            self._advance(rounded, originals)
        block = self.chain.blocks[k][1]
        changed = self._rounded_inside(k, rounded)
        outputs = self._layer_outputs()
        for index in indices:
            args, kwargs = self.calls_at[index]
            with outputs.reused(index, (args[1:], kwargs)):
                rounded_call = _call_in(block, module, (self._run(args[0]),) + args[1:], kwargs)
            if rounded_call is None:
                continue
            if self.float_inputs[index] is None and not changed:
                yield index, rounded_call, rounded_call
                continue
            if self.float_pass is None and module is not block:
                self.float_pass = self._run_float_pass(rounded, originals) or _NOT_KEPT
            kept = self.float_pass.calls if self.float_pass is not None else []
            float_call = kept[index].get(name) if kept else None
            if float_call is None:
                with float_weights(rounded, originals):
                    float_call = _call_in(block, module, (self._run(self._float_source(index)),) + args[1:], kwargs)
            else:
                float_call = map_tensors(float_call, lambda t: t.to(self.capture.device))
            yield index, rounded_call, float_call


_NO_FORWARD = object()  # a module without a ``forward`` of its own (the class's is used)


@contextmanager
def _forwards_replaced(replacements: Sequence[tuple[nn.Module, Callable[..., Any]]]) -> Iterator[None]:
    """Each module's ``forward`` replaced (hooks still run around it), put back afterwards."""
    saved = [(module, module.__dict__.get("forward", _NO_FORWARD)) for module, _ in replacements]
    for module, forward in replacements:
        module.forward = forward
    try:
        yield
    finally:
        for module, forward in saved:
            if forward is _NO_FORWARD:
                del module.forward
            else:
                module.forward = forward


def _same_call(a: Optional[Call], b: Optional[Call]) -> bool:
    """Whether two calls hold equal tensors (bit for bit) in the same places."""
    if a is None or b is None:
        return a is b
    left, right = list(tensors_in(a)), list(tensors_in(b))
    return len(left) == len(right) and all(
        x.shape == y.shape and x.dtype == y.dtype and torch.equal(x, y) for x, y in zip(left, right)
    )


@dataclass
class _FloatPass:
    """One block's float-model pass per batch: each inner layer's first call, and the block's output."""

    calls: list[dict[str, Call]]  # per batch: layer name -> (args, kwargs), on the cache device
    outputs: list[Tensor]  # per batch: the block's carried output, on the cache device
    nbytes: int


_NOT_KEPT = _FloatPass([], [], 0)  # a block whose float pass was not kept: every layer runs its own


class _LayerOutputs:
    """One block's rounded layers' outputs per batch, reused by the block's later passes.

    While a block's layers are rounded one at a time, each one's capture runs the rounded block up
    to it and the step to the next block runs it whole, so without this the block's first layer
    runs once for every later one. A layer's output is a function of the block's arguments (the
    kept ones, the same per batch) and of the block's parameters and buffers, less those held only
    by the block's layers that run after it: it is kept with a fingerprint of those tensors and of
    the arguments (storage and in-place version counter) and reused while that matches, so a layer
    just rounded runs again, and so does every layer after it, and one whose weight is tied to a
    layer rounded since. Kept outputs are private copies taken as the layer returned them, and
    each pass gets a copy of its own. A layer called twice in one pass runs each time, and nothing
    is kept where the state has no storage (a sparse buffer). Not seen, so taken not to happen (as
    the float pass takes it): a layer's output that depends on a later layer's own parameters (read
    by the block before that layer runs), on random draws, or on anything outside the block and
    its arguments.
    """

    def __init__(self, block: nn.Module, inner: dict[str, nn.Module], room: Callable[[], Optional[int]]) -> None:
        """``inner``: the block's layers whose outputs may be kept, in call order; ``room``: the bytes
        that may be kept now (``None``: no limit)."""
        self._inner, self._room = inner, room
        holders: dict[int, list[int]] = {}  # tensor id -> ids of the modules holding it
        state: dict[int, Tensor] = {}
        for _, module in block.named_modules(remove_duplicate=False):
            for t in (*module._parameters.values(), *module._buffers.values()):
                if t is not None:
                    holders.setdefault(id(t), []).append(id(module))
                    state[id(t)] = t
        order = list(inner)
        self._watched: dict[str, list[Tensor]] = {}
        for i, name in enumerate(order):
            later = {id(m) for n in order[i + 1:] for m in inner[n].modules()}
            self._watched[name] = [t for key, t in state.items() if not all(h in later for h in holders[key])]
        # (layer, batch) -> (fingerprint, input shapes, output)
        self._kept: dict[tuple[str, int], tuple[tuple, tuple, Tensor]] = {}
        self.nbytes = 0

    @contextmanager
    def reused(self, index: int, call: Call, keep: bool = True) -> Iterator[None]:
        """One pass of the block on batch ``index`` (``call``: its arguments but the input;
        ``keep=False``: use what is kept, keep nothing new)."""
        pass_ = _BlockPass(index, list(tensors_in(call)), self._room() if keep else 0)
        with _forwards_replaced([
            (module, functools.partial(self._forward, pass_, name, module.forward)) for name, module in self._inner.items()
        ]):
            yield

    def _forward(self, pass_: "_BlockPass", name: str, forward: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        key = (name, pass_.index)
        if name in pass_.called:  # called again in one pass: a kept output is not its output
            self._drop(key)
            return forward(*args, **kwargs)
        pass_.called.add(name)
        fingerprint = _fingerprint(self._watched[name] + pass_.arguments)
        shapes = tuple((t.shape, t.dtype) for t in tensors_in((args, kwargs)))
        entry = self._kept.get(key)
        if entry is not None and fingerprint is not None and entry[:2] == (fingerprint, shapes):
            return entry[2].clone()
        self._drop(key)
        out = forward(*args, **kwargs)
        if fingerprint is None or not isinstance(out, Tensor):
            return out
        size = out.numel() * out.element_size()
        if pass_.room is None or self.nbytes + size <= pass_.room:
            self._kept[key] = (fingerprint, shapes, out.detach().clone())
            self.nbytes += size
        return out

    def _drop(self, key: tuple[str, int]) -> None:
        entry = self._kept.pop(key, None)
        if entry is not None:
            self.nbytes -= entry[2].numel() * entry[2].element_size()


@dataclass
class _BlockPass:
    """One pass of a block: its batch, its tensor arguments, what it may keep, the layers it called."""

    index: int
    arguments: list[Tensor]
    room: Optional[int]  # the bytes that may be kept in all, as of the pass's start (0: keep nothing new)
    called: set[str] = field(default_factory=set)


def _fingerprint(tensors: Sequence[Tensor]) -> Optional[tuple]:
    """Storage and in-place version of each tensor; ``None`` if one has neither (no storage, or made
    under inference mode)."""
    try:
        found = tuple((t.data_ptr(), _version(t)) for t in tensors)
    except RuntimeError:  # a sparse or wrapper tensor: no storage to point at
        return None
    return None if any(version is None for _, version in found) else found


class _KeptTensors:
    """What was kept for tensors seen in one pass: the same tensor, unchanged since (its version
    counter), maps to the same kept one. The seen tensors are held, so their ``id`` stays theirs."""

    def __init__(self, pairs: Sequence[tuple[Tensor, Tensor]]) -> None:
        self._kept: dict[int, tuple[Tensor, int, Tensor]] = {}
        for seen, kept in pairs:
            self.add(seen, kept)

    def get(self, seen: Tensor) -> Optional[Tensor]:
        entry = self._kept.get(id(seen))
        version = _version(seen)
        if entry is None or version is None or entry[0] is not seen or entry[1] != version:
            return None
        return entry[2]

    def add(self, seen: Tensor, kept: Tensor) -> Tensor:
        version = _version(seen)
        if version is not None:
            self._kept[id(seen)] = (seen, version, kept)
        return kept


def _version(t: Tensor) -> Optional[int]:
    """``t``'s in-place version counter; ``None`` for a tensor without one (made under inference mode)."""
    try:
        return t._version
    except RuntimeError:
        return None  # such a tensor is copied every time, never shared


def stacked_shape(shapes: Sequence[torch.Size], name: str, flatten: Optional[bool] = None) -> tuple[int, ...]:
    """The shape of per-batch tensors concatenated along samples (varying-length Linear inputs: rows).

    ``flatten`` forces stacking rows (``True``) or samples (``False``); ``None`` decides from ``shapes``.
    """
    tails = {tuple(s[1:]) for s in shapes}
    if len(tails) == 1 and not flatten:
        return (sum(s[0] for s in shapes), *tails.pop())
    if flatten is not False and all(len(s) >= 2 for s in shapes) and len({s[-1] for s in shapes}) == 1:
        # Linear layers fed with varying sequence lengths: every row is a sample.
        return (sum(math.prod(s[:-1]) for s in shapes), shapes[0][-1])
    raise ValueError(
        f"layer {name!r} received inputs of different shapes {sorted(tails)} across calibration "
        "batches; give calibration batches of one input shape (resize or pad them)."
    )
