"""ImgEditE1Module: ImgEdit-E1 (ImgEdit paper §3.3 and appendix A), composed from zoo blocks.

ImgEdit-E1's code and weights were never released (PKU-YuanGroup/ImgEdit#4, #5); the paper's text
and UniWorld-V1 (same group; its denoise tower is the closest public code) are the references:

- VLM (§3.3, "Qwen2.5-VL-7B as text and image encoder"): reads ``[source image, instruction]`` — or,
  for a later turn of a dialogue, the numbered dialogue (:func:`~zoo.blocks.dialogue.render_dialogue`)
  — frozen in both stages; its final-norm states over the user turn are the condition
  (:meth:`~zoo.blocks.mllm.VLMEncoder.condition`; UniWorld reads the same last hidden state over
  the whole prompt after stripping the system block, i.e. also the role header tokens).
- ``vlm_projector``: UniWorld's ``denoise_projector``, ``Linear(3584, 12288) → SiLU → Linear(12288,
  4096)`` (:class:`~zoo.blocks.connectors.MLPConnector`, 94,388,224 parameters), trained in both stages.
- SigLIP (stage 2, "provides low-level feature"): SigLIP2-so400m-patch16-512 ``last_hidden_state``
  (1024 tokens of 1152 at 512²) of the source as the denoiser sees it (the same crop as the
  target, so its patches line up with the output), through ``siglip_projector`` ``Linear(1152,
  12288) → SiLU → Linear(12288, 4096)`` (64,503,808 parameters), initialised from FLUX-Redux's
  ``image_embedder`` when ``redux`` names it (appendix A).
- Concatenation (``token_order``): ``"vlm_first"`` — the VLM tokens, then the SigLIP tokens, the
  paper's "concatenated, forming the text-branch input"; ``"vision_end"`` — UniWorld's splice, the
  SigLIP tokens inserted just before the VLM's ``<|vision_end|>``. Padding is masked out of FLUX's
  attention either way.
- Denoiser: FLUX.1-dev (:class:`~zoo.blocks.flux.FluxDenoiser`) reading that sequence as its
  ``encoder_hidden_states`` (text ids all zero, as the FLUX pipeline gives its T5 tokens, unless
  ``siglip_positions: grid`` places the SigLIP tokens on the image's patch grid); the
  pooled projection is CLIP-L's pooled output of the instruction from the FLUX pipeline's own
  ``text_encoder`` when ``pooled_text`` names it (what the frozen FLUX was trained with), else zeros.
- Objective: flow matching with target ``noise − x0`` and logit-normal timesteps (UniWorld), shifted
  (:class:`~zoo.blocks.objectives.FlowMatching`); FLUX.1-dev's dynamic shift at 512² (image sequence
  1024: mu = 0.63) is the static shift e^0.63 = 1.88, which the paper recipe sets.
- Guidance: FLUX.1-dev is guidance-distilled: no true CFG, the value ``guidance`` (3.5) goes into
  its guidance embedding, in training as diffusers' FLUX training scripts do and at sampling;
  28 flow-Euler steps by default (UniWorld eval).
- Stages (appendix A): ``stage=1`` trains ``vlm_projector`` only (FLUX frozen and kept out of the
  module tree); ``stage=2`` adds SigLIP and trains both projectors and FLUX's image branch, the
  parameters ``image_branch`` selects (:func:`~zoo.blocks.flux.select_parameters`; default the
  image stream of the double-stream blocks). Prodigy at lr 1.0 is the recipes' optimizer
  (``optim.optimizer``).
- Multi-turn (ImgEdit's content memory, content understanding, version backtracking): the base's
  multi-turn editing picks the version a turn edits; the dialogue text carries the rest.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from datamodules.samples import EditBatch
from zoo.blocks.autoencoders import CodecConfig, build_codec
from zoo.blocks.condition import Condition
from zoo.blocks.config import ConfigError
from zoo.blocks.connectors import MLPConnector, flux_projector, load_redux_projector
from zoo.blocks.dialogue import render_dialogue
from zoo.blocks.flux import FluxConfig, FluxDenoiser, FluxSelector, check_selector, grid_text_ids, set_trainable
from zoo.blocks.mllm import VLMConfig, VLMEncoder
from zoo.blocks.objectives import FlowMatching
from zoo.blocks.sd_text import SDTextEncoder
from zoo.blocks.vision import SigLIPEncoder
from zoo.modules.base import EditingModule, Optimization

VISION_END = "<|vision_end|>"


class ImgEditE1Module(EditingModule):
    """ImgEdit-E1: Qwen2.5-VL states + SigLIP features, each through a SiLU MLP, as FLUX's text branch.

    Args:
        mllm: the VLM (Qwen2.5-VL-7B), frozen.
        denoiser: FLUX.1-dev's transformer; its ``guidance`` (3.5) is the distilled guidance value
            fed in training and sampling.
        autoencoder: the codec (``kl`` with FLUX's scale 0.3611 and shift 0.1159; ``identity`` for toy runs).
        stage: 1 trains the VLM projector only; 2 adds SigLIP and trains both projectors and ``image_branch``.
        siglip: SigLIP encoder source for stage 2, ``{"pretrained": ...}`` or ``{"tiny": {...}}``.
        redux: FLUX-Redux checkpoint (folder of ``black-forest-labs/FLUX.1-Redux-dev`` or its
            ``image_embedder`` safetensors) whose ``redux_up``/``redux_down`` initialise the SigLIP
            projector when stage 2 starts (null: PyTorch's init).
        image_branch: the FLUX parameters stage 2 trains (see :func:`~zoo.blocks.flux.select_parameters`).
        token_order: ``vlm_first`` (VLM tokens, then SigLIP tokens) or ``vision_end`` (UniWorld's splice).
        siglip_positions: rotary text ids of the SigLIP tokens: ``none`` (zeros, as FLUX-Redux and
            UniWorld give them) or ``grid`` (each patch at the packed latent patches it covers,
            :func:`~zoo.blocks.flux.grid_text_ids`, as FLUX Kontext places reference-image tokens;
            ``vlm_first`` only). Not from the paper: the toy recipes use it (benchmarks/toy_learning.md).
        pooled_text: FLUX pipeline folder whose CLIP ``text_encoder``/``tokenizer`` give the pooled
            projection, ``{"pretrained": ...}`` or ``{"tiny": {...}}``; null: zeros.
        num_inference_steps: flow-Euler steps (UniWorld eval: 28).
        objective: flow matching settings (paper recipe: shift 1.88 for 512², flow_euler).
        cfg_dropout: probability of training a sample on the null condition (UniWorld default 0).
        output_size: side of generated images until a fit sets the DataModule's (null: 512).
        init_from: checkpoint whose trainable weights initialise this model (stage 2 from stage 1).
        optim: optimiser and schedule (paper: Prodigy, lr 1.0).
        eval_seed: seed of evaluation noise.
    """

    cache_config = ("mllm", "autoencoder", "siglip", "pooled_text", "stage")
    cached_encoders = ("mllm", "codec", "siglip", "pooled_text")

    def __init__(
        self,
        mllm: VLMConfig,
        denoiser: FluxConfig,
        autoencoder: CodecConfig,
        stage: Literal[1, 2] = 1,
        siglip: dict | None = None,
        redux: str | None = None,
        image_branch: FluxSelector = "double_image",
        token_order: Literal["vlm_first", "vision_end"] = "vlm_first",
        siglip_positions: Literal["none", "grid"] = "none",
        pooled_text: dict | None = None,
        num_inference_steps: int = 28,
        objective: FlowMatching | None = None,
        cfg_dropout: float = 0.0,
        output_size: int | None = None,
        init_from: str | None = None,
        optim: Optimization | None = None,
        eval_seed: int = 0,
    ) -> None:
        if stage not in (1, 2):
            raise ConfigError(f"stage must be 1 or 2, got {stage}")
        if stage == 2 and siglip is None:
            raise ConfigError("stage 2 adds the SigLIP encoder: give model.init_args.siglip ({pretrained: ...} or {tiny: {...}})")
        if stage == 1 and (siglip is not None or redux is not None):
            raise ConfigError("stage 1 trains the VLM projector alone: set siglip and redux to null (they join in stage 2)")
        check_selector(image_branch)
        if denoiser.config is not None and denoiser.seed is None:
            raise ConfigError(
                "a FLUX built from denoiser.config needs denoiser.seed: its frozen weights are not in checkpoints "
                "and must be rebuilt the same when one is loaded"
            )
        if token_order not in ("vlm_first", "vision_end"):
            raise ConfigError(f"token_order must be 'vlm_first' or 'vision_end', got '{token_order}'")
        if siglip_positions not in ("none", "grid"):
            raise ConfigError(f"siglip_positions must be 'none' or 'grid', got '{siglip_positions}'")
        if siglip_positions == "grid" and token_order != "vlm_first":
            raise ConfigError("siglip_positions 'grid' needs token_order 'vlm_first' (FLUX takes one set of text ids per batch)")
        super().__init__(
            optim=optim, eval_seed=eval_seed, guidance_scale=1.0, cfg_dropout=cfg_dropout, num_inference_steps=num_inference_steps
        )
        self.save_hyperparameters()
        self.stage = stage
        self.token_order = token_order
        self.siglip_positions = siglip_positions

        self.add_encoder("mllm", VLMEncoder(mllm))
        if token_order == "vision_end":
            self.vision_end_id = self.mllm.token_id(VISION_END)
        self.keep_frozen("codec", build_codec(autoencoder))
        flux = FluxDenoiser(denoiser)
        flux.requires_grad_(False)
        context_dim = flux.context_dim
        self.vlm_projector = flux_projector(self.mllm.hidden_size, context_dim)
        self.siglip_projector: MLPConnector | None = None
        if stage == 2:
            self.keep_frozen("siglip", SigLIPEncoder(**siglip))
            self.siglip_projector = flux_projector(self.siglip.feature_dim, context_dim)
            if redux is not None:
                load_redux_projector(self.siglip_projector, redux)
            set_trainable(flux, image_branch)
            self.denoiser = flux
        else:
            self.keep_frozen("denoiser", flux)
        if pooled_text is not None:
            self.keep_frozen("pooled_text", SDTextEncoder(**pooled_text))
        self.objective = objective or FlowMatching(sampler="flow_euler")
        self.resolution = output_size or 512
        self.mllm_resolution = self.mllm.image_size or self.resolution
        if init_from is not None:
            self.load_trainable(init_from)

    @property
    def size_multiple(self) -> int:
        return self.codec.downsample_factor * 2  # FLUX packs 2 x 2 latent patches

    # -- conditioning -----------------------------------------------------------------------

    def condition_text(self, batch: EditBatch) -> list[str]:
        """The instruction, or for a later dialogue turn the numbered dialogue (earlier turns first)."""
        return [render_dialogue(history, instruction) for history, instruction in zip(batch.history, batch.instruction)]

    def encode_condition(self, batch: EditBatch, losses: bool = False) -> Condition:
        """Projected VLM states (+ projected SigLIP patch features in stage 2) joined as FLUX's
        ``encoder_hidden_states``; FLUX's guidance value and pooled projection as added inputs."""
        self.check_edits(batch)
        features = self.features(batch)
        parts = [(self.vlm_projector(features["vlm.states"].to(self.dtype)), features["vlm.mask"])]
        if self.siglip_projector is not None:
            tokens = self.siglip_projector(features["siglip"].to(self.dtype))
            parts.append((tokens, torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)))
        context, context_mask = self._join(parts, features["vlm.ids"])
        added = {"pooled": features["pooled"].to(self.dtype)} if "pooled" in features else {}
        if self.siglip_positions == "grid" and self.siglip_projector is not None:
            added["text_ids"] = self._grid_ids(context.shape[1], len(batch), batch.size)
        return Condition(context=context, mask=context_mask, added=added)

    def check_edits(self, batch: EditBatch) -> None:
        """Raise unless every sample of ``batch`` is an edit with its source image."""
        if not all(batch.edits) or batch.source is None:
            t2i = [key for key, edit in zip(batch.key, batch.edits) if not edit]
            raise ValueError(f"ImgEdit-E1 edits images; samples {t2i[:3]} are text-to-image (no source image)")

    def frozen_features(self, batch: EditBatch) -> dict[str, Tensor]:
        """The frozen VLM's states and token ids over the user turn (``vlm.*``), in stage 2 SigLIP's
        patch features of the source (``siglip``), and CLIP-L's pooled text with ``pooled_text``."""
        self.check_edits(batch)
        texts = self.condition_text(batch)
        states, mask, ids = self.mllm.condition_and_ids(batch.mllm_images, texts)
        features = {"vlm.states": states, "vlm.mask": mask, "vlm.ids": ids}
        if self.stage == 2:
            features["siglip"] = self.siglip.image_features((batch.source.to(self.device) + 1) / 2)
        if "pooled_text" in self.frozen_parts:
            features["pooled"] = self.pooled_text.pooled(texts).to(self.device, self.dtype)
        return features

    def _join(self, parts: list[tuple[Tensor, Tensor]], ids: Tensor) -> tuple[Tensor, Tensor]:
        """The joined condition ``[B, L, D]`` and its mask: ``vlm_first`` puts every sample's VLM
        tokens (padded to the batch's longest) before the SigLIP tokens, so those sit at the same
        positions in every row; ``vision_end`` splices them in before ``<|vision_end|>`` and pads
        at the end. Padding is masked (and zeroed by the denoiser) either way."""
        vlm, vlm_mask = parts[0]
        if len(parts) == 1:
            return vlm, vlm_mask
        siglip, siglip_mask = parts[1]
        if self.token_order == "vlm_first":
            longest = int(vlm_mask.sum(1).max())
            return torch.cat([vlm[:, :longest], siglip], dim=1), torch.cat([vlm_mask[:, :longest], siglip_mask], dim=1)
        rows = []
        for b in range(len(ids)):
            real = vlm[b, vlm_mask[b]]
            at = (ids[b, vlm_mask[b]] == self.vision_end_id).nonzero()
            if len(at) == 0:
                raise ValueError("token_order 'vision_end' needs the VLM's <|vision_end|> in the condition (is the image there?)")
            split = int(at[0])
            rows.append(torch.cat([real[:split], siglip[b], real[split:]]))
        length = max(len(row) for row in rows)
        context = rows[0].new_zeros(len(rows), length, rows[0].shape[-1])
        mask = torch.zeros(len(rows), length, dtype=torch.bool, device=context.device)
        for b, row in enumerate(rows):
            context[b, : len(row)], mask[b, : len(row)] = row, True
        return context, mask

    def _grid_ids(self, length: int, batch: int, size: tuple[int, int]) -> Tensor:
        """Text ids ``[B, L, 3]``: zeros for the VLM tokens, :func:`grid_text_ids` for the trailing SigLIP tokens."""
        tokens = self.siglip.num_tokens
        factor = self.codec.downsample_factor
        grid = grid_text_ids(int(round(tokens**0.5)), size[0] // factor, size[1] // factor).to(self.device)
        ids = torch.zeros(length, 3, device=self.device)
        ids[length - tokens :] = grid
        return ids.expand(batch, -1, -1)

    def null_condition(self, condition: Condition) -> Condition:
        """Zero tokens under the same mask and a zero pooled projection (training dropout only:
        guidance-distilled FLUX samples without a negative branch)."""
        added = {name: torch.zeros_like(value) for name, value in condition.added.items()}
        return condition.replace(context=torch.zeros_like(condition.context), added=added, losses={})

    def guidance_branches(self, condition: Condition, null: Condition) -> Condition:
        """One branch: the guidance value rides in FLUX's guidance embedding (no true CFG)."""
        return condition

    def guide(self, latents: Tensor, timestep: Tensor, branches: Condition) -> Tensor:
        return self.denoise(latents, timestep, branches)
