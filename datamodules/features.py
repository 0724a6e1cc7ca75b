"""Cached frozen-encoder features in shards: one safetensors member per sample, and their batching.

``python -m zoo data cache-features`` (:mod:`zoo.feature_cache`) writes, beside every original member
of a sample, ``<key>.features.safetensors`` (or ``<key>.features.safetensors.zlib``, zlib-compressed
where that saves at least :data:`MIN_SAVING` of the bytes): the tensors a module's frozen encoders
make of it, named as the module's ``frozen_features`` names them. The split's ``index.json`` holds
the cache's description under ``"features"`` (:func:`cache_info`), which ``ShardDataModule`` detects.

Padded groups: a module's condition states come padded to a fixed length L with a mask ``g.mask``
(``[L]`` bool, right padding). A sample stores only its real tokens of every ``g.*`` tensor and
``g.length`` = L; :func:`collate_features` pads a batch to its longest sample (the bytes a loader
worker ships) and :func:`expand_features` back to L on the device, with ``g.mask`` rebuilt — the
exact tensors the module computes online. Safetensors (not ``torch.save``) because it stores bf16,
loads without pickle and is what the zoo's exports use.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from torch import Tensor

MEMBER = "features.safetensors"
"""Member suffix of a sample's cached features."""
ZLIB_MEMBER = MEMBER + ".zlib"
"""The same, zlib-compressed (level 1)."""
FORMAT = 1
"""Version of the cache layout stored in ``index.json``."""
MIN_SAVING = 0.10
"""``compression="auto"`` keeps a sample's member compressed only when it is at least this much smaller."""
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
"""Storage dtypes of floating features (ids and lengths keep their integer dtype)."""
COMPRESSIONS = ("auto", "none", "zlib")


def _groups(features: Mapping[str, Tensor]) -> list[str]:
    return [name[: -len(".mask")] for name in features if name.endswith(".mask")]


def sample_features(features: Mapping[str, Tensor], row: int, dtype: torch.dtype) -> dict[str, Tensor]:
    """Row ``row`` of a module's batch of frozen features as one sample stores it: padded groups cut
    to their real tokens (``g.length`` = the padded length), floating tensors in ``dtype``, on the CPU."""
    out: dict[str, Tensor] = {}
    trimmed: dict[str, int] = {}
    for group in _groups(features):
        mask = features[f"{group}.mask"][row].cpu()
        real = int(mask.sum())
        if not bool(mask[:real].all()):
            raise ValueError(f"feature group {group!r} is not right-padded (its mask has gaps): it cannot be stored cut to its real tokens")
        trimmed[group] = real
        out[f"{group}.length"] = torch.tensor(mask.shape[0], dtype=torch.int64)
    for name, value in features.items():
        group = name.split(".", 1)[0]
        if name.endswith(".mask"):
            continue
        tensor = value[row].detach().cpu()
        if "." in name and group in trimmed:
            tensor = tensor[: trimmed[group]]
        out[name] = (tensor.to(dtype) if tensor.is_floating_point() else tensor).contiguous()
    return out


def pack(features: Mapping[str, Tensor], compression: str) -> tuple[str, bytes]:
    """``(member suffix, bytes)`` of one sample's features (``compression``: one of :data:`COMPRESSIONS`)."""
    if compression not in COMPRESSIONS:
        raise ValueError(f"compression must be one of {COMPRESSIONS}, got {compression!r}")
    data = save_tensors(dict(features))
    if compression == "none":
        return MEMBER, data
    packed = zlib.compress(data, 1)
    if compression == "zlib" or len(packed) <= (1 - MIN_SAVING) * len(data):
        return ZLIB_MEMBER, packed
    return MEMBER, data


def unpack(raw: Mapping[str, Any]) -> dict[str, Tensor] | None:
    """A raw sample's cached features, or None when it has none."""
    if ZLIB_MEMBER in raw:
        return load_tensors(zlib.decompress(raw[ZLIB_MEMBER]))
    if MEMBER in raw:
        return load_tensors(raw[MEMBER])
    return None


def collate_features(rows: Sequence[Mapping[str, Tensor]]) -> dict[str, Tensor]:
    """A batch of stored features: every tensor stacked, padded groups to the batch's longest sample
    with their ``g.mask`` (what crosses the loader's worker boundary; :func:`expand_features` then
    pads to the stored length)."""
    names = set(rows[0])
    if any(set(row) != names for row in rows):
        raise ValueError("samples of one batch carry different cached features (shards of different caches mixed?)")
    groups = [name[: -len(".length")] for name in names if name.endswith(".length")]
    out: dict[str, Tensor] = {}
    for group in groups:
        members = sorted(n for n in names if n.startswith(f"{group}.") and n != f"{group}.length")
        real = [int(row[members[0]].shape[0]) for row in rows]
        longest = max(real)
        for name in members:
            first = rows[0][name]
            stacked = first.new_zeros((len(rows), longest, *first.shape[1:]))
            for b, row in enumerate(rows):
                stacked[b, : real[b]] = row[name]
            out[name] = stacked
        out[f"{group}.mask"] = torch.arange(longest)[None, :] < torch.tensor(real)[:, None]
        out[f"{group}.length"] = torch.stack([row[f"{group}.length"] for row in rows])
    grouped = {n for n in names if n.split(".", 1)[0] in groups and "." in n}
    for name in sorted(names - grouped):
        out[name] = torch.stack([row[name] for row in rows])
    return out


def expand_features(features: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Padded groups of a collated batch at their stored length (``g.length``, dropped), so the
    tensors are the ones the module's frozen encoders return online; a batch already expanded is
    returned as it is."""
    out = dict(features)
    for name in [n for n in features if n.endswith(".length")]:
        group = name[: -len(".length")]
        length = int(out.pop(name).max())
        for member in [n for n in out if n.startswith(f"{group}.")]:
            value = out[member]
            if value.shape[1] < length:
                pad = value.new_zeros((value.shape[0], length - value.shape[1], *value.shape[2:]))
                out[member] = torch.cat([value, pad], dim=1)
    return out


def cache_info(
    fingerprint: str, config: Mapping[str, Any], module: str, dtype: str, compression: str, resolution: int, mllm_resolution: int
) -> dict[str, Any]:
    """The ``"features"`` entry of a cached split's ``index.json``."""
    return {
        "format": FORMAT, "fingerprint": fingerprint, "config": dict(config), "module": module, "dtype": dtype,
        "compression": compression, "resolution": resolution, "mllm_resolution": mllm_resolution,
    }
