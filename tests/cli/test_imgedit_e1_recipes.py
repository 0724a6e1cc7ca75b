"""ImgEdit-E1 recipes: both paper stages parse with the paper's numbers and fail in one line without
weights; the tiny overlays fit stage 1, start stage 2 from it, resume, and test on toy dialogues."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from datamodules import toy
from tests.helpers.recipes import NO_GPU_NO_DATA, ParseOnly, configs, error_lines, run_zoo, tiny_run_overlay
from zoo.cli import main

STAGE1, STAGE2 = "recipes/imgedit_e1_stage1.yaml", "recipes/imgedit_e1_stage2.yaml"
TINY1, TINY2 = "recipes/tiny/imgedit_e1_stage1.yaml", "recipes/tiny/imgedit_e1_stage2.yaml"


@pytest.mark.parametrize("stage", [1, 2])
def test_paper_recipes_parse_with_the_papers_settings(stage: int) -> None:
    config = ParseOnly(args=configs([STAGE1 if stage == 1 else STAGE2]), run=False).config
    init, trainer, data = config.model.init_args, config.trainer, config.data.init_args
    assert config.model.class_path == "zoo.modules.imgedit_e1.ImgEditE1Module" and init.stage == stage
    assert init.mllm.pretrained == "Qwen/Qwen2.5-VL-7B-Instruct" and init.mllm.freeze
    assert init.denoiser.pretrained == "black-forest-labs/FLUX.1-dev" and init.denoiser.guidance == 3.5
    assert (init.optim.optimizer, init.optim.lr) == ("prodigyopt.Prodigy", 1.0)
    batch = data.batch_size * trainer.devices * trainer.num_nodes * trainer.accumulate_grad_batches
    assert batch == 128 and trainer.max_steps == (50_000 if stage == 1 else 10_000)
    assert init.num_inference_steps == 28 and init.objective.init_args.sampler == "flow_euler"
    if stage == 2:
        assert init.siglip == {"pretrained": "google/siglip2-so400m-patch16-512"}
        assert init.redux == "black-forest-labs/FLUX.1-Redux-dev" and init.image_branch == "double_image"
        assert init.init_from == "runs/imgedit_e1_stage1/train/checkpoints/last.ckpt"
    else:
        assert init.siglip is None and init.redux is None


def test_paper_recipe_without_weights_fails_in_one_line() -> None:
    result = run_zoo("fit", "--config", STAGE1, *NO_GPU_NO_DATA)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    [line] = error_lines(result.stderr)
    assert "Qwen/Qwen2.5-VL-7B-Instruct" in line


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("toy")
    common = ["--val", "8", "--test", "8", "--seed", "0", "--resolution", "32", "--samples-per-shard", "16"]
    assert toy.main(["--out", str(root / "edits"), "--task", "imgedit", "--train", "32", *common]) == 0
    assert toy.main(["--out", str(root / "dialogue"), "--task", "dialogue", "--train", "12", *common]) == 0
    return {"edits": root / "edits", "dialogue": root / "dialogue"}


def _args(stage: int, toy_data: dict[str, Path], run_dir: Path, **model_args: object) -> list[str]:
    overlay = tiny_run_overlay(run_dir, toy_data["edits"], max_steps=4, model_args={"num_inference_steps": 2, **model_args})
    mixed = f"--data.init_args.train_shards={toy_data['edits'] / 'train'}::{toy_data['dialogue'] / 'train'}"
    return [*configs([STAGE1, TINY1] if stage == 1 else [STAGE2, TINY2]), *overlay, mixed]


def test_tiny_stages_fit_in_order_resume_and_test_on_dialogues(toy_data: dict[str, Path], tmp_path: Path) -> None:
    assert main(["fit", *_args(1, toy_data, tmp_path / "s1")]) == 0
    first = torch.load(tmp_path / "s1" / "train" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert {key.split(".")[0] for key in first["state_dict"]} == {"vlm_projector"}
    assert first["optimizer_states"][0]["param_groups"][0]["d"] > 0, "Prodigy's adaptive step size"

    first_ckpt = str(tmp_path / "s1" / "train" / "checkpoints" / "last.ckpt")
    stage2 = _args(2, toy_data, tmp_path / "s2", init_from=first_ckpt, image_branch="double_image")  # the paper's branch
    assert main(["fit", *stage2]) == 0
    checkpoints = tmp_path / "s2" / "train" / "checkpoints"
    [at_step2] = checkpoints.glob("*-step=2.ckpt")
    step2 = torch.load(at_step2, map_location="cpu", weights_only=True)
    assert {key.split(".")[0] for key in step2["state_dict"]} == {"vlm_projector", "siglip_projector", "denoiser"}
    assert not any("context" in key or "single_transformer" in key for key in step2["state_dict"]), "the image branch only"
    assert main(["fit", *stage2, "--trainer.max_steps=6", f"--ckpt_path={at_step2}"]) == 0
    resumed = torch.load(checkpoints / "last.ckpt", map_location="cpu", weights_only=True)
    assert resumed["global_step"] == 6 and resumed["ShardDataModule"]["batches_total"] == 6

    test = ["test", *stage2, f"--ckpt_path={checkpoints / 'last.ckpt'}", "--trainer.logger.init_args.version=dialogues"]
    test += [f"--data.init_args.test_shards={toy_data['dialogue'] / 'test'}"]
    assert main([*test, "--trainer.callbacks+=callbacks.toy_score.ToyEditEvaluator", "--trainer.callbacks.label=trained"]) == 0
    metrics = json.loads((tmp_path / "s2" / "dialogues" / "metrics.json").read_text())["trained"]
    for kind in ("memory", "understanding", "backtracking"):
        assert {f"{kind}/turn1", f"{kind}/turn3", f"{kind}/final"} <= set(metrics)
        assert 0 <= metrics[f"{kind}/final"]["score"] <= 1


def test_stage_2_without_a_stage_1_checkpoint_is_one_error_line(toy_data: dict[str, Path], tmp_path: Path) -> None:
    result = run_zoo("fit", *_args(2, toy_data, tmp_path, init_from=str(tmp_path / "none.ckpt")))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    [line] = error_lines(result.stderr)
    assert "none.ckpt' does not exist" in line and "train the previous stage first" in line


def test_tiny_stage_2_predicts_edits_from_a_tos_jsonl(toy_data: dict[str, Path], tmp_path: Path) -> None:
    image = tmp_path / "images" / "a.png"
    image.parent.mkdir()
    toy.edit_sample(0, "test", 0, 32)[0].source.save(image)
    jsonl = tmp_path / "edits.jsonl"
    jsonl.write_text(json.dumps({"id": "a", "image_path": "images/a.png", "image_path_target": "images/a.png", "prompt": "remove the circle"}) + "\n")
    args = _args(2, toy_data, tmp_path, init_from=None)
    shards_unset = [f"--data.init_args.{split}_shards=null" for split in ("train", "val", "test")]
    assert main(["predict", *args, *shards_unset, f"--data.init_args.predict_jsonl={jsonl}"]) == 0
    written = tmp_path / "predict" / "predictions" / "a.png"
    record = json.loads(written.with_name("predictions.rank0.jsonl").read_text())
    assert record == {"key": "a", "instruction": "remove the circle", "text": "remove the circle", "image": "a.png"}
    from PIL import Image

    assert Image.open(written).size == (32, 32)
