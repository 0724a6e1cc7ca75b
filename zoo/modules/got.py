"""GoTModule: Generation Chain-of-Thought (GoT-6B), composed from zoo blocks.

Map to the GoT paper (arXiv:2503.10639; the § numbers below are its sections) and the official
inference code, cited from its vendored copy ``sunyasheng/NeoAnalogist@c58cf0a:thirdparty/GoT/``
(``got/models/got_model.py`` ``GenCot``, ``configs/clm_models/``); the training code was never
released (rongyaofang/GoT#1):

- Reasoning (§4, §5.1): Qwen2.5-VL-3B with peft LoRA (r=32, alpha=32, dropout 0.05; embeddings, LM
  head and RMSNorms trained in full) and GoT's 66 generation tokens writes the chain for the T2I
  or edit prompt (:meth:`~zoo.blocks.got_chain.GoTReasoner.generate_chain`, bounded by
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
  batch may hold both (``batch.task``): each sample gets its own prompt template, MLLM image (none
  for T2I) and reference, exactly as it would alone.
- Multi-guidance (§5.3): ``ε = ε_u + g(ε_text − ε_img) + c(ε_cond − ε_text) + i(ε_img − ε_u)``
  (:func:`~zoo.blocks.guidance.got_cfg`) over the branches of
  :func:`~zoo.blocks.guidance.got_cfg_batch`; DDPM sampling with SDXL's schedule (official 50 steps,
  g=7.5, c=4.0, i=1.0).
- Training (§5.3, §5.4, supplementary §8): loss = w_ce · CE(chain tokens) + w_mse · ε-MSE, equal
  weights; noise offset 0.1; each partially-conditioned combination of (context, reference, mask)
  sampled with probability 5%, the full one otherwise; LoRA + projectors + UNet trainable, VAE
  frozen (outside the module tree).
- Feature cache: :meth:`~GoTModule.frozen_features` (the VAE latents of the reference and the box
  canvases; with the target latent, every VAE encode of a step) from ``zoo data cache-features``
  shards; the LoRA VLM has no frozen output to cache.
- Interactive generation (§6.2): ``generate(prompt, chain=...)`` / ``edit(image, instruction,
  chain=...)`` take a chain the user edited (e.g. :func:`~zoo.blocks.spatial.replace_box`) and skip
  reasoning; evaluation reasons anew for every sample unless ``teacher_chains``.
- Released weights: ``official_weights`` loads HF ``LucasFang/GoT-6B`` (:mod:`zoo.modules.got_official`).

One deliberate difference: the official sampler feeds the generated pooled embedding to the
null-context branches too, leaking the text into the "unconditional" prediction; by default
(``null_pooled=True``) those branches, and dropped contexts in training, get the pooled projection
of the null context. ``null_pooled=False`` restores the official behaviour.
"""

from __future__ import annotations

import logging
from itertools import product
from typing import Literal

import torch
from torch import Tensor, nn

