"""FlowMatching against SANA/DIM's formulas (parity check 3), computed directly here."""

from __future__ import annotations

import math

import pytest
import torch

from zoo.blocks.objectives import FlowMatching


def test_sigmas_are_the_shifted_linear_flow_grid() -> None:
    objective = FlowMatching(shift=3.0)
    base = 1.0 - torch.linspace(1.0, 0.001, 1000, dtype=torch.float64)
    torch.testing.assert_close(base, torch.arange(1000, dtype=torch.float64) / 1000)
    expected = 3.0 * base / (1.0 + 2.0 * base)
    torch.testing.assert_close(objective.sigmas, expected.float())
    assert objective.sigmas[0] == 0.0
    assert objective.sigmas[-1].item() == pytest.approx(3 * 0.999 / (1 + 2 * 0.999), abs=1e-7)
    assert torch.all(objective.sigmas[1:] > objective.sigmas[:-1])


def test_shift_one_is_unshifted() -> None:
    torch.testing.assert_close(FlowMatching(shift=1.0).sigmas, torch.arange(1000) / 1000.0)


def test_sigmas_are_not_checkpointed() -> None:
    assert "sigmas" not in FlowMatching().state_dict()


def test_add_noise_target_and_model_timestep() -> None:
    objective = FlowMatching(shift=3.0)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 4, 5, 5, generator=g), torch.randn(3, 4, 5, 5, generator=g)
    t = torch.tensor([0, 500, 999])
    x_t, sigma, model_t = objective.add_noise(x0, noise, t)
    direct = torch.tensor([3 * (i / 1000) / (1 + 2 * (i / 1000)) for i in (0, 500, 999)])
    torch.testing.assert_close(sigma, direct)
    torch.testing.assert_close(model_t, direct * 1000)
    for b in range(3):
        torch.testing.assert_close(x_t[b], (1 - direct[b]) * x0[b] + direct[b] * noise[b])
    torch.testing.assert_close(x_t[0], x0[0])  # index 0 is the clean image (sigma 0)
    target = objective.target(x0, noise)
    torch.testing.assert_close(target, noise - x0)
    # Following the velocity back over sigma lands on x0.
    torch.testing.assert_close(x_t - sigma.view(-1, 1, 1, 1) * target, x0)


def test_loss_is_mean_squared_error_per_sample_then_batch() -> None:
    objective = FlowMatching()
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(4, 2, 3, 3, generator=g), torch.randn(4, 2, 3, 3, generator=g)
    per_sample = torch.stack([((target[b] - pred[b]) ** 2).sum() / 18 for b in range(4)])
    torch.testing.assert_close(objective.loss(pred, target), per_sample.mean())
    # Official parity: a model predicting zeros has loss mean((eps - x0)^2).
    x0, noise = torch.randn(4, 2, 3, 3, generator=g), torch.randn(4, 2, 3, 3, generator=g)
    zeros = objective.loss(torch.zeros_like(x0), objective.target(x0, noise))
    torch.testing.assert_close(zeros, ((noise - x0) ** 2).mean())
    assert objective.loss(target, target) == 0


def test_timesteps_are_floor_of_sigmoid_normal_times_n() -> None:
    objective = FlowMatching(logit_mean=0.3, logit_std=1.5)
    t = objective.sample_timesteps(64, generator=torch.Generator().manual_seed(7))
    normal = torch.normal(0.3, 1.5, size=(64,), generator=torch.Generator().manual_seed(7))
    assert t.dtype == torch.int64
    assert torch.equal(t, torch.floor(torch.sigmoid(normal) * 1000).long())
    again = objective.sample_timesteps(64, generator=torch.Generator().manual_seed(7))
    assert torch.equal(t, again)


def test_timestep_histogram_is_logit_normal() -> None:
    objective = FlowMatching()
    t = objective.sample_timesteps(40_000, generator=torch.Generator().manual_seed(0))
    assert 0 <= t.min() and t.max() <= 999
    u = (t.double() + 0.5) / 1000
    assert u.mean().item() == pytest.approx(0.5, abs=0.005)  # E[sigmoid(N(0,1))] = 1/2 by symmetry
    # P(u < sigmoid(-1)) = Phi(-1); P(u < sigmoid(1)) = Phi(1).
    phi = lambda z: 0.5 * (1 + math.erf(z / math.sqrt(2)))  # noqa: E731
    assert (u < torch.sigmoid(torch.tensor(-1.0))).double().mean().item() == pytest.approx(phi(-1), abs=0.01)
    assert (u < torch.sigmoid(torch.tensor(1.0))).double().mean().item() == pytest.approx(phi(1), abs=0.01)
    # Middle steps are drawn far more often than the ends (logit-normal density, not uniform).
    counts = torch.bincount(t, minlength=1000)
    assert counts[450:550].sum() > 3 * counts[:100].sum()


def test_logit_mean_and_std_move_the_distribution() -> None:
    objective = FlowMatching(logit_mean=1.0, logit_std=0.5)
    t = objective.sample_timesteps(40_000, generator=torch.Generator().manual_seed(0))
    logits = torch.logit((t.double() + 0.5) / 1000)
    assert logits.mean().item() == pytest.approx(1.0, abs=0.02)
    assert logits.std().item() == pytest.approx(0.5, abs=0.02)


def test_bad_inputs_are_explained() -> None:
    objective = FlowMatching()
    x = torch.zeros(2, 3, 4, 4)
    with pytest.raises(ValueError, match="integer step indices"):
        objective.add_noise(x, x, torch.tensor([0.5, 0.2]))
    with pytest.raises(ValueError, match=r"t must lie in \[0, 1000\)"):
        objective.add_noise(x, x, torch.tensor([0, 1000]))
    with pytest.raises(ValueError, match="same shape"):
        objective.add_noise(x, torch.zeros(2, 3, 4, 5), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="must match"):
        objective.loss(x, torch.zeros(2, 3))
    with pytest.raises(ValueError, match="shift > 0"):
        FlowMatching(shift=0.0)
