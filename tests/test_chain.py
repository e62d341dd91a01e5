"""Carrying block inputs through a chain: same inputs as full passes, linear in depth."""

import contextlib

import pytest
import torch
from torch import nn

from lightning_adaround import AdaRoundConfig, adaround
from lightning_adaround.data.capture import _CarriedInputs, _LayerOutputs, default_forward
from lightning_adaround.data.chain import find_block_chains
from lightning_adaround.model.layers import select_layers


class Residual(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width),
        )

    def forward(self, x):
        return torch.relu(x + self.body(x))


def resnet(blocks=3, width=8):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
        *[Residual(width) for _ in range(blocks)],
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 5),
    )
    for m in model.modules():  # non-trivial BatchNorm statistics
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    return model.eval()


class EncoderLayer(nn.Module):
    """Takes a mask keyword and returns a tuple, like Hugging Face encoder layers."""

    def __init__(self, width):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(width, width), nn.Linear(width, width), nn.Linear(width, width)
        self.ffn = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))
        self.norm = nn.LayerNorm(width)

    def forward(self, x, mask=None):
        scores = self.q(x) @ self.k(x).transpose(1, 2) / x.shape[-1] ** 0.5
        if mask is not None:
            scores = scores.masked_fill(~mask[:, None, :], float("-inf"))
        x = x + scores.softmax(-1) @ self.v(x)
        return (self.norm(x + self.ffn(x)), scores)


class Encoder(nn.Module):
    def __init__(self, blocks=4, width=16):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Linear(6, width)
        self.layers = nn.ModuleList(EncoderLayer(width) for _ in range(blocks))
        self.head = nn.Linear(width, 3)

    def forward(self, tokens, lengths):
        mask = torch.arange(tokens.shape[1])[None, :] < lengths[:, None]
        x = self.embed(tokens)
        for layer in self.layers:
            x = layer(x, mask=mask)[0]
        return self.head(x[:, 0])


class TwiceThrough(nn.Module):
    """Not a chain: the same blocks run twice, so carrying would be wrong."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList([nn.Linear(8, 8), nn.Linear(8, 8)])

    def forward(self, x):
        for _ in range(2):
            for block in self.blocks:
                x = torch.tanh(block(x))
        return x


def image_batches(n=3):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(8, 3, 8, 8, generator=g) for _ in range(n)]


def token_batches(n=3):
    g = torch.Generator().manual_seed(2)
    return [{"tokens": torch.randn(4, 7, 6, generator=g), "lengths": torch.tensor([7, 5, 3, 6])} for _ in range(n)]


class MixOfBlocks(nn.Module):
    """A chain whose head reads the sum of every block's output (a scalar mix), not only the last."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.Tanh()) for _ in range(3))
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        total = 0
        for block in self.blocks:
            x = block(x)
            total = total + x
        return self.head(total)


class PoolThenSkipHead(nn.Module):
    """A pooler on the chain's output, then a head that also reads the first block's output."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Linear(8, 8)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.Tanh()) for _ in range(3))
        self.pool = nn.Linear(8, 8)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        x = self.embed(x)
        outs = []
        for block in self.blocks:
            x = block(x)
            outs.append(x)
        return self.head(torch.cat([torch.tanh(self.pool(x)), outs[0]], -1))


class TinyUNet(nn.Module):
    """Encoder stages that form a chain, their outputs kept as skip connections for the decoder."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.downs = nn.ModuleList([
            nn.Sequential(nn.Conv2d(4, 8, 3, stride=2, padding=1), nn.ReLU()),
            nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU()),
        ])
        self.up1 = nn.Conv2d(16 + 8, 8, 3, padding=1)
        self.up0 = nn.Conv2d(8 + 4, 4, 3, padding=1)

    def forward(self, x):
        x = self.stem(x)
        skips = [x]
        for down in self.downs:
            x = down(x)
            skips.append(x)
        x = nn.functional.interpolate(x, scale_factor=2)
        x = torch.relu(self.up1(torch.cat([x, skips[1]], 1)))
        x = nn.functional.interpolate(x, scale_factor=2)
        return self.up0(torch.cat([x, skips[0]], 1))


