"""GoT recipes parse; the paper recipe fails in one line without weights; the tiny overlay fits,
resumes, finetunes from the pretraining checkpoint and predicts chains with boxes drawn."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from callbacks.edit_writer import EditWriter
from callbacks.toy_score import toy_edit_scores
from datamodules import toy
from datamodules.samples import EditBatch, EditOutputs, collate
from tests.helpers.recipes import NO_GPU_NO_DATA, ParseOnly, configs, error_lines, run_zoo, tiny_run_overlay
from zoo.blocks.autoencoders import CodecConfig, build_codec
from zoo.cli import main

STAGES = {  # paper run -> recipe + stage overlays
    "got_pretrain": ["recipes/got_pretrain.yaml"],
    "got_finetune": ["recipes/got_pretrain.yaml", "recipes/got_finetune.yaml"],
}
TINY = "recipes/tiny/got.yaml"
OFFICIAL = "recipes/got_official.yaml"  # overlay: the released GoT-6B weights
DEMO = "recipes/demo/got.yaml"  # overlay of `make demo MODEL=got`, after TINY


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_paper_recipe_parses(stage: str) -> None:
    cli = ParseOnly(args=configs(STAGES[stage]), run=False)
    assert cli.config.model.class_path == "zoo.modules.got.GoTModule"
    init, trainer, data = cli.config.model.init_args, cli.config.trainer, cli.config.data.init_args
    assert init.mllm.pretrained == "Qwen/Qwen2.5-VL-3B-Instruct" and init.mllm.image_size == 448
    lora = init.mllm.lora
    assert (lora.r, lora.lora_alpha, lora.lora_dropout) == (32, 32, 0.05)
    assert "embed_tokens" in lora.modules_to_save and "q_proj" in lora.target_modules, "GoT's LoRA config by default"
    assert init.mllm.image_tokens == 64 and init.autoencoder.kind == "kl"
    assert init.denoiser.pretrained == init.autoencoder.pretrained == "stabilityai/stable-diffusion-xl-base-1.0"
    assert (init.guidance_scale, init.cond_guidance_scale, init.image_guidance_scale) == (7.5, 4.0, 1.0)
    assert init.num_inference_steps == 50 and init.objective.init_args.noise_offset == 0.1 and init.condition_dropout == 0.05
    assert init.ce_weight == init.diffusion_weight == 1.0
    optim = init.optim
    assert optim.weight_decay == 0.05 and optim.schedule == "cosine" and tuple(optim.betas) == (0.9, 0.98)
    [checkpoint] = [c for c in trainer.callbacks if c.class_path.endswith("ModelCheckpoint")]
    assert checkpoint.init_args.save_last is True and checkpoint.init_args.enable_version_counter is False
    assert trainer.devices * trainer.num_nodes * data.batch_size * trainer.accumulate_grad_batches == 128
    if stage == "got_pretrain":
        assert (trainer.max_steps, optim.warmup_steps, optim.lr, init.init_from) == (60000, 500, 1e-4, None)
    else:
        assert (trainer.max_steps, optim.warmup_steps, optim.lr) == (10000, 200, 5e-5)
        assert init.init_from == "runs/got_pretrain/train/checkpoints/last.ckpt"


def test_official_weights_overlay_parses_and_samples_like_the_official_code() -> None:
    init = ParseOnly(args=configs(["recipes/got_pretrain.yaml", OFFICIAL]), run=False).config.model.init_args
    assert init.official_weights == "pretrained/GoT-6B" and init.null_pooled is False and init.init_from is None


def test_tiny_overlay_replaces_every_pretrained_part() -> None:
    for files in STAGES.values():
        init = ParseOnly(args=configs([*files, TINY]), run=False).config.model.init_args
        assert init.mllm.pretrained is None and init.denoiser.pretrained is None and init.autoencoder.pretrained is None
        assert init.mllm.tiny.hidden_size == 32 and init.mllm.lora.r == 8 and init.mllm.lora.modules_to_save, "tiny LoRA over GoT's"
        assert init.init_from is None
        # Pixel space: 3-channel UNet at the toy resolution, v-prediction over the paper's DDPM schedule.
        assert init.autoencoder.kind == "identity" and init.denoiser.config["in_channels"] == 3
        assert init.denoiser.config["sample_size"] == 32 and init.denoiser.zero_init_condition is False
        assert init.objective.init_args.prediction_type == "v_prediction" and init.objective.init_args.noise_offset == 0.1


def test_demo_overlay_keeps_everything_under_runs_demo_got() -> None:
    config = ParseOnly(args=configs([*STAGES["got_pretrain"], TINY, DEMO]), run=False).config
    trainer, data = config.trainer, config.data.init_args
    assert trainer.default_root_dir == trainer.logger.init_args.save_dir == "runs/demo_got"
    assert all(getattr(data, f"{split}_shards") == f"runs/demo_got/data/{split}" for split in ("train", "val", "test"))
    assert config.model.init_args.autoencoder.kind == "identity" and trainer.max_steps == 1500


def test_tiny_codec_round_trips_toy_edits_above_copying_the_source() -> None:
    """The tiny GoT's codec passes the toy targets through intact: decode(encode(target)) scores
    1.0 on the toy edit score where copying the source scores 0.5 (the random tiny KL VAE it
    replaced scored 0.198)."""
    cfg = ParseOnly(args=configs([*STAGES["got_pretrain"], TINY]), run=False).config.model.init_args.autoencoder
    codec = build_codec(CodecConfig(**vars(cfg)))
    samples = [toy.edit_sample(0, "test", index)[0] for index in range(12)]
    batch = collate(samples, 32, 32)
    round_trip = codec.decode(codec.encode(batch.target)).clamp(-1, 1)
    scores = toy_edit_scores((round_trip + 1) / 2, (batch.target + 1) / 2, batch.mask)["score"]
    copying = toy_edit_scores((batch.source + 1) / 2, (batch.target + 1) / 2, batch.mask)["score"]
    assert float(copying.mean()) == pytest.approx(0.5)
    assert float(scores.min()) == 1.0


def test_paper_recipe_without_weights_fails_in_one_line() -> None:
    result = run_zoo("fit", "--config", "recipes/got_pretrain.yaml", *NO_GPU_NO_DATA)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    [line] = error_lines(result.stderr)
    assert "Qwen/Qwen2.5-VL-3B-Instruct" in line and "hf download" in line


@pytest.fixture(scope="module")
def toy_mixed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Toy splits alternating edit and T2I samples, as GoT's pretraining and finetuning data mix them."""
    root = tmp_path_factory.mktemp("toy_got")
    args = ["--out", str(root), "--train", "32", "--val", "4", "--test", "4", "--seed", "0", "--resolution", "32"]
    assert toy.main([*args, "--samples-per-shard", "16", "--task", "mixed"]) == 0
    return root


