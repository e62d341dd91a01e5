"""``adaround()`` end to end: input checks, failure recovery, data accounting, determinism."""

import copy

import pytest
import torch
from torch import nn

from lightning_adaround import AdaRoundConfig, AdaRoundObserver, adaround
from lightning_adaround.model.layers import select_layers


FAST = dict(iterations=20, batch_size=8)


class Recorder(AdaRoundObserver):
    def __init__(self):
        self.started = []
        self.layer_starts = []
        self.steps = []
        self.layer_ends = []
        self.ended = []

    def on_start(self, layer_names):
        self.started.append(list(layer_names))

    def on_layer_start(self, name, index, iterations):
        self.layer_starts.append((name, index, iterations))

    def on_step(self, name, step, metrics):
        self.steps.append((name, step))

    def on_layer_end(self, result):
        self.layer_ends.append(result.name)

    def on_end(self, result):
        self.ended.append(result)

    def assert_not_optimized(self):
        assert self.layer_starts == [] and self.steps == [] and self.layer_ends == [] and self.ended == []


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))


def batches(n=3, size=16, features=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(size, features, generator=g) for _ in range(n)]


def weights(model):
    return {n: m.weight.detach().clone() for n, m in select_layers(model)}


def assert_weights_equal(model, saved):
    for name, module in select_layers(model):
        assert torch.equal(module.weight.detach(), saved[name]), name


# ---------------------------------------------------------------- bad input, before any work


@pytest.mark.parametrize("kwargs,fragment", [
    (dict(bits=1), "bits=1"),
    (dict(bits=9), "bits=9"),
    (dict(bits=4.0), "4.0"),
    (dict(reg_lambda=-1), "reg_lambda=-1"),
    (dict(iterations=0), "iterations=0"),
    (dict(batch_size=0), "batch_size=0"),
    (dict(warm_start=1.5), "warm_start=1.5"),
    (dict(holdout_fraction=1.0), "holdout_fraction=1.0"),
    (dict(lr=0.0), "lr=0.0"),
    (dict(scale_method="max"), "'max'"),
    (dict(layer_bits={"fc": 9}), "layer_bits['fc']=9"),
    (dict(beta_start=2.0, beta_end=20.0), "beta_start=2.0"),
    (dict(log_every_n_steps=0), "log_every_n_steps=0"),
    (dict(layers="fc"), "layers"),
])
def test_config_rejects_bad_values(kwargs, fragment):
    with pytest.raises((ValueError, TypeError)) as info:
        AdaRoundConfig(**kwargs)
    assert fragment in str(info.value)


def _fails_before_start(model, data, config=None, **kw):
    rec = Recorder()
    saved = weights(model) if select_layers(model) else {}
    with pytest.raises(Exception) as info:
        adaround(model, data, config or AdaRoundConfig(**FAST), observer=rec, **kw)
    rec.assert_not_optimized()
    if saved:
        assert_weights_equal(model, saved)
    return info


def test_empty_calibration_data():
    info = _fails_before_start(mlp(), [])
    assert info.type is ValueError and "empty" in str(info.value)
    info = _fails_before_start(mlp(), iter([]))
    assert info.type is ValueError and "empty" in str(info.value)


def test_no_supported_layer():
    info = _fails_before_start(nn.Sequential(nn.ReLU()), batches())
    assert info.type is ValueError and "no layer to round" in str(info.value)
    assert "Sequential" in str(info.value)


def test_globs_selecting_nothing():
    info = _fails_before_start(mlp(), batches(), AdaRoundConfig(layers=["conv*"], **FAST))
    assert info.type is ValueError and "conv*" in str(info.value)


def test_forward_fn_that_raises():
    def broken(model, batch):
        raise RuntimeError("boom from user code")

    info = _fails_before_start(mlp(), batches(), forward_fn=broken)
    assert info.type is ValueError
    assert "forward_fn" in str(info.value) and "boom from user code" in str(info.value)


@pytest.mark.parametrize("bad_batch", ["a string batch", object(), 3.5])
def test_batch_default_forward_cannot_handle(bad_batch):
    info = _fails_before_start(mlp(), [bad_batch])
    assert info.type is ValueError
    assert "forward_fn" in str(info.value)


def test_nan_input_names_first_layer():
    data = batches()
    data[1][3, 2] = float("nan")
    info = _fails_before_start(mlp(), data)
    assert info.type is ValueError
    assert "'0'" in str(info.value) and "NaN" in str(info.value)


