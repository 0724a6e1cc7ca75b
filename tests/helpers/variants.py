"""A research variant as a user writes one: a paper module with one hook overridden (README, "Extending the zoo")."""

from __future__ import annotations

from torch import Tensor

from datamodules.samples import EditBatch
from zoo.blocks.condition import Condition
from zoo.modules.dim import DIMModule


class ZeroNullDIM(DIMModule):
    """DIM whose unconditional branch is an all-zero context instead of the learned null caption."""

    calls = 0
    """How often the override ran in this process (training dropout and every sampler step)."""

    def null_condition(self, condition: Condition) -> Condition:
        type(self).calls += 1
        return condition.replace(context=condition.context * 0, losses={})


class NaNAtStepDIM(DIMModule):
    """DIM with one extra loss term, ``nan_probe``, that is 0 except at optimiser step
    :attr:`NAN_STEP` (counted from 1), where it and its gradients are NaN: a divergence injected through the documented
    hooks ``extra_losses`` and ``loss_weights``."""

    NAN_STEP = 5

    def loss_weights(self) -> dict[str, float]:
        return {**super().loss_weights(), "nan_probe": 1.0}

    def extra_losses(self, batch: EditBatch, condition: Condition) -> dict[str, Tensor]:
        value = float("nan") if self.training and self.global_step + 1 == self.NAN_STEP else 0.0
        return {**super().extra_losses(batch, condition), "nan_probe": condition.context.mean() * value}
