"""EMA: an exponential moving average of the trainable parameters, kept in the checkpoint and swapped
in to evaluate.

After optimiser step ``s`` (``trainer.global_step``; with ``accumulate_grad_batches=N`` one step is N
batches) the average of every tracked parameter ``w`` becomes ``ema = decay * ema + (1 - decay) * w``
(the Polyak-style average of DiT's ``train.py::update_ema``, facebookresearch/DiT, decay 0.9999, and
of diffusers' ``training_utils.EMAModel``). The update is ``torch.optim.swa_utils.get_ema_multi_avg_fn``
(one fused lerp over all tensors). Up to ``start_step`` the average copies the weights (decay 0, as
diffusers' ``update_after_step``); after it, every ``every_n_steps``-th step updates it. The average
starts as a copy of the weights at the start of the fit and is kept in float32 whatever the weights'
dtype (a bf16 average would lose updates smaller than its 8-bit mantissa resolves).

What is tracked: the LightningModule's parameters with ``requires_grad`` when the fit starts, by
their names in ``module.named_parameters()``. Frozen encoders are outside the module tree
(``EditingModule.keep_frozen``); stage-frozen submodules inside it (DIM's warm-up DiT, ImgEdit-E1's
frozen FLUX parts) have ``requires_grad=False`` and are left out.

Checkpoint format (``checkpoint["callbacks"]["EMA"]``, the callback's ``state_dict``, which Lightning
also keeps in a DeepSpeed checkpoint's client state)::

    {"weights": {<parameter name>: float32 tensor of the parameter's full shape}, "updates": int,
     "last_step": int, "decay": float, "every_n_steps": int, "start_step": int}

``checkpoint["state_dict"]`` keeps the training weights, so a resume continues them and the average
bit-exactly; :func:`ema_weights` reads the average from a loaded checkpoint.

Evaluation: with ``swap_for_eval`` the validation loop (of a fit and of ``zoo validate``), ``zoo
test`` and ``zoo predict`` run on the average, and the training weights are put back afterwards
(before ``ModelCheckpoint`` saves in ``on_validation_end``). Outside a fit the average is the one in
``--ckpt_path``; a checkpoint without one is refused (:class:`~zoo.blocks.config.ConfigError`), never
evaluated silently with the training weights.

ZeRO-3 partitions each parameter over the ranks (``param.data`` is empty outside a gather). Tracked
parameters that carry DeepSpeed's ``ds_id`` are gathered with ``deepspeed.zero.GatheredParameters``
for each update and swap (diffusers' ``EMAModel.step`` does the same), so every rank keeps the full
average of the trainable parameters (4 bytes each; ``cpu`` moves it to host memory); ZeRO-2 and DDP
keep full parameters on every rank already. Under DeepSpeed's bf16 the module's parameters are bf16
copies of the optimiser's float32 master weights: the average follows those bf16 values.

Why not Lightning's ``WeightAveraging`` / ``EMAWeightAveraging``: it deep-copies the whole module
(frozen parts inside the tree too), puts the average into ``checkpoint["state_dict"]``, which
DeepSpeed's checkpoint drops, and copies the average over the training weights when the fit ends.
"""

from __future__ import annotations

import contextlib
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn
from torch.optim.swa_utils import get_ema_multi_avg_fn

from zoo.blocks.config import ConfigError, check_range

STATE_KEY = "EMA"
"""Key of the callback's state in ``checkpoint["callbacks"]``."""


def ema_weights(checkpoint: dict[str, Any]) -> dict[str, Tensor] | None:
    """The averaged weights (parameter name -> tensor) of a loaded checkpoint, None if it has none."""
    state = (checkpoint.get("callbacks") or {}).get(STATE_KEY)
    return None if state is None else state["weights"]


def _gathered(params: list[nn.Parameter], modifier_rank: int | None = None) -> contextlib.AbstractContextManager[Any]:
    """Full ``param.data`` of ZeRO-3-partitioned parameters inside the context (written back from
    ``modifier_rank``); a no-op for unpartitioned ones."""
    partitioned = [p for p in params if hasattr(p, "ds_id")]
    if not partitioned:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(partitioned, modifier_rank=modifier_rank)


