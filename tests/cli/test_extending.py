"""A subclass overriding one hook trains and predicts through the CLI; typos anywhere are one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from datamodules import toy
from tests.cli.test_recipes import STAGES
from tests.helpers.recipes import configs, error_lines, tiny_run_overlay
from tests.helpers.variants import ZeroNullDIM
from zoo.cli import main

VARIANT = "tests.helpers.variants.ZeroNullDIM"


def test_a_one_hook_variant_fits_and_predicts_by_class_path(tmp_path: Path) -> None:
    data = tmp_path / "toy"
    assert toy.main(["--out", str(data), "--train", "32", "--val", "4", "--test", "4", "--resolution", "32", "--samples-per-shard", "16"]) == 0
    overlay = tiny_run_overlay(tmp_path / "run", data, max_steps=2, model_args={"num_inference_steps": 2, "cfg_dropout": 1.0})
    args = [*configs([*STAGES["dim_edit"][0], "recipes/tiny/dim.yaml"]), *overlay, f"--model.class_path={VARIANT}"]
    before = ZeroNullDIM.calls
    assert main(["fit", *args]) == 0
    trained = ZeroNullDIM.calls - before
    assert trained >= 2, "cfg_dropout=1 drops every training sample to the variant's null condition"
    saved = yaml.safe_load((tmp_path / "run" / "train" / "config.yaml").read_text())
    assert saved["model"]["class_path"] == VARIANT
    last = tmp_path / "run" / "train" / "checkpoints" / "last.ckpt"
    assert torch.load(last, map_location="cpu", weights_only=True)["hyper_parameters"]["cfg_dropout"] == 1.0

    image = tmp_path / "a.png"
    toy.edit_sample(0, "test", 0, 32)[0].source.save(image)
    jsonl = tmp_path / "edits.jsonl"
    jsonl.write_text(json.dumps({"id": "a", "image_path": "a.png", "image_path_target": "a.png", "prompt": "remove it"}) + "\n")
    unset = [f"--data.init_args.{split}_shards=null" for split in ("train", "val", "test")]
    assert main(["predict", *args, *unset, f"--data.init_args.predict_jsonl={jsonl}", f"--ckpt_path={last}"]) == 0
    assert ZeroNullDIM.calls - before > trained, "sampling must use the variant's null condition"
    assert list((tmp_path / "run").glob("**/predictions/a.png"))


@pytest.mark.parametrize(
    "override, needle",
    [
        ("--model.init_args.mllm.max_conditon_length=64", "model.init_args.mllm: unknown key 'max_conditon_length' (did you mean 'max_condition_length'?)"),
        ("--model.init_args.denoiser.subfoldr=x", "model.init_args.denoiser: unknown key 'subfoldr' (did you mean 'subfolder'?)"),
        ("--model.init_args.autoencoder.scaling_factr=1", "model.init_args.autoencoder: unknown key 'scaling_factr' (did you mean 'scaling_factor'?)"),
        ("--model.init_args.objective.shfit=2", "model.init_args.objective: unknown key 'shfit' (did you mean 'shift'?)"),
        ("--model.init_args.optim.warmup_step=2", "model.init_args.optim: unknown key 'warmup_step' (did you mean 'warmup_steps'?)"),
        ("--model.init_args.mllm.tiny.hiden_size=8", "model.init_args.mllm.tiny: unknown key 'hiden_size' (did you mean 'hidden_size'?)"),
        ("--model.init_args.guidance_scale=-2", "guidance_scale must be in [0.0, inf], got -2.0"),
        ("--model.init_args.cfg_dropout=1.5", "cfg_dropout must be in [0.0, 1.0], got 1.5"),
        ("--model.init_args.num_inference_steps=0", "num_inference_steps must be in [1, inf], got 0"),
        ("--model.init_args.optim.lr=-1", "optim.lr must be in [0.0, inf], got -1.0"),
    ],
)
def test_nested_typos_and_bad_values_are_one_line(override: str, needle: str, capsys: pytest.CaptureFixture[str]) -> None:
    # No shards: the model's own checks are what is under test (missing shards would be reported first).
    no_shards = [f"--data.init_args.{split}_shards=null" for split in ("train", "val", "test")]
    args = [*configs([*STAGES["dim_edit"][0], "recipes/tiny/dim.yaml"]), *no_shards, override]
    assert main(["fit", *args, "--trainer.max_steps=1"]) == 2
    [line] = error_lines(capsys.readouterr().err)
    assert needle in line, line


def test_help_lists_nested_block_fields_with_their_docs(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["fit", "--model.help", "zoo.modules.dim.DIMModule"])
    text = " ".join(capsys.readouterr().out.split())
    for field in ("--model.mllm.hidden_layer", "--model.mllm.tiny", "--model.denoiser.zero_init_condition", "--model.autoencoder.kind", "--model.objective"):
        assert field in text, field
    assert "Which entry of transformers' ``hidden_states`` tuple" in text, "field docstrings are the help"
    with pytest.raises(SystemExit):
        main(["fit", "--model.help", "zoo.modules.dim.DIMModule", "--model.objective.help", "FlowMatching"])
    assert "SANA ``flow_shift`` (DIM: 3.0)" in " ".join(capsys.readouterr().out.split())
