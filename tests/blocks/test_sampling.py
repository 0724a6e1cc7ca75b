"""Sampling loops over real diffusers flow schedulers, checked with oracle velocity predictors."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from diffusers import DDPMScheduler, DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler

from zoo.blocks.guidance import got_cfg, text_cfg
from zoo.blocks.objectives import EpsilonDiffusion, FlowMatching
from zoo.blocks.sampling import build_scheduler, model_timesteps, sample

SCHEDULERS = ["dpm_solver++", "flow_euler"]


def data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 4, 6, 6, generator=g), torch.randn(2, 4, 6, 6, generator=g)


def oracle(x0: torch.Tensor, calls: list[float] | None = None) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Exact flow velocity eps - x0 for x_t = (1 - sigma) x0 + sigma eps, with sigma = model_t / 1000."""

    def predict(x_t: torch.Tensor, model_t: torch.Tensor) -> torch.Tensor:
        assert model_t.shape == (x_t.shape[0],)
        if calls is not None:
            calls.append(model_t[0].item())
        sigma = (model_t / 1000).view(-1, 1, 1, 1)
        eps = (x_t - (1 - sigma) * x0) / sigma
        return eps - x0

    return predict


def test_build_scheduler_configurations() -> None:
    dpm = build_scheduler("dpm_solver++", flow_shift=3.0)
    assert isinstance(dpm, DPMSolverMultistepScheduler)
    cfg = dpm.config
    assert (cfg.prediction_type, cfg.use_flow_sigmas, cfg.flow_shift) == ("flow_prediction", True, 3.0)
    assert (cfg.algorithm_type, cfg.solver_order, cfg.num_train_timesteps) == ("dpmsolver++", 2, 1000)
    euler = build_scheduler("flow_euler", flow_shift=2.0, num_train_timesteps=500)
    assert isinstance(euler, FlowMatchEulerDiscreteScheduler)
    assert (euler.config.shift, euler.config.num_train_timesteps) == (2.0, 500)
    with pytest.raises(ValueError, match="unknown scheduler 'ddim'"):
        build_scheduler("ddim")


@pytest.mark.parametrize("name", SCHEDULERS)
@pytest.mark.parametrize("num_steps", [1, 4, 30])
def test_oracle_velocity_recovers_x0_in_exactly_num_steps_calls(name: str, num_steps: int) -> None:
    x0, noise = data()
    calls: list[float] = []
    out = sample(oracle(x0, calls), noise, build_scheduler(name), num_steps)
    assert len(calls) == num_steps
    assert all(a > b for a, b in zip(calls, calls[1:])) and 0 < calls[-1] <= calls[0] <= 1000
    torch.testing.assert_close(out, x0, rtol=0, atol=1e-4)


@pytest.mark.parametrize("name", SCHEDULERS)
def test_the_opposite_velocity_sign_does_not_recover(name: str) -> None:
    x0, noise = data()
    predict = oracle(x0)
    out = sample(lambda x, t: -predict(x, t), noise, build_scheduler(name), 10)
    assert (out - x0).abs().max() > 0.5


@pytest.mark.parametrize("name", SCHEDULERS)
def test_steps_move_along_the_training_interpolation(name: str) -> None:
    """With sigma = model_t / 1000, every x_t the loop produces is (1 - sigma) x0 + sigma eps for ONE eps:
    the scheduler integrates FlowMatching's path with FlowMatching's timestep input."""
    x0, noise = data()
    seen: list[torch.Tensor] = []

    def predict(x_t: torch.Tensor, model_t: torch.Tensor) -> torch.Tensor:
        sigma = (model_t / 1000).view(-1, 1, 1, 1)
        seen.append((x_t - (1 - sigma) * x0) / sigma)
        return seen[-1] - x0

    sample(predict, noise, build_scheduler(name), 8)
    for eps in seen[1:]:
        torch.testing.assert_close(eps, seen[0], rtol=0, atol=1e-4)


