"""AtomicCheckpointIO: checkpoint files replaced atomically, on the checkpoint's own filesystem.

Lightning's ``TorchCheckpointIO`` (2.6) serialises into memory and writes through an fsspec
transaction, whose local implementation stages the bytes in ``tempfile.mkstemp()`` — the system
temp folder — and then ``shutil.move``\\ s them. When the checkpoint folder is on another filesystem
(a cluster's shared scratch, as multi-node runs need), that move is a copy into the final path, so a
``kill -9`` mid-copy leaves a truncated ``last.ckpt``; a kill before the move leaves a checkpoint-sized
file in ``/tmp`` that nothing removes. Here the file is written next to its destination, flushed
and fsynced, then ``os.replace``\\ d over it (atomic within one filesystem): a reader sees the old
checkpoint or the new one, never part of one. Temp files left by a killed write are removed after
the next successful save into that folder (only global rank 0 writes checkpoints).
Remote paths (``s3://`` ...) keep Lightning's fsspec behaviour.

Loading is always ``torch.load(weights_only=True)``: tensors and plain values only, whatever
``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` or the caller asks, because unpickling anything else can run
code (``torch.load``'s documentation); every checkpoint the zoo writes loads this way. A module
built in Python (not by the CLI) keeps its typed configs in its hyperparameters: those plain
dataclasses of the zoo's own packages are allowed (:func:`config_globals`), nothing else.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import os
import pkgutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO
from typing_extensions import override

CONFIG_PACKAGES = ("zoo", "datamodules", "callbacks")
"""Packages whose dataclasses (typed configs) a checkpoint's hyperparameters may hold."""
TEMP_MARK = ".tmp-"
"""Infix of the temp files: ``.<name>.tmp-<pid>`` beside ``<name>``."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, file too large, ...); the file it would have
    replaced is intact and no temp file is left. ``zoo`` prints it as one ``zoo: error:`` line."""


def _os_error(error: BaseException) -> OSError | None:
    """The OSError that ``error`` is or was raised while handling, if any."""
    seen: BaseException | None = error
    while seen is not None and not isinstance(seen, OSError):
        seen = seen.__cause__ or seen.__context__
    return seen


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local saves are atomic replacements (see the module docstring)."""

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        if not isinstance(get_filesystem(path), LocalFileSystem):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options for local checkpoints")
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        temp = target.with_name(f".{target.name}{TEMP_MARK}{os.getpid()}")
        try:
            with open(temp, "wb") as file:
                torch.save(checkpoint, file)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temp, target)
        except BaseException as error:
            temp.unlink(missing_ok=True)
            cause = _os_error(error)
            if cause is None:
                raise
            # torch.save reports a failed write (a full disk) as a zip-writer RuntimeError; say what happened.
            raise CheckpointWriteError(cause.errno, f"writing checkpoint {target} failed ({cause.strerror}); the previous one is kept") from error
        _fsync_folder(target.parent)
        for stray in target.parent.glob(f".*{TEMP_MARK}*"):
            stray.unlink(missing_ok=True)

    @override
    def load_checkpoint(
        self, path: _PATH, map_location: Callable | None = lambda storage, loc: storage, weights_only: bool | None = None
    ) -> dict[str, Any]:
        """Lightning's load (storages kept where they are read, its default), with ``weights_only=True``
        (see the module docstring)."""
        with allowing_configs():
            return super().load_checkpoint(path, map_location=map_location, weights_only=True)


def config_globals() -> list[type]:
    """Every dataclass of :data:`CONFIG_PACKAGES`' modules (imported first): the typed configs a module
    built in Python pickles into its hyperparameters. Unpickling one sets its fields and runs no code."""
    for package in ("zoo.blocks", "zoo.modules"):
        for info in pkgutil.iter_modules(importlib.import_module(package).__path__, f"{package}."):
            importlib.import_module(info.name)
    found = {
        value
        for name, module in list(sys.modules.items())
        if name.split(".")[0] in CONFIG_PACKAGES
        for value in vars(module).values()
        if isinstance(value, type) and dataclasses.is_dataclass(value) and value.__module__ == name
    }
    return sorted(found, key=lambda cls: f"{cls.__module__}.{cls.__qualname__}")


@contextlib.contextmanager
def allowing_configs() -> Iterator[None]:
    """``torch.load(weights_only=True)`` inside also accepts the zoo's typed configs (:func:`config_globals`)."""
    with torch.serialization.safe_globals(config_globals()):
        yield


def _fsync_folder(folder: Path) -> None:
    """Make the rename durable (the folder entry), where the OS allows opening folders."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