class _Log(nn.Module):
    def forward(self, x):
        return torch.log(x)  # NaN for negative inputs


def test_nan_at_later_layer_names_it_and_restores():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), _Log(), nn.Linear(6, 2))
    saved = weights(model)
    rec = Recorder()
    with pytest.raises(ValueError) as info:
        adaround(model, batches(), AdaRoundConfig(**FAST), observer=rec)
    assert "'2'" in str(info.value)
    assert [s[0] for s in rec.layer_starts] == ["0"]  # layer 0 was rounded, then the failure
    assert_weights_equal(model, saved)


# ---------------------------------------------------------------- failure midway


class _InterruptOnSecond(Recorder):
    def on_layer_end(self, result):
        super().on_layer_end(result)
        if len(self.layer_ends) == 2:
            raise KeyboardInterrupt


@pytest.mark.parametrize("training", [True, False])
def test_interrupt_midway_restores_float_weights_and_mode(training):
    model = mlp()
    model.train(training)
    saved = weights(model)
    params_before = [id(p) for p in model.parameters()]
    rec = _InterruptOnSecond()
    with pytest.raises(KeyboardInterrupt):
        adaround(model, batches(), AdaRoundConfig(**FAST), observer=rec)
    assert rec.layer_ends == ["0", "2"]  # two layers had been rounded and written back
    assert_weights_equal(model, saved)
    assert all(m.training == training for m in model.modules())
    assert [id(p) for p in model.parameters()] == params_before
    assert rec.ended == []


def test_forward_failure_on_later_batch_restores():
    model = mlp()
    saved = weights(model)
    calls = {"n": 0}

    def flaky(m, batch):
        calls["n"] += 1
        if calls["n"] > 8:  # fine for the first layers' captures, then fails
            raise RuntimeError("disk gone")
        return m(batch)

    with pytest.raises(RuntimeError, match="disk gone"):
        adaround(model, batches(), AdaRoundConfig(**FAST, carry_activations=False), forward_fn=flaky)
    assert_weights_equal(model, saved)


class _FailsAfter(nn.Module):
    """An activation that breaks after ``n`` calls: a failure inside a carried block."""

    def __init__(self, n):
        super().__init__()
        self.n = n

    def forward(self, x):
        self.n -= 1
        if self.n < 0:
            raise RuntimeError("disk gone")
        return torch.relu(x)


def test_failure_while_carrying_blocks_restores():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), _FailsAfter(4), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    saved = weights(model)
    with pytest.raises(RuntimeError, match="disk gone"):
        adaround(model, batches(), AdaRoundConfig(**FAST))
    assert_weights_equal(model, saved)


# ---------------------------------------------------------------- unreached layers


class _WithUnused(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 6)
        self.unused = nn.Linear(6, 6)
        self.fc2 = nn.Linear(6, 2)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def test_unreached_layer_reported_and_untouched():
    torch.manual_seed(0)
    model = _WithUnused()
    saved = weights(model)
    rec = Recorder()
    result = adaround(model, batches(), AdaRoundConfig(**FAST), observer=rec)
    assert result.unreached == ["unused"]
    assert set(result.layers) == {"fc1", "fc2"}
    assert torch.equal(model.unused.weight, saved["unused"])
    assert not torch.equal(model.fc1.weight, saved["fc1"])
    assert rec.started == [["fc1", "fc2", "unused"]]
    assert [s[0] for s in rec.layer_starts] == ["fc1", "fc2"]
    assert "unused" in result.summary_table()


def test_layer_reached_only_by_later_batches():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 2)
            self.b = nn.Linear(4, 2)

        def forward(self, x):
            return self.b(x) if x.shape[0] == 5 else self.a(x)

    torch.manual_seed(0)
    model = Branchy()
    data = [torch.randn(8, 4), torch.randn(5, 4), torch.randn(8, 4)]
    result = adaround(model, data, AdaRoundConfig(holdout_fraction=0.0, **FAST))
    assert set(result.layers) == {"a", "b"} and result.unreached == []
    assert result.layers["a"].num_samples == 16
    assert result.layers["b"].num_samples == 5


# ---------------------------------------------------------------- every sample reaches the optimiser


