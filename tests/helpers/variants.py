"""A research variant as a user writes one: a paper module with one hook overridden (README, "Extending the zoo")."""

from __future__ import annotations

from zoo.blocks.condition import Condition
from zoo.modules.dim import DIMModule


class ZeroNullDIM(DIMModule):
    """DIM whose unconditional branch is an all-zero context instead of the learned null caption."""

    calls = 0
    """How often the override ran in this process (training dropout and every sampler step)."""

    def null_condition(self, condition: Condition) -> Condition:
        type(self).calls += 1
        return condition.replace(context=condition.context * 0, losses={})
