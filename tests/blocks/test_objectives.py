"""FlowMatching (parity check 3) and EpsilonDiffusion against SANA/DIM and DDPM formulas computed here."""

from __future__ import annotations

import math

import pytest
import torch

from diffusers import DDPMScheduler

from zoo.blocks.config import ConfigError
from zoo.blocks.objectives import EpsilonDiffusion, FlowMatching, edit_region_weights


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


def test_objectives_are_typed_configs_not_modules() -> None:
    # Nothing of an objective is checkpointed: it is a deterministic function of its settings.
    assert not isinstance(FlowMatching(), torch.nn.Module) and not isinstance(EpsilonDiffusion(), torch.nn.Module)
    assert FlowMatching(shift=2.0) == FlowMatching(shift=2.0) != FlowMatching(shift=3.0)
    assert FlowMatching().sampling_scheduler().config.flow_shift == 3.0
    assert type(FlowMatching(sampler="flow_euler").sampling_scheduler()).__name__ == "FlowMatchEulerDiscreteScheduler"


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
    target = objective.target(x0, noise, t)
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
    zeros = objective.loss(torch.zeros_like(x0), objective.target(x0, noise, torch.zeros(4, dtype=torch.long)))
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
    with pytest.raises(ValueError, match="shift must be > 0"):
        FlowMatching(shift=0.0)


# --- EpsilonDiffusion (SDXL / GoT) ------------------------------------------------------------