def _tiny_args(files: list[str], data: Path, run_dir: Path, max_steps: int = 3) -> list[str]:
    """The recipes + the tiny overlay + a short test overlay."""
    overlay = tiny_run_overlay(
        run_dir, data, max_steps, data_args={"batch_size": 4, "val_batch_size": 2},
        model_args={"num_inference_steps": 2, "max_chain_tokens": 8},
    )
    return [*configs([*files, TINY]), *overlay]


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def test_tiny_pretrain_fits_resumes_and_finetunes(toy_mixed: Path, tmp_path: Path) -> None:
    pretrain = tmp_path / "pretrain"
    args = _tiny_args(STAGES["got_pretrain"], toy_mixed, pretrain)
    assert main(["fit", *args]) == 0
    checkpoints = pretrain / "train" / "checkpoints"
    step2 = checkpoints / "epoch=0-step=2.ckpt"
    first = _load(step2)
    keys = set(first["state_dict"])
    assert not any(k.startswith("codec.") for k in keys)
    assert all(".lora_" in k or ".modules_to_save." in k for k in keys if k.startswith("mllm."))
    assert any(".lora_B." in k for k in keys) and any(k.startswith("denoiser.") for k in keys)
    assert list((pretrain / "train" / "images").glob("val_step*.png"))

    assert main(["fit", *_tiny_args(STAGES["got_pretrain"], toy_mixed, pretrain, max_steps=6), f"--ckpt_path={step2}"]) == 0
    resumed = _load(checkpoints / "last.ckpt")
    assert first["global_step"] == 2 and resumed["global_step"] == 6
    assert not list(checkpoints.glob("*-v1.ckpt")), "a resumed run must overwrite, not version"
    assert first["ShardDataModule"]["batches_total"] == 2 and resumed["ShardDataModule"]["batches_total"] == 6
    moved = [k for k in keys if not torch.equal(first["state_dict"][k], resumed["state_dict"][k])]
    assert any(".lora_B." in k for k in moved) and any(k.startswith("denoiser.") for k in moved)

    finetune = tmp_path / "finetune"
    ft_args = _tiny_args(STAGES["got_finetune"], toy_mixed, finetune, max_steps=1)
    assert main(["fit", *ft_args, f"--model.init_args.init_from={checkpoints / 'last.ckpt'}"]) == 0
    assert _load(finetune / "train" / "checkpoints" / "last.ckpt")["global_step"] == 1


def test_tiny_predict_writes_the_chain_as_text(toy_mixed: Path, tmp_path: Path) -> None:
    args = _tiny_args(STAGES["got_pretrain"], toy_mixed, tmp_path)
    assert main(["predict", *args, f"--data.init_args.predict_shards={toy_mixed / 'test'}"]) == 0
    [jsonl] = list(tmp_path.glob("**/predictions/predictions.rank0.jsonl"))
    records = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert len(records) == 4
    for record in records:
        assert record["text"] != record["instruction"], "GoT's text is its generated chain"
        assert Image.open(jsonl.parent / record["image"]).size == (32, 32)


def test_edit_writer_draws_the_chain_boxes_on_a_copy(tmp_path: Path) -> None:
    chain = "a <|object_ref_start|>cat<|object_ref_end|><|box_start|>(250,250),(750,750)<|box_end|> (red)"
    prediction = EditOutputs(key=["a", "b"], edited=-torch.ones(2, 3, 32, 32), text=[chain, "no boxes"])
    batch = EditBatch.for_inference([None, None], ["add a cat", "nothing"], 32, 32)
    trainer = SimpleNamespace(global_rank=0)
    EditWriter(output_dir=str(tmp_path)).write_on_batch_end(trainer, None, prediction, None, batch, 0, 0)
    first, second = [json.loads(line) for line in (tmp_path / "predictions.rank0.jsonl").read_text().splitlines()]
    assert first == {"key": "a", "instruction": "add a cat", "text": chain, "image": "a.png", "boxes_image": "a.boxes.png"}
    assert "boxes_image" not in second and not (tmp_path / "b.boxes.png").exists()
    drawn = Image.open(tmp_path / "a.boxes.png").convert("RGB")
    # The outline runs along x = 8 (250/1000 * 32) from y = 8 to 24; inside and the original stay black.
    assert drawn.getpixel((8, 16)) == (255, 0, 0) and drawn.getpixel((24, 8)) == (255, 0, 0)
    assert drawn.getpixel((16, 16)) == (0, 0, 0) and drawn.getpixel((2, 2)) == (0, 0, 0)
    assert Image.open(tmp_path / "a.png").convert("RGB").getpixel((8, 16)) == (0, 0, 0)