class Gated(nn.Module):
    """A head that reads the first block's output only on batches that ask for it (not the first)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Linear(8, 8)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.Tanh()) for _ in range(3))
        self.head = nn.Linear(8, 3)

    def forward(self, x, mix):
        x = self.embed(x)
        first = None
        for block in self.blocks:
            x = block(x)
            first = x if first is None else first
        return self.head(x + first if bool(mix) else x)


def _vectors(seed=0):
    return [torch.randn(8, 8, generator=torch.Generator().manual_seed(seed + s)) for s in range(3)]


CASES = {
    "resnet": (resnet, image_batches),
    "encoder": (Encoder, token_batches),
    "twice": (TwiceThrough, lambda: [torch.randn(8, 8, generator=torch.Generator().manual_seed(s)) for s in range(3)]),
    "mix": (MixOfBlocks, _vectors),
    # layers after the chain that read more than its output: caught by the check, the NaN, the failure
    "two-heads": (PoolThenSkipHead, _vectors),
    "unet": (TinyUNet, lambda: [torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(s)) for s in range(3)]),
    "gated": (Gated, lambda: [{"x": x, "mix": torch.tensor(s > 0)} for s, x in enumerate(_vectors())]),
}


def _layer_names(model):
    return [n for n, _ in select_layers(model)]


def test_chains_found_where_blocks_feed_each_other():
    model = resnet()
    chains = find_block_chains(model, _layer_names(model), image_batches()[0], default_forward)
    assert [c.name for c in chains] == [""]  # the model itself; the nested bodies are inside it
    assert len(chains[0].blocks) == len(model)

    encoder = Encoder()
    chains = find_block_chains(encoder, _layer_names(encoder), token_batches()[0], default_forward)
    assert [c.name for c in chains] == ["layers"]
    assert chains[0].tuple_output
    assert chains[0].block_of("layers.2.ffn.0") == 2 and chains[0].block_of("head") is None

    twice = TwiceThrough()
    assert find_block_chains(twice, _layer_names(twice), torch.randn(4, 8), default_forward) == []


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("form", ["minibatch", "moments"])
def test_carrying_gives_the_same_integer_weights(case, form):
    make, data = CASES[case]
    results = {}
    for carry in (False, True):
        config = AdaRoundConfig(bits=3, iterations=30, batch_size=4, loss_form=form, carry_activations=carry)
        results[carry] = adaround(make(), data(), config)
    assert list(results[True].layers) == list(results[False].layers)
    for name, layer in results[False].layers.items():
        assert torch.equal(layer.integer_weight, results[True].layers[name].integer_weight), name
        assert layer.adaround_mse == results[True].layers[name].adaround_mse


def _layer_forwards(model, batches, carry):
    count = {"n": 0}
    handles = [m.register_forward_pre_hook(lambda *_: count.__setitem__("n", count["n"] + 1))
               for _, m in select_layers(model)]
    adaround(model, batches, AdaRoundConfig(iterations=2, loss_form="moments", carry_activations=carry))
    for h in handles:
        h.remove()
    return count["n"]


def test_carrying_makes_capture_linear_in_depth():
    batches = image_batches(2)
    depths = (2, 5, 8)
    full = [_layer_forwards(resnet(b), batches, False) for b in depths]
    carried = [_layer_forwards(resnet(b), batches, True) for b in depths]
    # Each added residual block costs the same with carried inputs (linear in depth) and more
    # than the one before with full passes (quadratic). Counts include the optimiser's own forwards.
    assert carried[2] - carried[1] == carried[1] - carried[0]
    assert full[2] - full[1] > 1.5 * (full[1] - full[0])
    assert carried[2] < full[2] / 2


class InPlaceBlock(nn.Module):
    """Changes a layer's input in place after the layer has seen it."""

    def __init__(self, width):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(width, width), nn.Linear(width, width), nn.Linear(width, width)

    def forward(self, x):
        h = self.fc1(x)
        z = self.fc2(h)
        h.mul_(0.5)
        return self.fc3(h) + z