def test_dpm_model_timesteps_lie_on_the_training_curve() -> None:
    scheduler = build_scheduler("dpm_solver++", flow_shift=3.0)
    scheduler.set_timesteps(20)
    inputs = model_timesteps(scheduler)
    training = FlowMatching(shift=3.0)
    # First step = the noisiest training input sigma'_999 * 1000 (0.999 shifted).
    assert inputs[0].item() == pytest.approx(training.sigmas[-1].item() * 1000, abs=1e-3)
    # Unshifting gives an evenly spaced base grid inside [0, 0.999], as in training.
    sigma = inputs.double() / 1000
    base = sigma / (3.0 - 2.0 * sigma)
    torch.testing.assert_close(base, torch.linspace(0.999, 0.999 / 20, 20, dtype=torch.float64), rtol=0, atol=1e-6)
    # diffusers' own int64 timesteps are the same values truncated; we pass the exact ones.
    assert torch.all((inputs - scheduler.timesteps).abs() < 1) and not torch.equal(inputs, scheduler.timesteps.float())


def test_euler_model_timesteps_are_its_timesteps() -> None:
    scheduler = build_scheduler("flow_euler")
    scheduler.set_timesteps(7)
    torch.testing.assert_close(model_timesteps(scheduler), scheduler.timesteps)


@pytest.mark.parametrize("name", SCHEDULERS)
@pytest.mark.parametrize("scale", [1.0, 4.5, 7.5])
def test_guidance_scale_is_honoured(name: str, scale: float) -> None:
    """Velocity is affine in x0, so guiding two oracles lands on x0_u + s (x0_c - x0_u)."""
    (x0_u, noise), (x0_c, _) = data(0), data(1)
    uncond, cond = oracle(x0_u), oracle(x0_c)
    out = sample(lambda x, t: text_cfg(uncond(x, t), cond(x, t), scale), noise, build_scheduler(name), 12)
    torch.testing.assert_close(out, x0_u + scale * (x0_c - x0_u), rtol=0, atol=1e-3)


def test_ddpm_gets_its_integer_timesteps_and_the_seeded_generator() -> None:
    """Non-flow schedulers (GoT's DDPM) see scheduler.timesteps as they are and draw step noise from `generator`."""
    x0, noise = data()
    scheduler = DDPMScheduler(prediction_type="sample", clip_sample=False)

    def run(seed: int) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        times: list[torch.Tensor] = []
        states: list[torch.Tensor] = []

        def predict(x_t: torch.Tensor, model_t: torch.Tensor) -> torch.Tensor:
            times.append(model_t)
            states.append(x_t)
            return x0

        out = sample(predict, noise, scheduler, 5, generator=torch.Generator().manual_seed(seed))
        return out, times, states

    out, times, states = run(0)
    assert torch.equal(torch.stack([t[0] for t in times]), scheduler.timesteps) and times[0].dtype == torch.int64
    torch.testing.assert_close(out, x0)  # the last DDPM step (t = 0) returns the predicted sample
    _, _, same = run(0)
    _, _, other = run(1)
    assert torch.equal(states[2], same[2]) and not torch.allclose(states[2], other[2])


def test_bad_arguments_are_explained() -> None:
    x0, noise = data()
    with pytest.raises(ValueError, match="num_steps must be >= 1"):
        sample(oracle(x0), noise, build_scheduler(), 0)
    with pytest.raises(ValueError, match=r"predict returned \(2, 4, 3, 3\)"):
        sample(lambda x, t: x[..., :3, :3], noise, build_scheduler(), 2)


