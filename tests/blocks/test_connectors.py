"""MLPConnector: DIM's mlp2x_gelu projector (parity check 1) and the SiLU variant."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from zoo.blocks.connectors import MLPConnector, VisionHead, cosine_embedding_loss


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


def test_vision_head_outputs_the_embedding_size_from_the_masked_mean() -> None:
    torch.manual_seed(0)
    head = VisionHead(in_features=16, out_features=1024, hidden_features=32)
    states = torch.randn(2, 5, 16)
    mask = torch.tensor([[True, True, False, False, False], [True] * 5])
    out = head(states, mask)
    assert out.shape == (2, 1024)
    # Padding is ignored: changing the masked-out tokens changes nothing, the mean feeds the MLP.
    changed = states.clone()
    changed[0, 2:] = 100.0
    torch.testing.assert_close(head(changed, mask), out)
    torch.testing.assert_close(out[0], head.mlp(states[0, :2].mean(dim=0)))
    with pytest.raises(ValueError, match="empty mask"):
        head(states, torch.zeros(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="must match"):
        head(states, mask[:, :3])


def test_cosine_embedding_loss_is_one_minus_cos_on_known_vectors() -> None:
    target = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [3.0, 4.0]])
    predicted = torch.tensor([[2.0, 0.0], [0.0, 5.0], [-1.0, 0.0], [4.0, 3.0]])
    # 1 - cos per row: 0 (same direction, other norm), 1 (orthogonal), 2 (opposite), 1 - 24/25.
    expected = torch.tensor([0.0, 1.0, 2.0, 1 - 24 / 25]).mean()
    torch.testing.assert_close(cosine_embedding_loss(predicted, target), expected)
    with pytest.raises(ValueError, match=r"must both be \[B, D\]"):
        cosine_embedding_loss(predicted, target[:2])
