"""Every weight is accounted for: what stayed in float and why, and weight-shared layers fitted to all their calls."""

import copy
import warnings

import pytest
import torch
from torch import nn

from lightning_adaround import AdaRoundConfig, adaround, round_to_nearest
from lightning_adaround.data.capture import InputCapture, default_forward
from lightning_adaround.result import AdaRoundResult

FAST = dict(iterations=30, batch_size=8)
VOCAB, DIM, TOKENS, BATCH = 500, 72, 12, 16


class Mixed(nn.Module):
    """An Embedding, an LSTM, an attention block, a LayerNorm, a Linear used twice, an unused Linear."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.lstm = nn.LSTM(DIM, DIM, batch_first=True)
        self.attn = nn.MultiheadAttention(DIM, 4, batch_first=True)
        self.norm = nn.LayerNorm(DIM)
        self.shared = nn.Linear(DIM, DIM)
        self.head = nn.Linear(DIM, 10)
        self.unused = nn.Linear(DIM, DIM)

    def forward(self, tokens):
        x = self.embed(tokens)
        x, _ = self.lstm(x)
        a, _ = self.attn(x, x, x, need_weights=False)
        x = self.norm(x + a)
        x = self.shared(torch.relu(self.shared(x)))
        return self.head(x.mean(1))


def tokens(n=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (BATCH, TOKENS), generator=g) for _ in range(n)]


def run_mixed(**config):
    torch.manual_seed(0)
    model = Mixed()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = adaround(model, tokens(), AdaRoundConfig(**{**FAST, **config}))
    float_warnings = [w for w in caught if "stay in float" in str(w.message)]
    return model, result, float_warnings


EXPECTED = {  # module -> (kind, words of its reason)
    "embed": ("unsupported", "unsupported type Embedding"),
    "lstm": ("unsupported", "unsupported type LSTM"),
    "attn": ("unsupported", "MultiheadAttention's own in_proj_weight not rounded"),
    "attn.out_proj": ("not called", "used without a module call (by MultiheadAttention)"),
    "head": ("excluded", "excluded by exclude='head'"),
    "unused": ("unreached", "unreached: no calibration batch called it"),
    "norm": ("norm/bias", "1-D parameters only"),
}


def test_summary_names_every_float_module_with_its_reason():
    model, result, _ = run_mixed(exclude=["head"])
    assert set(result.layers) == {"shared"}
    assert {name: m.kind for name, m in result.float_modules.items()} == {n: k for n, (k, _) in EXPECTED.items()}
    for name, (_, words) in EXPECTED.items():
        assert words in result.float_modules[name].reason, name
    assert result.float_modules["embed"].parameters == VOCAB * DIM
    assert "F.multi_head_attention_forward" in result.float_modules["attn.out_proj"].advice
    assert "F.multi_head_attention_forward" in result.float_modules["attn"].advice
    table = result.summary_table()
    lines = table.splitlines()
    section = lines.index(next(line for line in lines if line.startswith("left in float: 7 modules")))
    assert not any(line.split()[:1] == ["unused"] for line in lines[:section])  # not among the rounded layers
    for name, (kind, words) in EXPECTED.items():
        if kind == "norm/bias":
            continue
        row = next(line for line in lines[section:] if line.split()[:1] == [name])
        assert words in row and type(model.get_submodule(name)).__name__ in row, row
    assert "norm/bias parameters only (normally kept in float): 1 LayerNorm (144 parameters)" in table
    assert any(line.startswith("[1] ") and "MSE grid" in line for line in lines)  # the Embedding's advice


def test_one_warning_names_big_float_weight_matrices_only():
    _, result, caught = run_mixed(exclude=["head"], layers=None)
    assert len(caught) == 1
    message = str(caught[0].message)
    for name in ("'embed'", "'lstm'", "'attn'", "'attn.out_proj'", "'unused'"):
        assert name in message, name
    assert "'head'" not in message and "'norm'" not in message  # the user's choice; vectors only
    assert "F.multi_head_attention_forward" in message and "MSE grid" in message
    # small float layers and LayerNorms alone: listed, no warning
    torch.manual_seed(0)
    small = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quiet = adaround(small, [torch.randn(32, 8)], AdaRoundConfig(exclude=["2"], **FAST))
    assert {n: m.kind for n, m in quiet.float_modules.items()} == {"1": "norm/bias", "2": "excluded"}


def test_shared_layer_rows_from_every_call():
    _, result, _ = run_mixed(exclude=["head"])
    shared = result.layers["shared"]
    assert shared.num_samples + shared.eval_samples == 2 * 4 * BATCH  # both calls of every batch
    _, result, _ = run_mixed(exclude=["head"], loss_form="minibatch")
    shared = result.layers["shared"]
    assert shared.num_samples + shared.eval_samples == 2 * 4 * BATCH


class Loop(nn.Module):
    """A recurrence: ``shared`` is called once per step, first on a zero state."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(16, 32)
        self.shared = nn.Linear(32, 32)
        self.out = nn.Linear(32, 4)

    def forward(self, x):
        h = torch.zeros(x.shape[0], 32)
        for t in range(x.shape[1]):
            h = torch.tanh(self.inp(x[:, t]) + self.shared(h))
        return self.out(h)


