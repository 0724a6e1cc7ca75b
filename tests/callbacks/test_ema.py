"""EMA in real fits of a tiny connector-only DIM (its DiT inside the module tree but frozen): the
average against its closed form, only trainable parameters, the swap for validation, accumulation."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from callbacks.ema import EMA, ema_weights
from callbacks.preemption import Preempted, Preemption
from tests.helpers.recorders import WeightRecorder
from tests.modules.conftest import tiny_dim_kwargs, toy_batch
from zoo.blocks.config import ConfigError
from zoo.modules.base import Optimization
from zoo.modules.dim import DIMModule


def fit(ema: EMA, max_steps: int, accumulate: int = 1, val_every: int | None = None) -> tuple[DIMModule, WeightRecorder]:
    """``max_steps`` optimiser steps of a connector-only tiny DIM (lr 1e-2, so the weights move)."""
    torch.manual_seed(0)
    model = DIMModule(**tiny_dim_kwargs(train_denoiser=False, optim=Optimization(lr=1e-2)))
    batches = [toy_batch(2) for _ in range(max_steps * accumulate)]
    recorder = WeightRecorder()
    trainer = L.Trainer(
        accelerator="cpu", max_steps=max_steps, accumulate_grad_batches=accumulate, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        val_check_interval=val_every, check_val_every_n_epoch=None if val_every else 1, limit_val_batches=1,
        callbacks=[ema, recorder],
    )
    loader = DataLoader(batches, batch_size=None)
    trainer.fit(model, train_dataloaders=loader, val_dataloaders=loader if val_every else None)
    return model, recorder


def closed_form(after_step: dict[int, dict[str, Tensor]], decay: float, start: int, every: int, steps: int) -> dict[str, Tensor]:
    """``ema_s = decay * ema_(s-1) + (1 - decay) * w_s`` at the averaging steps, ``ema = w_s`` up to
    ``start``, in float64 from the recorded weights."""
    ema = {k: v.double() for k, v in after_step[0].items()}
    for step in range(1, steps + 1):
        weights = {k: v.double() for k, v in after_step[step].items()}
        if step <= start:
            ema = weights
        elif (step - start) % every == 0:
            ema = {k: decay * ema[k] + (1 - decay) * weights[k] for k in ema}
    return ema


def assert_close(a: dict[str, Tensor], b: dict[str, Tensor], atol: float = 1e-6) -> None:
    assert a.keys() == b.keys()
    worst = max(float((a[k].double() - b[k].double()).abs().max()) for k in a)
    assert worst <= atol, f"largest difference {worst:.3g}"


def max_difference(a: dict[str, Tensor], b: dict[str, Tensor]) -> float:
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


@pytest.mark.parametrize("decay, start, every", [(0.7, 0, 1), (0.5, 2, 2)], ids=["every-step", "start-2-every-2"])
def test_average_follows_the_closed_form(decay: float, start: int, every: int) -> None:
    ema = EMA(decay=decay, start_step=start, every_n_steps=every)
    _, recorder = fit(ema, max_steps=6)
    expected = closed_form(recorder.after_step, decay, start, every, 6)
    assert_close(ema.weights, expected)
    assert ema.updates == (6 - start) // every and ema.last_step == 6
    assert all(v.dtype == torch.float32 for v in ema.weights.values())
    # The average lags the weights by a measurable amount: a copy of them would fail the check above.
    assert max_difference(expected, recorder.after_step[6]) > 1e-3


def test_only_trainable_parameters_are_averaged() -> None:
    ema = EMA(decay=0.9)
    model, _ = fit(ema, max_steps=2)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    assert set(ema.weights) == trainable and trainable
    assert frozen and all(name.startswith("denoiser.") for name in frozen), "the warm-up DiT is in the tree, frozen"
    assert not any(name.startswith(("denoiser.", "mllm.", "codec.")) for name in ema.weights)


def test_validation_sees_the_average_and_training_goes_on_from_its_own_weights() -> None:
    ema = EMA(decay=0.7)
    model, recorder = fit(ema, max_steps=6, val_every=3)
    _, unswapped = fit(EMA(decay=0.7, swap_for_eval=False), max_steps=6, val_every=3)
    assert [step for step, _ in recorder.in_validation] == [3, 6]
    average3 = closed_form(recorder.after_step, 0.7, 0, 1, 3)
    assert_close(recorder.in_validation[0][1], average3)
    assert max_difference(average3, recorder.after_step[3]) > 1e-3
    [(_, seen3), _] = unswapped.in_validation
    assert all(torch.equal(seen3[k], v) for k, v in unswapped.after_step[3].items()), "swap_for_eval false: the weights"
    # Training went on from its own weights, bit for bit as with the unswapped validation (which draws
    # the same random numbers), and the module ends the fit with them, not with the average.
    assert all(torch.equal(recorder.after_step[6][k], v) for k, v in unswapped.after_step[6].items())
    assert_close(ema.weights, closed_form(recorder.after_step, 0.7, 0, 1, 6))
    final = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
    assert all(torch.equal(final[k], recorder.after_step[6][k]) for k in final)


def test_gradient_accumulation_updates_once_per_optimizer_step() -> None:
    ema = EMA(decay=0.7)
    _, recorder = fit(ema, max_steps=2, accumulate=3)
    assert sorted(recorder.after_step) == [0, 1, 2], "6 batches, 2 optimiser steps"
    assert ema.updates == 2 and ema.last_step == 2
    assert_close(ema.weights, closed_form(recorder.after_step, 0.7, 0, 1, 2))


def test_the_average_can_live_in_cpu_memory() -> None:
    ema = EMA(decay=0.7, cpu=True)
    _, recorder = fit(ema, max_steps=3)
    assert all(v.device.type == "cpu" for v in ema.weights.values())
    assert_close(ema.weights, closed_form(recorder.after_step, 0.7, 0, 1, 3))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"decay": 1.0}, "EMA decay must be in [0, 1), got 1.0"),
        ({"decay": -0.1}, "EMA decay must be in [0, 1), got -0.1"),
        ({"every_n_steps": 0}, "EMA every_n_steps must be in [1, inf], got 0"),
        ({"start_step": -1}, "EMA start_step must be in [0, inf], got -1"),
    ],
)
def test_bad_settings_are_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError) as error:
        EMA(**kwargs)
    assert str(error.value) == message


def test_an_average_of_other_parameters_is_refused() -> None:
    torch.manual_seed(0)
    model = DIMModule(**tiny_dim_kwargs(train_denoiser=False))
    ema = EMA()
    trainable = {name: p.detach().float() for name, p in model.named_parameters() if p.requires_grad}
    # What a checkpoint of the same model with its DiT trained holds: one tensor more than trains here.
    ema.load_state_dict({"weights": trainable | {"denoiser.model.proj_out.bias": torch.zeros(3)}, "updates": 3, "last_step": 3})
    with pytest.raises(ConfigError) as error:
        ema.track(model)
    assert str(error.value) == (
        "the checkpoint's EMA does not fit this model's trainable parameters: it holds "
        "denoiser.model.proj_out.bias, which does not train here (0 missing, 1 not trained here)"
    )
    ema.load_state_dict({"weights": trainable, "updates": 3, "last_step": 3})
    ema.track(model)
    assert ema.weights.keys() == trainable.keys() and all(torch.equal(ema.weights[k], v) for k, v in trainable.items())


class _SigtermAtStep(L.Callback):
    """Sends this process SIGTERM as the batch of optimiser step ``step`` starts (what ``scancel`` does)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: object, batch_idx: int) -> None:
        if trainer.global_step == self.step - 1:
            os.kill(os.getpid(), signal.SIGTERM)


def test_a_preemption_save_listed_before_the_ema_holds_the_average_of_its_step(tmp_path: Path) -> None:
    # Preemption saves and stops in its on_train_batch_end; listed first, it runs before the EMA's.
    torch.manual_seed(0)
    model = DIMModule(**tiny_dim_kwargs(train_denoiser=False, optim=Optimization(lr=1e-2)))
    ema, recorder = EMA(decay=0.7), WeightRecorder()
    trainer = L.Trainer(
        accelerator="cpu", max_steps=6, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=str(tmp_path), callbacks=[_SigtermAtStep(3), Preemption(), ema, recorder],
    )
    with pytest.raises(Preempted):
        trainer.fit(model, train_dataloaders=DataLoader([toy_batch(2) for _ in range(6)], batch_size=None))
    # Not weights_only: this checkpoint's hyperparameters hold the module's typed configs (no CLI here).
    saved = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert saved["global_step"] == 3 and saved["callbacks"]["EMA"]["updates"] == 3
    recorder.after_step[3] = {k: v for k, v in saved["state_dict"].items() if k in recorder.after_step[0]}
    assert_close(ema_weights(saved), closed_form(recorder.after_step, 0.7, 0, 1, 3))
