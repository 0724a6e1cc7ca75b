"""NaNGuard: a non-finite loss, gradient or weight never reaches a checkpoint.

Checked at every micro-batch (the loss, before backward), before every optimiser step (every
trainable gradient, before clipping) and after it (every trainable weight, before
``ModelCheckpoint`` and :class:`~callbacks.preemption.Preemption` save in ``on_train_batch_end``:
Lightning runs checkpoint callbacks last). The ranks agree on the outcome, so all stop or skip
together. ``policy``:

* ``stop`` (default): the fit ends with :class:`NonFinite`, before the step that would write the
  non-finite values; ``zoo fit`` prints it as one ``zoo: error:`` line naming the step and the
  non-finite logged terms or parameter, with exit status 1. The last checkpoint is the last good one.
* ``skip``: the step's gradients are dropped (the optimiser leaves every weight and its state as they
  were), a warning names the step and the terms, and after ``max_skips`` skipped steps the fit stops
  as with ``stop``.

Weights that became non-finite through an optimiser step with finite gradients (an lr far too large;
under DeepSpeed, whose engine holds the gradients outside ``param.grad``) cannot be skipped: the fit
stops at that step, before any save.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor

from zoo.blocks.config import ConfigError


class NonFinite(RuntimeError):
    """Training produced a non-finite loss, gradient or weight; the fit stopped before saving it."""


class NaNGuard(Callback):
    """Stops the fit (or skips the optimiser step) on a non-finite loss or gradient; never saves
    non-finite weights.

    Args:
        policy: ``stop`` ends the fit at the first non-finite loss or gradient; ``skip`` drops that
            step's update and goes on, up to ``max_skips`` steps, then stops.
        max_skips: Steps ``skip`` may drop in one fit before it stops.
    """

    def __init__(self, policy: Literal["stop", "skip"] = "stop", max_skips: int = 10) -> None:
        if policy not in ("stop", "skip"):
            raise ConfigError(f"NaNGuard policy must be 'stop' or 'skip', got {policy!r}")
        if max_skips < 0:
            raise ConfigError(f"NaNGuard max_skips must be >= 0, got {max_skips}")
        self.policy, self.max_skips = policy, max_skips
        self.skipped = 0
        self._reason: str | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.skipped, self._reason = 0, None

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: Tensor) -> None:
        if self._reason is None and not bool(torch.isfinite(loss.detach()).all()):
            self._reason = f"non-finite loss ({_non_finite_terms(trainer) or 'loss'})"

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        reason, self._reason = self._reason, None
        if reason is None:
            reason = _first_non_finite(pl_module, grads=True)
        if not trainer.strategy.reduce_boolean_decision(reason is not None, all=False):
            return
        step = trainer.global_step + 1
        # Any rank's finding decides for all; a rank that found nothing says so.
        reason = reason or "non-finite values on another rank"
        if self.policy == "stop" or self.skipped >= self.max_skips:
            limit = f" after {self.skipped} skipped step(s) (max_skips {self.max_skips})" if self.policy == "skip" else ""
            raise NonFinite(f"{reason} at step {step}{limit}: stopped before the update; the last checkpoint holds the last finite weights")
        self.skipped += 1
        for group in optimizer.param_groups:
            for param in group["params"]:
                param.grad = None
        rank_zero_warn(f"zoo: skipped optimizer step {step}: {reason} ({self.skipped} of at most {self.max_skips})")

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        reason = _first_non_finite(pl_module, grads=False)
        if trainer.strategy.reduce_boolean_decision(reason is not None, all=False):
            where = reason or "non-finite weights on another rank"
            raise NonFinite(f"{where} after step {trainer.global_step}: stopped before saving them")

    def state_dict(self) -> dict[str, Any]:
        return {"skipped": self.skipped}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped = int(state_dict.get("skipped", 0))


def _non_finite_terms(trainer: L.Trainer) -> str:
    """The logged training terms (``train/...``) that are not finite, e.g. ``train/diffusion_mse=nan``."""
    bad = [
        f"{name}={float(value)}"
        for name, value in trainer.callback_metrics.items()
        if name.startswith("train/") and value.numel() == 1 and not math.isfinite(float(value))
    ]
    return ", ".join(sorted(bad))


def _first_non_finite(module: L.LightningModule, grads: bool) -> str | None:
    """``non-finite gradient of <name>`` / ``non-finite weight <name>`` for the first trainable
    parameter with one, else None. One fused norm pass finds the candidates (an entry that is not
    finite makes the norm not finite); each candidate is confirmed entry by entry, since the norm of
    huge finite entries can overflow."""
    named = [(name, p.grad if grads else p.detach()) for name, p in module.named_parameters() if p.requires_grad]
    named = [(name, t) for name, t in named if t is not None]
    if not named:
        return None
    norms = torch._foreach_norm([t for _, t in named])
    finite = torch.isfinite(torch.stack([n.float().to(norms[0].device) for n in norms])).cpu()
    for index in (~finite).nonzero().flatten().tolist():
        name, tensor = named[index]
        if not bool(torch.isfinite(tensor).all()):
            return f"non-finite gradient of {name}" if grads else f"non-finite weight {name}"
    return None