@pytest.mark.parametrize("form", ["moments", "minibatch"])
def test_shared_layer_fitted_to_all_calls_beats_nearest(form):
    """Fitted to its first call only (a zero input), the shared layer came out exactly round-to-nearest."""
    g = torch.Generator().manual_seed(1)
    data = [torch.randn(64, 3, 16, generator=g) for _ in range(4)]
    held_out = torch.randn(256, 3, 16, generator=g)
    torch.manual_seed(0)
    reference = Loop()
    config = AdaRoundConfig(bits=3, iterations=500, loss_form=form, layers=["shared"], scale_method="mse")
    rounded, nearest = copy.deepcopy(reference), copy.deepcopy(reference)
    result = adaround(rounded, data, config)
    round_to_nearest(nearest, config)
    with torch.no_grad():
        target = reference(held_out)
        adaround_error = (rounded(held_out) - target).pow(2).mean().item()
        nearest_error = (nearest(held_out) - target).pow(2).mean().item()
    assert adaround_error < 0.9 * nearest_error, (adaround_error, nearest_error)
    shared = result.layers["shared"]
    assert shared.num_samples + shared.eval_samples == 3 * 4 * 64  # three calls per batch


def test_capture_inputs_stack_every_call_of_a_batch():
    """``inputs`` (bias correction) gives one tensor per batch holding every call."""
    torch.manual_seed(0)
    model = Loop()
    data = [torch.randn(5, 3, 16), torch.randn(7, 3, 16)]
    capture = InputCapture(model, data, default_forward, call_counts={"shared": 3})
    inputs = list(capture.inputs("shared", model.shared))
    assert [x.shape[0] for x in inputs] == [15, 21]
    assert torch.equal(inputs[0][:5], torch.zeros(5, 32))  # the first call sees the zero state


def test_weight_read_without_calling_the_layer():
    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)
            self.proj = nn.Linear(8, 8)

        def forward(self, x):
            return nn.functional.linear(self.fc(x), self.proj.weight)

    torch.manual_seed(0)
    model = nn.Sequential(Functional(), nn.Linear(8, 4))
    result = adaround(model, [torch.randn(32, 8)], AdaRoundConfig(**FAST))
    assert set(result.layers) == {"0.fc", "1"} and result.unreached == ["0.proj"]
    proj = result.float_modules["0.proj"]
    assert proj.kind == "not called" and "Functional '0'" in proj.reason and "F.linear" in proj.advice


def test_tied_weights_count_as_rounded():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(100, 16)
            self.lm_head = nn.Linear(16, 100, bias=False)
            self.lm_head.weight = self.embed.weight

        def forward(self, t):
            return self.lm_head(self.embed(t))

    torch.manual_seed(0)
    model = Tied()
    result = adaround(model, [torch.randint(0, 100, (32, 4))], AdaRoundConfig(**FAST))
    assert set(result.layers) == {"lm_head"} and result.float_modules == {}
    assert "left in float" not in result.summary_table()


def test_float_modules_survive_state_dict_and_old_state_dicts_load():
    _, result, _ = run_mixed(exclude=["head"])
    again = AdaRoundResult.from_state_dict(result.state_dict())
    assert again.float_modules == result.float_modules
    assert again.summary_table() == result.summary_table()
    old = result.state_dict()
    del old["float_modules"]  # saved before the field existed
    loaded = AdaRoundResult.from_state_dict(old)
    assert loaded.float_modules == {} and loaded.unreached == ["attn.out_proj", "unused"]
    table = loaded.summary_table()  # the unreached layers still show
    assert "left in float: 2 modules," in table
    for name in loaded.unreached:
        assert any(line.split()[:1] == [name] and "unreached" in line for line in table.splitlines()), name
