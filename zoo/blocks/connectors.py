"""Connectors: project MLLM hidden states into a denoiser's context space.

``MLPConnector`` is DIM's ``mlp2x_gelu`` projector (official ``build_projector(2048, 2304,
'mlp2x_gelu')`` = ``Sequential(Linear, GELU, Linear)``, exact GELU, no norm, PyTorch default init;
10,031,616 parameters at paper size). With ``activation="silu"`` it is the shape of ImgEdit-E1's
(UniWorld) denoise / SigLIP projectors.
"""

from __future__ import annotations

from torch import Tensor, nn

_ACTIVATIONS: dict[str, type[nn.Module]] = {"gelu": nn.GELU, "silu": nn.SiLU}


class MLPConnector(nn.Module):
    """``Linear(in, hidden) -> activation -> Linear(hidden, out)`` applied to the last dimension.

    Args:
        in_features: width of the MLLM hidden states (DIM: 2048, Qwen2.5-VL-3B).
        out_features: width of the denoiser's caption input (DIM: 2304, SANA ``caption_channels``).
        hidden_features: inner width; ``None`` means ``out_features`` (as in ``mlp2x_gelu``).
        activation: ``"gelu"`` (exact, DIM) or ``"silu"`` (ImgEdit-E1).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        hidden_features: int | None = None,
        activation: str = "gelu",
    ) -> None:
        super().__init__()
        if activation not in _ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(_ACTIVATIONS)}, got '{activation}'")
        hidden = out_features if hidden_features is None else hidden_features
        self.net = nn.Sequential(
            nn.Linear(in_features, hidden),
            _ACTIVATIONS[activation](),
            nn.Linear(hidden, out_features),
        )

    def forward(self, hidden_states: Tensor) -> Tensor:
        """Project ``[..., in_features]`` to ``[..., out_features]``."""
        return self.net(hidden_states)
