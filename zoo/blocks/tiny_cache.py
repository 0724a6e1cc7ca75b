"""What the tiny *pretrained* sides share: their toy pretraining images and a build-once cache.

A frozen part of a paper model (MIND-Edit's SD1.5 + IP-Adapter, ImgEdit-E1's FLUX) must already
know how to draw for the trainable part to learn anything; at toy size no published weights exist,
so :mod:`zoo.blocks.tiny_ip_adapter` and :mod:`zoo.blocks.tiny_flux` pretrain one briefly on toy
images (:func:`toy_images`) and keep it in a folder laid out as the published one, written once
and atomically (:func:`build_once`) under ``$ZOO_CACHE/tiny`` (default ``~/.cache/zoo/tiny``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from datamodules.toy import edit_sample, t2i_sample
from datamodules.toy_scenes import Scene, ToyObject, describe
from zoo.blocks.config import ConfigError

log = logging.getLogger(__name__)

OptionsT = TypeVar("OptionsT")

TOY_SEED = 0
"""Seed of the toy dataset the sides are trained on (its ``train`` split; evaluation uses ``test``)."""


def cache_root() -> Path:
    """``$ZOO_CACHE/tiny``, else ``~/.cache/zoo/tiny``."""
    return Path(os.environ.get("ZOO_CACHE", Path.home() / ".cache" / "zoo")).expanduser() / "tiny"


def build_once(folder: Path, build: Callable[[Path], None], options: dict[str, Any], what: str) -> Path:
    """``folder``, built by ``build(scratch)`` into a scratch folder beside it and renamed into place
    unless it exists (``options.json`` marks a finished build). One torch thread while building, so
    the same options give the same weights on every machine."""
    if (folder / "options.json").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    log.warning("building %s once (a few minutes on one CPU thread) into %s; later runs load it from there", what, folder)
    scratch = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # one thread: identical floating-point sums on every machine
        try:
            with torch.enable_grad():  # pretraining, even when first asked for under no_grad (a test or an edit)
                build(scratch)
        finally:
            torch.set_num_threads(threads)
        (scratch / "options.json").write_text(json.dumps(options, sort_keys=True))
        try:
            scratch.rename(folder)
        except OSError:
            if not (folder / "options.json").is_file():  # lost a race only if the winner finished
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return folder


def options_of(options_type: type[OptionsT], options: dict[str, Any], what: str) -> OptionsT:
    """``options_type(**options)`` from a recipe's dict; unknown keys are a :class:`ConfigError` naming ``what``."""
    known = {field.name for field in dataclasses.fields(options_type)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ConfigError(f"unknown tiny {what} option(s) {unknown}; known: {sorted(known)}")
    return options_type(**options)


def scene_caption(scene: Scene) -> str:
    """The caption a toy image is trained with: its description as a T2I prompt ("A red circle ... background.")."""
    text = describe(scene)
    return text[0].upper() + text[1:] + "."


def scene_from_json(record: dict) -> Scene:
    """The :class:`Scene` of a toy sample's ``*_scene`` json extra."""
    return Scene(record["background"], tuple(ToyObject(**obj) for obj in record["objects"]))


def toy_images(split: str, count: int, resolution: int = 32) -> tuple[torch.Tensor, list[str]]:
    """``count`` toy images ``[N, 3, R, R]`` in [0, 1] with their captions: T2I scenes and edit targets alternating
    (:func:`toy_edit_masks` gives the edit targets' masks)."""
    images, captions = [], []
    for i in range(count):
        if i % 2:
            sample, extra = edit_sample(TOY_SEED, split, i // 2, resolution)
            image, caption = sample.target, scene_caption(scene_from_json(extra["target_scene"]))
        else:
            sample, _ = t2i_sample(TOY_SEED, split, i // 2, resolution)
            image, caption = sample.image, sample.prompt
        images.append(torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 255)
        captions.append(caption)
    return torch.stack(images), captions


def toy_edit_masks(split: str, count: int, resolution: int = 32) -> torch.Tensor:
    """``[N, 1, R, R]`` in {0, 1}: the edit mask of each edit target of :func:`toy_images` (same order),
    zeros for its T2I scenes (they have none)."""
    masks = torch.zeros(count, 1, resolution, resolution)
    for i in range(1, count, 2):
        mask = edit_sample(TOY_SEED, split, i // 2, resolution)[0].mask
        masks[i, 0] = torch.from_numpy(np.asarray(mask) > 127)
    return masks
