"""ZooCLI: ``python -m zoo {fit,validate,test,predict}`` over recipes (dispatched by :mod:`zoo.cli`).

These commands are LightningCLI's, with any :class:`EditingModule` subclass as
``model`` and any LightningDataModule as ``data`` (``class_path`` + ``init_args`` in recipes), several
``--config`` files merged in order (a paper recipe, then overlays such as ``recipes/tiny/dim.yaml``),
and the resolved config saved with overwrite allowed — a requeued job writes into the same run
directory, where Lightning's ``SaveConfigCallback`` would otherwise refuse to replace ``config.yaml``.

Configuration mistakes (an unknown key at any depth, with the closest valid one; a value out of
range, :class:`~zoo.blocks.config.ConfigError`), missing pretrained weights, a ``--ckpt_path`` of
another module class or configuration, shards of a feature cache written for another configuration
(:func:`check_feature_caches`) and a DeepSpeed strategy on a machine without CUDA end in one
``zoo: error: ...`` line and exit status 2, not a stack trace.

Every fit is guarded against non-finite training (:class:`~callbacks.nan_guard.NaNGuard`: stop at
the step, exit status 1, no non-finite checkpoint; ``--trainer.callbacks+=callbacks.nan_guard.NaNGuard
--trainer.callbacks.init_args.policy=skip`` replaces the default). Every fit is resumable and preemption-safe: :class:`~callbacks.rng_state.RNGState` checkpoints the
RNG streams, :class:`~callbacks.preemption.Preemption` turns SIGTERM/SIGUSR1 into a checkpoint at the
next step (exit status 0), and :class:`~zoo.checkpoint_io.AtomicCheckpointIO` writes checkpoint files
atomically (a write that fails, e.g. on a full disk, is one ``zoo: error:`` line and exit status 1,
the previous checkpoint kept) and reads them weights-only.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import inspect
import json
import logging
import pickle
import re
import sys
import types
import typing
import warnings
from pathlib import Path
from collections.abc import Callable
from typing import Any

import torch
from jsonargparse import ArgumentError, ArgumentParser, Namespace, set_parsing_settings
from lightning.pytorch import LightningDataModule, Trainer
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ProgressBar
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.plugins.io import CheckpointIO

from callbacks.data_skips import DataSkips
from callbacks.edit_writer import EditWriter
from callbacks.nan_guard import NaNGuard, NonFinite
from callbacks.preemption import Preempted, Preemption
from callbacks.progress import StepProgressBar
from callbacks.rng_state import RNGState
from callbacks.results import BenchmarkEvaluator
from callbacks.toy_score import ToyEditEvaluator
from datamodules.samples import DataConfigError
from datamodules.shard_format import cache_of
from datamodules.shards import STAGE_SPLITS, ShardDataModule, check_stage_shards, predict_jsonl_kind
from zoo.blocks.config import ConfigError
from zoo.blocks.pretrained import MissingPretrainedError
from zoo.checkpoint_io import AtomicCheckpointIO, CheckpointWriteError, allowing_configs
from zoo.export import checkpoint_class_path, is_zero_checkpoint, zero_client_state
from zoo.modules.base import EditingModule, cache_fingerprint, check_schedule, refuse_other_cache


# Typed configs document each field with a string literal after it: those become --help.
set_parsing_settings(docstring_parse_attribute_docstrings=True)

# Known-harmless messages, silenced at their source:
# Lightning's own use of a torch pytree API it has not caught up with; nothing for a user to act on.
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated")
# ShardDataModule splits shards by worker and rank itself, so its __len__ is exact with any number of workers.
warnings.filterwarnings("ignore", message=r"Your `IterableDataset` has `__len__` defined")
# Testing a checkpoint into its own stage folder: the checkpoint's ModelCheckpoint state names the
# training folder, and nothing is saved while testing.
warnings.filterwarnings("ignore", message=r"The dirpath has changed from")
# On a machine with SLURM installed, a fit started without srun is a local run; jobs go through
# recipes/cluster/launch.sh, which starts every task with srun.
warnings.filterwarnings("ignore", message=r"The `srun` command is available on your system but is not used")


class _NoAdvert(logging.Filter):
    """Drops Lightning's "💡 Tip: ... try installing litlogger" advert printed at every fit, and its
    restatement of a configured ``limit_*_batches``."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        # The advert, and the note that a recipe's limit_*_batches is in effect (the recipe says so).
        return not message.startswith("💡 Tip:") and not re.match(r"`Trainer\(limit_\w+_batches=", message)


logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_NoAdvert())


class _NoEmptyFloat32List(logging.Filter):
    """Drops diffusers' warning that a model has modules to keep in float32 when that list is empty
    (it warns at every ``.to(dtype)`` of a UNet that has none: nothing is cast wrongly)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "should be kept in float32: []." not in str(record.msg)


logging.getLogger("diffusers.models.modeling_utils").addFilter(_NoEmptyFloat32List())


STAGE_FOLDERS = {"fit": "train", "validate": "validate", "test": "test", "predict": "predict"}
"""The logger version (folder under ``default_root_dir``) of each stage unless a recipe or the
command line names one: a test never writes into the training run's folder, config or TensorBoard
run, and a requeued fit reuses ``train``."""


class ZooCLI(LightningCLI):
    """LightningCLI with the zoo's defaults: subclass mode, merged configs, overwrite-safe config
    saving, a folder per stage, and no abbreviated options (``--trainer.max_step`` is an error)."""

    def __init__(self, args: list[str] | None = None, run: bool = True) -> None:
        super().__init__(
            model_class=EditingModule,
            datamodule_class=LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_kwargs={"overwrite": True},
            trainer_defaults={
                "callbacks": [LearningRateMonitor(logging_interval="step"), EditWriter(), RNGState(), DataSkips(), Preemption()]
            },
            parser_kwargs={
                "exit_on_error": False,
                "prog": "zoo",
                "allow_abbrev": False,
                **{stage: {"allow_abbrev": False} for stage in STAGE_FOLDERS},
            },
            args=args,
            run=run,
        )

    def add_core_arguments_to_parser(self, parser: Any) -> None:
        """Trainer, data, then model: jsonargparse instantiates in this order, so a DataModule's
        argument errors (a batch size, a missing shard folder) come before any model is built."""
        parser.add_lightning_class_args(self.trainer_class, "trainer")
        parser.set_defaults({"trainer." + k: v for k, v in self.trainer_defaults.items() if k != "callbacks"})
        parser.add_lightning_class_args(self._datamodule_class, "data", subclass_mode=self.subclass_mode_data)
        parser.add_lightning_class_args(self._model_class, "model", subclass_mode=self.subclass_mode_model)

    def before_instantiate_classes(self) -> None:
        """Give the stage's logger its own version (:data:`STAGE_FOLDERS`) when none is set, and no
        TensorBoard ``hp_metric = -1`` placeholder (the zoo logs no hyperparameter metric)."""
        if self.subcommand is None:
            return
        config = self.config[self.subcommand]
        _check_accelerator(config.trainer)
        _check_deepspeed_device(config.trainer)
        data = config.get("data")
        if isinstance(data, Namespace) and _is_subclass(data.get("class_path"), ShardDataModule):
            check_stage_shards(dict(data.get("init_args") or {}), self.subcommand)
            check_feature_caches(config, self.subcommand)
            kind, mode = predict_jsonl_kind(dict(data.get("init_args") or {}), self.subcommand), config.get("model.init_args.mode")
            if kind is not None and mode in ("edit", "t2i") and kind != mode:
                raise ConfigError(
                    f"data.init_args.predict_jsonl holds {kind} rows, but model.init_args.mode is {mode}: "
                    f"give a file of {mode} rows, or the model of that task"
                )
        if self.subcommand == "fit":
            check_schedule(str(config.get("model.init_args.optim.schedule")), int(config.trainer.get("max_steps") or -1))
        logger = self.config[self.subcommand].get("trainer.logger")
        init = logger.get("init_args") if isinstance(logger, Namespace) else None
        if isinstance(init, Namespace) and "version" in init and init.version is None:
            init.version = STAGE_FOLDERS[self.subcommand]
        if isinstance(init, Namespace) and init.get("default_hp_metric") is True:
            init.default_hp_metric = False

    def after_fit(self) -> None:
        self._report()

    def after_validate(self) -> None:
        self._report()

    def after_test(self) -> None:
        self._report()

    def after_predict(self) -> None:
        self._report()

    def _report(self) -> None:
        """Print the stage's logged metrics (validate/test), the samples its data skipped, and the
        folder its outputs went to."""
        trainer = self.trainer
        # A collective under DDP (rank 0's folder, broadcast): every rank asks, or rank 0 waits for
        # ranks that have already exited (measured: gloo "Connection reset by peer" ending a 2-rank fit).
        log_dir = trainer.log_dir
        if not trainer.is_global_zero:
            return
        for line in (c.summary() for c in trainer.callbacks if isinstance(c, DataSkips)):
            if line is not None:
                print(line)
        if self.subcommand in ("validate", "test"):
            metrics = {name: float(value) for name, value in trainer.callback_metrics.items() if value.numel() == 1}
            if metrics:
                width = max(map(len, metrics))
                rows = [f"  {name:<{width}}  {value:.4f}" for name, value in sorted(metrics.items())]
                print("\n".join([f"{self.subcommand} metrics:", *rows]))
            elif not any(isinstance(c, (BenchmarkEvaluator, ToyEditEvaluator)) for c in trainer.callbacks):
                hint = "add an evaluator, e.g. --trainer.callbacks+=callbacks.toy_score.ToyEditEvaluator"
                print(f"{self.subcommand}: no metric was logged ({hint})")
        print(f"zoo: {self.subcommand} outputs in {log_dir}")

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Callback]) -> Trainer:
        """The trainer, with :class:`StepProgressBar` unless the progress bar is disabled or the
        configuration brings its own (a default bar would clash with ``enable_progress_bar: false``),
        :class:`NaNGuard` (policy ``stop``) unless the configuration brings one, and
        :class:`AtomicCheckpointIO` unless the configuration names a checkpoint IO plugin."""
        given = config.get("callbacks") or []
        given = given if isinstance(given, list) else [given]
        if config.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in given):
            callbacks = [*callbacks, StepProgressBar()]
        if not any(isinstance(c, NaNGuard) for c in given):
            callbacks = [*callbacks, NaNGuard()]
        plugins = config.get("plugins") or []
        plugins = plugins if isinstance(plugins, list) else [plugins]
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            config["plugins"] = [*plugins, AtomicCheckpointIO()]
        return super()._instantiate_trainer(config, callbacks)

    def parse_arguments(self, parser: Any, args: Any) -> None:
        """Parse the command line (``sys.argv`` when ``args`` is None) with :func:`explicit_nulls`."""
        if isinstance(args, (dict, Namespace)):
            super().parse_arguments(parser, args)
            return
        self.config = parser.parse_args(explicit_nulls(list(sys.argv[1:] if args is None else args)))

    def _parse_ckpt_path(self) -> None:
        """Keep the configuration as given: the recipes and command line, never the checkpoint's hparams;
        refuse a checkpoint written by another module class before any model is built.

        LightningCLI would merge the checkpoint's saved hyperparameters over the parsed config, so
        ``zoo test --ckpt_path last.ckpt --model.init_args.guidance_scale=4.5`` silently ran with the
        training-time scale, and a GoT checkpoint given to the DIM recipe built a GoTModule. Here the
        given recipes define the model (what may change on resume — lr, schedule, ``max_steps``,
        logging — comes from them: :meth:`EditingModule.on_train_start`); the checkpoint gives the
        training state, and one that does not fit the model is refused
        (:meth:`EditingModule.on_load_checkpoint`).
        """
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        config = self.config[subcommand]
        path, wanted = config.get("ckpt_path"), config.get("model.class_path")
        if path is None or wanted is None:
            return
        written_by = _written_by(path)
        if written_by is not None and written_by != wanted:
            raise ConfigError(f"--ckpt_path {path} was written by {written_by}, but this configuration builds {wanted}")


_NESTED_NULL = re.compile(r"^--(?P<owner>[\w.]+)\.init_args\.(?P<path>\w+(?:\.\w+)+)=null$")


def explicit_nulls(words: list[str]) -> list[str]:
    """``--a.init_args.b.leaf=null`` -> ``--a={"init_args": {"b": {"leaf": null}}}``.

    jsonargparse (4.53) turns a dotted ``null`` into the string ``"None"`` for a field of a typed
    config nested in a class's ``init_args`` (``--trainer.callbacks.init_args.judge.init_args.client
    .api_key_env=null`` asked to ``export None=<key>``); the same value given as a mapping on the
    class merges into its config as a real null, every other field kept.
    """
    rewritten = []
    for word in words:
        match = _NESTED_NULL.match(word)
        if match is None:
            rewritten.append(word)
            continue
        value: Any = None
        for key in reversed(match["path"].split(".")):
            value = {key: value}
        rewritten.append(f"--{match['owner']}={json.dumps({'init_args': value})}")
    return rewritten


_NOISE = ("Does not validate", "Subtypes:", "Errors:", "- Problem with given class_path", "Given value", "- Expected a <class 'NoneType'>")
# How jsonargparse names an option it does not know, by where it met it.
_UNKNOWN = (
    re.compile(r"unrecognized arguments: --(?P<option>[\w.]+)"),
    re.compile(r"Group '(?P<group>[\w.]+)' does not accept option '(?P<option>[\w.]+)'"),
    re.compile(r"Option '(?P<option>[\w.]+)' is not accepted"),
)


def _one_line(error: BaseException) -> str:
    """One line from an error; jsonargparse's nested reports become ``key.path: first reason``,
    and an unknown key names its full path and the closest valid key."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    keys = [m.group(1) for line in lines if (m := re.fullmatch(r'Parser key "(.+)":', line))]
    reasons = [line for line in lines if not line.startswith(_NOISE) and not re.fullmatch(r'Parser key ".+":', line)]
    if not keys:
        return lines[0]
    unknown = _unknown_key(keys, lines)
    if unknown is not None:
        return unknown
    return f"{'.'.join(keys)}: {reasons[0] if reasons else 'invalid value'}"


