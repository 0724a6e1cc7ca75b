"""GoTModule: Generation Chain-of-Thought (GoT-6B), composed from zoo blocks.

Map to the paper (``../shared/papers/got-generation-chain-of-thought.txt``) and the official
inference code facts (``official-code-facts.md`` §3A; the training code was never released, §3B):

- Reasoning (§4, §5.1): Qwen2.5-VL-3B with peft LoRA (r=32, alpha=32, dropout 0.05; embeddings, LM
  head and RMSNorms trained in full) and GoT's 66 generation tokens writes the chain for the T2I
  or edit prompt (:meth:`~zoo.blocks.mllm.QwenVLEncoder.generate_chain`, bounded by
  ``max_chain_tokens``); a second forward over prompt + chain + ``<|im_gen_start|>`` + 64
  placeholders gives the semantic guidance ``c_T`` (their last hidden states).
- Projectors (``agent_got.yaml``): Linear 2048 → 2048 (UNet context) and Linear 2048 → 1280
  mean-pooled over the 64 tokens (SDXL ``text_embeds``); the null context is the projector of
  zeros (official ``output_projector(zeros)``).
- SSGM (§5.2): each box of the chain drawn in its colour on its own black canvas, VAE-encoded
  (unscaled posterior mode) and averaged = spatial guidance ``c_S`` (no box: an encoded black
  canvas); reference ``c_R`` = unscaled latent of the source, a black image for T2I. SDXL's UNet
  reads ``[x_t | c_R | c_S]`` through a 12-channel ``conv_in`` (:class:`~zoo.blocks.denoisers.UNetDenoiser`).
- Tasks: pretraining mixes T2I (LAHR-GoT, JourneyDB-GoT) and editing (OmniEdit-GoT) samples, so a
  batch may hold both (``batch["task"]``): each sample gets its own prompt template, MLLM image (none
  for T2I) and reference, exactly as it would alone.
- Multi-guidance (§5.3): ``ε = ε_u + g(ε_text − ε_img) + c(ε_cond − ε_text) + i(ε_img − ε_u)``
  (:func:`~zoo.blocks.guidance.got_cfg`) over the branches of
  :func:`~zoo.blocks.guidance.got_cfg_batch`; DDPM sampling with SDXL's schedule (official 50 steps,
  g=7.5, c=4.0, i=1.0).
- Training (§5.3, §5.4, supplementary §8): loss = w_ce · CE(chain tokens) + w_mse · ε-MSE, equal
  weights; noise offset 0.1; each partially-conditioned combination of (context, reference, mask)
  sampled with probability 5%, the full one otherwise; LoRA + projectors + UNet trainable, VAE
  frozen.
- Interactive generation (§6.2): :meth:`GoTModule.generate` / :meth:`GoTModule.edit` take a chain the
  user edited (e.g. :func:`~zoo.blocks.spatial.replace_box`) and skip reasoning.
- Released weights: ``official_weights`` loads HF ``LucasFang/GoT-6B`` (:mod:`zoo.modules.got_official`).

One deliberate difference: the official sampler feeds the generated pooled embedding to the
null-context branches too, leaking the text into the "unconditional" prediction; by default
(``null_pooled=True``) those branches, and dropped contexts in training, get the pooled projection
of the null context. ``null_pooled=False`` restores the official behaviour.
"""

from __future__ import annotations

import logging
from itertools import product
from typing import Any, Literal

import torch
from PIL import Image
from torch import Tensor, nn
from torchvision.transforms.functional import pil_to_tensor, resize, to_pil_image

from datamodules.samples import edit_rows
from zoo.blocks.autoencoders import KLAutoencoder
from zoo.blocks.denoisers import UNetDenoiser, sdxl_time_ids
from zoo.blocks.guidance import got_cfg, got_cfg_batch
from zoo.blocks.mllm import Images, QwenVLEncoder
from zoo.blocks.objectives import EpsilonDiffusion
from zoo.blocks.sampling import sample
from zoo.blocks.spatial import Box, parse_boxes, render_box_canvases
from zoo.modules.base import EditingModule, Optimization
from zoo.modules.got_official import load_official_got

log = logging.getLogger(__name__)

