"""Training objectives: how a clean latent becomes a noisy input, a target and a loss.

:class:`FlowMatching` is SANA's / DIM's rectified-flow objective (official-code-facts §1A,
``gaussian_diffusion.py`` + ``respace.py``, yaml ``noise_schedule: linear_flow``,
``predict_flow_v: true``, ``flow_shift: 3.0``, ``weighting_scheme: logit_normal``):

- base grid ``sigma_i = 1 - beta_i`` with ``beta`` linear from 1.0 to 0.001 over N=1000 steps
  (so ``sigma_i = i / N``), shifted ``sigma'_i = s * sigma_i / (1 + (s - 1) * sigma_i)``;
- step index ``t = floor(sigmoid(n) * N)``, ``n ~ Normal(logit_mean, logit_std)``;
- ``x_t = (1 - sigma') x0 + sigma' eps``, target ``eps - x0``, model timestep ``sigma' * N``;
- loss ``mean over samples of mean over the other dims of (target - prediction)^2``.

:class:`EpsilonDiffusion` is the DDPM objective of SDXL / SD1.5 UNets (GoT, MIND-Edit): uniform
integer ``t``, ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps`` through diffusers' ``DDPMScheduler``,
ε- (or v-) prediction MSE, and the noise offset GoT trains with (paper §8: 0.1).
"""

from __future__ import annotations

import torch
from diffusers import DDPMScheduler
from torch import Tensor, nn


def mean_squared_error(pred: Tensor, target: Tensor) -> Tensor:
    """``mean_flat((target - pred)^2).mean()``: per-sample mean, then batch mean (float32)."""
    if pred.shape != target.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} must match")
    per_sample = (target.float() - pred.float()).pow(2).flatten(1).mean(dim=1)
    return per_sample.mean()


def _check_steps(t: Tensor, batch: int, num_train_timesteps: int) -> None:
    if t.ndim != 1 or t.shape[0] != batch or t.dtype.is_floating_point:
        raise ValueError(f"t must be integer step indices of shape [{batch}], got {t.dtype} {tuple(t.shape)}")
    if t.min() < 0 or t.max() >= num_train_timesteps:
        raise ValueError(f"t must lie in [0, {num_train_timesteps}), got [{int(t.min())}, {int(t.max())}]")


