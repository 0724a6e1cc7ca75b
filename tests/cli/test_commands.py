"""``zoo --help`` lists every command without importing torch; abbreviated options are errors; a
command-line null is null; data-module mistakes are one line."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers.recipes import NO_GPU_NO_DATA, ROOT, ParseOnly, configs, error_lines, run_zoo
from zoo.cli import TOOLS, TRAINER_COMMANDS, main
from zoo.trainer_cli import explicit_nulls


def _seconds(*command: str) -> float:
    start = time.perf_counter()
    subprocess.run(command, cwd=ROOT, check=True, capture_output=True, timeout=300)
    return time.perf_counter() - start


def test_help_lists_every_command_faster_than_importing_torch() -> None:
    result = run_zoo("--help")
    assert result.returncode == 0 and result.stdout.startswith("usage: zoo COMMAND")
    listed = [line[2:].split("  ")[0] for line in result.stdout.splitlines() if line.startswith("  ")]
    assert listed == [*TRAINER_COMMANDS, *TOOLS]
    # Measured in one run: the listing imports nothing heavy (torch alone takes seconds).
    torch_import = _seconds(sys.executable, "-c", "import torch")
    help_time = _seconds(sys.executable, "-m", "zoo", "--help")
    assert help_time < torch_import, (help_time, torch_import)


def test_data_help_and_unknown_commands() -> None:
    shown = run_zoo("data", "--help")
    assert shown.returncode == 0 and "zoo data convert:" in shown.stdout and "zoo data toy:" in shown.stdout
    assert "zoo data annotate:" in shown.stdout
    for words, expected in ((["data"], "zoo data needs one of: data convert, data annotate, data toy"), (["train"], "unknown command 'train'")):
        result = run_zoo(*words)
        assert result.returncode == 2 and error_lines(result.stderr) == [error_lines(result.stderr)[0]]
        assert expected in result.stderr
    assert run_zoo().returncode == 2, "no command is a usage error"


@pytest.mark.parametrize("command", [["data", "toy", "--ou", "x"], ["toy-report", "m.json", "--ou", "x"], ["demo", "--mod", "dim"]])
def test_tools_reject_abbreviated_options(command: list[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(command)
    assert exited.value.code == 2


def test_trainer_commands_reject_abbreviated_options(capsys: pytest.CaptureFixture[str]) -> None:
    # argparse would otherwise read --trainer.max_step as --trainer.max_steps.
    args = ["fit", *configs(["recipes/dim_edit_stage1.yaml", "recipes/tiny/dim.yaml"]), "--trainer.max_step=3", "--print_config"]
    assert main(args) == 2
    [line] = error_lines(capsys.readouterr().err)
    assert "--trainer.max_step=3" in line


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("--data.init_args.batch_size=0", "batch_size and val_batch_size must be >= 1, got 0"),
        ("--data.init_args.wrong_instructions=true", "wrong_instructions swaps texts between the samples"),
    ],
)
def test_data_config_mistakes_are_one_line(override: str, message: str, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["test", *configs(["recipes/dim_edit_stage1.yaml", "recipes/tiny/dim.yaml"]), override, "--data.init_args.val_batch_size=1"]
    # No test shards here: a missing split of the stage would be the first error (checked before any class is built).
    assert main([*args, "--data.init_args.test_shards=null"]) == 2
    err = capsys.readouterr().err
    assert error_lines(err) == [line for line in err.splitlines() if line.strip()] and message in err


def test_a_command_line_null_is_null_at_any_depth() -> None:
    files = ["recipes/dim_edit_stage1.yaml", "recipes/tiny/dim.yaml", "recipes/eval/gedit_bench.yaml"]
    nested = "--trainer.callbacks.init_args.judge.init_args.client.api_key_env=null"
    args = [*configs(files), nested, "--model.init_args.mllm.pretrained=null", "--model.init_args.mllm.torch_dtype=bfloat16"]
    config = ParseOnly(args=args, run=False).config
    [evaluator] = [c for c in config.trainer.callbacks if c.class_path.endswith("GEditEvaluator")]
    client = evaluator.init_args.judge.init_args.client
    assert client.api_key_env is None and client.model == "gpt-4.1", "null, with the client's other fields kept"
    mllm = config.model.init_args.mllm
    assert mllm.pretrained is None and mllm.torch_dtype == "bfloat16" and mllm.tiny.hidden_size == 64
    words = ["--data.init_args.val_shards=null", "--a.init_args.b.init_args.c.d=null", "--a.init_args.b.c=none"]
    assert explicit_nulls(words) == [
        "--data.init_args.val_shards=null",  # a class's own argument: jsonargparse reads it right
        '--a.init_args.b={"init_args": {"c": {"d": null}}}',
        "--a.init_args.b.c=none",
    ]


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([{"id": "a", "image_path": "a.png", "image_path_target": "a.png", "prompt": "p"}, {"id": "b", "image_path": "-", "prompt": "q"}],
         "mixes 1 edit rows and 1 text-to-image rows"),
        ([{"id": "b", "image_path": "-", "prompt": "a red square"}], "holds t2i rows, but model.init_args.mode is edit"),
    ],
)
def test_a_predict_file_of_mixed_or_wrong_rows_is_one_line_before_any_model(
    rows: list[dict], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    jsonl = tmp_path / "edits.jsonl"
    jsonl.write_text("".join(json.dumps(row) + "\n" for row in rows))
    # The paper recipe: building its model would fail first on the missing Qwen2.5-VL weights.
    unset = [*NO_GPU_NO_DATA, "--data.init_args.test_shards=null", f"--data.init_args.predict_jsonl={jsonl}"]
    assert main(["predict", *configs(["recipes/dim_edit.yaml"]), *unset]) == 2
    err = capsys.readouterr().err
    assert error_lines(err) == [line for line in err.splitlines() if line.strip()] and message in err