def _unknown_key(keys: list[str], lines: list[str]) -> str | None:
    """``model.init_args.mllm.lora: unknown key 'rr' (did you mean 'r'?)`` for an unknown option."""
    classes = [m.group(1) for line in lines if (m := re.search(r"Problem with given class_path '([^']+)'", line))]
    for line in lines:
        for pattern in _UNKNOWN:
            match = pattern.search(line)
            if match is None:
                continue
            found = match.groupdict()
            path = [part for key in keys[1:] for part in key.split(".")]
            path += found["group"].split(".") if found.get("group") else []
            *parents, option = path + found["option"].split(".")
            where = ".".join([keys[0], *(["init_args"] if classes else []), *parents])
            hint = _closest(classes[0], parents, option) if classes else None
            return f"{where}: unknown key '{option}'" + (f" (did you mean '{hint}'?)" if hint else "")
    return None


def _closest(class_path: str, parents: list[str], option: str) -> str | None:
    """The valid key nearest to ``option`` below ``parents`` of ``class_path``'s init arguments."""
    module, _, name = class_path.rpartition(".")
    try:
        owner: object = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return None
    for parent in parents:
        owner = _config_type(_arguments(owner).get(parent))
        if owner is None:
            return None
    matches = difflib.get_close_matches(option, list(_arguments(owner)), n=1)
    return matches[0] if matches else None


