"""Denoising loops over diffusers schedulers.

:func:`build_scheduler` names the schedulers the recipes use; :func:`sample` runs one from pure
noise with a ``predict(x_t, model_timestep)`` closure that returns the already-guided model output
(so any CFG variant of :mod:`zoo.blocks.guidance` and any condition batching live in the caller).

Conventions, checked by the oracle-recovery tests:

- flow schedulers use ``x_t = (1 - sigma) x0 + sigma eps`` and expect the velocity ``eps - x0``,
  exactly :class:`zoo.blocks.objectives.FlowMatching`'s target;
- their model timestep is ``sigma * num_train_timesteps``, FlowMatching's training input. We
  compute it from ``scheduler.sigmas`` because ``DPMSolverMultistepScheduler`` truncates its
  ``timesteps`` to int64 (up to 1/1000 of sigma off), while SANA trains and the official DIM
  DPM-Solver samples on the continuous value;
- other schedulers (DDPM/DDIM for UNets) get ``scheduler.timesteps`` as they are.

DIM samples with its own DPM-Solver++ (order 2, multistep, ``time_uniform_flow``, shift 3) at a
hard-coded 30 steps and guidance 7.5, ignoring its arguments; ``"dpm_solver++"`` is diffusers' SANA
equivalent, and the step count and guidance here are whatever the caller passes.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler, SchedulerMixin
from torch import Tensor

SCHEDULER_NAMES = ("dpm_solver++", "flow_euler")


def build_scheduler(
    name: str = "dpm_solver++", *, flow_shift: float = 3.0, num_train_timesteps: int = 1000
) -> SchedulerMixin:
    """A flow-matching scheduler by name.

    ``"dpm_solver++"``: ``DPMSolverMultistepScheduler`` as in diffusers' SANA scheduler config
    (flow prediction, flow sigmas shifted by ``flow_shift``, DPM-Solver++ order 2).
    ``"flow_euler"``: ``FlowMatchEulerDiscreteScheduler(shift=flow_shift)``.
    """
    if name == "dpm_solver++":
        return DPMSolverMultistepScheduler(
            num_train_timesteps=num_train_timesteps,
            prediction_type="flow_prediction",
            use_flow_sigmas=True,
            flow_shift=flow_shift,
            algorithm_type="dpmsolver++",
            solver_order=2,
        )
    if name == "flow_euler":
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=num_train_timesteps, shift=flow_shift)
    raise ValueError(f"unknown scheduler '{name}'; choose one of {SCHEDULER_NAMES}")


def is_flow_scheduler(scheduler: SchedulerMixin) -> bool:
    """Whether ``scheduler`` integrates a flow (sigma in [0, 1], velocity output)."""
    return isinstance(scheduler, FlowMatchEulerDiscreteScheduler) or (
        scheduler.config.get("prediction_type") == "flow_prediction"
    )


def model_timesteps(scheduler: SchedulerMixin) -> Tensor:
    """The denoiser's time input at each step of the schedule last set by ``set_timesteps``."""
    steps = len(scheduler.timesteps)
    if is_flow_scheduler(scheduler):
        sigmas = scheduler.sigmas[:steps].to(device=scheduler.timesteps.device, dtype=torch.float32)
        return sigmas * scheduler.config.num_train_timesteps
    return scheduler.timesteps


@torch.no_grad()
def sample(
    predict: Callable[[Tensor, Tensor], Tensor],
    noise: Tensor,
    scheduler: SchedulerMixin,
    num_steps: int,
    *,
    generator: torch.Generator | None = None,
    source: Tensor | None = None,
    strength: float = 1.0,
    keep: Tensor | None = None,
) -> Tensor:
    """Denoise ``noise`` in ``num_steps`` scheduler steps (one ``predict`` call each).

    Args:
        predict: ``predict(x_t, model_timestep [B]) -> output`` in the scheduler's convention
            (velocity ``eps - x0`` for flow schedulers), guidance already applied.
        noise: the initial ``x_T``, e.g. ``randn`` of the latent shape from a seeded generator.
        scheduler: from :func:`build_scheduler` (or any diffusers scheduler); its state is reset.
        num_steps: number of denoising steps.
        generator: seeds the noise that stochastic schedulers (DDPM, as GoT samples) add per step.
        source: a clean latent to edit (needs a scheduler with ``add_noise``: DDPM, DDIM). With
            ``strength < 1`` the loop starts from ``source`` noised to the step ``strength`` of the
            way in and runs only the remaining steps (diffusers' img2img: ``int(num_steps *
            strength)`` of them).
        strength: in (0, 1]; 1 starts from pure noise.
        keep: ``[B, 1, h, w]`` in [0, 1], 1 where ``source`` is kept: after every step those
            elements are replaced by ``source`` noised to the next step (the source itself after
            the last), diffusers' inpainting with a plain 4-channel UNet
            (``StableDiffusionInpaintPipeline`` when ``num_channels_unet == 4``).
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    if (strength < 1.0 or keep is not None) and source is None:
        raise ValueError("strength < 1 and keep need the source latent to start from or keep")
    if source is not None and not hasattr(scheduler, "add_noise"):
        raise ValueError(f"{type(scheduler).__name__} cannot noise a source latent (no add_noise); use DDPM or DDIM")
    scheduler.set_timesteps(num_steps, device=noise.device)
    if len(scheduler.timesteps) != num_steps:
        raise ValueError(f"{type(scheduler).__name__} made {len(scheduler.timesteps)} steps for num_steps={num_steps}")
    first = num_steps - max(1, int(num_steps * strength))
    timesteps, inputs = scheduler.timesteps[first:], model_timesteps(scheduler)[first:]
    step_kwargs = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
    if strength < 1.0:
        x = scheduler.add_noise(source, noise, timesteps[:1].expand(noise.shape[0]))
    else:
        x = noise * getattr(scheduler, "init_noise_sigma", 1.0)
    for i, (t, model_t) in enumerate(zip(timesteps, inputs)):
        model_input = scheduler.scale_model_input(x, t) if hasattr(scheduler, "scale_model_input") else x
        output = predict(model_input, model_t.expand(x.shape[0]))
        if output.shape != x.shape:
            raise ValueError(f"predict returned {tuple(output.shape)} for x_t of shape {tuple(x.shape)}")
        x = scheduler.step(output, t, x, return_dict=False, **step_kwargs)[0]
        if keep is not None:
            known = source if i + 1 == len(timesteps) else scheduler.add_noise(source, noise, timesteps[i + 1].expand(x.shape[0]))
            x = keep * known + (1 - keep) * x
    return x
