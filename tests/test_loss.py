"""The beta schedule, the rounding regularizer, and how the optimiser loop applies them."""

import math

import pytest
import torch
from torch import nn

from lightning_adaround.model.layers import OutputOps
from lightning_adaround.data.unit import Unit, UnitData
from lightning_adaround.grid.loss import BetaSchedule, rounding_regularizer
from lightning_adaround.engine.objective import MinibatchObjective
from lightning_adaround.engine.optimize import optimize_rounding
from lightning_adaround.grid.quant import choose_grid
from lightning_adaround.grid.rounding import RoundingVariable


SCHEDULES = [
    (100, 0.2, 20.0, 2.0),
    (37, 0.3, 10.0, 1.0),
    (10, 0.0, 20.0, 2.0),
    (50, 0.5, 8.0, 8.0),
    (1000, 0.2, 20.0, 2.0),
    (21, 0.95, 20.0, 2.0),
]


@pytest.mark.parametrize("iterations,warm_start,beta_start,beta_end", SCHEDULES)
def test_beta_schedule_endpoints_and_monotone(iterations, warm_start, beta_start, beta_end):
    s = BetaSchedule(iterations, warm_start, beta_start, beta_end)
    warm = int(warm_start * iterations)
    assert s.warm_steps == warm
    assert s.beta(warm) == pytest.approx(beta_start)
    assert s.beta(iterations - 1) == pytest.approx(beta_end)
    betas = [s.beta(t) for t in range(warm, iterations)]
    assert all(b1 >= b2 for b1, b2 in zip(betas, betas[1:]))
    assert all(beta_end - 1e-12 <= b <= beta_start + 1e-12 for b in betas)


def test_beta_schedule_cosine_midpoint():
    s = BetaSchedule(iterations=101, warm_start=0.0, beta_start=20.0, beta_end=2.0)
    assert s.beta(50) == pytest.approx(11.0)
    assert s.beta(25) == pytest.approx(2.0 + 9.0 * (1 + math.cos(math.pi * 0.25)))
    # strictly decreasing when beta_start > beta_end
    betas = [s.beta(t) for t in range(101)]
    assert all(b1 > b2 for b1, b2 in zip(betas, betas[1:]))


@pytest.mark.parametrize("iterations,warm_start,beta_start,beta_end", SCHEDULES)
def test_regularizing_only_after_warm_start(iterations, warm_start, beta_start, beta_end):
    s = BetaSchedule(iterations, warm_start, beta_start, beta_end)
    warm = int(warm_start * iterations)
    for step in range(iterations):
        assert s.regularizing(step) == (step >= warm), step


def test_regularizer_zero_on_binary_h_positive_otherwise():
    for beta in (2.0, 8.0, 20.0):
        h = torch.tensor([0.0, 1.0, 1.0, 0.0, 0.0])
        assert rounding_regularizer(h, beta).item() == 0.0
        for value in (0.01, 0.3, 0.5, 0.77, 0.99):
            h2 = h.clone()
            h2[2] = value
            assert rounding_regularizer(h2, beta).item() > 0.0
    # at h = 0.5 each term is exactly 1
    assert rounding_regularizer(torch.full((7,), 0.5), 3.0).item() == pytest.approx(7.0)
    # larger beta penalises h near 0/1 less
    h = torch.tensor([0.9])
    assert rounding_regularizer(h, 20.0) > rounding_regularizer(h, 2.0)


def test_regularizer_gradient_pushes_towards_zero_or_one():
    h = torch.tensor([0.2, 0.8], requires_grad=True)
    rounding_regularizer(h, 2.0).backward()
    # descent direction is -grad: 0.2 moves down, 0.8 moves up
    assert h.grad[0] > 0 and h.grad[1] < 0