def _tagged_batches(sizes, seed=0):
    """Feature 0 of sample i is the unique id i (1-based), the rest is noise."""
    g = torch.Generator().manual_seed(seed)
    out, next_id = [], 1
    for size in sizes:
        x = torch.randn(size, 4, generator=g)
        x[:, 0] = torch.arange(next_id, next_id + size, dtype=torch.float32)
        next_id += size
        out.append(x)
    return out, list(range(1, next_id))


def _record_optimizer_ids(layer):
    seen = []

    def hook(_module, args, output):
        if output.requires_grad:  # an optimisation step (capture and evaluation run without grad)
            seen.extend(int(v) for v in args[0][:, 0].tolist())

    return seen, layer.register_forward_hook(hook)


def test_every_sample_of_every_batch_reaches_optimizer_equally():
    model = mlp()
    data, ids = _tagged_batches([12, 12, 12, 12])  # 48 samples
    seen, handle = _record_optimizer_ids(model[0])
    # 48 samples / batch 8 = 6 steps per pass; 12 steps = exactly 2 passes
    result = adaround(model, data, AdaRoundConfig(iterations=12, batch_size=8, holdout_fraction=0.0, loss_form="minibatch"))
    handle.remove()
    assert len(seen) == 12 * 8
    assert sorted(set(seen)) == ids
    assert all(seen.count(i) == 2 for i in ids)
    r = result.layers["0"]
    assert r.num_samples == 48 and r.eval_samples == 48  # no holdout: evaluated on the training set
    assert all(result.layers[n].num_samples == 48 for n in ("0", "2", "4"))


def test_uneven_batches_all_reach_optimizer():
    model = mlp()
    data, ids = _tagged_batches([10, 14, 7, 3])  # 34 samples
    seen, handle = _record_optimizer_ids(model[0])
    result = adaround(model, data, AdaRoundConfig(iterations=60, batch_size=8, holdout_fraction=0.0, loss_form="minibatch"))
    handle.remove()
    assert sorted(set(seen)) == ids
    assert result.layers["0"].num_samples == 34


def test_holdout_samples_kept_out_of_optimization():
    model = mlp()
    data, ids = _tagged_batches([16, 16, 16])  # 48 samples
    seen, handle = _record_optimizer_ids(model[0])
    result = adaround(model, data, AdaRoundConfig(iterations=40, batch_size=6, holdout_fraction=0.25, loss_form="minibatch"))
    handle.remove()
    for name, r in result.layers.items():
        assert r.num_samples + r.eval_samples == 48, name
        assert r.eval_samples == 12
    assert len(set(seen)) == 36  # exactly the training share, all of it
    assert set(seen) < set(ids)


# ---------------------------------------------------------------- determinism


def test_same_seed_same_integer_weights():
    model = mlp()
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    data = batches()
    cfg = AdaRoundConfig(iterations=40, batch_size=8, seed=123, lr=1e-2)
    ra = adaround(a, data, cfg)
    rb = adaround(b, data, cfg)
    for name in ra.layers:
        assert torch.equal(ra.layers[name].integer_weight, rb.layers[name].integer_weight), name
        assert torch.equal(ra.layers[name].scale, rb.layers[name].scale)
    for (na, ma), (nb, mb) in zip(select_layers(a), select_layers(b)):
        assert torch.equal(ma.weight, mb.weight), na


# ---------------------------------------------------------------- mode, summary, result


def test_training_mode_and_bn_stats_restored_and_summary():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))
    model.train()
    bn_mean = model[1].running_mean.clone()
    bn_batches = model[1].num_batches_tracked.clone()
    saved = weights(model)
    data = [torch.randn(6, 3, 6, 6) for _ in range(2)]
    rec = Recorder()
    config = AdaRoundConfig(**FAST, loss_form="minibatch", fold_batchnorm=False)  # folding would rewrite the stats
    result = adaround(model, data, config, observer=rec)
    assert all(m.training for m in model.modules())
    assert torch.equal(model[1].running_mean, bn_mean)  # calibration ran in eval mode
    assert torch.equal(model[1].num_batches_tracked, bn_batches)
    table = result.summary_table()
    for name in ("0", "4"):
        assert name in result.layers
        assert any(line.split()[0] == name for line in table.splitlines()[2:])
        assert not torch.equal(dict(select_layers(model))[name].weight, saved[name])
    assert result.layers["0"].with_activation  # BN + ReLU follow the conv
    assert not result.layers["4"].with_activation
    assert rec.started == [["0", "4"]]
    assert [s[:2] for s in rec.layer_starts] == [("0", 0), ("4", 1)]
    assert rec.ended == [result]
    assert {s[0] for s in rec.steps} == {"0", "4"}