# Kept conditions (context, reference, mask) of the partially-conditioned training combinations.
_ALL_PARTIAL = tuple(kept for kept in product((True, False), repeat=3) if not all(kept))
# Only those the sampler queries: text (no mask), image (reference only), unconditional.
_CFG_PARTIAL = ((True, True, False), (False, True, False), (False, False, False))


class GoTModule(EditingModule):
    """GoT: LoRA Qwen2.5-VL reasoning chain → projectors → SDXL UNet with the SSGM, T2I and editing.

    Args:
        mllm: keyword arguments of :class:`~zoo.blocks.mllm.QwenVLEncoder` (``pretrained`` or
            ``tiny``, ``image_size`` = 448 for GoT's 256 visual tokens, ``torch_dtype``, ``lora``);
            ``lora`` defaults to ``{}`` (GoT's config) and ``got_image_tokens`` to 64.
        denoiser: keyword arguments of :class:`~zoo.blocks.denoisers.UNetDenoiser` (``pretrained``
            or ``config``); ``condition_channels`` is set here to 2 × the VAE's latent channels.
        autoencoder: keyword arguments of :class:`~zoo.blocks.autoencoders.KLAutoencoder`.
        ce_weight: weight of the chain's next-token cross-entropy (paper: 1).
        diffusion_weight: weight of the ε-MSE (paper: 1).
        condition_dropout: probability of each partially-conditioned combination in training
            (paper: 0.05).
        drop_combinations: ``"all"``: the 7 combinations of keeping/dropping context, reference
            and mask other than the full one (paper: "conditioning combinations"); ``"cfg"``: only
            the 3 the sampler uses (text, image, unconditional).
        noise_offset: Guttenberg noise offset of the ε target (paper: 0.1).
        null_pooled: null-context branches get the null pooled embedding (see module docstring);
            ``False`` = official inference, generated pooled embedding everywhere.
        guidance_scale: ``g``, text guidance (official 7.5).
        cond_guidance_scale: ``c``, spatial (mask) guidance (official 4.0).
        image_guidance_scale: ``i``, reference-image guidance (official 1.0).
        num_inference_steps: DDPM steps (official 50).
        max_chain_tokens: bound of chain generation (official ``max_new_tokens=1024``).
        resolution: default output side in pixels; ``None`` = UNet ``sample_size`` × VAE factor
            (SDXL: 1024).
        init_from: checkpoint whose trainable weights initialise this model (finetune from pretrain).
        official_weights: the released GoT-6B checkpoint (file or folder of HF ``LucasFang/GoT-6B``)
            loaded over the built model (:mod:`zoo.modules.got_official`); not with ``init_from``.
        optim: optimiser and schedule.
        eval_seed: seed of evaluation noise.
    """

    def __init__(
        self,
        mllm: dict[str, Any],
        denoiser: dict[str, Any],
        autoencoder: dict[str, Any],
        ce_weight: float = 1.0,
        diffusion_weight: float = 1.0,
        condition_dropout: float = 0.05,
        drop_combinations: Literal["all", "cfg"] = "all",
        noise_offset: float = 0.1,
        null_pooled: bool = True,
        guidance_scale: float = 7.5,
        cond_guidance_scale: float = 4.0,
        image_guidance_scale: float = 1.0,
        num_inference_steps: int = 50,
        max_chain_tokens: int = 1024,
        resolution: int | None = None,
        init_from: str | None = None,
        official_weights: str | None = None,
        optim: Optimization | None = None,
        eval_seed: int = 0,
    ) -> None:
        super().__init__(optim=optim, eval_seed=eval_seed)
        self.save_hyperparameters()
        if ce_weight < 0 or diffusion_weight < 0 or ce_weight + diffusion_weight == 0:
            raise ValueError(f"loss weights must be >= 0 and not both 0, got ce={ce_weight}, diffusion={diffusion_weight}")
        self.combinations = _ALL_PARTIAL if drop_combinations == "all" else _CFG_PARTIAL
        if not 0.0 <= condition_dropout * len(self.combinations) <= 1.0:
            raise ValueError(
                f"condition_dropout={condition_dropout} for {len(self.combinations)} combinations "
                f"({drop_combinations!r}) exceeds probability 1; use at most {1 / len(self.combinations):.4f}"
            )
        if max_chain_tokens < 1 or num_inference_steps < 1:
            raise ValueError(f"need max_chain_tokens >= 1 and num_inference_steps >= 1, got {max_chain_tokens}, {num_inference_steps}")
        self.ce_weight, self.diffusion_weight = ce_weight, diffusion_weight
        self.condition_dropout = condition_dropout
        self.null_pooled = null_pooled
        self.guidance = (guidance_scale, cond_guidance_scale, image_guidance_scale)
        self.num_inference_steps = num_inference_steps
        self.max_chain_tokens = max_chain_tokens

        self.mllm = QwenVLEncoder(**{"lora": {}, "got_image_tokens": 64, **mllm})
        self.codec = KLAutoencoder(**autoencoder)
        latent = self.codec.latent_channels
        self.denoiser = UNetDenoiser(**denoiser, condition_channels=2 * latent)
        if not self.denoiser.needs_added_conditions:
            raise ValueError("GoT's UNet is SDXL-style: its config needs addition_embed_type='text_time' (pooled + time ids)")
        unet = self.denoiser.model.config
        pooled_dim = unet.projection_class_embeddings_input_dim - 6 * unet.addition_time_embed_dim
        width = self.mllm.hidden_size
        self.context_projector = nn.Linear(width, self.denoiser.context_dim)
        self.pooled_projector = nn.Linear(width, pooled_dim)
        self.objective = EpsilonDiffusion(noise_offset=noise_offset)
        self.resolution = resolution or self.denoiser.sample_size * self.codec.downsample_factor
        self._check_side(self.resolution)
        if init_from is not None and official_weights is not None:
            raise ValueError("give init_from (a zoo checkpoint) or official_weights (GoT-6B), not both")
        if init_from is not None:
            self.load_trainable(init_from)
        if official_weights is not None:
            load_official_got(self, official_weights)

    # -- conditioning -----------------------------------------------------------------------

    def _check_side(self, side: int) -> None:
        # Latent sides must survive every UNet downsampling.
        multiple = self.codec.downsample_factor * 2 ** (len(self.denoiser.model.config.block_out_channels) - 1)
        if side < 1 or side % multiple:
            raise ValueError(f"image side {side} must be a positive multiple of {multiple} for this VAE + UNet")

    @staticmethod
    def _mllm_images(batch: dict[str, Any]) -> Images:
        """Per sample, the source for the MLLM (edit prompt) or None (T2I: caption prompt, no image)."""
        edits = edit_rows(batch)
        if not any(edits):
            return None
        if "mllm_image" not in batch:
            raise KeyError("an edit sample needs batch['mllm_image'] (the source in [0, 1] for the MLLM)")
        return [image if edit else None for image, edit in zip(batch["mllm_image"], edits)]

    def project(self, states: Tensor) -> tuple[Tensor, Tensor]:
        """``(context [B, 64, Dc], pooled [B, P])`` from the image-token states (pooled = mean of projections)."""
        states = states.to(self.dtype)
        return self.context_projector(states), self.pooled_projector(states).mean(dim=1)

    def null_condition(self, states: Tensor) -> tuple[Tensor, Tensor]:
        """Null ``(context, pooled)`` of batch 1: the projectors of zero states (official null context)."""
        return self.project(torch.zeros_like(states[:1]))

    def reference_latent(self, batch: dict[str, Any], height: int, width: int) -> Tensor:
        """Unscaled latent of each edit's source image; of a black image for T2I samples (official)."""
        edits = edit_rows(batch)
        source = -torch.ones(len(edits), 3, height, width, device=self.device, dtype=self.dtype)
        if any(edits):
            if "source" not in batch:
                raise KeyError("an edit sample needs batch['source'] (the image to edit, in [-1, 1])")
            rows = torch.tensor(edits, device=self.device)
            source[rows] = batch["source"].to(self.device, self.dtype)[rows]
        return self.codec.encode_unscaled(source)

    def mask_latent(self, chains: list[str], height: int, width: int) -> Tensor:
        """SSGM spatial guidance ``[B, C, h, w]``: mean unscaled latent of each chain's box canvases."""
        boxes = [parse_boxes(chain).boxes for chain in chains]
        return self._canvas_latents(boxes, height, width)

    def _canvas_latents(self, boxes: list[tuple[Box, ...]], height: int, width: int) -> Tensor:
        canvases = [render_box_canvases(b, height, width) for b in boxes]
        pixels = torch.stack([pil_to_tensor(c) for group in canvases for c in group])
        latents = self.codec.encode_unscaled((pixels.float() / 127.5 - 1).to(self.device, self.dtype))
        return torch.stack([part.mean(dim=0) for part in latents.split([len(g) for g in canvases])])

    def condition_keep(self, batch_size: int) -> Tensor:
        """``[B, 3]`` bool: which of (context, reference, mask) each sample keeps (all outside training)."""
        keep = torch.ones(batch_size, 3, dtype=torch.bool)
        if self.training and self.condition_dropout > 0:
            slot = (torch.rand(batch_size) / self.condition_dropout).long()
            for b in (slot < len(self.combinations)).nonzero().flatten().tolist():
                keep[b] = torch.tensor(self.combinations[slot[b]])
        return keep.to(self.device)

    def _unet(self, latents: Tensor, timestep: Tensor, context: Tensor, condition: Tensor, pooled: Tensor, size: tuple[int, int]) -> Tensor:
        mask = torch.ones(context.shape[:2], dtype=torch.bool, device=context.device)
        added = {"text_embeds": pooled, "time_ids": sdxl_time_ids(*size).to(latents.device)}
        return self.denoiser(latents, timestep, context, mask, condition, added)

    # -- training ---------------------------------------------------------------------------

    def training_loss(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """Joint objective: chain next-token CE + ε-MSE of the SSGM UNet (paper §5.4)."""
        chains = list(batch["chain"])
        missing = [key for key, chain in zip(batch["key"], chains) if not chain]
        if missing:
            raise ValueError(f"GoT trains on reasoning chains; samples {missing[:3]} have none (batch['chain'] is empty)")
        if "target" not in batch:
            raise KeyError("training needs batch['target'] (the image to generate)")
        target = batch["target"].to(self.dtype)
        height, width = target.shape[-2:]
        ce, states = self.mllm.chain_loss_and_states(self._mllm_images(batch), list(batch["instruction"]), chains)
        context, pooled = self.project(states)
        reference = self.reference_latent(batch, height, width)
        spatial = self.mask_latent(chains, height, width)

        keep = self.condition_keep(len(chains))
        null_context, null_pooled = self.null_condition(states)
        use_context = keep[:, 0].view(-1, 1, 1)
        context = torch.where(use_context, context, null_context)
        if self.null_pooled:
            pooled = torch.where(keep[:, :1], pooled, null_pooled)
        reference = reference * keep[:, 1].view(-1, 1, 1, 1).to(reference.dtype)
        spatial = spatial * keep[:, 2].view(-1, 1, 1, 1).to(spatial.dtype)

        x0 = self.codec.encode(target)
        noise = self.objective.sample_noise(x0)
        t = self.objective.sample_timesteps(x0.shape[0], device=x0.device)
        x_t, _, model_t = self.objective.add_noise(x0, noise, t)
        pred = self._unet(x_t, model_t, context, torch.cat([reference, spatial], dim=1), pooled, (height, width))
        mse = self.objective.loss(pred, self.objective.target(x0, noise, t))
        loss = self.ce_weight * ce + self.diffusion_weight * mse
        return {"loss": loss, "chain_ce": ce.detach(), "diffusion_mse": mse.detach()}

    # -- inference --------------------------------------------------------------------------

    @torch.no_grad()
    def reason(self, batch: dict[str, Any]) -> list[str]:
        """The model's reasoning chain per sample (bounded by ``max_chain_tokens``)."""
        return self.mllm.generate_chain(self._mllm_images(batch), list(batch["instruction"]), self.max_chain_tokens)

    @torch.no_grad()
    def synthesize(self, batch: dict[str, Any], chains: list[str], generator: torch.Generator | None = None) -> Tensor:
        """Images in [-1, 1] for ``chains`` with the 4-branch multi-guidance, ``[B, 3, H, W]``."""
        height, width = self._output_size(batch)
        states = self.mllm.image_token_states(self._mllm_images(batch), list(batch["instruction"]), chains)
        context, pooled = self.project(states)
        null_context, null_pooled = self.null_condition(states)
        reference = self.reference_latent(batch, height, width)
        spatial = self.mask_latent(chains, height, width)
        factor = self.codec.downsample_factor
        shape = (len(chains), self.codec.latent_channels, height // factor, width // factor)
        noise = torch.randn(shape, generator=generator).to(self.device, self.dtype)
        g, c, i = self.guidance

        def predict(x_t: Tensor, timestep: Tensor) -> Tensor:
            branches = got_cfg_batch(
                x_t, context, null_context, reference, spatial, pooled, null_pooled if self.null_pooled else None
            )
            eps = self._unet(
                branches.latents, timestep.repeat(4), branches.context, branches.condition, branches.pooled, (height, width)
            )
            return got_cfg(*eps.chunk(4), g, c, i)

        latents = sample(predict, noise, self.objective.sampling_scheduler(), self.num_inference_steps, generator=generator)
        return self.codec.decode(latents).clamp(-1, 1)

    def edit_with_text(self, batch: dict[str, Any], generator: torch.Generator | None = None) -> tuple[Tensor, list[str]]:
        """Images and the reasoning chains that produced them (GoT's text is its chain)."""
        chains = self.reason(batch)
        invalid = sum(len(parse_boxes(chain).invalid) for chain in chains)
        if invalid:
            log.warning("generated chains hold %d boxes that cannot be drawn; they are left out of the mask", invalid)
        return self.synthesize(batch, chains, generator), chains

    def edit_batch(self, batch: dict[str, Any], generator: torch.Generator | None = None) -> Tensor:
        """Reason, then synthesise (see :meth:`edit_with_text`)."""
        return self.edit_with_text(batch, generator)[0]

    def _output_size(self, batch: dict[str, Any]) -> tuple[int, int]:
        for name in ("source", "target"):
            if name in batch:
                return tuple(batch[name].shape[-2:])
        return self.resolution, self.resolution

    # -- user entry points --------------------------------------------------------------------

    def _run(self, batch: dict[str, Any], chain: str | None) -> tuple[str, Tensor]:
        if chain is None:
            chain = self.reason(batch)[0]
        else:
            problems = parse_boxes(chain).invalid
            if problems:
                raise ValueError(f"the edited chain has {len(problems)} box(es) that cannot be drawn: {problems[0].reason}")
        generator = torch.Generator().manual_seed(self.eval_seed)
        return chain, self.synthesize(batch, [chain], generator)[0]

    def generate(self, prompt: str, chain: str | None = None, size: int | None = None) -> tuple[str, Image.Image]:
        """Text-to-image: ``(chain, size × size image)``; a given ``chain`` (user-edited) skips reasoning."""
        side = size or self.resolution
        self._check_side(side)
        batch = {"key": ["0"], "instruction": [prompt], "target": torch.zeros(1, 3, side, side)}
        chain, image = self._run(batch, chain)
        return chain, _to_pil(image)

    def edit(
        self, image: Image.Image, instruction: str, chain: str | None = None, size: int | None = None
    ) -> tuple[str, Image.Image]:
        """Edit one image: ``(chain, edited)``; the edited image keeps the source's aspect with its
        shorter side ``size`` (official). The source is squashed to ``size²`` for the UNet and to the
        MLLM's ``image_size`` for reasoning; a given ``chain`` skips reasoning (interactive editing)."""
        side = size or self.resolution
        self._check_side(side)
        pixels = pil_to_tensor(image.convert("RGB")).float().div(255)
        mllm_side = self.mllm.image_size or side
        batch = {
            "key": ["0"],
            "instruction": [instruction],
            "source": (resize(pixels, [side, side], antialias=True) * 2 - 1).unsqueeze(0),
            "mllm_image": resize(pixels, [mllm_side, mllm_side], antialias=True).clamp(0, 1).unsqueeze(0),
        }
        chain, edited = self._run(batch, chain)
        width, height = image.size
        scale = side / min(width, height)
        return chain, _to_pil(edited).resize((round(width * scale), round(height * scale)), Image.BICUBIC)

    def edit_turns(self, image: Image.Image, instructions: list[str], size: int | None = None) -> list[tuple[str, Image.Image]]:
        """Multi-turn editing: each turn edits the previous turn's result; ``[(chain, image)]`` per turn."""
        if not instructions:
            raise ValueError("edit_turns needs at least one instruction")
        turns = []
        for instruction in instructions:
            chain, image = self.edit(image, instruction, size=size)
            turns.append((chain, image))
        return turns


def _to_pil(image: Tensor) -> Image.Image:
    return to_pil_image(((image.float().cpu() + 1) / 2).clamp(0, 1))
