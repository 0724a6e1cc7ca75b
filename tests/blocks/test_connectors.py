"""MLPConnector: DIM's mlp2x_gelu projector (parity check 1), ImgEdit-E1's SiLU projectors (parity check 13)
and their FLUX-Redux initialisation."""

from __future__ import annotations

from pathlib import Path

import huggingface_hub
import pytest
import torch
import torch.nn.functional as F
from diffusers import ReduxImageEncoder

from zoo.blocks.connectors import MLPConnector, VisionHead, cosine_embedding_loss, flux_projector, load_redux_projector
from zoo.blocks.pretrained import MissingPretrainedError


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


# --- ImgEdit-E1's projectors into FLUX (UniWorld-V1 denoise_projector / siglip_projector) -------


@pytest.mark.parametrize(("in_features", "expected"), [(3584, 94_388_224), (1152, 64_503_808)])
def test_imgedit_projectors_have_uniworlds_parameter_counts(in_features: int, expected: int) -> None:
    with torch.device("meta"):
        projector = flux_projector(in_features, 4096)
    count = sum(p.numel() for p in projector.parameters())
    print(f"flux_projector({in_features}, 4096): {count:,} parameters")
    assert count == expected
    assert [tuple(projector.net[i].weight.shape) for i in (0, 2)] == [(12288, in_features), (4096, 12288)]
    assert isinstance(projector.net[1], torch.nn.SiLU)


def tiny_redux(seed: int = 0) -> ReduxImageEncoder:
    torch.manual_seed(seed)
    return ReduxImageEncoder(redux_dim=6, txt_in_features=4).eval()


def test_siglip_projector_loads_flux_redux_from_a_pipeline_folder_or_a_file(tmp_path: Path) -> None:
    redux = tiny_redux()
    redux.save_pretrained(tmp_path / "redux" / "image_embedder")
    x = torch.randn(2, 5, 6)
    for source in (tmp_path / "redux", tmp_path / "redux" / "image_embedder", tmp_path / "redux" / "image_embedder" / "diffusion_pytorch_model.safetensors"):
        projector = flux_projector(6, 4)
        before = projector(x)
        load_redux_projector(projector, str(source))
        torch.testing.assert_close(projector(x), redux(x).image_embeds, rtol=0, atol=0)
        assert (projector(x) - before).abs().max() > 1e-3


def test_redux_loading_errors_name_the_problem(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))  # an empty hub cache
    with pytest.raises(MissingPretrainedError, match=r"hf download black-forest-labs/FLUX.1-Redux-dev --include 'image_embedder/\*'"):
        load_redux_projector(flux_projector(6, 4), str(tmp_path / "redux.safetensors"))
    with pytest.raises(MissingPretrainedError, match="no FLUX-Redux image embedder"):
        load_redux_projector(flux_projector(6, 4), str(tmp_path))
    with pytest.raises(MissingPretrainedError, match="not available offline"):
        load_redux_projector(flux_projector(6, 4))
    tiny_redux().save_pretrained(tmp_path / "embedder")
    with pytest.raises(ValueError, match=r"redux_up is \(12, 6\) but the projector's layer is \(15, 5\)"):
        load_redux_projector(flux_projector(5, 5), str(tmp_path / "embedder"))
    with pytest.raises(ValueError, match="activation='silu'"):
        load_redux_projector(MLPConnector(6, 4, hidden_features=12), str(tmp_path / "embedder"))