class EMA(Callback):
    """Exponential moving average of the trainable parameters (see the module docstring).

    Args:
        decay: Weight of the old average at each update, in [0, 1); 0.9999 is DiT's. The average
            spans about ``1 / (1 - decay)`` updates.
        every_n_steps: Update after every n-th optimiser step (counted from ``start_step``), not
            per batch: gradient accumulation does not change when it updates.
        start_step: Up to this optimiser step the average copies the weights; it averages after it.
        swap_for_eval: Validate, test and predict with the averaged weights (the training weights
            are restored afterwards); False evaluates the training weights.
        cpu: Keep the average in CPU memory (each update copies the trainable weights to the host:
            slower, but no accelerator memory for a large trainable part; raise ``every_n_steps``).
    """

    def __init__(
        self, decay: float = 0.9999, every_n_steps: int = 1, start_step: int = 0, swap_for_eval: bool = True, cpu: bool = False
    ) -> None:
        if not 0.0 <= decay < 1.0:
            raise ConfigError(f"EMA decay must be in [0, 1), got {decay}")
        check_range("EMA every_n_steps", every_n_steps, 1)
        check_range("EMA start_step", start_step, 0)
        self.decay, self.every_n_steps, self.start_step = decay, every_n_steps, start_step
        self.swap_for_eval, self.cpu = swap_for_eval, cpu
        self.updates = 0
        """Averaging updates so far (copies up to ``start_step`` not counted)."""
        self.last_step = 0
        """``global_step`` of the last update or copy (an optimiser step is applied once)."""
        self.weights: dict[str, Tensor] = {}
        """Parameter name -> float32 average."""
        self._names: list[str] = []
        self._params: list[nn.Parameter] = []
        self._loaded: dict[str, Tensor] | None = None
        self._backup: list[Tensor] | None = None
        self._trainer: L.Trainer | None = None
        self._average = get_ema_multi_avg_fn(decay)
        self._copy = get_ema_multi_avg_fn(0.0)

    # -- state -------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        # A save by a callback whose on_train_batch_end runs before this one's (Preemption's, when it
        # comes first in the list) must hold the average of the step it saves.
        if self._trainer is not None and self._trainer.training:
            self.update(self._trainer.global_step)
        return {
            "weights": self.weights, "updates": self.updates, "last_step": self.last_step,
            "decay": self.decay, "every_n_steps": self.every_n_steps, "start_step": self.start_step,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._loaded = state_dict["weights"]
        self.updates, self.last_step = int(state_dict["updates"]), int(state_dict["last_step"])
        if self._params:  # a trainer that already fitted, evaluating a checkpoint
            self._adopt_loaded()

    def track(self, module: nn.Module) -> None:
        """Find the trainable parameters; start the average from the checkpoint's or from the weights."""
        named = [(name, p) for name, p in module.named_parameters() if p.requires_grad]
        if not named:
            raise ConfigError(f"EMA: {type(module).__name__} has no trainable parameters to average")
        self._names, self._params = [name for name, _ in named], [p for _, p in named]
        if self._loaded is not None:
            self._adopt_loaded()
            return
        with _gathered(self._params):
            self.weights = {name: p.detach().to(self._device(p), torch.float32, copy=True) for name, p in named}

    def _adopt_loaded(self) -> None:
        loaded, self._loaded = self._loaded, None
        assert loaded is not None
        _check_names(set(loaded), set(self._names))
        self.weights = {
            name: loaded[name].to(self._device(p), torch.float32, copy=True) for name, p in zip(self._names, self._params)
        }

    def _device(self, param: nn.Parameter) -> torch.device:
        return torch.device("cpu") if self.cpu else param.device

    # -- training ----------------------------------------------------------------------------------

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Not on_fit_start: DeepSpeed restores a checkpoint (weights and this state) after that hook.
        self._trainer = trainer
        if not self._params:
            self.track(pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._trainer = None

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.update(trainer.global_step)

    def update(self, step: int) -> None:
        """Average (or copy, up to ``start_step``) the tracked weights after optimiser step ``step``;
        nothing when no optimiser step was taken since the last call (accumulating gradients)."""
        if step <= self.last_step:
            return
        self.last_step = step
        copy = step <= self.start_step
        if not copy and (step - self.start_step) % self.every_n_steps:
            return
        averages = list(self.weights.values())
        with _gathered(self._params):
            current = [p.detach().to(a.device, torch.float32) for p, a in zip(self._params, averages)]
            (self._copy if copy else self._average)(averages, current, self.updates)
        self.updates += 0 if copy else 1

    # -- evaluation --------------------------------------------------------------------------------

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._params and trainer.state.fn == "fit":
            self.track(pl_module)  # the sanity check, before on_train_start
        self.swap_in(pl_module)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.swap_out()

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.swap_in(pl_module)

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.swap_out()

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.swap_in(pl_module)

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.swap_out()

    def swap_in(self, module: nn.Module) -> None:
        """Put the average into the tracked parameters, keeping the training weights aside
        (nothing without ``swap_for_eval``)."""
        if not self.swap_for_eval or self._backup is not None:
            return
        if not self._params:
            if self._loaded is None:
                raise ConfigError(
                    "EMA swap_for_eval: there are no averaged weights to evaluate (give --ckpt_path of a "
                    "fit that ran with the EMA callback, or set swap_for_eval false)"
                )
            self.track(module)
        with _gathered(self._params, modifier_rank=0):
            self._backup = [p.detach().clone() for p in self._params]
            for param, average in zip(self._params, self.weights.values()):
                param.data.copy_(average)

    def swap_out(self) -> None:
        """Put the training weights back (after :meth:`swap_in`)."""
        if self._backup is None:
            return
        with _gathered(self._params, modifier_rank=0):
            for param, kept in zip(self._params, self._backup):
                param.data.copy_(kept)
        self._backup = None


def _check_names(loaded: set[str], trainable: set[str]) -> None:
    """Refuse a checkpoint's average that does not cover exactly the trainable parameters."""
    missing, extra = sorted(trainable - loaded), sorted(loaded - trainable)
    if missing or extra:
        first = f"lacks {missing[0]}" if missing else f"holds {extra[0]}, which does not train here"
        raise ConfigError(
            f"the checkpoint's EMA does not fit this model's trainable parameters: it {first} "
            f"({len(missing)} missing, {len(extra)} not trained here)"
        )