def _arguments(owner: object) -> dict[str, object]:
    """Argument name -> type of a dataclass's fields or a class's ``__init__``."""
    if dataclasses.is_dataclass(owner):
        hints = typing.get_type_hints(owner)
        return {f.name: hints.get(f.name) for f in dataclasses.fields(owner) if f.init}
    if not inspect.isclass(owner):
        return {}
    hints = typing.get_type_hints(owner.__init__)
    names = [n for n in inspect.signature(owner.__init__).parameters if n != "self"]
    return {n: hints.get(n) for n in names}


def _config_type(annotation: object) -> object | None:
    """The dataclass inside ``annotation`` (``X``, ``X | None``)."""
    if dataclasses.is_dataclass(annotation):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return next((arg for arg in typing.get_args(annotation) if dataclasses.is_dataclass(arg)), None)
    return None


def run(argv: list[str] | None) -> int:
    """``fit/validate/test/predict`` with ``argv`` (None: ``sys.argv``); returns the exit status."""
    # args=None lets LightningCLI read sys.argv itself (it warns when given both).
    return guarded(lambda: ZooCLI(args=argv))


def guarded(body: Callable[[], object]) -> int:
    """Run ``body`` (a command over recipes) and return its exit status: a configuration mistake,
    missing weights or bad data is one ``zoo: error:`` line and 2, non-finite training 1, preemption 0."""
    try:
        body()
    except Preempted:
        return 0  # saved at a safe point and logged by the callback; the scheduler restarts the job
    except (NonFinite, CheckpointWriteError) as error:
        print(f"zoo: error: {error}", file=sys.stderr)
        return 1
    except ArgumentError as error:
        print(f"zoo: error: {_one_line(error)} (see --help)", file=sys.stderr)
        return 2
    except Exception as error:
        known = _user_error(error)
        if known is None:
            raise
        print(f"zoo: error: {_one_line(known)}", file=sys.stderr)
        return 2
    return 0


