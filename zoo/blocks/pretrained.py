"""Resolve a pretrained model id or path to a local folder, offline.

Every block that loads published weights calls :func:`resolve_pretrained` first, so a missing
model gives one actionable line instead of a hub stack trace. The zoo never downloads at run
time: users fetch weights once and point recipes at them.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch
from diffusers import ModelMixin

from huggingface_hub import snapshot_download
from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError


class MissingPretrainedError(RuntimeError):
    """A pretrained model named in a config is neither a local folder nor in the hub cache."""


def resolve_pretrained(name_or_path: str, subfolder: str | None = None) -> str:
    """Return a local folder holding ``name_or_path`` (a folder, or a hub id already cached).

    Raises:
        MissingPretrainedError: with a one-line message naming the model and how to provide it.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        folder = path
    else:
        try:
            folder = Path(snapshot_download(name_or_path, local_files_only=True))
        except (LocalEntryNotFoundError, HFValidationError, FileNotFoundError, OSError) as err:
            raise MissingPretrainedError(
                f"pretrained model '{name_or_path}' is not available offline: download it once with "
                f"`hf download {name_or_path}` (it is then found in the hub cache, HF_HOME) or set the "
                f"recipe's path to a local folder holding it"
            ) from err
    if subfolder is not None and not (folder / subfolder).is_dir():
        raise MissingPretrainedError(
            f"pretrained model '{name_or_path}' has no subfolder '{subfolder}' (looked in {folder})"
        )
    return str(folder)


ModelT = TypeVar("ModelT", bound=ModelMixin)
T = TypeVar("T")


def load_diffusers_model(
    model_cls: type[ModelT], pretrained: str | None, config: dict | None, subfolder: str | None, seed: int | None = None
) -> ModelT:
    """Build ``model_cls`` from a published id / local folder, or from constructor kwargs (a tiny config).

    One code path for a published model and a tiny one: exactly one of ``pretrained`` and ``config``.
    ``pretrained`` goes through :func:`resolve_pretrained` first, so a missing model is one clear line.
    ``seed``: a model built from ``config`` draws its initial weights from its own generator seeded
    so (the global RNG is left as it was), the same in every process; None draws from the global RNG.
    """
    if (pretrained is None) == (config is None):
        raise ValueError(
            f"{model_cls.__name__}: give exactly one of pretrained= (a hub id or local folder) or "
            f"config= (constructor kwargs, e.g. a tiny config); got pretrained={pretrained!r}, config={config!r}"
        )
    if pretrained is not None:
        folder = resolve_pretrained(pretrained, subfolder)
        return model_cls.from_pretrained(folder, subfolder=subfolder)
    try:
        if seed is None:
            return model_cls(**config)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return model_cls(**config)
    except TypeError as err:
        raise TypeError(f"config is not valid for {model_cls.__name__}: {err}") from err


def require_one_source(owner: str, pretrained: str | None, tiny: dict | None) -> None:
    """Raise unless exactly one of ``pretrained`` (id or folder) and ``tiny`` (config dict) is given."""
    if (pretrained is None) == (tiny is None):
        raise ValueError(f"{owner} needs exactly one of `pretrained` (id or folder) and `tiny` (dict)")


def build_tiny(factory: Callable[..., T], owner: str, options: dict) -> T:
    """``factory(**options)`` of a tiny random component; unknown options are a ValueError naming them."""
    try:
        return factory(**options)
    except TypeError as err:
        raise ValueError(f"bad `tiny` options for {owner} {options}: {err}") from err