def in_place_chain():
    torch.manual_seed(0)
    return nn.Sequential(InPlaceBlock(8), InPlaceBlock(8), InPlaceBlock(8)).eval()


class InPlaceOutput(nn.Module):
    """Changes a layer's output in place before any other layer reads it."""

    def __init__(self, width):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(width, width), nn.Linear(width, width), nn.Linear(width, width)

    def forward(self, x):
        h = self.fc1(x)
        h.mul_(0.5)
        return self.fc3(torch.relu(self.fc2(h)))


def in_place_output_chain():
    torch.manual_seed(0)
    return nn.Sequential(InPlaceOutput(8), InPlaceOutput(8), InPlaceOutput(8)).eval()


class InPlaceResidual(nn.Module):
    """Adds its residual into its own input (``x += ...``), as some pre-norm blocks do."""

    def __init__(self, width):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(width, width), nn.Linear(width, width)

    def forward(self, x):
        x += self.fc2(torch.relu(self.fc1(x)))
        return x


def in_place_input_chain():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 8), *[InPlaceResidual(8) for _ in range(3)]).eval()


def _rounded_and_forwards(make, batches, **options):
    model = make()
    count = {"n": 0}
    handles = [m.register_forward_pre_hook(lambda *_: count.__setitem__("n", count["n"] + 1))
               for _, m in select_layers(model)]
    settings = {"bits": 3, "iterations": 20, "batch_size": 4, **options}
    result = adaround(model, batches, AdaRoundConfig(**settings))
    for h in handles:
        h.remove()
    return {n: (layer.integer_weight, layer.adaround_mse) for n, layer in result.layers.items()}, count["n"]


def _same_rounding(a, b):
    return list(a) == list(b) and all(torch.equal(a[n][0], b[n][0]) and a[n][1] == b[n][1] for n in a)


@pytest.mark.parametrize("form", ["minibatch", "moments"])
@pytest.mark.parametrize("make, data", [
    (Encoder, token_batches),
    (in_place_chain, lambda: [torch.randn(8, 8) for _ in range(3)]),
    (in_place_input_chain, lambda: [torch.randn(8, 8) for _ in range(3)]),
], ids=["encoder", "in-place-inside", "in-place-input"])
def test_one_float_pass_per_block_gives_the_same_rounding(make, data, form):
    """Each block's float-model side runs once per batch for all its layers (not once per layer),
    with the same integer weights as per-layer passes (a budget of 1 byte) and as full passes."""
    batches = data()
    shared, shared_forwards = _rounded_and_forwards(make, batches, loss_form=form)
    per_layer, per_layer_forwards = _rounded_and_forwards(make, batches, loss_form=form, host_cache_bytes=1)
    full, _ = _rounded_and_forwards(make, batches, loss_form=form, carry_activations=False)
    for name, (integer_weight, mse) in full.items():
        for other in (shared, per_layer):
            assert torch.equal(other[name][0], integer_weight), name
            assert other[name][1] == mse, name
    assert shared_forwards < per_layer_forwards