def _written_by(path: str) -> str | None:
    """The module class path a checkpoint file or DeepSpeed checkpoint folder records (LightningCLI's
    ``hyper_parameters._class_path``); None for a keyword such as ``last`` or a checkpoint without it."""
    if is_zero_checkpoint(Path(path)):
        return checkpoint_class_path(zero_client_state(Path(path)))
    if not Path(path).is_file():
        return None
    try:
        # Memory-mapped: the class path is read without loading the weights into memory.
        with allowing_configs():
            checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError:
        raise ConfigError(
            f"--ckpt_path {path} holds objects other than tensors and plain values: refused, as checkpoints "
            "are read with weights_only=True (a pickle can run code when loaded)"
        ) from None
    except (RuntimeError, EOFError) as error:
        raise ConfigError(f"--ckpt_path {path} is not a readable checkpoint: {str(error).split('. ')[0]}") from None
    return checkpoint_class_path(checkpoint)


def _class(class_path: object) -> type | None:
    """The class the dotted ``class_path`` names, or None."""
    module, _, name = str(class_path).rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return None
    return cls if isinstance(cls, type) else None


def _is_subclass(class_path: object, base: type) -> bool:
    """Whether the dotted ``class_path`` names ``base`` or a subclass of it."""
    cls = _class(class_path)
    return cls is not None and issubclass(cls, base)


