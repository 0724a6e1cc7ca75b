"""Configuration mistakes of a new user: one ``zoo: error:`` line, exit status 2, and no model built."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.helpers.faults import FaultTable
from tests.helpers.recipes import configs, error_lines
from zoo.cli import main
from zoo.modules.base import EditingModule

pytestmark = pytest.mark.faults

CASES = {
    "negative lr": (["--model.init_args.optim.lr=-1"], "optim.lr must be in [0.0, inf], got -1.0"),
    "max_steps 0 with cosine": (["--trainer.max_steps=0"], "a cosine schedule needs trainer.max_steps > 0"),
    "batch_size 0": (["--data.init_args.batch_size=0"], "batch_size and val_batch_size must be >= 1, got 0"),
    "guidance_scale -2": (["--model.init_args.guidance_scale=-2"], "guidance_scale must be in [0.0, inf], got -2.0"),
    "nested typo": (["--model.init_args.mllm.tiny.hiden_size=3"], "model.init_args.mllm.tiny: unknown key 'hiden_size' (did you mean 'hidden_size'?)"),
    "empty shard folder": (["--data.init_args.train_shards={empty}"], "shard folder {empty} has no index.json"),
    "missing shard folder": (["--data.init_args.train_shards={missing}"], "shard spec {missing}: no such folder or file(s)"),
    "index lists a missing shard": (["--data.init_args.train_shards={lost}"], "shard folder {lost}: index.json lists 1 missing shard(s)"),
    "negative max_pixels": (["--data.init_args.max_pixels=0"], "max_pixels must be >= 1 or null, got 0"),
    "DeepSpeed on CPU": (["--trainer.strategy=deepspeed"], "trainer.strategy deepspeed runs on CUDA GPUs only"),
}
if not torch.cuda.is_available():
    CASES["accelerator gpu without CUDA"] = (["--trainer.accelerator=gpu"], "trainer.accelerator is gpu, but this machine has no CUDA GPU")


@pytest.mark.parametrize("kind", sorted(CASES))
def test_config_mistake_is_one_line_before_any_model(
    kind: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, fault: FaultTable
) -> None:
    fault.injected(f"config: {kind}")

    def built(*args: object, **kwargs: object) -> None:
        raise AssertionError("a model was built before the configuration error")

    monkeypatch.setattr(EditingModule, "keep_frozen", built)  # DIM keeps its frozen codec at construction
    (tmp_path / "empty").mkdir()
    data = tmp_path / "data"
    (data / "train").mkdir(parents=True)
    (data / "train" / "index.json").write_text('{"shards": [{"url": "s.tar", "samples": 1}], "total": 1}')
    (data / "train" / "s.tar").write_bytes(b"")
    lost = tmp_path / "lost"
    lost.mkdir()
    (lost / "index.json").write_text('{"shards": [{"url": "gone.tar", "samples": 4}], "total": 4}')
    names = {"empty": tmp_path / "empty", "missing": tmp_path / "missing", "lost": lost}
    options, message = CASES[kind]
    recipes = configs(["recipes/dim_edit_stage1.yaml", "recipes/tiny/dim.yaml"])
    base = [f"--data.init_args.{split}_shards={data / 'train'}" for split in ("train", "val")]
    assert main(["fit", *recipes, *base, f"--trainer.default_root_dir={tmp_path}", *(o.format(**names) for o in options)]) == 2
    [line] = error_lines(capsys.readouterr().err)
    assert message.format(**names) in line, line
    fault.survived(f"config: {kind}")
