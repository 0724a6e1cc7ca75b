"""Cached features in shards: per-sample storage (padded groups cut to real tokens), collation, and
the re-padding that gives back the module's online tensors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from datamodules.features import MEMBER, ZLIB_MEMBER, collate_features, expand_features, pack, sample_features, unpack
from datamodules.samples import DataConfigError
from datamodules.shard_format import cache_of


def online(lengths: list[int], length: int = 6, width: int = 3) -> dict[str, torch.Tensor]:
    """A module's batch of frozen features: a right-padded group and a fixed-shape latent."""
    torch.manual_seed(0)
    mask = torch.arange(length)[None, :] < torch.tensor(lengths)[:, None]
    states = torch.randn(len(lengths), length, width) * mask[..., None]
    ids = torch.randint(1, 100, (len(lengths), length)) * mask
    return {"vlm.states": states, "vlm.mask": mask, "vlm.ids": ids, "source_latent": torch.randn(len(lengths), 3, 2, 2)}


def stored(features: dict[str, torch.Tensor], dtype: torch.dtype, compression: str = "none") -> list[dict[str, torch.Tensor]]:
    rows = []
    for row in range(len(features["vlm.mask"])):
        member, data = pack(sample_features(features, row, dtype), compression)
        rows.append(unpack({member: data}))
    return rows


def test_round_trip_gives_back_the_online_tensors_exactly_in_float32() -> None:
    features = online([2, 5, 4])
    rows = stored(features, torch.float32)
    assert [row["vlm.states"].shape[0] for row in rows] == [2, 5, 4]  # only the real tokens are stored
    batch = collate_features(rows)
    assert batch["vlm.states"].shape[1] == 5  # the batch's longest, across the worker boundary
    again = expand_features(batch)
    assert set(again) == set(features)
    for name, value in features.items():
        assert again[name].dtype == value.dtype and torch.equal(again[name], value), name


def test_bfloat16_storage_rounds_floats_and_keeps_ids() -> None:
    features = online([3, 6])
    again = expand_features(collate_features(stored(features, torch.bfloat16)))
    assert again["vlm.states"].dtype == torch.bfloat16 and torch.equal(again["vlm.ids"], features["vlm.ids"])
    drift = (again["vlm.states"].float() - features["vlm.states"]).abs().max().item()
    assert 0 < drift <= 2**-8 * features["vlm.states"].abs().max().item()


def test_auto_compression_only_where_it_pays() -> None:
    zeros = {"target_latent": torch.zeros(4, 16, 16)}
    noise = {"target_latent": torch.randn(4, 16, 16)}
    assert pack(zeros, "auto")[0] == ZLIB_MEMBER and pack(noise, "auto")[0] == MEMBER
    assert pack(noise, "zlib")[0] == ZLIB_MEMBER and pack(zeros, "none")[0] == MEMBER
    member, data = pack(zeros, "auto")
    assert torch.equal(unpack({member: data})["target_latent"], zeros["target_latent"])


def test_a_mask_with_gaps_is_refused() -> None:
    features = online([3])
    features["vlm.mask"][0, 1] = False
    with pytest.raises(ValueError, match="not right-padded"):
        sample_features(features, 0, torch.float32)


def test_a_batch_mixing_caches_is_refused() -> None:
    rows = stored(online([2, 3]), torch.float32)
    del rows[1]["source_latent"]
    with pytest.raises(ValueError, match="different cached features"):
        collate_features(rows)


def test_mixing_a_cached_split_with_plain_shards_is_refused(tmp_path: Path) -> None:
    for name, extra in (("cached", {"features": {"fingerprint": "x"}}), ("plain", {})):
        (tmp_path / name).mkdir()
        (tmp_path / name / "index.json").write_text(json.dumps({"shards": [], "total": 0, **extra}))
    assert cache_of(str(tmp_path / "cached")) == {"fingerprint": "x"} and cache_of(str(tmp_path / "plain")) is None
    with pytest.raises(DataConfigError, match="mixes splits"):
        cache_of(f"{tmp_path / 'cached'}::{tmp_path / 'plain'}")