def check_feature_caches(config: Namespace, stage: str) -> None:
    """Refuse the feature-cache shards of another configuration that ``stage`` would read, before any
    model is built (:func:`recipe_fingerprint`; the model checks the same once built, in its ``setup``)."""
    init = config.get("data.init_args") or Namespace()
    if not init.get("use_cached_features"):
        return
    specs = {split: init.get(f"{split}_shards") for split in STAGE_SPLITS.get(stage, [])}
    caches = {split: cache for split, spec in specs.items() if spec is not None and (cache := cache_of(spec)) is not None}
    computed = recipe_fingerprint(config) if caches else None
    if computed is None:
        return
    owner = str(config.get("model.class_path")).rpartition(".")[2]
    for split, cache in caches.items():
        refuse_other_cache(cache, *computed, owner, f"data.init_args.{split}_shards")


def recipe_fingerprint(config: Namespace) -> tuple[str, dict[str, Any]] | None:
    """The feature-cache fingerprint (:func:`~zoo.modules.base.cache_fingerprint`) of the model a parsed
    configuration builds over a ``ShardDataModule``, without building it: its class, the DataModule's
    training view (which the model adopts) and its ``cache_config`` init arguments; None for another
    model or DataModule."""
    model = _class(config.get("model.class_path"))
    if model is None or not issubclass(model, EditingModule) or not _is_subclass(config.get("data.class_path"), ShardDataModule):
        return None
    init = config.get("data.init_args") or Namespace()
    args = _init_values(model, config.get("model.init_args") or Namespace(), model.cache_config)
    return cache_fingerprint(f"{model.__module__}.{model.__qualname__}", init.resolution, init.mllm_resolution, args)


def _init_values(cls: type, init_args: Namespace, names: tuple[str, ...]) -> dict[str, Any]:
    """The values ``cls.__init__`` would receive for ``names`` from parsed ``init_args``, typed configs
    built as their dataclasses by jsonargparse as LightningCLI builds them for the model (which is not built)."""
    types_ = _arguments(cls)
    known = [name for name in names if types_.get(name) is not None]
    parser = ArgumentParser(exit_on_error=False)
    for name in known:
        parser.add_argument(f"--{name}", type=types_[name])
    given = {name: value.as_dict() if isinstance(value := init_args.get(name), Namespace) else value for name in known}
    built = parser.instantiate(parser.parse_object(given))
    return {name: built.get(name) if name in known else None for name in names}


def _check_accelerator(trainer: Namespace) -> None:
    """Refuse a GPU accelerator on a machine without CUDA before any model is built (Lightning
    raises ``MisconfigurationException: No supported gpu backend found!`` after building everything)."""
    accelerator = str(trainer.get("accelerator"))
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError(
            f"trainer.accelerator is {accelerator}, but this machine has no CUDA GPU: "
            "use --trainer.accelerator=cpu (or auto), e.g. with a recipes/tiny/ overlay"
        )


def _check_deepspeed_device(trainer: Namespace) -> None:
    """Refuse a DeepSpeed strategy without CUDA before any model is built (Lightning raises a
    ``RuntimeError`` only after building everything)."""
    strategy = trainer.get("strategy")
    name = strategy.get("class_path", "") if isinstance(strategy, Namespace) else str(strategy)
    if "deepspeed" not in name.lower():
        return
    accelerator = str(trainer.get("accelerator"))
    if accelerator not in ("auto", "gpu", "cuda"):
        reason = f"trainer.accelerator is {accelerator}"
    elif not torch.cuda.is_available():
        reason = "this machine has no CUDA GPU"
    else:
        return
    raise ConfigError(
        f"trainer.strategy {name} runs on CUDA GPUs only, but {reason}: drop the DeepSpeed overlay "
        f"(recipes/strategy/zero*.yaml) or use --trainer.strategy=auto / recipes/strategy/ddp.yaml"
    )


def _user_error(error: BaseException) -> MissingPretrainedError | ConfigError | DataConfigError | None:
    """The missing-weights or bad-config error behind ``error`` (jsonargparse wraps instantiation errors)."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, (MissingPretrainedError, ConfigError, DataConfigError)):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None
