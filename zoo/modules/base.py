"""EditingModule: the train / validate / test / predict flow every paper module shares.

A paper module (DIM, GoT, ...) composes blocks and implements three hooks:

- :meth:`EditingModule.training_loss` — the paper's objective on one batch (a dict of named terms,
  ``"loss"`` being the one optimised);
- :meth:`EditingModule.edit_batch` — images produced for a batch (edits, or T2I generations);
- :meth:`EditingModule.condition_text` — the text the MLLM reads for each sample (instruction,
  or the designer's blueprint).

Evaluation reads both through :meth:`EditingModule.edit_with_text`; a module whose text is produced
while editing (GoT's reasoning chain) overrides that instead.

The base owns what is the same everywhere: optimiser and warm-up/decay schedule from config,
logging, evaluation outputs handed to callbacks, and checkpoint hygiene — checkpoints hold
trainable weights only; frozen encoders are reloaded from their source (DESIGN.md, "Trainable
state only").
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

from pathlib import Path

import lightning as L
import torch
from torch import Tensor

from zoo.blocks.pretrained import MissingPretrainedError


@dataclass
class Optimization:
    """Optimiser and learning-rate schedule (AdamW over trainable parameters only)."""

    lr: float = 1e-4
    """Peak learning rate."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam betas."""
    eps: float = 1e-8
    """Adam epsilon."""
    weight_decay: float = 0.0
    """Decoupled weight decay."""
    warmup_steps: int = 0
    """Linear warm-up from 0 to ``lr`` over this many optimiser steps."""
    schedule: Literal["constant", "cosine"] = "constant"
    """Shape after warm-up; cosine decays to ``min_lr_ratio * lr`` at ``trainer.max_steps``."""
    min_lr_ratio: float = 0.0
    """Floor of the cosine schedule as a fraction of ``lr``."""


