"""ZooCLI: ``python -m zoo {fit,validate,test,predict}`` over recipes, plus ``zoo data ...`` tools.

``fit/validate/test/predict`` are LightningCLI's, with any :class:`EditingModule` subclass as
``model`` and any LightningDataModule as ``data`` (``class_path`` + ``init_args`` in recipes), several
``--config`` files merged in order (a paper recipe, then overlays such as ``recipes/tiny/dim.yaml``),
and the resolved config saved with overwrite allowed — a requeued job writes into the same run
directory (pitfall 25). ``zoo data convert|toy`` are the shard writers of :mod:`datamodules`;
``zoo toy-report`` merges toy evaluations into one table.

Configuration mistakes and missing pretrained weights end in one ``zoo: error: ...`` line and exit
status 2, not a stack trace.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable

from jsonargparse import ArgumentError
from lightning.pytorch import LightningDataModule
from lightning.pytorch.callbacks import LearningRateMonitor, RichProgressBar
from lightning.pytorch.cli import LightningCLI

from callbacks.edit_writer import EditWriter
from zoo.blocks.pretrained import MissingPretrainedError
from zoo.modules.base import EditingModule


class ZooCLI(LightningCLI):
    """LightningCLI with the zoo's defaults: subclass mode, merged configs, overwrite-safe config saving."""

    def __init__(self, args: list[str] | None = None, run: bool = True) -> None:
        super().__init__(
            model_class=EditingModule,
            datamodule_class=LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_kwargs={"overwrite": True},
            trainer_defaults={
                "callbacks": [RichProgressBar(), LearningRateMonitor(logging_interval="step"), EditWriter()]
            },
            parser_kwargs={"exit_on_error": False},
            args=args,
            run=run,
        )


def _data_tools() -> dict[str, Callable[[list[str] | None], int]]:
    from datamodules import convert, toy

    return {"convert": convert.main, "toy": toy.main}


_NOISE = ("Does not validate", "Subtypes:", "Errors:", "- Problem with given class_path", "Given value", "- Expected a <class 'NoneType'>")


def _one_line(error: BaseException) -> str:
    """One line from an error; jsonargparse's nested reports become ``key.path: first reason``."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    keys = [m.group(1) for line in lines if (m := re.fullmatch(r'Parser key "(.+)":', line))]
    reasons = [line for line in lines if not line.startswith(_NOISE) and not re.fullmatch(r'Parser key ".+":', line)]
    if not keys:
        return lines[0]
    return f"{'.'.join(keys)}: {reasons[0] if reasons else 'invalid value'}"


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m zoo``; returns the process exit status."""
    words = list(sys.argv[1:] if argv is None else argv)
    if words[:1] == ["toy-report"]:
        from callbacks.toy_score import main as toy_report

        return toy_report(words[1:])
    if words[:1] == ["data"]:
        tools = _data_tools()
        if len(words) < 2 or words[1] not in tools:
            print(f"zoo: error: usage: zoo data {{{','.join(tools)}}} ...", file=sys.stderr)
            return 2
        return tools[words[1]](words[2:])
    try:
        # args=None lets LightningCLI read sys.argv itself (it warns when given both).
        ZooCLI(args=argv)
    except ArgumentError as error:
        print(f"zoo: error: {_one_line(error)} (see --help)", file=sys.stderr)
        return 2
    except Exception as error:
        missing = _missing_pretrained(error)
        if missing is None:
            raise
        print(f"zoo: error: {_one_line(missing)}", file=sys.stderr)
        return 2
    return 0


def _missing_pretrained(error: BaseException) -> MissingPretrainedError | None:
    """The MissingPretrainedError behind ``error`` (jsonargparse wraps instantiation errors), if any."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, MissingPretrainedError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None
