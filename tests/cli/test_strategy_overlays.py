"""Strategy overlays (recipes/strategy/) parse over paper recipes and configure Lightning's strategies;
DeepSpeed without CUDA is one ``zoo: error:`` line before any model is built."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lightning.pytorch.strategies import DeepSpeedStrategy

from tests.helpers.recipes import ROOT, ParseOnly, configs, error_lines
from zoo.cli import main

ZERO = {  # overlay -> (stage, offload device of optimiser state, of weights)
    "recipes/strategy/zero2.yaml": (2, None, None),
    "recipes/strategy/zero3.yaml": (3, None, None),
    "recipes/strategy/zero3_offload.yaml": (3, "cpu", "cpu"),
}
TINY = ["recipes/dim_edit.yaml", "recipes/tiny/dim.yaml"]


def test_every_overlay_is_covered() -> None:
    on_disk = {str(p.relative_to(ROOT)) for p in (ROOT / "recipes" / "strategy").glob("*.yaml")}
    assert on_disk == {*ZERO, "recipes/strategy/ddp.yaml"}


@pytest.mark.parametrize("recipe", ["recipes/dim_edit.yaml", "recipes/got_pretrain.yaml", "recipes/mind_edit.yaml"])
@pytest.mark.parametrize("overlay", sorted(ZERO))
def test_zero_overlay_configures_deepspeed(recipe: str, overlay: str) -> None:
    cli = ParseOnly(args=configs([recipe, overlay]), run=False)
    strategy = cli.config.trainer.strategy
    assert strategy.class_path == "lightning.pytorch.strategies.DeepSpeedStrategy"
    assert cli.config.trainer.accelerator == "gpu"  # the paper recipe's, untouched
    # The strategy object itself builds on CPU; its DeepSpeed config is what the engine gets.
    zero = DeepSpeedStrategy(**vars(strategy.init_args)).config["zero_optimization"]
    stage, optimizer_device, param_device = ZERO[overlay]
    assert zero["stage"] == stage
    assert zero.get("offload_optimizer", {}).get("device") == optimizer_device
    assert zero.get("offload_param", {}).get("device") == param_device
    assert strategy.init_args.exclude_frozen_parameters is True


def test_ddp_overlay_parses_over_a_paper_recipe() -> None:
    cli = ParseOnly(args=[*configs(["recipes/got_pretrain.yaml", "recipes/strategy/ddp.yaml"]), "--trainer.num_nodes=4"], run=False)
    assert (cli.config.trainer.strategy, cli.config.trainer.num_nodes) == ("ddp", 4)


@pytest.mark.parametrize(
    "extra, reason",
    [
        (configs(["recipes/strategy/zero2.yaml"]), "trainer.accelerator is cpu"),
        (["--trainer.strategy=deepspeed_stage_2"], "trainer.accelerator is cpu"),
        (configs(["recipes/strategy/zero3_offload.yaml"]), "trainer.accelerator is cpu"),
    ],
    ids=["zero2-overlay", "strategy-name", "zero3-offload-overlay"],
)
def test_deepspeed_on_cpu_is_one_line_before_building(
    extra: list[str], reason: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = [*configs(TINY), *extra, f"--trainer.default_root_dir={tmp_path}"]
    assert main(["fit", *args]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    [line] = error_lines(err)
    assert line.startswith("zoo: error: trainer.strategy ") and f"runs on CUDA GPUs only, but {reason}" in line
    assert "recipes/strategy/ddp.yaml" in line
    assert not list(tmp_path.iterdir()), "nothing was built or written"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_deepspeed_with_gpu_accelerator_on_a_cpu_machine_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["fit", *configs(["recipes/dim_edit.yaml", "recipes/strategy/zero3.yaml"])]) == 2
    [line] = error_lines(capsys.readouterr().err)
    # The recipe's gpu accelerator is the first thing this machine cannot run: named in the one line.
    assert "no CUDA GPU" in line and "--trainer.accelerator" in line
