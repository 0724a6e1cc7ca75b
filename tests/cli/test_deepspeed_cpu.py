"""The DeepSpeed engine itself on CPU (``DS_ACCELERATOR=cpu``, gloo) over a tiny DIM, with the
overlays' strategy arguments: ZeRO-2 and ZeRO-3 steps, the ZeRO checkpoint folder, its
consolidation by ``convert_zero_checkpoint_to_fp32_state_dict``, ``zoo export`` and ``init_from``
from it, an exact ``ckpt_path`` resume from it, and the frozen encoders provably not partitioned.

The runs happen in one subprocess (:mod:`tests.helpers.deepspeed_cpu`). DeepSpeed's CPU
communication JIT-compiles a shared-memory op with the C++ compiler on first use (cached in
``TORCH_EXTENSIONS_DIR``; minutes on a busy 2-core machine), hence ``slow``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tests.helpers.recipes import ROOT, error_lines
from tests.modules.conftest import tiny_dim_kwargs
from tests.modules.test_export import edits
from zoo.cli import main
from zoo.export import read_checkpoint
from zoo.modules.dim import DIMModule

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("c++") is None, reason="DeepSpeed's CPU accelerator JIT-compiles its shared-memory op: no C++ compiler"),
]
RUNS = [  # name:overlay:steps[:the ZeRO folder it resumes from]
    "zero2:recipes/strategy/zero2.yaml:4",
    "zero2_resumed:recipes/strategy/zero2.yaml:4:zero2/checkpoints/step=2.ckpt",
    "zero3:recipes/strategy/zero3.yaml:4",
    "zero3_resumed:recipes/strategy/zero3.yaml:4:zero3/checkpoints/step=2.ckpt",
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("deepspeed")
    env = os.environ | {"DS_ACCELERATOR": "cpu"}
    done = subprocess.run(
        [sys.executable, "-m", "tests.helpers.deepspeed_cpu", str(out), *RUNS],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200, check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def report(runs: Path, name: str) -> dict[str, Any]:
    return json.loads((runs / name / "report.json").read_text())


@pytest.mark.parametrize(
    "name, stage, model_states",
    [("zero2", 2, "mp_rank_00_model_states.pt"), ("zero3", 3, "zero_pp_rank_0_mp_rank_00_model_states.pt")],
)
def test_the_engine_ran_the_overlays_zero_stage_on_cpu(runs: Path, name: str, stage: int, model_states: str) -> None:
    ran = report(runs, name)
    assert ran["zero"]["stage"] == stage
    assert (ran["backend"], ran["world_size"], ran["global_step"]) == ("gloo", 1, 4)
    assert {p.name for p in (runs / name / "checkpoints").iterdir()} == {"step=2.ckpt", "step=4.ckpt"}
    folder = runs / name / "zero"
    assert (folder / "latest").read_text().strip() == "checkpoint"
    # ZeRO-3 shards the weights too, so its model states are per rank.
    assert {p.name for p in (folder / "checkpoint").iterdir()} == {model_states, "zero_pp_rank_0_mp_rank_00_optim_states.pt"}


def test_zero3_partitions_the_module_tree_and_never_the_frozen_encoders(runs: Path) -> None:
    zero3, zero2 = report(runs, "zero3"), report(runs, "zero2")
    assert zero3["partitioned_in_tree"] == zero3["trainable_in_tree"] and len(zero3["trainable_in_tree"]) > 10
    assert zero3["frozen_parameters"]["mllm"] > 0, "the frozen MLLM has parameters DeepSpeed could have taken"
    assert zero3["partitioned_frozen"] == {"mllm": [], "codec": []}
    assert zero2["partitioned_in_tree"] == [] and zero2["partitioned_frozen"] == {"mllm": [], "codec": []}


@pytest.mark.parametrize("name", ["zero2", "zero3"])
def test_consolidation_holds_exactly_the_trained_tensors(runs: Path, name: str) -> None:
    fresh = DIMModule(**tiny_dim_kwargs())
    state = read_checkpoint(runs / name / "zero")["state_dict"]
    assert set(state) == fresh.trainable_state_keys()
    assert not any(key.startswith("mllm.") for key in state)
    assert all(v.dtype == torch.float32 for v in state.values())
    changed = [k for k, v in state.items() if not torch.equal(v, fresh.state_dict()[k])]
    assert len(changed) > len(state) // 2, "four steps moved most trained tensors"


@pytest.mark.parametrize("name", ["zero2", "zero3"])
def test_export_and_init_from_read_the_zero_folder(runs: Path, name: str, tmp_path: Path) -> None:
    folder = runs / name / "zero"
    state = read_checkpoint(folder)["state_dict"]
    assert main(["export", str(folder), str(tmp_path / "out")]) == 0
    exported = DIMModule.from_pretrained(tmp_path / "out")
    assert exported.exported_from["global_step"] == 4
    for key, value in state.items():
        assert torch.equal(exported.state_dict()[key], value), key
    reference = DIMModule(**tiny_dim_kwargs())
    reference.load_state_dict(state, strict=False)
    image, text = edits(exported)
    reference_image, reference_text = edits(reference)
    assert text == reference_text
    np.testing.assert_array_equal(image, reference_image)
    started = DIMModule(**tiny_dim_kwargs(init_from=str(folder)))
    for key, value in state.items():
        assert torch.equal(started.state_dict()[key], value), key


@pytest.mark.parametrize("name", ["zero2", "zero3"])
def test_resuming_from_a_zero_folder_is_exact(runs: Path, name: str) -> None:
    """Resumed at step 2 from the fit's periodic ZeRO folder, step 4 is bit-identical to the fit's."""
    assert report(runs, f"{name}_resumed")["global_step"] == 4
    resumed = read_checkpoint(runs / f"{name}_resumed" / "zero")["state_dict"]
    full = read_checkpoint(runs / name / "zero")["state_dict"]
    assert resumed.keys() == full.keys()
    for key in full:
        assert torch.equal(resumed[key], full[key]), f"{key}: max diff {(resumed[key] - full[key]).abs().max():.3g}"


def test_ckpt_path_of_a_zero_folder_of_another_module_is_one_line(runs: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = runs / "zero2" / "zero"
    recipes = ["--config", str(ROOT / "recipes/got_pretrain.yaml"), "--config", str(ROOT / "recipes/tiny/got.yaml")]
    no_data = ["--data.init_args.train_shards=null", "--data.init_args.val_shards=null"]
    assert main(["fit", *recipes, *no_data, f"--ckpt_path={folder}"]) == 2
    [line] = error_lines(capsys.readouterr().err)
    assert line == (
        f"zoo: error: --ckpt_path {folder} was written by zoo.modules.dim.DIMModule, "
        "but this configuration builds zoo.modules.got.GoTModule"
    )
