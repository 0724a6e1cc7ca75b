"""Training objectives: how a clean latent becomes a noisy input, a target and a loss.

:class:`FlowMatching` is SANA's / DIM's rectified-flow objective (official-code-facts §1A,
``gaussian_diffusion.py`` + ``respace.py``, yaml ``noise_schedule: linear_flow``,
``predict_flow_v: true``, ``flow_shift: 3.0``, ``weighting_scheme: logit_normal``):

- base grid ``sigma_i = 1 - beta_i`` with ``beta`` linear from 1.0 to 0.001 over N=1000 steps
  (so ``sigma_i = i / N``), shifted ``sigma'_i = s * sigma_i / (1 + (s - 1) * sigma_i)``;
- step index ``t = floor(sigmoid(n) * N)``, ``n ~ Normal(logit_mean, logit_std)``;
- ``x_t = (1 - sigma') x0 + sigma' eps``, target ``eps - x0``, model timestep ``sigma' * N``;
- loss ``mean over samples of mean over the other dims of (target - prediction)^2``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


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
        if t.ndim != 1 or t.shape[0] != x0.shape[0] or t.dtype.is_floating_point:
            raise ValueError(f"t must be integer step indices of shape [{x0.shape[0]}], got {t.dtype} {tuple(t.shape)}")
        if t.min() < 0 or t.max() >= self.num_train_timesteps:
            raise ValueError(f"t must lie in [0, {self.num_train_timesteps}), got [{int(t.min())}, {int(t.max())}]")
        sigma = self.sigmas.to(x0.device)[t.to(x0.device)]
        s = sigma.to(x0.dtype).view(-1, *([1] * (x0.ndim - 1)))
        x_t = (1.0 - s) * x0 + s * noise
        return x_t, sigma, sigma * self.num_train_timesteps

    def target(self, x0: Tensor, noise: Tensor) -> Tensor:
        """Flow velocity ``eps - x0`` (SANA ``FLOW_VELOCITY``)."""
        return noise - x0

    def loss(self, pred: Tensor, target: Tensor) -> Tensor:
        """``mean_flat((target - pred)^2).mean()``: per-sample mean, then batch mean (float32)."""
        if pred.shape != target.shape:
            raise ValueError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} must match")
        per_sample = (target.float() - pred.float()).pow(2).flatten(1).mean(dim=1)
        return per_sample.mean()