def sdxl_alphas_cumprod() -> torch.Tensor:
    """scaled_linear: beta linear in sqrt from sqrt(0.00085) to sqrt(0.012); abar_t = prod (1 - beta)."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def test_epsilon_schedule_is_sdxls_scaled_linear() -> None:
    objective = EpsilonDiffusion()
    expected = sdxl_alphas_cumprod()
    torch.testing.assert_close(objective.alphas_cumprod.double(), expected, rtol=0, atol=1e-6)
    assert objective.alphas_cumprod[0].item() == pytest.approx(1 - 0.00085, abs=1e-7)
    assert objective.alphas_cumprod[-1].item() == pytest.approx(0.0047, abs=1e-4)


def test_epsilon_add_noise_target_and_model_timestep() -> None:
    objective = EpsilonDiffusion()
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 4, 5, 5, generator=g), torch.randn(3, 4, 5, 5, generator=g)
    t = torch.tensor([0, 499, 999])
    x_t, abar, model_t = objective.add_noise(x0, noise, t)
    a = sdxl_alphas_cumprod()[t].float()
    torch.testing.assert_close(abar, a, rtol=0, atol=1e-6)
    a4 = a.view(-1, 1, 1, 1)
    torch.testing.assert_close(x_t, a4.sqrt() * x0 + (1 - a4).sqrt() * noise, rtol=1e-5, atol=1e-5)
    assert torch.equal(model_t, t)
    assert objective.target(x0, noise, t) is noise
    v = EpsilonDiffusion(prediction_type="v_prediction")
    torch.testing.assert_close(v.target(x0, noise, t), a4.sqrt() * noise - (1 - a4).sqrt() * x0, rtol=1e-5, atol=1e-5)
    pred = torch.randn(3, 4, 5, 5, generator=g)
    expected = ((pred - noise) ** 2).mean()
    torch.testing.assert_close(objective.loss(pred, noise), expected)


def test_epsilon_timesteps_are_uniform_integers() -> None:
    t = EpsilonDiffusion().sample_timesteps(20_000, generator=torch.Generator().manual_seed(0))
    assert t.dtype == torch.int64 and (t.min().item(), t.max().item()) == (0, 999)
    counts = torch.bincount(t // 100, minlength=10).float()
    # Each tenth holds 2000 draws in expectation; binomial sd ~42, so 250 is a 6-sigma band.
    assert (counts - 2000).abs().max() < 250
    same = EpsilonDiffusion().sample_timesteps(20_000, generator=torch.Generator().manual_seed(0))
    assert torch.equal(t, same)


def test_noise_offset_is_a_per_sample_per_channel_constant() -> None:
    x0 = torch.zeros(2, 3, 4, 4)
    noise = EpsilonDiffusion(noise_offset=0.1).sample_noise(x0, generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    eps = torch.randn(2, 3, 4, 4, generator=g)
    torch.testing.assert_close(noise, eps + 0.1 * torch.randn(2, 3, 1, 1, generator=g), rtol=0, atol=0)
    plain = EpsilonDiffusion().sample_noise(x0, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(plain, eps, rtol=0, atol=0)


def test_noise_offset_statistics() -> None:
    """Spatial means of an 8x8 map: variance 1/64 from eps plus offset^2 = 0.01; channels independent."""
    x0 = torch.zeros(4000, 2, 8, 8)
    g = torch.Generator().manual_seed(0)
    means = EpsilonDiffusion(noise_offset=0.1).sample_noise(x0, generator=g).mean(dim=(2, 3))
    # 8000 means: the variance estimate has sd ~ 0.0256 * sqrt(2 / 8000) = 0.0004.
    assert means.var().item() == pytest.approx(1 / 64 + 0.01, abs=0.0016)
    assert abs(torch.corrcoef(means.T)[0, 1].item()) < 0.06
    plain = EpsilonDiffusion().sample_noise(x0, generator=g).mean(dim=(2, 3))
    assert plain.var().item() == pytest.approx(1 / 64, abs=0.0012)


def test_sampling_scheduler_is_sdxls_ddpm_config() -> None:
    scheduler = EpsilonDiffusion().sampling_scheduler()
    assert isinstance(scheduler, DDPMScheduler)
    cfg = scheduler.config
    assert (cfg.prediction_type, cfg.clip_sample, cfg.timestep_spacing, cfg.steps_offset) == (
        "epsilon",
        False,
        "leading",
        1,
    )
    torch.testing.assert_close(scheduler.alphas_cumprod.double(), sdxl_alphas_cumprod(), rtol=0, atol=1e-6)
    scheduler.set_timesteps(50)
    assert scheduler.timesteps.tolist() == list(range(981, 0, -20))


def test_epsilon_bad_inputs_are_explained() -> None:
    objective = EpsilonDiffusion()
    x0 = torch.zeros(2, 4, 3, 3)
    with pytest.raises(ValueError, match=r"t must lie in \[0, 1000\)"):
        objective.add_noise(x0, x0, torch.tensor([0, 1000]))
    with pytest.raises(ValueError, match="integer step indices"):
        objective.add_noise(x0, x0, torch.tensor([0.5, 1.0]))
    with pytest.raises(ValueError, match="integer step indices"):
        EpsilonDiffusion(prediction_type="v_prediction").target(x0, x0, torch.tensor([0.5, 1.0]))
    with pytest.raises(ValueError, match="prediction_type must be"):
        EpsilonDiffusion(prediction_type="sample")
    with pytest.raises(ValueError, match=r"noise_offset must be in \[0.0, inf\]"):
        EpsilonDiffusion(noise_offset=-0.1)


def test_edit_region_share_balances_the_region_and_defaults_to_the_plain_mse() -> None:
    pred = torch.zeros(3, 3, 4, 4)
    target = torch.ones(3, 3, 4, 4)
    target[:, :, 0, 0] = 3.0  # error 9 in one of 16 cells, 1 elsewhere
    region = torch.zeros(3, 1, 4, 4)
    region[:2, :, 0, 0] = 1
    region[2] = 1  # the whole image edited: nothing to balance, the plain mean
    plain = (15 * 1 + 9) / 16
    for objective in (FlowMatching(), EpsilonDiffusion()):
        assert float(objective.loss(pred, target, region)) == pytest.approx(plain)  # null: the paper's loss
    for objective in (FlowMatching(edit_region_share=0.5), EpsilonDiffusion(edit_region_share=0.5)):
        assert float(objective.loss(pred, target, region)) == pytest.approx((2 * (0.5 * 9 + 0.5 * 1) + plain) / 3)
        assert float(objective.loss(pred, target)) == pytest.approx(plain)  # no mask given: nothing to weigh
    weights = edit_region_weights(region, 0.8)
    assert float(weights[0, 0, 0, 0]) == pytest.approx(0.8) and float(weights[0, 0, 1, 1]) == pytest.approx(0.2 / 15)
    assert weights[2].eq(1).all()
    for share in (0.0, 1.0, -0.5):
        with pytest.raises(ConfigError, match="edit_region_share must be null"):
            FlowMatching(edit_region_share=share)