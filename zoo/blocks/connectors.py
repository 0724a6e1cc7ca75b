"""Connectors: project MLLM hidden states into a denoiser's context space.

``MLPConnector`` is DIM's ``mlp2x_gelu`` projector (official ``build_projector(2048, 2304,
'mlp2x_gelu')`` = ``Sequential(Linear, GELU, Linear)``, exact GELU, no norm, PyTorch default init;
10,031,616 parameters at paper size). With ``activation="silu"`` it is ImgEdit-E1's two projectors
into FLUX's text branch (:func:`flux_projector`), the SigLIP one initialisable from FLUX-Redux
(:func:`load_redux_projector`). ``VisionHead`` is MIND-Edit's F_v.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import ReduxImageEncoder
from safetensors.torch import load_file
from torch import Tensor, nn

from zoo.blocks.pretrained import MissingPretrainedError, resolve_pretrained

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


FLUX_REDUX = "black-forest-labs/FLUX.1-Redux-dev"
"""The FLUX-Redux release whose ``image_embedder`` initialises ImgEdit-E1's SigLIP projector."""


def flux_projector(in_features: int, out_features: int = 4096) -> MLPConnector:
    """ImgEdit-E1's projector into FLUX's text branch: ``Linear(in, 3 * out) -> SiLU -> Linear(3 * out, out)``.

    UniWorld-V1's ``denoise_projector`` (Qwen2.5-VL-7B: ``in_features=3584``, 94,388,224 parameters)
    and ``siglip_projector`` (SigLIP2-so400m: ``in_features=1152``, 64,503,808 parameters; the shape
    of FLUX-Redux's ``ReduxImageEncoder``), ``out_features`` = FLUX's ``joint_attention_dim`` (4096).
    """
    return MLPConnector(in_features, out_features, hidden_features=3 * out_features, activation="silu")


def load_redux_projector(projector: MLPConnector, source: str = FLUX_REDUX) -> None:
    """Copy FLUX-Redux's ``redux_up`` / ``redux_down`` into ``projector`` (ImgEdit-E1 App. A.4: the
    SigLIP MLP "is initialized from the pretrained Flux-Redux model").

    ``source``: a ``.safetensors`` file of the ``image_embedder``, a folder of diffusers'
    ``ReduxImageEncoder`` (``config.json`` + weights), or a FLUX-Redux pipeline folder / cached hub
    id holding one in ``image_embedder/``.

    Raises:
        MissingPretrainedError: the weights are not there (one line naming what to download).
        ValueError: the projector is not a SiLU MLP of Redux's shapes.
    """
    if not isinstance(projector.net[1], nn.SiLU):
        raise ValueError("FLUX-Redux's image embedder is a SiLU MLP: build the projector with activation='silu'")
    state = _redux_state(source)
    up, down = projector.net[0], projector.net[2]
    for name, layer in (("redux_up", up), ("redux_down", down)):
        if tuple(state[f"{name}.weight"].shape) != tuple(layer.weight.shape):
            raise ValueError(
                f"FLUX-Redux's {name} is {tuple(state[f'{name}.weight'].shape)} but the projector's layer is "
                f"{tuple(layer.weight.shape)} (out, in): build it as flux_projector(1152, 4096)"
            )
    with torch.no_grad():
        for name, layer in (("redux_up", up), ("redux_down", down)):
            layer.weight.copy_(state[f"{name}.weight"])
            layer.bias.copy_(state[f"{name}.bias"])


def _redux_state(source: str) -> dict[str, Tensor]:
    path = Path(source).expanduser()
    if path.suffix == ".safetensors":
        if not path.is_file():
            raise MissingPretrainedError(
                f"FLUX-Redux weights {path} not found: download {FLUX_REDUX}'s image_embedder once "
                f"(`hf download {FLUX_REDUX} --include 'image_embedder/*'`) and point to it"
            )
        state = load_file(str(path))
        missing = sorted({"redux_up.weight", "redux_up.bias", "redux_down.weight", "redux_down.bias"} - set(state))
        if missing:
            raise ValueError(f"{path} is not a FLUX-Redux image embedder: it lacks {missing}")
        return state
    folder = Path(resolve_pretrained(source))
    subfolder = "image_embedder" if (folder / "image_embedder").is_dir() else None
    if subfolder is None and not (folder / "config.json").is_file():
        raise MissingPretrainedError(
            f"{source} holds no FLUX-Redux image embedder (no image_embedder/ or config.json in {folder}): "
            f"download it once with `hf download {FLUX_REDUX} --include 'image_embedder/*'`"
        )
    return ReduxImageEncoder.from_pretrained(folder, subfolder=subfolder).state_dict()


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
