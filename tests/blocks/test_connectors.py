"""MLPConnector: DIM's mlp2x_gelu projector (parity check 1) and the SiLU variant."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from zoo.blocks.connectors import MLPConnector


def test_dim_paper_size_has_the_official_parameter_count() -> None:
    connector = MLPConnector(2048, 2304)
    # 2048*2304 + 2304 + 2304*2304 + 2304 (showlab/DIM@28e644f:models/multimodal/multimodal_projector/builder.py:34-41).
    assert sum(p.numel() for p in connector.parameters()) == 10_031_616


@pytest.mark.parametrize(("activation", "act"), [("gelu", F.gelu), ("silu", F.silu)])
def test_output_is_linear_activation_linear(activation: str, act: object) -> None:
    torch.manual_seed(0)
    connector = MLPConnector(6, 5, hidden_features=7, activation=activation)
    x = torch.randn(2, 3, 6)
    first, last = connector.net[0], connector.net[2]
    assert first.weight.shape == (7, 6) and last.weight.shape == (5, 7)
    expected = F.linear(act(F.linear(x, first.weight, first.bias)), last.weight, last.bias)
    torch.testing.assert_close(connector(x), expected)


def test_gelu_is_exact_not_tanh() -> None:
    torch.manual_seed(0)
    connector = MLPConnector(4, 4)
    x = 3 * torch.randn(64, 4)
    hidden = connector.net[0](x)
    exact = connector.net[2](F.gelu(hidden))
    tanh = connector.net[2](F.gelu(hidden, approximate="tanh"))
    torch.testing.assert_close(connector(x), exact)
    assert not torch.allclose(connector(x), tanh)


def test_hidden_defaults_to_output_width() -> None:
    assert MLPConnector(3, 9).net[0].out_features == 9


def test_unknown_activation_is_rejected() -> None:
    with pytest.raises(ValueError, match="activation must be one of"):
        MLPConnector(4, 4, activation="relu")