from datamodules.samples import EditBatch
from zoo.blocks.autoencoders import CodecConfig, build_codec
from zoo.blocks.condition import Condition
from zoo.blocks.config import ConfigError, check_range
from zoo.blocks.denoisers import UNetConfig, UNetDenoiser, sdxl_time_ids
from zoo.blocks.got_chain import GoTReasoner, GoTVLMConfig
from zoo.blocks.guidance import got_cfg, got_cfg_batch
from zoo.blocks.objectives import EpsilonDiffusion
from zoo.blocks.spatial import box_mask_latents, parse_boxes
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
        mllm: the reasoning VLM (Qwen2.5-VL-3B, ``image_size`` 448 for GoT's 256 visual tokens) with
            GoT's LoRA and 64 image tokens by default.
        denoiser: the SDXL UNet; ``conv_in`` is widened here by 2 × the VAE's latent channels.
        autoencoder: the SDXL VAE (kind ``kl``); ``identity`` for pixel-space toy runs (reference and
            box canvases then enter the UNet as pixels).
        ce_weight: weight of the chain's next-token cross-entropy (paper: 1).
        diffusion_weight: weight of the ε-MSE (paper: 1).
        condition_dropout: probability of each partially-conditioned combination in training
            (paper: 0.05).
        drop_combinations: ``"all"``: the 7 combinations of keeping/dropping context, reference
            and mask other than the full one (paper: "conditioning combinations"); ``"cfg"``: only
            the 3 the sampler uses (text, image, unconditional).
        objective: the DDPM objective (paper: ε-prediction with noise offset 0.1).
        null_pooled: null-context branches get the null pooled embedding (see module docstring);
            ``False`` = official inference, generated pooled embedding everywhere.
        guidance_scale: ``g``, text guidance (official 7.5).
        cond_guidance_scale: ``c``, spatial (mask) guidance (official 4.0).
        image_guidance_scale: ``i``, reference-image guidance (official 1.0).
        num_inference_steps: DDPM steps (official 50).
        max_chain_tokens: bound of chain generation (official ``max_new_tokens=1024``).
        teacher_chains: evaluate with the data's chains where present instead of reasoning anew.
        output_size: side in pixels of generated images (and the view of new images to edit) until a
            fit sets the DataModule's; null = UNet ``sample_size`` × VAE factor (SDXL: 1024).
        init_from: checkpoint whose trainable weights initialise this model (finetune from pretrain).
        official_weights: the released GoT-6B checkpoint (file or folder of HF ``LucasFang/GoT-6B``)
            loaded over the built model (:mod:`zoo.modules.got_official`); not with ``init_from``.
        optim: optimiser and schedule.
        eval_seed: seed of evaluation noise.
    """

    def __init__(
        self,
        mllm: GoTVLMConfig,
        denoiser: UNetConfig,
        autoencoder: CodecConfig,
        ce_weight: float = 1.0,
        diffusion_weight: float = 1.0,
        condition_dropout: float = 0.05,
        drop_combinations: Literal["all", "cfg"] = "all",
        objective: EpsilonDiffusion | None = None,
        null_pooled: bool = True,
        guidance_scale: float = 7.5,
        cond_guidance_scale: float = 4.0,
        image_guidance_scale: float = 1.0,
        num_inference_steps: int = 50,
        max_chain_tokens: int = 1024,
        teacher_chains: bool = False,
        output_size: int | None = None,
        init_from: str | None = None,
        official_weights: str | None = None,
        optim: Optimization | None = None,
        eval_seed: int = 0,
    ) -> None:
        combinations = _ALL_PARTIAL if drop_combinations == "all" else _CFG_PARTIAL
        check_range("ce_weight", ce_weight, 0.0)
        check_range("diffusion_weight", diffusion_weight, 0.0)
        if ce_weight + diffusion_weight == 0:
            raise ConfigError("ce_weight and diffusion_weight cannot both be 0")
        check_range(f"condition_dropout × {len(combinations)} combinations ({drop_combinations!r})", condition_dropout * len(combinations), 0.0, 1.0)
        check_range("cond_guidance_scale", cond_guidance_scale, 0.0)
        check_range("image_guidance_scale", image_guidance_scale, 0.0)
        check_range("max_chain_tokens", max_chain_tokens, 1)
        if init_from is not None and official_weights is not None:
            raise ConfigError("give init_from (a zoo checkpoint) or official_weights (GoT-6B), not both")
        if autoencoder.kind not in ("kl", "identity"):
            raise ConfigError(f"GoT conditions on SDXL's KL VAE latents (or pixels, 'identity'): autoencoder.kind must be 'kl' or 'identity', got '{autoencoder.kind}'")
        super().__init__(
            optim=optim, eval_seed=eval_seed, guidance_scale=guidance_scale, cfg_dropout=0.0, num_inference_steps=num_inference_steps
        )
        self.save_hyperparameters()
        self.combinations = combinations
        self.ce_weight, self.diffusion_weight = ce_weight, diffusion_weight
        self.condition_dropout = condition_dropout
        self.null_pooled = null_pooled
        self.guidance = (guidance_scale, cond_guidance_scale, image_guidance_scale)
        self.max_chain_tokens = max_chain_tokens
        self.teacher_chains = teacher_chains

        self.mllm = GoTReasoner(mllm)
        self.keep_frozen("codec", build_codec(autoencoder))
        latent = self.codec.latent_channels
        self.denoiser = UNetDenoiser(denoiser, condition_channels=2 * latent)
        if not self.denoiser.needs_added_conditions:
            raise ConfigError("GoT's UNet is SDXL-style: its config needs addition_embed_type='text_time' (pooled + time ids)")
        unet = self.denoiser.model.config
        pooled_dim = unet.projection_class_embeddings_input_dim - 6 * unet.addition_time_embed_dim
        width = self.mllm.hidden_size
        self.context_projector = nn.Linear(width, self.denoiser.context_dim)
        self.pooled_projector = nn.Linear(width, pooled_dim)
        self.objective = objective or EpsilonDiffusion(noise_offset=0.1)
        self.resolution = output_size or self.denoiser.sample_size * self.codec.downsample_factor
        self.mllm_resolution = self.mllm.image_size or self.resolution
        if self.resolution % self.size_multiple:
            raise ConfigError(f"output_size {self.resolution} must be a multiple of {self.size_multiple} for this VAE + UNet")
        if init_from is not None:
            self.load_trainable(init_from)
        if official_weights is not None:
            load_official_got(self, official_weights)

    @property
    def size_multiple(self) -> int:
        # Latent sides must survive every UNet downsampling.
        return self.codec.downsample_factor * 2 ** (len(self.denoiser.model.config.block_out_channels) - 1)

    # -- conditioning -----------------------------------------------------------------------

    def project(self, states: Tensor) -> tuple[Tensor, Tensor]:
        """``(context [B, 64, Dc], pooled [B, P])`` from the image-token states (pooled = mean of projections)."""
        states = states.to(self.dtype)
        return self.context_projector(states), self.pooled_projector(states).mean(dim=1)

    def reference_latent(self, batch: EditBatch) -> Tensor:
        """Unscaled latent of each edit's source image; of a black image for T2I samples (official)."""
        height, width = batch.size
        source = -torch.ones(len(batch), 3, height, width, device=self.device, dtype=self.dtype)
        if any(batch.edits):
            rows = torch.tensor(batch.edits, device=self.device)
            source[rows] = batch.source.to(self.device, self.dtype)[rows]
        return self.codec.encode_unscaled(source)

    def chains(self, batch: EditBatch) -> list[str]:
        """The reasoning chain of every sample (ValueError naming those without one)."""
        chains = list(batch.chain)
        missing = [key for key, chain in zip(batch.key, chains) if not chain]
        if missing:
            raise ValueError(f"GoT conditions on reasoning chains; samples {missing[:3]} have none")
        return chains

    def frozen_features(self, batch: EditBatch) -> dict[str, Tensor]:
        """The frozen VAE's unscaled latents of each sample's reference (``reference_latent``: its source,
        a black image for T2I) and of its chain's SSGM box canvases (``spatial_latent``, §5.2): every
        encode of a step but the target's, so a feature cache holds them (the LoRA VLM runs online)."""
        height, width = batch.size
        spatial = box_mask_latents(self.codec, self.chains(batch), height, width, self.device, self.dtype)
        return {"reference_latent": self.reference_latent(batch), "spatial_latent": spatial}

    def encode_condition(self, batch: EditBatch, losses: bool = False) -> Condition:
        """Image-token states of prompt + chain, projected (context, SDXL pooled), with the reference
        and box-mask latents as channels (:meth:`frozen_features`, online or cached); with ``losses``,
        the chain CE of the same forward."""
        chains = self.chains(batch)
        images, prompts = batch.mllm_images, list(batch.instruction)
        terms = {}
        if losses:
            terms["chain_ce"], states = self.mllm.chain_loss_and_states(images, prompts, chains)
        else:
            states = self.mllm.image_token_states(images, prompts, chains)
        context, pooled = self.project(states)
        features = self.features(batch)
        channels = torch.cat([features["reference_latent"], features["spatial_latent"]], dim=1)
        height, width = batch.size
        time_ids = sdxl_time_ids(height, width).to(self.device).expand(len(batch), -1)
        mask = torch.ones(context.shape[:2], dtype=torch.bool, device=context.device)
        return Condition(context, mask, channels, {"text_embeds": pooled, "time_ids": time_ids}, terms)

    def null_condition(self, condition: Condition) -> Condition:
        """The projectors of zero states (official null context); no reference, no mask. The pooled
        embedding is the null one with ``null_pooled``, else the generated one (official)."""
        width = self.context_projector.in_features
        states = torch.zeros(1, condition.context.shape[1], width, device=self.device, dtype=self.dtype)
        context, pooled = self.project(states)
        batch = len(condition)
        added = dict(condition.added)
        if self.null_pooled:
            added["text_embeds"] = pooled.expand(batch, -1)
        return Condition(
            context=context.expand(batch, -1, -1),
            mask=condition.mask,
            channels=torch.zeros_like(condition.channels),
            added=added,
        )

    def condition_keep(self, batch_size: int) -> Tensor:
        """``[B, 3]`` bool: which of (context, reference, mask) each sample keeps (all outside training)."""
        keep = torch.ones(batch_size, 3, dtype=torch.bool)
        if self.training and self.condition_dropout > 0:
            slot = (torch.rand(batch_size) / self.condition_dropout).long()
            for b in (slot < len(self.combinations)).nonzero().flatten().tolist():
                keep[b] = torch.tensor(self.combinations[slot[b]])
        return keep.to(self.device)

    def drop_condition(self, condition: Condition) -> Condition:
        """Each partially-conditioned combination of (context, reference, mask) with ``condition_dropout``."""
        keep = self.condition_keep(len(condition))
        null = self.null_condition(condition)
        context = torch.where(keep[:, 0].view(-1, 1, 1), condition.context, null.context)
        added = dict(condition.added)
        if self.null_pooled:
            added["text_embeds"] = torch.where(keep[:, :1], added["text_embeds"], null.added["text_embeds"])
        reference, spatial = condition.channels.chunk(2, dim=1)
        reference = reference * keep[:, 1].view(-1, 1, 1, 1).to(reference.dtype)
        spatial = spatial * keep[:, 2].view(-1, 1, 1, 1).to(spatial.dtype)
        return condition.replace(context=context, channels=torch.cat([reference, spatial], dim=1), added=added)

    def loss_weights(self) -> dict[str, float]:
        """Joint objective (paper §5.4): ``ce_weight`` · chain CE + ``diffusion_weight`` · ε-MSE."""
        return {"chain_ce": self.ce_weight, "diffusion_mse": self.diffusion_weight}

    def guidance_branches(self, condition: Condition, null: Condition) -> Condition:
        """GoT's four CFG branches ``[cond, text, image, uncond]`` (paper §5.3) as one denoiser batch."""
        reference, spatial = condition.channels.chunk(2, dim=1)
        null_pooled = null.added["text_embeds"] if self.null_pooled else None
        branches = got_cfg_batch(None, condition.context, null.context, reference, spatial, condition.added["text_embeds"], null_pooled)
        return Condition(
            context=branches.context,
            mask=condition.mask.repeat(4, 1),
            channels=branches.condition,
            added={"text_embeds": branches.pooled, "time_ids": condition.added["time_ids"].repeat(4, 1)},
        )

    def guide(self, latents: Tensor, timestep: Tensor, branches: Condition) -> Tensor:
        """GoT's multi-guidance ``u + g (text - image) + c (cond - text) + i (image - u)`` over one denoiser call."""
        eps = self.denoise(torch.cat([latents] * 4), timestep.repeat(4), branches)
        return got_cfg(*eps.chunk(4), *self.guidance)

    # -- reasoning --------------------------------------------------------------------------

    @torch.no_grad()
    def reason(self, batch: EditBatch) -> list[str]:
        """The model's reasoning chain per sample (bounded by ``max_chain_tokens``)."""
        return self.mllm.generate_chain(batch.mllm_images, list(batch.instruction), self.max_chain_tokens)

    def prepare_batch(self, batch: EditBatch, keep_given: bool = False) -> EditBatch:
        """Reason for every sample, except those whose chain is kept (given by a user, or
        ``teacher_chains``); a kept chain must be drawable."""
        keep = [bool(chain) and (keep_given or self.teacher_chains) for chain in batch.chain]
        for chain in (c for c, kept in zip(batch.chain, keep) if kept):
            problems = parse_boxes(chain).invalid
            if problems:
                raise ValueError(f"the given chain has {len(problems)} box(es) that cannot be drawn: {problems[0].reason}")
        rows = [i for i, kept in enumerate(keep) if not kept]
        if not rows:
            return batch
        chains = list(batch.chain)
        for i, chain in zip(rows, self.reason(batch.select(rows))):
            chains[i] = chain
        invalid = sum(len(parse_boxes(chains[i]).invalid) for i in rows)
        if invalid:
            log.warning("generated chains hold %d boxes that cannot be drawn; they are left out of the mask", invalid)
        return batch.replace(chain=chains)

    def condition_text(self, batch: EditBatch) -> list[str]:
        """GoT's text is its reasoning chain."""
        return list(batch.chain)