def _setup(iterations, seed=0):
    torch.manual_seed(seed)
    layer = nn.Linear(8, 4)
    x = torch.randn(64, 8)
    with torch.no_grad():
        y = layer(x)
    data = UnitData(x, y)
    gen = torch.Generator().manual_seed(seed)
    objective = MinibatchObjective(Unit.of_layer("fc", layer), data, data, 16, gen, torch.device("cpu"))
    weight = layer.weight.detach().clone()
    grid = choose_grid(weight, 3, True, method="mse")
    return RoundingVariable(weight, grid), objective


@pytest.mark.parametrize("iterations,warm_start", [(40, 0.25), (30, 0.2), (25, 0.5)])
def test_reg_loss_zero_during_warm_start_positive_after(iterations, warm_start):
    rounding, objective = _setup(iterations)
    schedule = BetaSchedule(iterations, warm_start)
    logs = {}
    optimize_rounding(
        rounding, objective, iterations, lr=1e-2, reg_lambda=0.01, schedule=schedule,
        on_log=lambda step, m: logs.__setitem__(step, dict(m)), log_every_n_steps=1,
    )
    assert sorted(logs) == list(range(iterations))
    warm = schedule.warm_steps
    assert warm > 0
    for step in range(warm):
        assert logs[step]["reg_loss"] == 0.0, step
    assert logs[warm]["reg_loss"] > 0.0
    assert logs[warm]["beta"] == pytest.approx(schedule.beta_start)
    assert logs[iterations - 1]["beta"] == pytest.approx(schedule.beta_end)
    for step, m in logs.items():
        assert set(m) == {"recon_loss", "reg_loss", "beta"}
        assert math.isfinite(m["recon_loss"]) and m["recon_loss"] >= 0


def test_log_every_n_steps_and_last_step():
    rounding, objective = _setup(23)
    steps = []
    optimize_rounding(
        rounding, objective, 23, lr=1e-2, reg_lambda=0.01, schedule=BetaSchedule(23),
        on_log=lambda step, m: steps.append(step), log_every_n_steps=10,
    )
    assert steps == [0, 10, 20, 22]


def test_optimize_only_changes_v_and_averages_gradients_each_step():
    rounding, objective = _setup(20)
    v0 = rounding.v.detach().clone()
    w0 = objective.unit.module.weight.detach().clone()
    grads, logged = [], []

    def average(gs, loss):
        grads.append(gs[0].clone())
        return loss * 0 + 7.0  # what every process's loss averages to: the one that is logged

    optimize_rounding(
        rounding, objective, 20, lr=1e-2, reg_lambda=0.01, schedule=BetaSchedule(20),
        average_gradients=average, on_log=lambda step, m: logged.append(m["recon_loss"]),
    )
    assert len(grads) == 20 and all(g.shape == v0.shape for g in grads)
    assert logged and set(logged) == {7.0}
    assert not torch.equal(rounding.v.detach(), v0)
    assert torch.equal(objective.unit.module.weight, w0)  # the layer's own weight is untouched


def test_strong_regularizer_drives_h_to_binary():
    rounding, objective = _setup(200)
    optimize_rounding(
        rounding, objective, 200, lr=5e-2, reg_lambda=10.0,
        schedule=BetaSchedule(200, 0.1, 20.0, 2.0),
    )
    _, h = rounding.soft()
    binary = ((h == 0) | (h == 1)).float().mean()
    assert binary > 0.9


def test_objective_applies_activation_to_candidate_output():
    torch.manual_seed(0)
    layer = nn.Linear(8, 4)
    x = torch.randn(32, 8)
    with torch.no_grad():
        y = torch.relu(layer(x))
    data = UnitData(x, y)
    unit = Unit.of_layer("fc", layer, OutputOps(activation=torch.relu))
    obj = MinibatchObjective(unit, data, data, 8, torch.Generator().manual_seed(0), torch.device("cpu"))
    w = layer.weight.detach()
    assert obj.step_loss([w]).item() == pytest.approx(0.0, abs=1e-10)
    assert obj.mse([w]) == pytest.approx(0.0, abs=1e-12)
    assert obj.step_loss([w * 1.5]).item() > 0 and obj.mse([w * 1.5]) > 0
