"""Connectors: project MLLM hidden states into a denoiser's context space.

``MLPConnector`` is DIM's ``mlp2x_gelu`` projector (official ``build_projector(2048, 2304,
'mlp2x_gelu')`` = ``Sequential(Linear, GELU, Linear)``, exact GELU, no norm, PyTorch default init;
10,031,616 parameters at paper size). With ``activation="silu"`` it is the shape of ImgEdit-E1's
(UniWorld) denoise / SigLIP projectors. ``VisionHead`` is MIND-Edit's F_v.
"""

from __future__ import annotations

import torch
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


class VisionHead(nn.Module):
    """MIND-Edit's vision head F_v (paper §3.3, Eq. 4-5): MLLM states of one layer -> one image embedding.

    The paper gives F_v's input (the 21st hidden layer's states) and its output (a vector shaped
    like the CLIP image embedding IP-Adapter consumes, 1024 for SD1.5's ViT-H/14) but not how the
    token sequence becomes one vector; we take the masked mean over the given tokens (the user
    turn: source image + instruction), then ``mlp2x_gelu`` (:class:`MLPConnector`) to the
    embedding size. The mean weighs every token alike, whatever the length of the instruction.

    Args:
        in_features: width of the MLLM states (LLaVA-OneVision-7B: 3584).
        out_features: CLIP image-embedding width (IP-Adapter SD1.5: 1024).
        hidden_features: inner width of the MLP; ``None`` means ``out_features``.
    """

    def __init__(self, in_features: int, out_features: int, hidden_features: int | None = None) -> None:
        super().__init__()
        self.mlp = MLPConnector(in_features, out_features, hidden_features)

    def forward(self, states: Tensor, mask: Tensor) -> Tensor:
        """``[B, L, in_features]`` states and a ``[B, L]`` bool mask of the tokens to read -> ``[B, out_features]``."""
        if states.shape[:2] != mask.shape:
            raise ValueError(f"mask {tuple(mask.shape)} must match the states' [B, L] {tuple(states.shape[:2])}")
        counts = mask.sum(dim=1, keepdim=True)
        if (counts == 0).any():
            raise ValueError("every sample needs at least one token for the vision head (an empty mask)")
        weights = mask.to(states.dtype).unsqueeze(-1)
        pooled = (states * weights).sum(dim=1) / counts.to(states.dtype)
        return self.mlp(pooled)


def cosine_embedding_loss(predicted: Tensor, target: Tensor) -> Tensor:
    """MIND-Edit's ``l_embed = 1 - cos(v_insight, E_CLIP(I_gt))`` (Eq. 5), averaged over the batch (float32)."""
    if predicted.shape != target.shape or predicted.ndim != 2:
        raise ValueError(f"predicted {tuple(predicted.shape)} and target {tuple(target.shape)} must both be [B, D]")
    return (1 - torch.nn.functional.cosine_similarity(predicted.float(), target.float(), dim=-1)).mean()