def epsilon_oracle(
    x0: torch.Tensor, calls: list[int] | None = None
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Exact noise for x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps on SDXL's schedule."""
    abar = EpsilonDiffusion().alphas_cumprod

    def predict(x_t: torch.Tensor, model_t: torch.Tensor) -> torch.Tensor:
        if calls is not None:
            calls.append(int(model_t[0]))
        a = abar[model_t].view(-1, 1, 1, 1)
        return (x_t - a.sqrt() * x0) / (1 - a).sqrt()

    return predict


def test_got_ddpm_epsilon_sampling_in_50_steps() -> None:
    """GoT's sampler: SDXL's DDPM config (leading spacing, offset 1), 50 steps, eps prediction, seeded noise."""
    x0, noise = data()
    calls: list[int] = []
    scheduler = EpsilonDiffusion().sampling_scheduler()
    out = sample(epsilon_oracle(x0, calls), noise, scheduler, 50, generator=torch.Generator().manual_seed(42))
    assert calls == list(range(981, 0, -20))
    # The last step (t=1 -> abar_prev = 1) returns the predicted x0, exact for an oracle.
    torch.testing.assert_close(out, x0, rtol=0, atol=1e-5)


def test_got_four_branch_guidance_through_ddpm_sampling() -> None:
    """eps is affine in x0 at a fixed x_t and GoT's weights sum to 1, so guiding four oracles lands on
    4 x0_cond + 3.5 x0_text - 6.5 x0_image + 0 x0_uncond for (g, c, i) = (7.5, 4, 1)."""
    targets = [data(seed)[0] for seed in range(4)]
    noise = data(9)[1]
    oracles = [epsilon_oracle(x0) for x0 in targets]

    def predict(x_t: torch.Tensor, model_t: torch.Tensor) -> torch.Tensor:
        return got_cfg(*(o(x_t, model_t) for o in oracles), 7.5, 4.0, 1.0)

    scheduler = EpsilonDiffusion().sampling_scheduler()
    out = sample(predict, noise, scheduler, 50, generator=torch.Generator().manual_seed(0))
    cond, text, image, _ = targets
    torch.testing.assert_close(out, 4 * cond + 3.5 * text - 6.5 * image, rtol=0, atol=1e-4)


def eps_oracle(x0: torch.Tensor, scheduler: DDPMScheduler, calls: list[int]) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Exact ε of x_t = sqrt(abar) x0 + sqrt(1 - abar) ε for a DDPM/DDIM schedule."""
    abar = scheduler.alphas_cumprod

    def predict(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        calls.append(int(t[0]))
        a = abar[t].view(-1, 1, 1, 1)
        return (x_t - a.sqrt() * x0) / (1 - a).sqrt()

    return predict


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_keep_restores_the_source_outside_the_region_and_edits_inside(sampler: str) -> None:
    source, target = data(1)
    scheduler = EpsilonDiffusion(sampler=sampler).sampling_scheduler()
    keep = torch.zeros(2, 1, 6, 6)
    keep[..., :3] = 1
    noise = torch.randn(source.shape, generator=torch.Generator().manual_seed(2))
    calls: list[int] = []
    out = sample(eps_oracle(target, scheduler, calls), noise, scheduler, 20, source=source, keep=keep,
                 generator=torch.Generator().manual_seed(3))
    assert len(calls) == 20
    torch.testing.assert_close(out[..., :3], source[..., :3], rtol=0, atol=0)
    # Inside the region the oracle of the target is followed (DDPM adds noise on the way; DDIM without set_alpha_to_one ends one step short of t = 0).
    assert (out[..., 3:] - target[..., 3:]).abs().max() < (0.15 if sampler == "ddim" else 0.5)
    assert (out[..., 3:] - source[..., 3:]).abs().mean() > 0.5


def test_strength_runs_the_last_steps_from_the_noised_source() -> None:
    source, target = data(2)
    scheduler = EpsilonDiffusion(sampler="ddim").sampling_scheduler()
    noise = torch.randn(source.shape, generator=torch.Generator().manual_seed(4))
    calls: list[int] = []
    out = sample(eps_oracle(target, scheduler, calls), noise, scheduler, 20, source=source, strength=0.5)
    scheduler.set_timesteps(20)
    assert calls == scheduler.timesteps[10:].tolist()
    # The oracle's ε at t_start is not the noise that made x_t, so the output sits between the two.
    assert 0 < (out - target).abs().mean() < (source - target).abs().mean()


def test_source_options_are_checked() -> None:
    source, _ = data()
    scheduler = EpsilonDiffusion().sampling_scheduler()
    with pytest.raises(ValueError, match="strength must be in"):
        sample(lambda x, t: x, source, scheduler, 4, source=source, strength=0.0)
    with pytest.raises(ValueError, match="need the source latent"):
        sample(lambda x, t: x, source, scheduler, 4, keep=torch.ones(2, 1, 6, 6))
    with pytest.raises(ValueError, match="no add_noise"):
        sample(lambda x, t: x, source, build_scheduler("flow_euler"), 4, source=source, strength=0.5)