@pytest.mark.parametrize("form", ["minibatch", "moments"])
@pytest.mark.parametrize("make, data, saved", [
    # 4 blocks of 5 layers, 4 batches: without reuse a block's passes run 0 + 1 + 2 + 3 + 4 of its
    # layers for the captures and 5 for the step to the next block, with reuse each layer once
    (Encoder, lambda: token_batches(4), 4 * 4 * (15 - 5)),
    # 3 blocks of 3 layers, 3 batches, the last block with no step after it (nothing follows the
    # chain): 6 against 3 runs per batch in the first two blocks, 3 against 2 in the last
    (in_place_chain, lambda: [torch.randn(8, 8) for _ in range(3)], 3 * (3 + 3 + 1)),
    # the same with each block halving fc1's output in place right away: the kept output is a copy
    # taken as fc1 returned it, so the savings are the same
    (in_place_output_chain, lambda: [torch.randn(8, 8) for _ in range(3)], 3 * (3 + 3 + 1)),
], ids=["encoder", "in-place-inside", "in-place-output"])
def test_a_block_runs_each_rounded_layer_once_per_batch(make, data, saved, form, monkeypatch):
    """A rounded layer's output in its block is kept and handed to the block's later passes (the
    next layers' captures, the step to the next block) instead of being computed again, with the
    same rounding; a block that changes a layer's output in place gets it as the layer returns it."""
    batches = data()
    runs = {"n": 0}
    linear = nn.Linear.forward

    def counted(module, x):
        runs["n"] += 1
        return linear(module, x)

    monkeypatch.setattr(nn.Linear, "forward", counted)
    reused, _ = _rounded_and_forwards(make, batches, loss_form=form)
    with_reuse = runs["n"]
    monkeypatch.setattr(_LayerOutputs, "reused", lambda self, *a, **k: contextlib.nullcontext())
    runs["n"] = 0
    recomputed, _ = _rounded_and_forwards(make, batches, loss_form=form)
    assert _same_rounding(reused, recomputed)
    assert runs["n"] - with_reuse == saved


@pytest.mark.parametrize("form", ["minibatch", "moments"])
def test_a_layer_after_the_chain_skips_its_blocks(form, monkeypatch):
    """The head after an encoder's chain gets its input from the chain's kept output (the blocks
    are not run again, past a first batch that checks it), with the same rounding as running them."""
    batches = token_batches(4)
    skipped, skipped_forwards = _rounded_and_forwards(Encoder, batches, loss_form=form)
    monkeypatch.setattr(_CarriedInputs, "comes_before", lambda self, name: False)
    run_through, run_through_forwards = _rounded_and_forwards(Encoder, batches, loss_form=form)
    assert _same_rounding(skipped, run_through)
    # the head's capture runs the 4 blocks' 5 layers on 3 of the 4 batches less, in both models; the
    # rounded model's last block runs once more per batch (to the chain's output), and the first
    # batch's check reaches the embedding and the head once more in each model
    assert run_through_forwards - skipped_forwards == 2 * 3 * 4 * 5 - 4 * 5 - 2 * 2


def test_a_head_reading_more_than_the_chain_output_runs_the_blocks():
    """A head over every block's output: skipping the blocks would change its input, which the first
    batch's check finds; the rounding is that of full passes."""
    batches = [torch.randn(8, 8, generator=torch.Generator().manual_seed(s)) for s in range(3)]
    carried, _ = _rounded_and_forwards(MixOfBlocks, batches)
    full, _ = _rounded_and_forwards(MixOfBlocks, batches, carry_activations=False)
    assert _same_rounding(carried, full)


def test_kept_layer_outputs_follow_the_block_parameters(monkeypatch):
    """A kept output is reused only while the parameters it depends on are unchanged: its own layer's
    and those of the block's modules before it, not those of the layers after it."""
    torch.manual_seed(0)
    block = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    outputs = _LayerOutputs(block, {"0": block[0], "2": block[2]}, lambda: None)
    x = torch.randn(3, 4)
    ran = []
    linear = nn.Linear.forward
    monkeypatch.setattr(nn.Linear, "forward", lambda module, t: ran.append(module) or linear(module, t))

    def run():
        ran.clear()
        with outputs.reused(0, ((), {})):
            out = block(x)
        assert torch.equal(out, linear(block[2], torch.relu(linear(block[0], x))))
        return [next(n for n, m in block.named_children() if m is r) for r in ran]

    assert run() == ["0", "2"]
    assert run() == []
    with torch.no_grad():
        block[2].weight.mul_(0.5)  # a later layer changed: the first layer's output still holds
    assert run() == ["2"]
    with torch.no_grad():
        block[0].bias.add_(1.0)  # an earlier one: everything after it runs again
    assert run() == ["0", "2"]
    block[0].weight.data = block[0].weight.data * 2  # a swapped tensor (as float weights are put back)
    assert run() == ["0", "2"]
    assert run() == []