def test_eval_mode_stays_eval():
    model = mlp().eval()
    adaround(model, batches(), AdaRoundConfig(**FAST))
    assert not any(m.training for m in model.modules())


def test_layer_bits_override_and_globs():
    model = mlp()
    result = adaround(model, batches(), AdaRoundConfig(layer_bits={"0": 8}, **FAST))
    assert result.layers["0"].bits == 8 and result.layers["0"].qmax == 127 and result.layers["0"].qmin == -128
    for name in ("2", "4"):
        assert result.layers[name].bits == 4 and result.layers[name].qmax == 7
    assert int(result.layers["0"].integer_weight.abs().max()) > 7  # really uses the wider range

    model = mlp()
    saved = weights(model)
    result = adaround(model, batches(), AdaRoundConfig(layers=["0", "4"], **FAST))
    assert set(result.layers) == {"0", "4"}
    assert torch.equal(model[2].weight, saved["2"])
    assert not torch.equal(model[0].weight, saved["0"])

    model = mlp()
    saved = weights(model)
    result = adaround(model, batches(), AdaRoundConfig(exclude=["[02]"], **FAST))
    assert set(result.layers) == {"4"}
    assert torch.equal(model[0].weight, saved["0"]) and torch.equal(model[2].weight, saved["2"])


def test_activations_argument_overrides_detection():
    model = mlp()
    result = adaround(model, batches(), AdaRoundConfig(**FAST, loss_form="minibatch"), activations={"0": None, "4": torch.tanh})
    assert not result.layers["0"].with_activation
    assert result.layers["2"].with_activation  # ReLU detected
    assert result.layers["4"].with_activation


class _KwModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.seen = []

    def forward(self, x, offset=None):
        self.seen.append((tuple(x.shape), offset is None))
        return self.fc(x) if offset is None else self.fc(x + offset)


def test_dict_batches_are_keyword_arguments():
    torch.manual_seed(0)
    model = _KwModel()
    saved = weights(model)
    # keys in the opposite order of the signature: only keyword passing gets this right
    data = [{"offset": torch.zeros(4), "x": b} for b in batches()]
    result = adaround(model, data, AdaRoundConfig(holdout_fraction=0.0, **FAST))
    assert result.layers["fc"].num_samples == 48
    assert not torch.equal(model.fc.weight, saved["fc"])
    assert model.seen and all(seen == ((16, 4), False) for seen in model.seen)

    model = _KwModel()
    result = adaround(model, [{"x": b} for b in batches()], AdaRoundConfig(holdout_fraction=0.0, **FAST))
    assert result.layers["fc"].num_samples == 48


def test_tuple_batches_use_first_element():
    model = mlp()
    data = [(b, torch.zeros(len(b), dtype=torch.long)) for b in batches()]
    result = adaround(model, data, AdaRoundConfig(holdout_fraction=0.0, **FAST))
    assert result.layers["0"].num_samples == 48


def test_inference_mode_like_lightning_validate():
    model = mlp()
    saved = weights(model)
    with torch.inference_mode():
        data = [torch.randn(16, 4) for _ in range(3)]
        assert data[0].is_inference()
        result = adaround(model, data, AdaRoundConfig(**FAST))
    assert set(result.layers) == {"0", "2", "4"}
    for name, module in select_layers(model):
        assert not torch.equal(module.weight.detach(), saved[name]), name
        assert torch.equal(result.layers[name].dequantized_weight(), module.weight.detach())
        assert module.weight.requires_grad and not module.weight.is_inference()
    # the model still trains afterwards
    model(torch.randn(2, 4)).sum().backward()
    assert model[0].weight.grad is not None


def test_inference_mode_failure_still_restores():
    model = mlp()
    saved = weights(model)
    with torch.inference_mode():
        data = [torch.randn(16, 4) for _ in range(2)]
        with pytest.raises(KeyboardInterrupt):
            adaround(model, data, AdaRoundConfig(**FAST), observer=_InterruptOnSecond())
    assert_weights_equal(model, saved)


