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
) -> Tensor:
    """Denoise ``noise`` in ``num_steps`` scheduler steps (one ``predict`` call each).

    Args:
        predict: ``predict(x_t, model_timestep [B]) -> output`` in the scheduler's convention
            (velocity ``eps - x0`` for flow schedulers), guidance already applied.
        noise: the initial ``x_T``, e.g. ``randn`` of the latent shape from a seeded generator.
        scheduler: from :func:`build_scheduler` (or any diffusers scheduler); its state is reset.
        num_steps: number of denoising steps.
        generator: seeds the noise that stochastic schedulers (DDPM, as GoT samples) add per step.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    scheduler.set_timesteps(num_steps, device=noise.device)
    if len(scheduler.timesteps) != num_steps:
        raise ValueError(f"{type(scheduler).__name__} made {len(scheduler.timesteps)} steps for num_steps={num_steps}")
    inputs = model_timesteps(scheduler)
    step_kwargs = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
    x = noise * getattr(scheduler, "init_noise_sigma", 1.0)
    for t, model_t in zip(scheduler.timesteps, inputs):
        model_input = scheduler.scale_model_input(x, t) if hasattr(scheduler, "scale_model_input") else x
        output = predict(model_input, model_t.expand(x.shape[0]))
        if output.shape != x.shape:
            raise ValueError(f"predict returned {tuple(output.shape)} for x_t of shape {tuple(x.shape)}")
        x = scheduler.step(output, t, x, return_dict=False, **step_kwargs)[0]
    return x
