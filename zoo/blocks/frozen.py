"""Frozen parts: one way to make a block never train, and a holder that keeps frozen blocks out of
the trained model's ``nn.Module`` tree.

Every paper in the zoo freezes some encoders (an MLLM, a VAE, CLIP/SigLIP targets). A frozen block
is a :class:`FrozenModule` after :meth:`FrozenModule.freeze`: no gradients, and eval mode whatever
its parent's ``.train()`` asks. An :class:`EditingModule <zoo.modules.base.EditingModule>` keeps such
blocks in a :class:`FrozenParts` holder instead of as submodules, so ``parameters()``,
``state_dict()``, DDP, DeepSpeed ZeRO, EMA copies and checkpoints see only what trains — as
diffusers' training scripts keep frozen text encoders and VAEs out of ``accelerator.prepare``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from torch import Tensor, nn


class FrozenModule(nn.Module):
    """A block that can be frozen: :meth:`freeze` stops its gradients and pins it to eval mode."""

    frozen: bool = False

    def freeze(self) -> FrozenModule:
        """No gradients, eval mode from now on (dropout off, norms' statistics fixed)."""
        self.frozen = True
        self.requires_grad_(False)
        return self.train(False)

    def train(self, mode: bool = True) -> FrozenModule:
        return super().train(mode and not self.frozen)


class FrozenParts:
    """Named frozen blocks held outside an owner's module tree.

    The owner forwards ``_apply`` (``.to()``, ``.half()``, ``.cuda()``) to :meth:`apply`, so the
    parts follow its device and dtype. A deep copy of the owner (Lightning's ``WeightAveraging``, an
    EMA) shares the parts instead of copying a frozen multi-billion-parameter MLLM.
    """

    def __init__(self) -> None:
        self._parts: dict[str, nn.Module] = {}

    def add(self, name: str, module: nn.Module) -> None:
        if any(p.requires_grad for p in module.parameters()):
            raise ValueError(f"frozen part '{name}' ({type(module).__name__}) has trainable parameters: freeze it first")
        self._parts[name] = module

    def __contains__(self, name: object) -> bool:
        return name in self._parts

    def __getitem__(self, name: str) -> nn.Module:
        return self._parts[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._parts)

    def items(self) -> list[tuple[str, nn.Module]]:
        return list(self._parts.items())

    def apply(self, fn: Callable[[Tensor], Tensor]) -> None:
        """Apply a tensor conversion (the one ``nn.Module._apply`` gets) to every part."""
        for module in self._parts.values():
            module._apply(fn)

    def num_parameters(self) -> int:
        return sum(p.numel() for module in self._parts.values() for p in module.parameters())

    def __deepcopy__(self, memo: dict[int, Any]) -> FrozenParts:
        return self
