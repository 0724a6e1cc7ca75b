"""MIND-Edit recipes: the paper recipe parses with the paper's numbers and fails in one line without
weights; the tiny overlay fits, resumes, tests with the toy evaluator and edits through the CLI."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from datamodules import toy
from datamodules.samples import collate
from datamodules.shard_format import write_split
from tests.helpers.recipes import NO_GPU_NO_DATA, ParseOnly, configs, error_lines, run_zoo, tiny_run_overlay
from zoo.cli import main
from zoo.modules.mind_edit import MINDEditModule

PAPER = "recipes/mind_edit.yaml"
TINY = "recipes/tiny/mind_edit.yaml"


def test_paper_recipe_parses_with_the_papers_settings() -> None:
    config = ParseOnly(args=configs([PAPER]), run=False).config
    init, trainer, data = config.model.init_args, config.trainer, config.data.init_args
    assert config.model.class_path == "zoo.modules.mind_edit.MINDEditModule"
    assert init.mllm.pretrained == "llava-hf/llava-onevision-qwen2-7b-ov-hf" and init.mllm.hidden_layer == 21
    assert init.mllm.freeze is False and init.embed_weight == 2.0 and init.text_weight == 1.0
    assert init.diffusion.pretrained == "stable-diffusion-v1-5/stable-diffusion-v1-5" and init.diffusion.scale == 1.0
    assert init.diffusion.ip_adapter_weights == "models/ip-adapter_sd15.bin"
    assert (init.guidance_scale, init.num_inference_steps, init.sampler) == (7.5, 30, "ddim")
    assert (trainer.max_epochs, data.batch_size * trainer.devices * trainer.num_nodes, init.optim.lr) == (5, 8, 1e-5)
    assert data.resolution == 512 and init.autoencoder.kind == "kl"


def test_paper_recipe_without_weights_fails_in_one_line() -> None:
    result = run_zoo("fit", "--config", PAPER, *NO_GPU_NO_DATA)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    [line] = error_lines(result.stderr)
    assert "llava-hf/llava-onevision-qwen2-7b-ov-hf" in line


def test_tiny_overlay_replaces_every_pretrained_part() -> None:
    init = ParseOnly(args=configs([PAPER, TINY]), run=False).config.model.init_args
    assert init.mllm.pretrained is None and init.mllm.tiny.family == "llava_onevision" and init.mllm.hidden_layer == 3
    assert init.diffusion.tiny == {} and init.autoencoder.kind == "identity" and init.autoencoder.pretrained is None


def test_demo_overlay_selects_the_object_weighted_side() -> None:
    """`make demo MODEL=mind_edit` runs on the side whose UNet draws the objects an embedding names."""
    from zoo.blocks.tiny_ip_adapter import TinyIPAdapterOptions

    config = ParseOnly(args=configs([PAPER, TINY, "recipes/demo/mind_edit.yaml"]), run=False).config
    options = TinyIPAdapterOptions(**config.model.init_args.diffusion.tiny)
    assert (options.contrastive_steps, options.object_loss_weight, options.steps) == (1000, 16.0, 2400)
    assert config.trainer.max_steps == 6000


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("toy")
    args = ["--out", str(root), "--train", "32", "--val", "8", "--test", "8", "--seed", "0", "--resolution", "32"]
    assert toy.main([*args, "--samples-per-shard", "16"]) == 0
    return root


def _tiny_args(toy_data: Path, run_dir: Path) -> list[str]:
    overlay = tiny_run_overlay(run_dir, toy_data, max_steps=4, model_args={"num_inference_steps": 2, "max_new_tokens": 8})
    return [*configs([PAPER, TINY]), *overlay]


def test_tiny_recipe_fits_resumes_and_tests(toy_data: Path, tmp_path: Path) -> None:
    args = _tiny_args(toy_data, tmp_path)
    assert main(["fit", *args]) == 0
    checkpoints = tmp_path / "train" / "checkpoints"
    step2 = torch.load(checkpoints / "epoch=0-step=2.ckpt", map_location="cpu", weights_only=True)
    assert {key.split(".")[0] for key in step2["state_dict"]} == {"mllm", "vision_head"}
    assert main(["fit", *args, "--trainer.max_steps=6", f"--ckpt_path={checkpoints / 'epoch=0-step=2.ckpt'}"]) == 0
    resumed = torch.load(checkpoints / "last.ckpt", map_location="cpu", weights_only=True)
    assert resumed["global_step"] == 6 and resumed["ShardDataModule"]["batches_total"] == 6
    assert any(not torch.equal(step2["state_dict"][k], v) for k, v in resumed["state_dict"].items())
    test = ["test", *args, f"--ckpt_path={checkpoints / 'last.ckpt'}", "--trainer.logger.init_args.version=evaluate"]
    assert main([*test, "--trainer.callbacks+=callbacks.toy_score.ToyEditEvaluator", "--trainer.callbacks.label=trained"]) == 0
    metrics = json.loads((tmp_path / "evaluate" / "metrics.json").read_text())
    overall = metrics["trained"]["overall"]
    # Masks keep everything outside the edit region: preservation is exact.
    assert overall["preserve"] == 1.0 and 0 <= overall["edit"] <= 1


def test_instruction_writer_takes_the_optimized_instructions_from_another_checkpoint(toy_data: Path, tmp_path: Path) -> None:
    """Ablations #3-#5: the text head of one run, the vision head of another."""
    text_run, vision_run = tmp_path / "text", tmp_path / "vision"
    assert main(["fit", *_tiny_args(toy_data, text_run), "--model.init_args.embed_weight=0", "--trainer.max_steps=2"]) == 0
    assert main(["fit", *_tiny_args(toy_data, vision_run), "--model.init_args.text_weight=0", "--trainer.max_steps=2"]) == 0
    writer = text_run / "train" / "checkpoints" / "last.ckpt"
    model = MINDEditModule.load_from_checkpoint(vision_run / "train" / "checkpoints" / "last.ckpt", map_location="cpu", instruction_writer=str(writer))
    own = MINDEditModule.load_from_checkpoint(writer, map_location="cpu")
    batch = toy.edit_sample(0, "test", 0, 32)[0]
    prepared = model.prepare_batch(collate([batch], 32, 32))
    assert prepared.optimized_instruction == own.prepare_batch(collate([batch], 32, 32)).optimized_instruction
    assert "writer" in model.frozen_parts and not any(k.startswith("writer") for k in model.state_dict())
    result = run_zoo("test", *_tiny_args(toy_data, tmp_path / "bad"), "--model.init_args.instruction_writer=/nowhere.ckpt")
    assert result.returncode == 2 and "instruction_writer checkpoint '/nowhere.ckpt' does not exist" in error_lines(result.stderr)[0]


def test_training_on_data_without_optimized_instructions_is_one_error_line(tmp_path: Path) -> None:
    for split in ("train", "val", "test"):
        samples = [replace(toy.edit_sample(0, split, i, 32)[0], optimized_instruction=None) for i in range(4)]
        write_split(tmp_path / "data" / split, samples, samples_per_shard=4)
    result = run_zoo("fit", *_tiny_args(tmp_path / "data", tmp_path / "run"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    [line] = error_lines(result.stderr)
    assert "needs every sample's optimized instruction" in line and "zoo data annotate" in line
