"""Tiny DIM components (the same ones recipes/tiny/dim.yaml builds) and fixed toy batches."""

from __future__ import annotations

from typing import Any

import pytest

from datamodules.samples import EditBatch, collate
from datamodules.toy import edit_sample
from zoo.blocks.autoencoders import CodecConfig
from zoo.blocks.denoisers import SanaConfig
from zoo.blocks.mllm import TinyVLMConfig, VLMConfig

TINY_MLLM = VLMConfig(tiny=TinyVLMConfig(seed=0, hidden_size=32, num_layers=1), max_condition_length=96, image_size=16)
TINY_SANA = SanaConfig(
    config={
        "in_channels": 3,
        "out_channels": 3,
        "sample_size": 16,
        "patch_size": 2,
        "num_layers": 1,
        "num_attention_heads": 2,
        "attention_head_dim": 16,
        "num_cross_attention_heads": 2,
        "cross_attention_head_dim": 16,
        "cross_attention_dim": 32,
        "caption_channels": 32,
    },
    subfolder=None,
)
PIXELS = CodecConfig("identity")


def tiny_dim_kwargs(**overrides: Any) -> dict[str, Any]:
    """Keyword arguments of a tiny pixel-space DIMModule."""
    return {"mllm": TINY_MLLM, "denoiser": TINY_SANA, "autoencoder": PIXELS, "num_inference_steps": 4} | overrides


def toy_batch(size: int = 4, resolution: int = 16, split: str = "train") -> EditBatch:
    """A collated batch of the first ``size`` toy edits."""
    samples = [edit_sample(0, split, i, resolution)[0] for i in range(size)]
    return collate(samples, resolution, resolution)


@pytest.fixture
def batch() -> EditBatch:
    return toy_batch()
