"""Load the released GoT-6B weights (HF ``LucasFang/GoT-6B``) into a :class:`~zoo.modules.got.GoTModule`.

The released checkpoint is the ``state_dict`` of the whole official ``GenCot`` module, which the
official loader (``sunyasheng/NeoAnalogist@c58cf0a:thirdparty/GoT/got/models/got_model.py:372-382``,
``GenCot.from_pretrained``) reads with ``torch.load`` and ``load_state_dict(strict=False)``, printing
and otherwise ignoring keys that do not fit. Its attributes map onto ours one to one:

============================================  ==============================================
official ``GenCot`` key                       ``GoTModule`` key
============================================  ==============================================
``mllm.<peft PeftModelForCausalLM key>``      ``mllm.model.<same key>`` (LoRA, modules_to_save)
``output_projector.projector.{weight,bias}``  ``context_projector.{weight,bias}`` (2048→2048)
``output_projector_add.projector.{...}``      ``pooled_projector.{...}`` (2048→1280)
``unet.<diffusers UNet key>``                 ``denoiser.model.<same key>`` (12-channel conv_in)
``vae.<diffusers VAE key>``                   ``codec.model.<same key>`` (frozen SDXL VAE)
============================================  ==============================================

The checkpoint predates transformers' Qwen2.5-VL re-layout, so its MLLM keys may be in the old
form (``visual.*`` and ``model.layers.*`` at the top of the HF model); they are renamed to the
current ``model.visual.*`` / ``model.language_model.*`` the way transformers renames legacy
checkpoints. Unlike the official loader, nothing is ignored silently: a checkpoint that leaves a
trainable tensor of the module unset, or holds a tensor the module has no place for, is an error
naming the first such key.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor

from zoo.blocks.pretrained import MissingPretrainedError
from zoo.modules.base import EditingModule

_PREFIXES = (
    ("mllm.", "mllm.model."),
    ("output_projector.projector.", "context_projector."),
    ("output_projector_add.projector.", "pooled_projector."),
    ("unet.", "denoiser.model."),
    ("vae.", "codec.model."),
)
_PEFT_MODEL = "base_model.model."
# transformers' legacy layout of Qwen2(.5)-VL-for-generation checkpoints (its conversion mapping).
_LEGACY_QWEN = (
    (re.compile(r"^visual\."), "model.visual."),
    (re.compile(r"^model\.(?!language_model\.|visual\.)"), "model.language_model."),
)
_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_SINGLE_FILES = ("model.safetensors", "pytorch_model.bin")


def official_key(key: str) -> str | None:
    """Our state-dict key of an official ``GenCot`` key; ``None`` for keys of no known part."""
    for official, ours in _PREFIXES:
        if key.startswith(official):
            rest = key[len(official) :]
            if official == "mllm." and rest.startswith(_PEFT_MODEL):
                inner = rest[len(_PEFT_MODEL) :]
                for pattern, replacement in _LEGACY_QWEN:
                    inner = pattern.sub(replacement, inner, count=1)
                rest = _PEFT_MODEL + inner
            return ours + rest
    return None


def checkpoint_files(path: str | Path) -> list[Path]:
    """The weight files of a checkpoint: one ``.bin``/``.safetensors`` file, or a folder holding one
    or a sharded set with its ``*.index.json``.

    Raises:
        MissingPretrainedError: nothing loadable at ``path`` (one line saying what to download).
    """
    path = Path(path)
    if path.is_file():
        return [path]
    if path.is_dir():
        for index in _INDEXES:
            if (path / index).is_file():
                shards = sorted(set(json.loads((path / index).read_text())["weight_map"].values()))
                missing = [s for s in shards if not (path / s).is_file()]
                if missing:
                    raise MissingPretrainedError(f"GoT checkpoint {path} lacks shard {missing[0]} named by {index}: finish the download")
                return [path / s for s in shards]
        for single in _SINGLE_FILES:
            if (path / single).is_file():
                return [path / single]
    raise MissingPretrainedError(
        f"official GoT weights not found at '{path}': download them once with "
        f"`hf download LucasFang/GoT-6B --local-dir <folder>` and pass that folder (or its pytorch_model.bin)"
    )


def _tensors(files: list[Path]) -> Iterator[tuple[str, Tensor]]:
    for file in files:
        if file.suffix == ".safetensors":
            state = load_file(str(file))
        else:
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        yield from state.items()


def load_official_got(module: EditingModule, path: str | Path) -> int:
    """Copy the official GoT-6B weights at ``path`` into ``module`` (a GoTModule built with GoT's
    configuration: LoRA r=32 on Qwen2.5-VL-3B, SDXL UNet/VAE); returns the number of tensors loaded.

    Raises:
        MissingPretrainedError: no checkpoint at ``path``.
        KeyError: a checkpoint tensor the module has no place for, or a trainable tensor of the
            module the checkpoint does not set (a different LoRA config or model family).
        ValueError: a tensor whose shape differs from the module's.
    """
    own = module.state_dict()
    # The frozen VAE is held outside the module tree; its tensors are in the checkpoint all the same.
    for name, part in module.frozen_parts.items():
        own.update({f"{name}.{key}": value for key, value in part.state_dict().items()})
    loaded: set[str] = set()
    with torch.no_grad():
        for key, value in _tensors(checkpoint_files(path)):
            ours = official_key(key)
            if ours is None or ours not in own:
                raise KeyError(
                    f"GoT checkpoint tensor {key!r} has no place in {type(module).__name__}"
                    + (f" (looked for {ours!r})" if ours else "")
                    + "; was the module built with GoT's LoRA config (r=32, GoT tokens) and SDXL?"
                )
            if own[ours].shape != value.shape:
                raise ValueError(f"GoT checkpoint tensor {key!r} has shape {tuple(value.shape)}, {ours} has {tuple(own[ours].shape)}")
            own[ours].copy_(value)
            loaded.add(ours)
    trainable = {name for name, p in module.named_parameters() if p.requires_grad}
    unset = sorted(trainable - loaded)
    if unset:
        raise KeyError(f"GoT checkpoint at {path} does not set {len(unset)} trainable tensors (first: {unset[0]})")
    return len(loaded)