def lr_factor(step: int, optim: Optimization, max_steps: int) -> float:
    """Multiplier of the peak learning rate at optimiser step ``step``."""
    if step < optim.warmup_steps:
        return (step + 1) / optim.warmup_steps
    if optim.schedule == "constant":
        return 1.0
    decay_steps = max(1, max_steps - optim.warmup_steps)
    progress = min(1.0, (step - optim.warmup_steps) / decay_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return optim.min_lr_ratio + (1.0 - optim.min_lr_ratio) * cosine


class EditingModule(L.LightningModule):
    """Shared LightningModule flow for MLLM-guided editing and generation.

    Args:
        optim: optimiser and schedule.
        eval_seed: seed of the noise used in validation loss, test and predict, so numbers and
            images are comparable across runs and checkpoints.
    """

    def __init__(self, optim: Optimization | None = None, eval_seed: int = 0) -> None:
        super().__init__()
        self.optim = optim or Optimization()
        self.eval_seed = eval_seed
        # Frozen encoders are not in checkpoints, so loading must tolerate their absence;
        # on_load_checkpoint checks that nothing trainable is missing instead.
        self.strict_loading = False
        # A resumed benchmark run may have fewer cases left than ranks; a rank without any then skips
        # the test loop and its evaluators finish in teardown (callbacks/results.py).
        self.allow_zero_length_dataloader_with_multiple_devices = True

    # -- hooks a paper module implements -------------------------------------------------------

    def training_loss(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """Loss terms for one batch; ``"loss"`` is optimised, every term is logged."""
        raise NotImplementedError

    def edit_batch(self, batch: dict[str, Any], generator: torch.Generator | None = None) -> Tensor:
        """Images in [-1, 1], shape [B, 3, H, W], produced for every sample of ``batch``."""
        raise NotImplementedError

    def condition_text(self, batch: dict[str, Any]) -> list[str]:
        """The text the MLLM reads for each sample of ``batch``."""
        return list(batch["instruction"])

    def edit_with_text(
        self, batch: dict[str, Any], generator: torch.Generator | None = None
    ) -> tuple[Tensor, list[str]]:
        """Images of :meth:`edit_batch` and, per sample, the text that produced them (for evaluators)."""
        return self.edit_batch(batch, generator=generator), self.condition_text(batch)

    # -- Lightning flow ---------------------------------------------------------------------

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        terms = self.training_loss(batch)
        batch_size = len(batch["key"])
        for name, value in terms.items():
            self.log(f"train/{name}", value, prog_bar=name == "loss", batch_size=batch_size)
        return terms["loss"]

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        with _seeded(self.eval_seed + batch_idx):
            terms = self.training_loss(batch)
        batch_size = len(batch["key"])
        for name, value in terms.items():
            self.log(f"val/{name}", value, batch_size=batch_size, sync_dist=True)
        return {"loss": terms["loss"]}

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        return self._edit_outputs(batch, batch_idx)

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        return self._edit_outputs(batch, batch_idx)

    def _edit_outputs(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        """Edits for a batch plus the text that produced them, for evaluator callbacks."""
        generator = torch.Generator(device="cpu").manual_seed(self.eval_seed + batch_idx)
        edited, texts = self.edit_with_text(batch, generator=generator)
        return {"key": list(batch["key"]), "edited": edited, "text": texts}

    # -- optimisation -----------------------------------------------------------------------

    def configure_optimizers(self) -> dict[str, Any]:
        params = [p for p in self.parameters() if p.requires_grad]
        if not params:
            raise ValueError(f"{type(self).__name__} has no trainable parameters: check the freeze flags")
        optimizer = torch.optim.AdamW(
            params,
            lr=self.optim.lr,
            betas=tuple(self.optim.betas),
            eps=self.optim.eps,
            weight_decay=self.optim.weight_decay,
        )
        # Streaming loaders have no length, so the schedule is defined by max_steps (pitfall 13).
        max_steps = self.trainer.max_steps if self.trainer.max_steps > 0 else 0
        if self.optim.schedule == "cosine" and max_steps <= 0:
            raise ValueError("a cosine schedule needs trainer.max_steps > 0 (streaming data has no epoch length)")
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_factor(step, self.optim, max_steps)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -- checkpoint hygiene -----------------------------------------------------------------

    def trainable_state_keys(self) -> set[str]:
        """State-dict keys that checkpoints keep: trainable parameters and their modules' buffers."""
        keys: set[str] = set()
        for module_name, module in self.named_modules():
            own = list(module.named_parameters(recurse=False))
            if not any(p.requires_grad for _, p in own):
                continue
            prefix = f"{module_name}." if module_name else ""
            keys.update(prefix + name for name, _ in own)
            keys.update(prefix + name for name, _ in module.named_buffers(recurse=False))
        return keys

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        keep = self.trainable_state_keys()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}

    def load_trainable(self, checkpoint_path: str) -> None:
        """Initialise trainable weights from a zoo checkpoint of an earlier stage.

        An input layer widened in this stage (T2I → edit: extra channels for the concatenated
        source latent) takes the checkpoint's weights in its leading channels and keeps its own
        initialisation for the new ones — the official order "load, then expand channels".
        """
        if not Path(checkpoint_path).is_file():
            raise MissingPretrainedError(
                f"init_from checkpoint '{checkpoint_path}' does not exist: train the previous stage first "
                f"or set model.init_args.init_from to its last.ckpt"
            )
        state = torch.load(checkpoint_path, map_location="cpu", weights_only=True)["state_dict"]
        own = self.state_dict()
        unexpected = sorted(set(state) - set(own))
        if unexpected:
            raise KeyError(
                f"{checkpoint_path} holds {len(unexpected)} tensors this model lacks (first: {unexpected[0]}); "
                f"is it a checkpoint of the same model family?"
            )
        for key, value in state.items():
            if value.shape != own[key].shape:
                state[key] = _widen_into(own[key].clone(), value, key)
        self.load_state_dict(state, strict=False)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        missing = sorted(self.trainable_state_keys() - set(checkpoint["state_dict"]))
        if missing:
            raise KeyError(
                f"checkpoint lacks {len(missing)} trainable tensors of {type(self).__name__} "
                f"(first: {missing[0]}); was it written by a different model configuration?"
            )


def _widen_into(target: Tensor, value: Tensor, key: str) -> Tensor:
    """Copy ``value`` into the leading input channels (dim 1) of ``target``; other shapes must match."""
    same_rest = value.dim() == target.dim() and value.shape[0] == target.shape[0] and value.shape[2:] == target.shape[2:]
    if not (same_rest and value.shape[1] < target.shape[1]):
        raise ValueError(f"checkpoint tensor {key} has shape {tuple(value.shape)}, model has {tuple(target.shape)}")
    target[:, : value.shape[1]] = value
    return target


class _seeded:
    """Fork the global RNGs and seed them, so validation noise is the same at every evaluation."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self._fork = torch.random.fork_rng(devices=[])

    def __enter__(self) -> None:
        self._fork.__enter__()
        torch.manual_seed(self.seed)

    def __exit__(self, *exc: object) -> None:
        self._fork.__exit__(*exc)
