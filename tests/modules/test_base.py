"""EditingModule's optimiser choice, schedule and warm-start widening, against hand-computed numbers."""

from __future__ import annotations

import math

import pytest
import torch

from zoo.blocks.config import ConfigError
from zoo.modules.base import Optimization, _widen_into, build_optimizer, lr_factor


def test_warmup_is_linear_then_constant() -> None:
    optim = Optimization(warmup_steps=4, schedule="constant")
    assert [lr_factor(s, optim, 100) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]


def test_cosine_decays_to_floor_at_max_steps() -> None:
    optim = Optimization(warmup_steps=10, schedule="cosine", min_lr_ratio=0.1)
    assert lr_factor(10, optim, 110) == pytest.approx(1.0)
    midway = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5))
    assert lr_factor(60, optim, 110) == pytest.approx(midway)
    assert lr_factor(110, optim, 110) == pytest.approx(0.1)
    assert lr_factor(500, optim, 110) == pytest.approx(0.1)


def test_widen_into_copies_leading_channels_and_keeps_new_ones() -> None:
    target = torch.full((8, 6, 1, 1), 7.0)
    value = torch.randn(8, 3, 1, 1)
    out = _widen_into(target.clone(), value, "patch_embed.proj.weight")
    assert torch.equal(out[:, :3], value)
    assert torch.equal(out[:, 3:], torch.full((8, 3, 1, 1), 7.0))


def test_widen_into_rejects_other_mismatches() -> None:
    with pytest.raises(ValueError, match="shape"):
        _widen_into(torch.zeros(8, 6), torch.zeros(4, 3), "w")


# --- optimiser choice (ImgEdit-E1 trains with Prodigy at lr 1.0) ------------------------------


def toy_regression_losses(optim: Optimization, steps: int) -> list[float]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=g)
    y = x @ torch.tensor([1.5, -2.0, 0.5, 3.0]) + 1.0
    model = torch.nn.Linear(4, 1)
    torch.nn.init.zeros_(model.weight)
    torch.nn.init.zeros_(model.bias)
    optimizer = build_optimizer(list(model.parameters()), optim)
    losses = []
    for _ in range(steps):
        loss = (model(x).squeeze(-1) - y).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_prodigy_at_lr_one_fits_a_toy_regression() -> None:
    optim = Optimization(optimizer="prodigyopt.Prodigy", lr=1.0, optimizer_args={"d_coef": 1.0, "safeguard_warmup": True})
    losses = toy_regression_losses(optim, 60)
    print(f"Prodigy toy regression loss: {losses[0]:.3f} -> {losses[-1]:.3f}")
    assert losses[-1] < 0.1 * losses[0]
    optimizer = build_optimizer([torch.nn.Parameter(torch.zeros(2))], optim)
    assert type(optimizer).__name__ == "Prodigy"
    group = optimizer.param_groups[0]
    assert (group["lr"], group["d_coef"], group["safeguard_warmup"], group["use_bias_correction"]) == (1.0, 1.0, True, False)


def test_adamw_stays_the_default_with_the_configured_hyperparameters() -> None:
    optimizer = build_optimizer([torch.nn.Parameter(torch.zeros(2))], Optimization(lr=3e-4, betas=(0.9, 0.99), weight_decay=0.01))
    assert type(optimizer) is torch.optim.AdamW
    group = optimizer.param_groups[0]
    assert (group["lr"], group["betas"], group["eps"], group["weight_decay"]) == (3e-4, (0.9, 0.99), 1e-8, 0.01)
    # An optimiser without betas/eps gets only what it takes.
    sgd = build_optimizer([torch.nn.Parameter(torch.zeros(2))], Optimization(optimizer="SGD", lr=0.1, optimizer_args={"momentum": 0.9}))
    assert (type(sgd), sgd.param_groups[0]["lr"], sgd.param_groups[0]["momentum"]) == (torch.optim.SGD, 0.1, 0.9)


@pytest.mark.parametrize("name", ["Prodigy", "AdamWW", "prodigyopt.Nope", "no_such_package.Opt", "os.path"])
def test_unknown_optimizer_is_a_one_line_config_error(name: str) -> None:
    with pytest.raises(ConfigError, match="optim.optimizer must be a torch.optim class") as error:
        Optimization(optimizer=name)
    assert "AdamW" in str(error.value) and "prodigyopt.Prodigy" in str(error.value) and "\n" not in str(error.value)


def test_unknown_optimizer_args_are_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"\['dcoef'\] are not arguments of prodigyopt.Prodigy .*d_coef"):
        Optimization(optimizer="prodigyopt.Prodigy", optimizer_args={"dcoef": 2.0})


def test_train_start_keeps_the_optimizer_args_it_was_built_with(tmp_path) -> None:
    import lightning as L

    from tests.modules.conftest import tiny_dim_kwargs, toy_batch
    from zoo.modules.dim import DIMModule

    optim = Optimization(lr=1e-3, betas=(0.9, 0.999), optimizer_args={"betas": (0.5, 0.6)})
    model = DIMModule(**tiny_dim_kwargs(optim=optim))
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    batches = torch.utils.data.DataLoader([toy_batch(2)], batch_size=None, collate_fn=lambda batch: batch)
    trainer.fit(model, train_dataloaders=batches)
    [group] = trainer.optimizers[0].param_groups
    assert group["betas"] == (0.5, 0.6), "optimizer_args win over optim.betas after on_train_start too"
    assert group["initial_lr"] == 1e-3
