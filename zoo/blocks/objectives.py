"""Training objectives: how a clean latent becomes a noisy input, a target and a loss.

Every objective is an :class:`Objective`: ``sample_timesteps``, ``sample_noise``, ``add_noise``,
``target(x0, noise, t)``, ``loss`` and ``sampling_scheduler()`` (the diffusers scheduler that
integrates what the denoiser learned). Objectives are typed dataclasses, so a recipe picks one and
its settings by config (``objective: {shift: 3.0}``) and ``--help`` documents every field.

:class:`FlowMatching` is SANA's / DIM's rectified-flow objective (``showlab/DIM@28e644f``:
``models/diffusion/model/gaussian_diffusion.py:136-143`` + ``respace.py:80-127``, and the SANA yaml's
``noise_schedule: linear_flow``, ``predict_flow_v: true``, ``flow_shift: 3.0``,
``weighting_scheme: logit_normal``):

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

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Literal

import torch
from diffusers import DDIMScheduler, DDPMScheduler, SchedulerMixin
from torch import Tensor

from zoo.blocks.config import ConfigError, check_choice, check_positive, check_range
from zoo.blocks.sampling import build_scheduler


PredictionType = Literal["epsilon", "v_prediction"]
"""What an ε-objective's denoiser predicts: the noise (SDXL, GoT) or v."""


def mean_squared_error(pred: Tensor, target: Tensor, weight: Tensor | None = None) -> Tensor:
    """``mean_flat((target - pred)^2).mean()``: per-sample mean, then batch mean (float32).

    ``weight`` (broadcastable to ``pred``) makes each sample's mean a weighted mean.
    """
    if pred.shape != target.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} must match")
    squared = (target.float() - pred.float()).pow(2)
    if weight is None:
        return squared.flatten(1).mean(dim=1).mean()
    weight = weight.float().expand_as(squared)
    return ((squared * weight).flatten(1).sum(dim=1) / weight.flatten(1).sum(dim=1)).mean()


def edit_region_weights(region: Tensor, share: float) -> Tensor:
    """Per-element weights ``[B, 1, h, w]`` giving ``region`` (``{0, 1}``) ``share`` of each
    sample's weighted mean and the rest ``1 - share``; uniform for a sample whose region is empty
    or everything (there is nothing to balance)."""
    region = region.float()
    inside = region.flatten(1).sum(dim=1).view(-1, 1, 1, 1)
    outside = region[0].numel() - inside
    balanced = share * region / inside.clamp_min(1) + (1 - share) * (1 - region) / outside.clamp_min(1)
    return torch.where((inside > 0) & (outside > 0), balanced, torch.ones_like(balanced))


def _check_steps(t: Tensor, batch: int, num_train_timesteps: int) -> None:
    if t.ndim != 1 or t.shape[0] != batch or t.dtype.is_floating_point:
        raise ValueError(f"t must be integer step indices of shape [{batch}], got {t.dtype} {tuple(t.shape)}")
    if t.min() < 0 or t.max() >= num_train_timesteps:
        raise ValueError(f"t must lie in [0, {num_train_timesteps}), got [{int(t.min())}, {int(t.max())}]")


def _draw_device(generator: torch.Generator | None) -> torch.device | str:
    return generator.device if generator is not None else "cpu"


