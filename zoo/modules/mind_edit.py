"""MINDEditModule: MIND-Edit (MLLM insight-driven editing), composed from zoo blocks.

Map to the MIND-Edit paper (arXiv 2505.19149; no code is published, so the paper and IP-Adapter's
design are the references):

- MLLM (§3.1, §4 "Implementation details"): LLaVA-OneVision-7B, fine-tuned, reads the source image
  and the raw instruction (:data:`~zoo.blocks.optimized_instruction.REWRITE_REQUEST`) through the
  generic :class:`~zoo.blocks.mllm.VLMEncoder`; in full or with LoRA by config.
- Text head F_t (§3.2, Eq. 3-4): the LM head on the final layer writes the optimized instruction
  ``optimized_prompt: "..." negative_prompt: "..."`` (appendix C,
  :mod:`zoo.blocks.optimized_instruction`); trained by next-token CE on the annotated reply.
- Vision head F_v (§3.3, Eq. 5): :class:`~zoo.blocks.connectors.VisionHead` on the states of
  ``mllm.hidden_layer`` (the paper's "21st hidden layer" of 28 is ``hidden_states[21]``, 0 being
  the embeddings) over the user turn. Under the causal mask those states never see the reply, so
  training (teacher-forced reply) and inference (before any reply) read the same tensor.
- Loss (Eq. 6): ``text_weight * CE + embed_weight * (1 - cos(v_insight, CLIP(I_gt)))``, λ = 2;
  the CLIP image embedding of the ground-truth edit comes from IP-Adapter's frozen image encoder.
- Diffusion side, frozen (§3.3): SD1.5 with the SD1.5 IP-Adapter (:mod:`zoo.blocks.ip_adapter`,
  diffusers' own IP-Adapter processors), scale 1.0; the optimized prompt is the text prompt,
  ``v_insight`` the image embedding. Text CFG as IP-Adapter samples: the negative branch is the
  negative prompt with a zero image embedding; 7.5 / 30 steps by default (DDIM).
- How the source enters the frozen SD1.5 (the paper implies HumanEdit's masks and shows mask-free
  edits without saying how), as diffusers' ``StableDiffusionInpaintPipeline`` does for each UNet
  kind (:class:`~zoo.blocks.sd15_ip_adapter.IPAdapterSD15` tells them apart by ``in_channels``):

  - plain UNet (SD1.5, the paper's): with a mask, the latent outside it is replaced by the noised
    source after every step; without one, SDEdit-style img2img from the source noised to
    ``strength`` (:func:`zoo.blocks.sampling.sample`).
  - inpainting UNet (``stable-diffusion-v1-5/stable-diffusion-inpainting``, which the same SD1.5
    IP-Adapter fits): every step's input is ``[x_t, mask (1 = repaint), latent of source * (mask <
    0.5)]`` (:mod:`zoo.blocks.inpainting`) and nothing is blended back, so the UNet sees where the
    edit goes. Without a mask: diffusers' convention of a mask of all ones (the masked source is
    blank), started from the source noised to ``strength`` as in img2img.

Ablations by config (Table 2): ``use_optimized_instruction: false`` (#2, insight only: the raw
instruction is the prompt), ``use_insight: false`` (#1, text only: a zero image embedding),
``embed_weight: 0`` / ``text_weight: 0`` train the two heads independently, and
``instruction_writer`` takes the optimized instruction from another checkpoint's MLLM (#3-#5).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from diffusers import DDIMScheduler, DDPMScheduler
from PIL import Image
from torch import Tensor

from datamodules.samples import DataConfigError, EditBatch, EditOutputs, signed_to_pil
from zoo.blocks.autoencoders import CodecConfig, build_codec
from zoo.blocks.condition import Condition
from zoo.blocks.config import ConfigError, check_choice, check_range
from zoo.blocks.connectors import VisionHead, cosine_embedding_loss
from zoo.blocks.inpainting import source_inputs
from zoo.blocks.mllm import VLMConfig, VLMEncoder
from zoo.blocks.sd15_ip_adapter import IPAdapterSD15, IPAdapterSD15Config
from zoo.blocks.optimized_instruction import (
    OptimizedInstruction,
    OptimizedInstructionError,
    parse,
    rewrite_request,
)
from zoo.blocks.pretrained import MissingPretrainedError
from zoo.blocks.sampling import sample
from zoo.modules.base import Edit, EditingModule, Optimization

log = logging.getLogger(__name__)


@dataclass
class MINDEdit(Edit):
    """One result of :meth:`MINDEditModule.edit`: the edit, the optimized instruction and ``v_insight``."""

    optimized_prompt: str = ""
    """The prompt the diffusion model was given (the raw instruction when the reply did not parse)."""
    negative_prompt: str = ""
    """The negative prompt it was given."""
    insight: Tensor | None = None
    """``v_insight`` ``[D]``: the predicted CLIP image embedding of the edit."""


class MINDEditModule(EditingModule):
    """MIND-Edit: a fine-tuned VLM writes the optimized instruction and predicts the edit's CLIP
    embedding, which drive a frozen IP-Adapter SD1.5.

    Args:
        mllm: the VLM (LLaVA-OneVision-7B), ``freeze: false`` (or ``lora``) to fine-tune it;
            ``hidden_layer`` is the vision head's input layer (paper: 21).
        diffusion: the frozen SD1.5 + IP-Adapter + its CLIP image encoder.
        autoencoder: the codec (SD1.5's ``kl`` VAE; ``identity`` for pixel-space toy runs).
        embed_weight: λ of Eq. 6 (paper: 2); 0 trains the text head alone.
        text_weight: weight of the text CE (paper: 1); 0 trains the vision head alone.
        use_optimized_instruction: condition SD1.5 on the optimized prompt (else the raw instruction).
        use_insight: condition the IP-Adapter on ``v_insight`` (else a zero embedding).
        teacher_instructions: in evaluation, use the data's optimized instructions instead of
            writing them (the diffusion side then sees the annotator's text).
        instruction_writer: checkpoint of another MINDEditModule whose MLLM writes the optimized
            instructions (the independent-training ablations); this model still predicts ``v_insight``.
        use_masks: edit inside the data's edit masks when every sample has one (else mask-free).
        strength: mask-free img2img strength in (0, 1]: how far the source is noised before denoising.
        max_new_tokens: longest optimized instruction the MLLM may write.
        guidance_scale: text CFG scale (IP-Adapter: 7.5).
        num_inference_steps: sampler steps (IP-Adapter: 30 here).
        sampler: ``ddim`` (IP-Adapter's SD1.5 demos, η = 0) or ``ddpm``, on the frozen pipeline's
            own noise schedule and prediction type (its ``scheduler/`` config).
        output_size: side in pixels of edited images until a fit sets the DataModule's; null =
            UNet ``sample_size`` x codec factor.
        optim: optimiser and schedule (paper: lr 1e-5).
        eval_seed: seed of evaluation noise.
    """

    def __init__(
        self,
        mllm: VLMConfig,
        diffusion: IPAdapterSD15Config,
        autoencoder: CodecConfig,
        embed_weight: float = 2.0,
        text_weight: float = 1.0,
        use_optimized_instruction: bool = True,
        use_insight: bool = True,
        teacher_instructions: bool = False,
        instruction_writer: str | None = None,
        use_masks: bool = True,
        strength: float = 0.6,
        max_new_tokens: int = 128,
        guidance_scale: float = 7.5,
        num_inference_steps: int = 30,
        sampler: Literal["ddim", "ddpm"] = "ddim",
        output_size: int | None = None,
        optim: Optimization | None = None,
        eval_seed: int = 0,
    ) -> None:
        check_range("embed_weight", embed_weight, 0.0)
        check_range("text_weight", text_weight, 0.0)
        if embed_weight == 0 and text_weight == 0:
            raise ConfigError("embed_weight and text_weight are both 0: nothing would train")
        check_range("strength", strength, 0.0, 1.0)
        if strength == 0:
            raise ConfigError("strength must be in (0, 1]: 0 would return the source unedited")
        check_range("max_new_tokens", max_new_tokens, 1)
        check_choice("sampler", sampler, Literal["ddim", "ddpm"])
        if instruction_writer is not None and not Path(instruction_writer).is_file():
            raise MissingPretrainedError(
                f"instruction_writer checkpoint '{instruction_writer}' does not exist: train the text model first"
            )
        super().__init__(
            optim=optim,
            eval_seed=eval_seed,
            guidance_scale=guidance_scale,
            cfg_dropout=0.0,  # the diffusion side is frozen: nothing learns an unconditional branch
            num_inference_steps=num_inference_steps,
        )
        self.save_hyperparameters()
        self.embed_weight, self.text_weight = embed_weight, text_weight
        self.use_optimized_instruction, self.use_insight = use_optimized_instruction, use_insight
        self.teacher_instructions, self.use_masks = teacher_instructions, use_masks
        self.strength, self.max_new_tokens, self.sampler = strength, max_new_tokens, sampler
        self.unparsed_instructions = 0
        """Optimized instructions the MLLM wrote that did not parse (the raw instruction was used)."""

        self.add_encoder("mllm", VLMEncoder(mllm))
        self.keep_frozen("codec", build_codec(autoencoder))
        side = IPAdapterSD15(diffusion)
        self.keep_frozen("denoiser", side.denoiser)
        self.keep_frozen("text_encoder", side.text_encoder)
        self.keep_frozen("image_encoder", side.image_encoder)
        self.noise_schedule = side.scheduler.config
        self.vision_head = VisionHead(self.mllm.hidden_size, self.denoiser.image_embed_dim)
        if instruction_writer is not None:
            writer = MINDEditModule.load_from_checkpoint(instruction_writer, map_location="cpu").mllm
            writer.freeze()
            self.keep_frozen("writer", writer)
        self.resolution = output_size or self.denoiser.sample_size * self.codec.downsample_factor
        self.mllm_resolution = self.mllm.image_size or self.resolution

    # -- the MLLM's two heads ---------------------------------------------------------------------

    @staticmethod
    def requests(batch: EditBatch) -> list[str]:
        """The MLLM's user text per sample (the raw instruction in the rewrite template)."""
        return [rewrite_request(instruction) for instruction in batch.instruction]

    def check_edits(self, batch: EditBatch) -> None:
        """MIND-Edit edits an image: every sample needs a source."""
        if not all(batch.edits) or batch.source is None:
            wrong = [key for key, edit in zip(batch.key, batch.edits) if not edit]
            raise ValueError(f"MIND-Edit edits images; samples {wrong[:3]} are text-to-image (no source)")

    def loss_weights(self) -> dict[str, float]:
        """Eq. 6: CE of the text head and λ (1 - cos) of the vision head; the frozen SD1.5 has no
        loss. The text CE is computed only when weighted (a vision head trained alone needs no
        annotations); the cosine term is always computed and logged."""
        return {"embed_cos": self.embed_weight} | ({"text_ce": self.text_weight} if self.text_weight > 0 else {})

    def encode_condition(self, batch: EditBatch, losses: bool = False) -> Condition:
        """The prompt's CLIP text states and ``v_insight`` as IP-Adapter's ``image_embeds``.

        With ``losses`` (training, validation) the MLLM is teacher-forced on the data's optimized
        instruction and the condition carries ``text_ce`` and ``embed_cos``.
        """
        self.check_edits(batch)
        images = batch.mllm_images
        requests = self.requests(batch)
        condition_losses: dict[str, Tensor] = {}
        if losses and self.text_weight > 0:
            missing = [key for key, text in zip(batch.key, batch.optimized_instruction) if not text]
            if missing:
                raise DataConfigError(
                    f"training MIND-Edit's text head needs every sample's optimized instruction (EditBatch."
                    f"optimized_instruction); samples {missing[:3]} have none: annotate the data with `zoo data annotate`"
                )
            condition_losses["text_ce"], states, mask = self.mllm.reply_loss_and_states(
                images, requests, batch.optimized_instruction
            )
        else:
            states, mask = self.mllm.condition(images, requests)
        insight = self.vision_head(states.to(self.dtype), mask)
        if losses:
            if batch.target is None:
                raise ValueError(f"training needs target images; samples {batch.key[:3]} have none (a prediction set?)")
            target = self.clip_embeds(batch.target)
            condition_losses["embed_cos"] = cosine_embedding_loss(insight, target)
        if not self.use_insight:
            insight = torch.zeros_like(insight)
        prompts = [p.optimized_prompt for p in self.prompts(batch)]
        text = self.text_encoder.encode(prompts)
        return text.replace(context=text.context.to(self.dtype), added={"image_embeds": insight}, losses=condition_losses)

    def null_condition(self, condition: Condition) -> Condition:
        """IP-Adapter's unconditional branch: the empty prompt and a zero image embedding."""
        return self._negative(condition, [""] * len(condition))

    def _negative(self, condition: Condition, prompts: list[str]) -> Condition:
        """``condition``'s unconditional branch with these (negative) prompts and a zero image embedding."""
        text = self.text_encoder.encode(prompts)
        embeds = torch.zeros_like(condition.added["image_embeds"])
        return condition.replace(context=text.context.to(condition.context), mask=text.mask, added={"image_embeds": embeds}, losses={})

    def clip_embeds(self, images: Tensor) -> Tensor:
        """IP-Adapter's CLIP image embeddings ``[B, D]`` of images ``[B, 3, H, W]`` in [-1, 1]."""
        return self.image_encoder.image_embeds(list((images.float() + 1) / 2))

    @torch.no_grad()
    def insight_cosine(self, batch: EditBatch) -> dict[str, Tensor]:
        """Eq. 5 on a batch with targets: ``embed_cos = 1 - cos(v_insight, CLIP(target))`` (the vision
        head's held-out error; 0 is perfect) and ``embed_cos_copy``, the same for the source's own
        CLIP embedding, the copy-the-source baseline: a head below it predicts the edit, not the source."""
        self.check_edits(batch)
        states, mask = self.mllm.condition(batch.mllm_images, self.requests(batch))
        target, source = self.clip_embeds(batch.target), self.clip_embeds(batch.source)
        insight = self.vision_head(states.to(self.dtype), mask)
        return {"embed_cos": cosine_embedding_loss(insight, target), "embed_cos_copy": cosine_embedding_loss(source, target)}

    def test_step(self, batch: EditBatch, batch_idx: int) -> EditOutputs:
        """The edits, and :meth:`insight_cosine`'s terms as ``test/...`` when the batch has targets."""
        if batch.target is not None:
            for name, value in self.insight_cosine(batch).items():
                self.log(f"test/{name}", value, batch_size=len(batch), sync_dist=True)
        return super().test_step(batch, batch_idx)

    # -- the optimized instruction -----------------------------------------------------------------

    def prepare_batch(self, batch: EditBatch, keep_given: bool = False) -> EditBatch:
        """The MLLM (or ``instruction_writer``'s) writes each sample's optimized instruction, unless
        ``teacher_instructions`` keeps the data's or the prompt is the raw instruction."""
        self.check_edits(batch)
        if not self.use_optimized_instruction:
            return batch
        if not (self.teacher_instructions and all(batch.optimized_instruction)):
            writer = self.frozen_parts["writer"] if "writer" in self.frozen_parts else self.mllm
            replies = writer.generate(batch.mllm_images, self.requests(batch), max_new_tokens=self.max_new_tokens)
            batch = batch.replace(optimized_instruction=replies)
        self.count_unparsed(batch)
        return batch

    @staticmethod
    def _parsed(batch: EditBatch) -> list[OptimizedInstruction | OptimizedInstructionError]:
        """Each sample's optimized instruction parsed, or why it does not parse."""
        parsed: list[OptimizedInstruction | OptimizedInstructionError] = []
        for reply in batch.optimized_instruction:
            try:
                parsed.append(parse(reply))
            except OptimizedInstructionError as err:
                parsed.append(err)
        return parsed

    def count_unparsed(self, batch: EditBatch) -> None:
        """Add the batch's optimized instructions that do not parse to :attr:`unparsed_instructions`;
        the first one is warned about, once per module."""
        for key, err in zip(batch.key, self._parsed(batch)):
            if isinstance(err, OptimizedInstructionError):
                if not self.unparsed_instructions:
                    log.warning("sample %s: the optimized instruction does not parse (%s); editing with the raw "
                                "instruction instead (counted in unparsed_instructions)", key, err)
                self.unparsed_instructions += 1

    def prompts(self, batch: EditBatch) -> list[OptimizedInstruction]:
        """Prompt and negative prompt per sample: the parsed optimized instruction, or the raw
        instruction with no negative prompt (``use_optimized_instruction: false``, or a reply that
        does not parse, which :meth:`prepare_batch` counted)."""
        if not self.use_optimized_instruction:
            return [OptimizedInstruction(instruction, "") for instruction in batch.instruction]
        return [
            OptimizedInstruction(instruction, "") if isinstance(parsed, OptimizedInstructionError) else parsed
            for instruction, parsed in zip(batch.instruction, self._parsed(batch))
        ]

    def condition_text(self, batch: EditBatch) -> list[str]:
        """The optimized instruction when it conditions the edit, else the raw instruction."""
        if not self.use_optimized_instruction:
            return list(batch.instruction)
        return [reply or instruction for instruction, reply in zip(batch.instruction, batch.optimized_instruction)]

    # -- generation ---------------------------------------------------------------------------------

    def _edit_mask(self, batch: EditBatch) -> Tensor | None:
        """The image-size edit masks ``[B, 1, H, W]`` (1 = edit) the edit is confined to, or None (mask-free)."""
        if not self.use_masks or batch.mask is None:
            return None
        return batch.mask.to(self.device, self.dtype)

    def sampling_scheduler(self) -> DDIMScheduler | DDPMScheduler:
        """A fresh ``sampler`` on the frozen pipeline's noise schedule (DDIM as SD1.5's: ``set_alpha_to_one=False``)."""
        if self.sampler == "ddim":
            return DDIMScheduler.from_config(self.noise_schedule, set_alpha_to_one=False)
        return DDPMScheduler.from_config(self.noise_schedule)

    @torch.no_grad()
    def synthesize_with_condition(self, batch: EditBatch, generator: torch.Generator | None = None) -> tuple[Tensor, Condition]:
        """Edited images in [-1, 1] and the condition that produced them, for a prepared batch."""
        condition = self.encode_condition(batch)
        pixels = batch.source.to(self.device, self.dtype)
        source = self.codec.encode(pixels)
        mask = self._edit_mask(batch)
        condition, keep = source_inputs(
            condition, pixels, mask, self.codec.encode, source.shape[-2:], inpainting=bool(self.denoiser.condition_channels)
        )
        null = self._negative(condition, [p.negative_prompt for p in self.prompts(batch)])
        noise = torch.randn(source.shape, generator=generator).to(self.device, self.dtype)
        branches = self.guidance_branches(condition, null)

        def predict(x_t: Tensor, timestep: Tensor) -> Tensor:
            return self.guide(x_t, timestep.to(x_t.device), branches)

        latents = sample(
            predict,
            noise,
            self.sampling_scheduler(),
            self.num_inference_steps,
            generator=generator,
            source=source,
            strength=1.0 if mask is not None else self.strength,
            keep=keep,
        )
        return self.codec.decode(latents).clamp(-1, 1), condition

    @torch.no_grad()
    def synthesize(self, batch: EditBatch, generator: torch.Generator | None = None) -> Tensor:
        """Edited images in [-1, 1] (inside the masks when given, else from the source noised to ``strength``)."""
        return self.synthesize_with_condition(batch, generator)[0]

    @torch.no_grad()
    def edit(  # type: ignore[override]
        self, image: Image.Image, instruction: str, *, mask: Image.Image | None = None, size: int | None = None
    ) -> MINDEdit:
        """Edit one image, inside ``mask`` (an "L" image of the image's size, white where to edit) or mask-free.

        Returns the edit with the optimized instruction the MLLM wrote and its ``v_insight``.
        """
        batch = self.prepare_batch(self.inference_batch([image], [instruction], size=size, masks=[mask]))
        images, condition = self.synthesize_with_condition(batch, self._eval_generator(0))
        parsed = self.prompts(batch)[0]
        return MINDEdit(
            image=signed_to_pil(images[0]),
            text=self.condition_text(batch)[0],
            optimized_prompt=parsed.optimized_prompt,
            negative_prompt=parsed.negative_prompt,
            insight=condition.added["image_embeds"][0].float().cpu(),
        )
