"""``python -m zoo COMMAND``: the zoo's command line, dispatched before anything heavy is imported.

``fit/validate/test/predict`` are LightningCLI's over recipes (:mod:`zoo.trainer_cli`); ``data
convert|toy`` are the shard writers of :mod:`datamodules`, ``data annotate`` its chat-model
annotator and ``data cache-features`` the frozen-encoder feature cache (:mod:`zoo.feature_cache`);
``export`` writes a checkpoint as a ``from_pretrained`` folder (:mod:`zoo.export`); ``toy-report``
merges toy evaluations into one table (:mod:`callbacks.toy_score`);
``demo`` runs the toy-learning harness (:mod:`zoo.demo`). Each command's module is imported only
when that command runs, so ``zoo --help`` lists them all in about the time Python takes to start.
"""

from __future__ import annotations

import importlib
import sys

TRAINER_COMMANDS = {
    "fit": "train a model: --config RECIPE [--config OVERLAY ...] [--section.key=value ...]",
    "validate": "one pass over the validation split (--ckpt_path CKPT)",
    "test": "one pass over the test split with the recipe's evaluators (--ckpt_path CKPT)",
    "predict": "edit the images of a JSONL file (--data.init_args.predict_jsonl FILE --ckpt_path CKPT)",
}
"""LightningCLI's commands -> their one-line purpose."""

TOOLS = {
    "data convert": ("datamodules.convert", "write shards from a DIM, GoT, HumanEdit or ImgEdit release (JSONL/JSON/parquet + images)"),
    "data annotate": ("datamodules.annotate", "write MIND-Edit optimized instructions of edit samples with a chat model (resumable JSONL)"),
    "data toy": ("datamodules.toy", "write the procedural toy edit (and T2I) shards"),
    "data cache-features": ("zoo.feature_cache", "run a recipe's frozen encoders once over its shards and write shards carrying their outputs"),
    "export": ("zoo.export", "write a checkpoint (file or ZeRO folder) as a self-contained folder: safetensors, config, diffusers subfolder"),
    "toy-report": ("callbacks.toy_score", "merge toy evaluations (metrics.json) into one table with checks"),
    "demo": ("zoo.demo", "train a tiny model on toy edits on the CPU and prove that it learned (make demo)"),
}
"""The zoo's own commands -> (module whose ``main(argv)`` runs it, one-line purpose)."""


def usage() -> str:
    """The listing of every command that ``zoo``, ``zoo -h`` and ``zoo --help`` print."""
    rows = [*TRAINER_COMMANDS.items(), *((name, purpose) for name, (_, purpose) in TOOLS.items())]
    width = max(len(name) for name, _ in rows) + 2
    lines = [
        "usage: zoo COMMAND [ARGS]   (python -m zoo COMMAND [ARGS])",
        "",
        "Image editing guided by multimodal LLMs: train, evaluate and run the zoo's models from YAML recipes.",
        "",
        "commands:",
        *(f"  {name:<{width}}{purpose}" for name, purpose in rows),
        "",
        "`zoo COMMAND --help` shows a command's options.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m zoo``; returns the process exit status."""
    words = list(sys.argv[1:] if argv is None else argv)
    if not words or words[0] in ("-h", "--help"):
        print(usage())
        return 0 if words else 2
    if words[0] in TRAINER_COMMANDS or words[0].startswith("-"):
        from zoo.trainer_cli import run

        return run(argv)
    name = " ".join(words[:2]) if words[0] == "data" else words[0]
    if name not in TOOLS:
        if words[0] == "data":
            tools = [tool for tool in TOOLS if tool.startswith("data ")]
            if words[1:2] in (["-h"], ["--help"]):
                print("\n".join(f"zoo {tool}: {TOOLS[tool][1]}" for tool in tools))
                return 0
            given = f" (got '{words[1]}')" if len(words) > 1 else ""
            print(f"zoo: error: zoo data needs one of: {', '.join(tools)}{given}", file=sys.stderr)
        else:
            known = ", ".join([*TRAINER_COMMANDS, *TOOLS])
            print(f"zoo: error: unknown command '{name}'; one of: {known} (see zoo --help)", file=sys.stderr)
        return 2
    module, _ = TOOLS[name]
    return importlib.import_module(module).main(words[len(name.split()) :])