class FlowMatching(nn.Module):
    """Flow-matching objective with a shifted linear sigma grid and logit-normal timestep sampling.

    Args:
        shift: SANA ``flow_shift`` (3.0 for DIM); 1.0 means unshifted.
        num_train_timesteps: N, size of the discrete training grid.
        logit_mean: mean of the normal whose sigmoid picks the step (SANA ``logit_mean``).
        logit_std: its standard deviation (SANA ``logit_std``).
    """

    sigmas: Tensor

    def __init__(
        self,
        shift: float = 3.0,
        num_train_timesteps: int = 1000,
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
    ) -> None:
        super().__init__()
        if shift <= 0 or num_train_timesteps < 2 or logit_std <= 0:
            raise ValueError(
                f"need shift > 0, num_train_timesteps >= 2 and logit_std > 0; got shift={shift}, "
                f"num_train_timesteps={num_train_timesteps}, logit_std={logit_std}"
            )
        self.shift = shift
        self.num_train_timesteps = num_train_timesteps
        self.logit_mean = logit_mean
        self.logit_std = logit_std
        betas = torch.linspace(1.0, 0.001, num_train_timesteps, dtype=torch.float64)
        sigmas = 1.0 - betas
        sigmas = shift * sigmas / (1.0 + (shift - 1.0) * sigmas)
        # A deterministic function of the arguments: not part of the checkpoint.
        self.register_buffer("sigmas", sigmas.float(), persistent=False)

    def sample_timesteps(
        self, batch_size: int, generator: torch.Generator | None = None, device: torch.device | str | None = None
    ) -> Tensor:
        """Draw ``batch_size`` step indices in ``[0, N)`` with logit-normal density (int64)."""
        draw_device = generator.device if generator is not None else "cpu"
        # Same call as SANA's compute_density_for_timestep_sampling, so seeded draws match it.
        normal = torch.normal(
            self.logit_mean, self.logit_std, size=(batch_size,), generator=generator, device=draw_device
        )
        u = torch.sigmoid(normal)
        # sigmoid rounds to exactly 1.0 in float32 for n > ~17; keep that (official: index N) on the grid.
        t = (u * self.num_train_timesteps).long().clamp_(max=self.num_train_timesteps - 1)
        return t.to(device if device is not None else self.sigmas.device)

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Return ``(x_t, sigma', model_timestep)`` for step indices ``t [B]``.

        ``sigma'`` is ``[B]`` (broadcast over the other dims for ``x_t``); ``model_timestep`` is
        ``sigma' * N``, the denoiser's time input.
        """
        if x0.shape != noise.shape:
            raise ValueError(f"x0 {tuple(x0.shape)} and noise {tuple(noise.shape)} must have the same shape")
        _check_steps(t, x0.shape[0], self.num_train_timesteps)
        sigma = self.sigmas.to(x0.device)[t.to(x0.device)]
        s = sigma.to(x0.dtype).view(-1, *([1] * (x0.ndim - 1)))
        x_t = (1.0 - s) * x0 + s * noise
        return x_t, sigma, sigma * self.num_train_timesteps

    def target(self, x0: Tensor, noise: Tensor) -> Tensor:
        """Flow velocity ``eps - x0`` (SANA ``FLOW_VELOCITY``)."""
        return noise - x0

    def loss(self, pred: Tensor, target: Tensor) -> Tensor:
        """``mean_flat((target - pred)^2).mean()``: per-sample mean, then batch mean (float32)."""
        return mean_squared_error(pred, target)


class EpsilonDiffusion(nn.Module):
    """DDPM training objective of SDXL / SD1.5 UNets, as GoT trains its SSGM UNet.

    GoT's training code is unreleased (official-code-facts §3B); its inference loads SDXL's
    scheduler as ``DDPMScheduler`` (ε-prediction, scaled-linear β 0.00085 -> 0.012, 1000 steps,
    ``leading`` spacing, ``steps_offset=1``; §3A), and the paper adds a noise offset of 0.1 (§8).
    So the step is the diffusers text-to-image recipe: ``t ~ U{0..N-1}``, ``noise = eps + offset *
    randn(B, C, 1, 1)`` (Guttenberg's noise offset, per sample and channel, constant over space, as
    diffusers' ``train_text_to_image*.py`` do), ``x_t = scheduler.add_noise(x0, noise, t)``, target
    ``noise`` (the offset is part of what the model predicts) or the v of ``get_velocity``, MSE.

    Args:
        num_train_timesteps: N.
        beta_start: first β of the schedule (SDXL / SD1.5: 0.00085).
        beta_end: last β (SDXL / SD1.5: 0.012).
        beta_schedule: diffusers name; ``"scaled_linear"`` is linear in sqrt(β).
        noise_offset: scale of the per-channel constant noise added to ε (GoT: 0.1; 0 disables).
        prediction_type: ``"epsilon"`` (SDXL, GoT) or ``"v_prediction"``.
    """

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        beta_schedule: str = "scaled_linear",
        noise_offset: float = 0.0,
        prediction_type: str = "epsilon",
    ) -> None:
        super().__init__()
        if prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', got '{prediction_type}'")
        if noise_offset < 0 or num_train_timesteps < 2:
            raise ValueError(
                f"need noise_offset >= 0 and num_train_timesteps >= 2, got {noise_offset}, {num_train_timesteps}"
            )
        self.num_train_timesteps = num_train_timesteps
        self.noise_offset = noise_offset
        self.prediction_type = prediction_type
        # SDXL's scheduler config as GoT's DDPMScheduler.from_pretrained reads it (clip_sample off).
        self.scheduler = DDPMScheduler(
            num_train_timesteps=num_train_timesteps,
            beta_start=beta_start,
            beta_end=beta_end,
            beta_schedule=beta_schedule,
            prediction_type=prediction_type,
            clip_sample=False,
            timestep_spacing="leading",
            steps_offset=1,
        )

    @property
    def alphas_cumprod(self) -> Tensor:
        """``abar_t`` for ``t = 0..N-1`` (float32, CPU)."""
        return self.scheduler.alphas_cumprod

    def sampling_scheduler(self) -> DDPMScheduler:
        """A fresh ``DDPMScheduler`` with this schedule, for :func:`zoo.blocks.sampling.sample` (GoT: 50 steps)."""
        return DDPMScheduler.from_config(self.scheduler.config)

    def sample_timesteps(
        self, batch_size: int, generator: torch.Generator | None = None, device: torch.device | str | None = None
    ) -> Tensor:
        """``batch_size`` step indices uniform in ``[0, N)`` (int64)."""
        draw_device = generator.device if generator is not None else "cpu"
        t = torch.randint(0, self.num_train_timesteps, (batch_size,), generator=generator, device=draw_device)
        return t.to(device if device is not None else draw_device)

    def sample_noise(self, x0: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """``eps + noise_offset * randn(B, C, 1, 1)`` with ``eps ~ N(0, I)`` of ``x0``'s shape."""
        draw_device = generator.device if generator is not None else "cpu"
        noise = torch.randn(x0.shape, generator=generator, device=draw_device, dtype=torch.float32)
        if self.noise_offset:
            offset = torch.randn((*x0.shape[:2], *([1] * (x0.ndim - 2))), generator=generator, device=draw_device)
            noise = noise + self.noise_offset * offset
        return noise.to(device=x0.device, dtype=x0.dtype)

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Return ``(x_t, abar_t [B], model_timestep)``; the UNet's time input is ``t`` itself."""
        if x0.shape != noise.shape:
            raise ValueError(f"x0 {tuple(x0.shape)} and noise {tuple(noise.shape)} must have the same shape")
        _check_steps(t, x0.shape[0], self.num_train_timesteps)
        t = t.to(x0.device)
        x_t = self.scheduler.add_noise(x0, noise, t)
        return x_t, self.alphas_cumprod.to(x0.device)[t], t

    def target(self, x0: Tensor, noise: Tensor, t: Tensor | None = None) -> Tensor:
        """``noise`` for ε-prediction; ``sqrt(abar) noise - sqrt(1 - abar) x0`` for v (needs ``t``)."""
        if self.prediction_type == "epsilon":
            return noise
        if t is None:
            raise ValueError("v_prediction needs the step indices t for its target")
        _check_steps(t, x0.shape[0], self.num_train_timesteps)
        return self.scheduler.get_velocity(x0, noise, t.to(x0.device))

    def loss(self, pred: Tensor, target: Tensor) -> Tensor:
        """Mean squared error, per sample then over the batch (float32), as :meth:`FlowMatching.loss`."""
        return mean_squared_error(pred, target)
