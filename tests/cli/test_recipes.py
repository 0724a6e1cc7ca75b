"""Every recipe parses; paper recipes fail in one line without weights; tiny recipes fit, test, predict, resume."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest
import torch
import yaml

from datamodules import toy
from tests.helpers.recipes import NO_GPU_NO_DATA, ROOT, ParseOnly, configs, error_lines, run_zoo, tiny_run_overlay
from zoo.cli import main

STAGES = {  # paper run -> (recipe + stage overlays, toy task)
    "dim_t2i_warmup": (["recipes/dim_t2i.yaml", "recipes/dim_t2i_warmup.yaml"], "t2i"),
    "dim_t2i": (["recipes/dim_t2i.yaml"], "t2i"),
    "dim_edit_stage1": (["recipes/dim_edit_stage1.yaml"], "edit"),
    "dim_edit": (["recipes/dim_edit.yaml"], "edit"),
}


def test_every_recipe_is_covered() -> None:
    # Imported here: test_got_recipes reuses this module's helpers.
    from tests.cli.test_got_recipes import OFFICIAL, STAGES as GOT_STAGES

    listed = {path for files, _ in STAGES.values() for path in files} | {OFFICIAL}
    listed |= {path for files in GOT_STAGES.values() for path in files}
    listed |= {"recipes/mind_edit.yaml"}  # tests/cli/test_mind_edit_recipes.py
    listed |= {"recipes/imgedit_e1_stage1.yaml", "recipes/imgedit_e1_stage2.yaml"}  # tests/cli/test_imgedit_e1_recipes.py
    listed |= {"recipes/ema.yaml"}  # an overlay for any recipe: tests/cli/test_ema_overlay.py
    on_disk = {str(p.relative_to(ROOT)) for p in (ROOT / "recipes").glob("*.yaml")}
    assert on_disk == listed


def test_every_demo_overlay_belongs_to_a_demo_and_parses() -> None:
    from zoo.demo import DEMOS

    overlays = {str(p.relative_to(ROOT)) for p in (ROOT / "recipes" / "demo").glob("*.yaml")}
    stages = [(demo, recipes) for demo in DEMOS.values() for recipes in (demo.recipes, *(r for _, r in demo.earlier_stages))]
    assert overlays == {recipes[-1] for _, recipes in stages}
    for demo, recipes in stages:
        cli = ParseOnly(args=configs(list(recipes)), run=False)
        assert cli.config.trainer.default_root_dir == demo.folder and cli.config.trainer.accelerator == "cpu"
        assert cli.config.data.init_args.test_shards == f"{demo.folder}/data/test"


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_paper_recipe_parses(stage: str) -> None:
    cli = ParseOnly(args=configs(STAGES[stage][0]), run=False)
    assert cli.config.model.class_path == "zoo.modules.dim.DIMModule"
    assert cli.config.data.class_path == "datamodules.shards.ShardDataModule"
    init = cli.config.model.init_args
    assert init.mllm.pretrained == "Qwen/Qwen2.5-VL-3B-Instruct" and init.mllm.torch_dtype == "bfloat16"
    assert init.guidance_scale == 7.5 and init.num_inference_steps == 30 and init.cfg_dropout == 0.1
    assert init.connector_hidden == 2304 and init.objective.init_args.shift == 3.0 and init.objective.init_args.sampler == "dpm_solver++"
    assert init.train_denoiser == (stage != "dim_t2i_warmup")
    assert (init.mode == "t2i") == stage.startswith("dim_t2i")


def test_tiny_overlay_parses_over_every_paper_recipe() -> None:
    for files, _ in STAGES.values():
        cli = ParseOnly(args=configs([*files, "recipes/tiny/dim.yaml"]), run=False)
        init = cli.config.model.init_args
        assert init.mllm.pretrained is None and init.mllm.tiny.hidden_size == 64 and init.mllm.torch_dtype == "float32"
        assert init.denoiser.pretrained is None and init.denoiser.config["patch_size"] == 1
        assert (init.autoencoder.kind, init.autoencoder.pretrained, init.autoencoder.scaling_factor) == ("identity", None, None)
        assert cli.config.trainer.accelerator == "cpu" and init.init_from is None


def test_paper_recipe_without_weights_fails_in_one_line() -> None:
    result = run_zoo("fit", "--config", "recipes/dim_edit.yaml", *NO_GPU_NO_DATA)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    [line] = error_lines(result.stderr)
    assert "Qwen/Qwen2.5-VL-3B-Instruct" in line and "hf download" in line and "local folder" in line


@pytest.mark.parametrize(
    "override, needle",
    [("--model.init_args.mode=sideways", "mode"), ("--trainer.max_stepz=3", "max_stepz")],
)
def test_bad_config_exits_2_with_one_line(override: str, needle: str) -> None:
    result = run_zoo("fit", "--config", "recipes/dim_edit.yaml", "--config", "recipes/tiny/dim.yaml", override)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    [line] = error_lines(result.stderr)
    assert needle in line


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("toy")
    for task in ("edit", "t2i"):
        args = ["--out", str(root / task), "--train", "64", "--val", "8", "--test", "8", "--seed", "0"]
        assert toy.main([*args, "--resolution", "32", "--samples-per-shard", "32", "--task", task]) == 0
    return {"edit": root / "edit", "t2i": root / "t2i"}


def _tiny_args(stage: str, toy_data: dict[str, Path], run_dir: Path) -> list[str]:
    """The stage's recipes + the tiny overlay + a 4-step test overlay."""
    files, task = STAGES[stage]
    overlay = tiny_run_overlay(run_dir, toy_data[task], max_steps=4, model_args={"num_inference_steps": 2})
    return [*configs([*files, "recipes/tiny/dim.yaml"]), *overlay]


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_tiny_recipe_fits_and_tests(stage: str, toy_data: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = _tiny_args(stage, toy_data, tmp_path)
    assert main(["fit", *args]) == 0
    assert f"zoo: fit outputs in {tmp_path / 'train'}" in capsys.readouterr().out
    last = tmp_path / "train" / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(last, map_location="cpu", weights_only=True)
    assert checkpoint["global_step"] == 4
    assert not any(k.startswith("mllm.") for k in checkpoint["state_dict"])
    assert (tmp_path / "train" / "config.yaml").is_file()
    assert list((tmp_path / "train" / "images").glob("val_step*.png"))
    saved, events = (tmp_path / "train" / "config.yaml").read_text(), sorted((tmp_path / "train").glob("events.*"))
    assert main(["test", *args, f"--ckpt_path={last}", "--trainer.limit_test_batches=1", "--trainer.max_steps=99"]) == 0
    # The test stage has its own folder and config; the training run's are untouched.
    assert yaml.safe_load((tmp_path / "test" / "config.yaml").read_text())["trainer"]["max_steps"] == 99
    printed = capsys.readouterr().out
    assert "test: no metric was logged" in printed and f"zoo: test outputs in {tmp_path / 'test'}" in printed
    assert list((tmp_path / "test").glob("events.*"))
    assert (tmp_path / "train" / "config.yaml").read_text() == saved and sorted((tmp_path / "train").glob("events.*")) == events


def test_test_time_overrides_win_over_the_checkpoint_hparams(
    toy_data: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    # LightningCLI alone merges the checkpoint's saved hparams over the command line, which would
    # silently evaluate with the training-time guidance scale.
    args = _tiny_args("dim_edit_stage1", toy_data, tmp_path)
    assert main(["fit", *args, "--trainer.max_steps=2"]) == 0
    last = tmp_path / "train" / "checkpoints" / "last.ckpt"
    overrides = ["--model.init_args.guidance_scale=1.25", "--trainer.logger.init_args.version=evaluate"]
    overrides += ["--trainer.callbacks+=callbacks.toy_score.ToyEditEvaluator", "--trainer.enable_progress_bar=false"]
    caplog.set_level(logging.INFO)
    assert main(["test", *args, f"--ckpt_path={last}", "--trainer.limit_test_batches=1", *overrides]) == 0
    printed = capsys.readouterr().out + caplog.text  # Lightning's rank_zero_info goes through logging
    # The evaluator prints its table and where it wrote; the CLI prints the stage's folder.
    assert re.search(r"^overall +\d\.\d{4} +\d\.\d{4}$", printed, re.M), printed
    assert f"-> {tmp_path / 'evaluate' / 'metrics.json'}" in printed and "no metric was logged" not in printed
    assert f"zoo: test outputs in {tmp_path / 'evaluate'}" in printed
    saved = yaml.safe_load((tmp_path / "evaluate" / "config.yaml").read_text())
    assert saved["model"]["init_args"]["guidance_scale"] == 1.25


def test_recipes_checkpoint_into_the_same_files_on_requeue() -> None:
    for files, _ in STAGES.values():
        cli = ParseOnly(args=configs(files), run=False)
        [checkpoint] = [c for c in cli.config.trainer.callbacks if c.class_path.endswith("ModelCheckpoint")]
        assert checkpoint.init_args.save_last is True and checkpoint.init_args.enable_version_counter is False


def test_tiny_fit_resumes_and_requeue_overwrites_config(toy_data: dict[str, Path], tmp_path: Path) -> None:
    args = _tiny_args("dim_edit", toy_data, tmp_path)
    assert main(["fit", *args]) == 0
    step2 = tmp_path / "train" / "checkpoints" / "epoch=0-step=2.ckpt"
    first = torch.load(step2, map_location="cpu", weights_only=True)
    assert main(["fit", *args, "--trainer.max_steps=6", f"--ckpt_path={step2}"]) == 0
    resumed = torch.load(tmp_path / "train" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert first["global_step"] == 2 and resumed["global_step"] == 6
    assert not list((tmp_path / "train" / "checkpoints").glob("*-v1.ckpt")), "a resumed run must overwrite, not version"

    from zoo.modules.dim import DIMModule

    loaded = DIMModule.load_from_checkpoint(tmp_path / "train" / "checkpoints" / "last.ckpt", map_location="cpu")
    state = loaded.state_dict()
    assert all(torch.equal(state[k], v) for k, v in resumed["state_dict"].items())
    assert first["ShardDataModule"]["batches_total"] == 2, "the data-stream position must be checkpointed"
    assert resumed["ShardDataModule"]["batches_total"] == 6
    moved = [k for k in first["state_dict"] if not torch.equal(first["state_dict"][k], resumed["state_dict"][k])]
    assert moved, "training after resume must change the trainable weights"


def test_loading_a_checkpoint_does_not_list_the_frozen_keys(toy_data: dict[str, Path], tmp_path: Path, recwarn: pytest.WarningsRecorder) -> None:
    # The T2I warm-up freezes the DiT as well as the MLLM: the checkpoint holds the connector only.
    args = _tiny_args("dim_t2i_warmup", toy_data, tmp_path)
    assert main(["fit", *args, "--trainer.max_steps=1", "--trainer.limit_val_batches=0", "--trainer.enable_progress_bar=false"]) == 0
    last = tmp_path / "train" / "checkpoints" / "last.ckpt"
    saved = torch.load(last, map_location="cpu", weights_only=True)["state_dict"]
    from zoo.modules.dim import DIMModule

    recwarn.clear()
    loaded = DIMModule.load_from_checkpoint(last, map_location="cpu")
    frozen = set(loaded.state_dict()) - set(saved)
    assert len(frozen) > 50 and all(k.startswith("denoiser.") for k in frozen)
    assert sum(1 for _ in loaded.mllm.parameters()) > 50 and not any(k.startswith("mllm.") for k in loaded.state_dict())
    printed = "".join(str(w.message) for w in recwarn)
    assert "Found keys" not in printed and len(printed) < 300, printed
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in saved.items())


def test_tiny_predict_writes_edits_from_a_tos_jsonl(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    image = tmp_path / "images" / "a.png"
    image.parent.mkdir()
    sample, _ = toy.edit_sample(0, "test", 0, 32)
    sample.source.save(image)
    jsonl = tmp_path / "edits.jsonl"
    row = {"id": "a", "image_path": "images/a.png", "image_path_target": "images/a.png", "prompt": "make the background white"}
    untargeted = {"id": "b", "image_path": "images/a.png", "prompt": "make the background white", "kind": "edit"}
    jsonl.write_text(json.dumps(row) + "\n" + json.dumps(untargeted) + "\n")
    args = _tiny_args("dim_edit", {"edit": tmp_path}, tmp_path)
    shards_unset = [f"--data.init_args.{split}_shards=null" for split in ("train", "val", "test")]
    caplog.set_level(logging.INFO)
    assert main(["predict", *args, *shards_unset, f"--data.init_args.predict_jsonl={jsonl}"]) == 0
    folder = tmp_path / "predict" / "predictions"
    assert sorted(tmp_path.glob("**/predictions/*.png")) == [folder / "a.png", folder / "b.png"], "predict writes into its own stage folder"
    records = [json.loads(line) for line in (folder / "predictions.rank0.jsonl").read_text().splitlines()]
    assert records[0] == {"key": "a", "instruction": "make the background white", "text": "make the background white", "image": "a.png"}
    assert [r["key"] for r in records] == ["a", "b"]
    assert f"predict: 2 edits written -> {folder}" in caplog.text
    from PIL import Image

    assert Image.open(folder / "a.png").size == (32, 32)


def test_print_config_shows_the_resolved_recipe() -> None:
    result = run_zoo("fit", "--config", "recipes/dim_edit.yaml", "--config", "recipes/tiny/dim.yaml", "--print_config")
    assert result.returncode == 0, result.stderr
    config = yaml.safe_load(result.stdout)
    assert config["model"]["class_path"] == "zoo.modules.dim.DIMModule"
    assert config["model"]["init_args"]["mllm"]["tiny"]["hidden_size"] == 64
    assert config["trainer"]["accelerator"] == "cpu"