def test_model_parameters_get_no_gradient_and_keep_requires_grad():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    model[3].bias.requires_grad_(False)
    adaround(model, batches(), AdaRoundConfig(**FAST, loss_form="minibatch"))
    assert all(p.grad is None for p in model.parameters())
    assert [p.requires_grad for p in model.parameters()] == [True] * 5 + [False]


def test_namedtuple_and_mapping_batches_keep_their_type_when_moved():
    """One walker moves, clones and cuts batches: a namedtuple or an OrderedDict comes back as itself."""
    import collections

    from lightning_adaround.api import move_to_device
    from lightning_adaround.data.calibration import batch_size_of, leading_rows, take_samples

    Pair = collections.namedtuple("Pair", "x y")
    batch = Pair(torch.randn(6, 3), collections.OrderedDict(mask=torch.ones(6), note="kept"))
    moved = move_to_device(batch, torch.device("cpu"))
    assert isinstance(moved, Pair) and isinstance(moved.y, collections.OrderedDict) and moved.y["note"] == "kept"
    assert batch_size_of(batch) == 6
    cut = leading_rows(batch, 1, 4, 6)
    assert isinstance(cut, Pair) and cut.x.shape == (3, 3) and cut.y["mask"].shape == (3,)
    assert [batch_size_of(b) for b in take_samples([batch, batch], 8)] == [6, 2]


def test_learning_rate_is_tied_to_iterations_unless_given():
    """lr=None: 1e-2 up to 500 iterations, 1e-3 from the paper's 10,000, log-linear between."""
    assert AdaRoundConfig(iterations=500).learning_rate == 1e-3  # the default stays the paper's
    rates = [AdaRoundConfig(iterations=n, lr=None).learning_rate for n in (100, 500, 2236, 10_000, 50_000)]
    assert rates[0] == rates[1] == pytest.approx(1e-2) and rates[3] == rates[4] == pytest.approx(1e-3)
    assert rates[2] == pytest.approx(10 ** -2.5, rel=1e-3)
    assert AdaRoundConfig(iterations=500, lr=5e-4).learning_rate == 5e-4
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    data = [torch.randn(32, 8) for _ in range(2)]
    tied = adaround(copy.deepcopy(model), data, AdaRoundConfig(iterations=60, lr=None))
    given = adaround(copy.deepcopy(model), data, AdaRoundConfig(iterations=60, lr=1e-2))
    paper = adaround(copy.deepcopy(model), data, AdaRoundConfig(iterations=60, lr=1e-3))
    assert all(torch.equal(tied.layers[n].integer_weight, given.layers[n].integer_weight) for n in tied.layers)
    assert any(not torch.equal(tied.layers[n].integer_weight, paper.layers[n].integer_weight) for n in tied.layers)


def test_each_layer_holds_out_its_own_samples_so_every_sample_is_fitted(monkeypatch):
    """With one held-out set for the whole run a tenth of the calibration samples reached no layer's
    optimisation (and cost EfficientNet-Lite1 with bias correction, docs/four-bits.md). Each unit now
    draws its own set, from the seed and its position only, so a resumed run and every process
    draw the same one whatever ran before."""
    from lightning_adaround.data.calibration import SampleLayout

    drawn: dict[int, torch.Tensor] = {}
    original = SampleLayout.unit_held_out

    def record(self, fraction, seed, position):
        masks = original(self, fraction, seed, position)
        drawn[position] = torch.cat(masks)
        return masks

    monkeypatch.setattr(SampleLayout, "unit_held_out", record)
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(8, 8) for _ in range(4)])
    data = [torch.randn(10, 8) for _ in range(4)]  # 40 samples, 10 held out of each layer
    result = adaround(model, data, AdaRoundConfig(holdout_fraction=0.25, **FAST))
    assert sorted(drawn) == [0, 1, 2, 3] and len(result.layers) == 4
    assert all(int(held.sum()) == 10 for held in drawn.values())
    assert len({tuple(held.tolist()) for held in drawn.values()}) == 4  # not one set for all
    held_by_every_layer = torch.stack(list(drawn.values())).all(dim=0)
    assert not held_by_every_layer.any()  # every sample is fitted by some layer
    layout = SampleLayout.of(data)
    torch.manual_seed(123)  # the global and any other generator's state do not matter
    assert torch.equal(torch.cat(original(layout, 0.25, 0, 2)), drawn[2])
    assert not torch.equal(torch.cat(original(layout, 0.25, 1, 2)), drawn[2])  # the seed does