class Objective(ABC):
    """What a module's training step and sampler agree on (see the module docstring)."""

    num_train_timesteps: int
    edit_region_share: float | None

    @abstractmethod
    def sample_timesteps(
        self, batch_size: int, generator: torch.Generator | None = None, device: torch.device | str | None = None
    ) -> Tensor:
        """``batch_size`` integer step indices in ``[0, N)``."""

    def sample_noise(self, x0: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """``eps ~ N(0, I)`` of ``x0``'s shape (drawn in float32 on the generator's device)."""
        return self._draw_noise(x0, generator).to(device=x0.device, dtype=x0.dtype)

    def _draw_noise(self, x0: Tensor, generator: torch.Generator | None) -> Tensor:
        return torch.randn(x0.shape, generator=generator, device=_draw_device(generator), dtype=torch.float32)

    @abstractmethod
    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(x_t, noise level [B], the denoiser's time input [B])`` for step indices ``t``."""

    @abstractmethod
    def target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """What the denoiser is trained to predict at ``x_t``."""

    def loss(self, pred: Tensor, target: Tensor, edit_region: Tensor | None = None) -> Tensor:
        """``mean_flat((target - pred)^2).mean()``: per-sample mean, then batch mean (float32).

        With ``edit_region_share`` set and an ``edit_region`` mask (``[B, 1, h, w]`` in {0, 1} at
        the latent's size) each sample's loss is ``share * mean inside + (1 - share) * mean
        outside`` (:func:`edit_region_weights`).
        """
        if self.edit_region_share is None or edit_region is None:
            return mean_squared_error(pred, target)
        return mean_squared_error(pred, target, edit_region_weights(edit_region, self.edit_region_share))

    def check_edit_region_share(self) -> None:
        """Raise :class:`ConfigError` unless ``edit_region_share`` is None or strictly between 0 and 1."""
        share = self.edit_region_share
        if share is not None and not 0 < share < 1:
            raise ConfigError(f"objective.edit_region_share must be null (plain MSE) or in (0, 1), got {share}")

    @abstractmethod
    def sampling_scheduler(self) -> SchedulerMixin:
        """A fresh diffusers scheduler integrating this objective's predictions (for :func:`~zoo.blocks.sampling.sample`)."""


@dataclass
class FlowMatching(Objective):
    """Flow matching with a shifted linear sigma grid and logit-normal timestep sampling (SANA, DIM)."""

    shift: float = 3.0
    """SANA ``flow_shift`` (DIM: 3.0), used in training and sampling; 1.0 means unshifted."""
    num_train_timesteps: int = 1000
    """N, size of the discrete training grid."""
    logit_mean: float = 0.0
    """Mean of the normal whose sigmoid picks the step (SANA ``logit_mean``)."""
    logit_std: float = 1.0
    """Its standard deviation (SANA ``logit_std``)."""
    sampler: Literal["dpm_solver++", "flow_euler"] = "dpm_solver++"
    """Sampling scheduler: diffusers' DPM-Solver++ as SANA's (official) or flow Euler."""
    edit_region_share: float | None = None
    """Share of each sample's loss carried by its ground-truth edit region (``EditBatch.mask``),
    the rest by the pixels outside it; None = the paper's plain MSE. Not from any paper: an object
    edit changes 4-7% of the toy pixels, so the plain loss is mostly copying (0.5 balances the two,
    as the toy edit score averages them)."""
    sigmas: Tensor = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_positive("objective.shift", self.shift)
        self.check_edit_region_share()
        check_positive("objective.logit_std", self.logit_std)
        check_range("objective.num_train_timesteps", self.num_train_timesteps, 2)
        betas = torch.linspace(1.0, 0.001, self.num_train_timesteps, dtype=torch.float64)
        sigmas = 1.0 - betas
        self.sigmas = (self.shift * sigmas / (1.0 + (self.shift - 1.0) * sigmas)).float()

    def sample_timesteps(
        self, batch_size: int, generator: torch.Generator | None = None, device: torch.device | str | None = None
    ) -> Tensor:
        """Draw ``batch_size`` step indices in ``[0, N)`` with logit-normal density (int64)."""
        # Same call as SANA's compute_density_for_timestep_sampling, so seeded draws match it.
        normal = torch.normal(
            self.logit_mean, self.logit_std, size=(batch_size,), generator=generator, device=_draw_device(generator)
        )
        u = torch.sigmoid(normal)
        # sigmoid rounds to exactly 1.0 in float32 for n > ~17; keep that (official: index N) on the grid.
        t = (u * self.num_train_timesteps).long().clamp_(max=self.num_train_timesteps - 1)
        return t.to(device if device is not None else "cpu")

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Return ``(x_t, sigma', model_timestep)``; the denoiser's time input is ``sigma' * N``."""
        if x0.shape != noise.shape:
            raise ValueError(f"x0 {tuple(x0.shape)} and noise {tuple(noise.shape)} must have the same shape")
        _check_steps(t, x0.shape[0], self.num_train_timesteps)
        sigma = self.sigmas.to(x0.device)[t.to(x0.device)]
        s = sigma.to(x0.dtype).view(-1, *([1] * (x0.ndim - 1)))
        x_t = (1.0 - s) * x0 + s * noise
        return x_t, sigma, sigma * self.num_train_timesteps

    def target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """Flow velocity ``eps - x0`` (SANA ``FLOW_VELOCITY``); independent of ``t``."""
        return noise - x0

    def sampling_scheduler(self) -> SchedulerMixin:
        return build_scheduler(self.sampler, flow_shift=self.shift, num_train_timesteps=self.num_train_timesteps)


@dataclass
class EpsilonDiffusion(Objective):
    """DDPM training objective of SDXL / SD1.5 UNets, as GoT trains its SSGM UNet.

    GoT's training code is unreleased (rongyaofang/GoT#1); its inference loads SDXL's scheduler as
    ``DDPMScheduler`` (ε-prediction, scaled-linear β 0.00085 -> 0.012, 1000 steps, ``leading``
    spacing, ``steps_offset=1``;
    ``sunyasheng/NeoAnalogist@c58cf0a:thirdparty/GoT/configs/clm_models/agent_got.yaml:12-15``), and
    the paper adds a noise offset of 0.1 (supplementary §8).
    So the step is the diffusers text-to-image recipe: ``t ~ U{0..N-1}``, ``noise = eps + offset *
    randn(B, C, 1, 1)`` (Guttenberg's noise offset, per sample and channel, constant over space, as
    diffusers' ``train_text_to_image*.py`` do), ``x_t = scheduler.add_noise(x0, noise, t)``, target
    ``noise`` (the offset is part of what the model predicts) or the v of ``get_velocity``, MSE.
    """

    num_train_timesteps: int = 1000
    """N."""
    beta_start: float = 0.00085
    """First β of the schedule (SDXL / SD1.5: 0.00085)."""
    beta_end: float = 0.012
    """Last β (SDXL / SD1.5: 0.012)."""
    beta_schedule: Literal["scaled_linear", "linear", "squaredcos_cap_v2"] = "scaled_linear"
    """diffusers schedule name; ``scaled_linear`` is linear in sqrt(β)."""
    noise_offset: float = 0.0
    """Scale of the per-channel constant noise added to ε (GoT: 0.1; 0 disables)."""
    prediction_type: PredictionType = "epsilon"
    """``epsilon`` (SDXL, GoT) or ``v_prediction``."""
    edit_region_share: float | None = None
    """Share of each sample's loss carried by its ground-truth edit region (``EditBatch.mask``),
    the rest by the pixels outside it; None = the paper's plain MSE. Not from any paper: an object
    edit changes 4-7% of the toy pixels, so the plain loss is mostly copying (0.5 balances the two,
    as the toy edit score averages them)."""
    sampler: Literal["ddpm", "ddim"] = "ddpm"
    """Sampling scheduler on this schedule: ``ddpm`` (GoT samples 50 DDPM steps) or ``ddim``
    (IP-Adapter's SD1.5 demos, η = 0)."""
    scheduler: DDPMScheduler = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_choice("objective.prediction_type", self.prediction_type, PredictionType)
        check_choice("objective.sampler", self.sampler, Literal["ddpm", "ddim"])
        check_range("objective.noise_offset", self.noise_offset, 0.0)
        self.check_edit_region_share()
        check_range("objective.num_train_timesteps", self.num_train_timesteps, 2)
        # SDXL's scheduler config as GoT's DDPMScheduler.from_pretrained reads it (clip_sample off).
        self.scheduler = DDPMScheduler(
            num_train_timesteps=self.num_train_timesteps,
            beta_start=self.beta_start,
            beta_end=self.beta_end,
            beta_schedule=self.beta_schedule,
            prediction_type=self.prediction_type,
            clip_sample=False,
            timestep_spacing="leading",
            steps_offset=1,
        )

    @property
    def alphas_cumprod(self) -> Tensor:
        """``abar_t`` for ``t = 0..N-1`` (float32, CPU)."""
        return self.scheduler.alphas_cumprod

    def sampling_scheduler(self) -> DDPMScheduler | DDIMScheduler:
        """A fresh scheduler of ``sampler`` with this schedule (DDIM: ``set_alpha_to_one=False``, as
        SD1.5's and IP-Adapter's DDIM configs)."""
        if self.sampler == "ddim":
            return DDIMScheduler.from_config(self.scheduler.config, set_alpha_to_one=False)
        return DDPMScheduler.from_config(self.scheduler.config)

    def sample_timesteps(
        self, batch_size: int, generator: torch.Generator | None = None, device: torch.device | str | None = None
    ) -> Tensor:
        """``batch_size`` step indices uniform in ``[0, N)`` (int64)."""
        draw_device = _draw_device(generator)
        t = torch.randint(0, self.num_train_timesteps, (batch_size,), generator=generator, device=draw_device)
        return t.to(device if device is not None else draw_device)

    def sample_noise(self, x0: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """``eps + noise_offset * randn(B, C, 1, 1)`` with ``eps ~ N(0, I)`` of ``x0``'s shape."""
        noise = self._draw_noise(x0, generator)
        if self.noise_offset:
            shape = (*x0.shape[:2], *([1] * (x0.ndim - 2)))
            noise = noise + self.noise_offset * torch.randn(shape, generator=generator, device=_draw_device(generator))
        return noise.to(device=x0.device, dtype=x0.dtype)

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Return ``(x_t, abar_t [B], model_timestep)``; the UNet's time input is ``t`` itself."""
        if x0.shape != noise.shape:
            raise ValueError(f"x0 {tuple(x0.shape)} and noise {tuple(noise.shape)} must have the same shape")
        _check_steps(t, x0.shape[0], self.num_train_timesteps)
        t = t.to(x0.device)
        x_t = self.scheduler.add_noise(x0, noise, t)
        return x_t, self.alphas_cumprod.to(x0.device)[t], t

    def target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """``noise`` for ε-prediction; ``sqrt(abar) noise - sqrt(1 - abar) x0`` for v."""
        if self.prediction_type == "epsilon":
            return noise
        _check_steps(t, x0.shape[0], self.num_train_timesteps)
        return self.scheduler.get_velocity(x0, noise, t.to(x0.device))