class CalledTwice(nn.Module):
    """Calls one layer twice (weight sharing inside a block)."""

    def __init__(self, width):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(width, width), nn.Linear(width, width)

    def forward(self, x):
        h = torch.tanh(self.fc1(x))
        return x + self.fc2(torch.tanh(self.fc1(2 * h)))


class Tied(nn.Module):
    """Two layers with one weight: rounding the second changes the first."""

    def __init__(self, width):
        super().__init__()
        self.enc, self.dec = nn.Linear(width, width), nn.Linear(width, width)
        self.dec.weight = self.enc.weight

    def forward(self, x):
        return x + self.dec(torch.tanh(3 * self.enc(x)))


class ChangedThroughData(nn.Module):
    """Changes layer outputs through ``.data``, which no version counter sees."""

    def __init__(self, width):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(width, width), nn.Linear(width, width), nn.Linear(width, width)

    def forward(self, x):
        h = self.fc1(x)
        h.data.clamp_(min=0)
        h = self.fc2(h)
        h.data.mul_(0.5)
        return x + self.fc3(torch.tanh(h))


class SparseGraph(nn.Module):
    """Holds a sparse buffer (no storage to fingerprint)."""

    def __init__(self, width, nodes=16):
        super().__init__()
        edges = torch.stack([torch.arange(nodes), (torch.arange(nodes) + 1) % nodes])
        self.register_buffer("adjacency", torch.sparse_coo_tensor(edges, torch.ones(nodes), (nodes, nodes)).coalesce())
        self.fc1, self.fc2 = nn.Linear(width, width), nn.Linear(width, width)

    def forward(self, x):
        return x + self.fc2(torch.relu(torch.sparse.mm(self.adjacency, self.fc1(x))))


def attention_layer(width):
    return nn.TransformerEncoderLayer(width, 4, 2 * width, dropout=0.0, batch_first=True)


@pytest.mark.parametrize("block, shape", [
    (CalledTwice, (16, 32)), (Tied, (16, 32)), (ChangedThroughData, (16, 32)), (SparseGraph, (16, 32)),
    (attention_layer, (16, 6, 32)),
], ids=["called-twice", "tied", "changed-through-data", "sparse-buffer", "transformer-layer"])
def test_kept_layer_outputs_give_the_same_rounding(block, shape, monkeypatch):
    """Blocks where a kept output could go wrong: a layer called twice in one pass, a weight tied to
    a later layer, outputs changed where no version counter sees it, state without storage, and
    torch's own encoder layer (its fused fast path is taken only when no torch-function mode is
    active: a pass must run as it would without kept outputs)."""
    def make():
        torch.manual_seed(0)
        return nn.Sequential(block(32), block(32), block(32)).eval()

    generator = torch.Generator().manual_seed(1)
    batches = [torch.randn(*shape, generator=generator) for _ in range(3)]
    reused, _ = _rounded_and_forwards(make, batches, iterations=200, bits=2, batch_size=16)
    monkeypatch.setattr(_LayerOutputs, "reused", lambda self, *a, **k: contextlib.nullcontext())
    recomputed, _ = _rounded_and_forwards(make, batches, iterations=200, bits=2, batch_size=16)
    assert _same_rounding(reused, recomputed)
