"""Pixel similarity metrics on known image pairs."""

from __future__ import annotations

import math

import pytest
import torch

from callbacks.similarity import pair_metrics


def test_identical_images() -> None:
    image = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0))
    metrics = pair_metrics(image, image)
    assert math.isinf(metrics["psnr"]) and metrics["ssim"] == pytest.approx(1.0) and metrics["l1"] == 0.0


def test_known_pair() -> None:
    black, grey = torch.zeros(3, 16, 16), torch.full((3, 16, 16), 0.1)
    metrics = pair_metrics(grey, black)
    assert metrics["psnr"] == pytest.approx(20.0)  # 10 log10(1 / 0.01)
    assert metrics["l1"] == pytest.approx(0.1)
    assert metrics["ssim"] < 1.0
    with pytest.raises(ValueError, match="differ in shape"):
        pair_metrics(black, torch.zeros(3, 8, 8))
