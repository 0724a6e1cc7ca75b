"""DIMModule: Draw-In-Mind (DIM-4.6B-T2I / DIM-4.6B-Edit), composed from zoo blocks.

Map to the DIM paper (the § numbers below are its sections) and the official code,
``showlab/DIM@28e644f:models/modeling_dim.py`` (``DIM``, ``DIMDecoder``; no training code is
released, showlab/DIM#4):

- MLLM (§3, "frozen 3.0B VLM"): Qwen2.5-VL-3B reads the source image and the instruction, or the
  designer's chain-of-thought blueprint; the last hidden state after the final norm over the user
  turn is the condition (:class:`~zoo.blocks.mllm.VLMEncoder`), kept frozen outside the module tree.
- Connector: a 2-layer GELU MLP 2048 → 2304 → 2304 (:class:`~zoo.blocks.connectors.MLPConnector`).
- Decoder: SANA1.5-1.6B DiT (:class:`~zoo.blocks.denoisers.SanaDenoiser`); editing concatenates the
  source latent to the noisy latent along channels (input layer widened, "MM-PAD"), T2I does not.
- Latents: DC-AE f32c32 with scaling factor 0.41407 (:class:`~zoo.blocks.autoencoders.DCAutoencoder`);
  tiny runs use the identity codec in pixel space.
- Objective: SANA flow matching, shift 3, logit-normal timesteps, target ε − x0
  (:class:`~zoo.blocks.objectives.FlowMatching`), sampled with DPM-Solver++; steps and scale come
  from config (the official code hard-codes 30 / 7.5, here defaults).
- Guidance: text CFG (the base's :meth:`~zoo.modules.base.EditingModule.guide`) against a learned
  null caption table (:class:`~zoo.blocks.guidance.NullCondition`), whole samples dropped with
  p = 0.1 in training; the source latent goes to both branches.
- Designer (§3.2): an external VLM turns instruction + source into the 5-section blueprint that
  replaces the instruction (:mod:`zoo.blocks.designer`); asked once per evaluated sample without one.
- Feature cache: :meth:`~DIMModule.frozen_features` (the frozen MLLM's states and the source latent)
  is what ``zoo data cache-features`` stores; the blueprint's encoding is cached, never a designer's
  reply (the command refuses a designer).
- Stages: T2I pretraining, then editing; a model trains one task, so a batch holding samples of
  the other task is an error, never a silent edit of a black source.
"""

from __future__ import annotations

import logging
from typing import Literal

from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from datamodules.samples import EditBatch
from zoo.blocks.autoencoders import CodecConfig, build_codec
from zoo.blocks.condition import Condition
from zoo.blocks.connectors import MLPConnector
from zoo.blocks.denoisers import SanaConfig, SanaDenoiser
from zoo.blocks.designer import Designer, DesignerConfig
from zoo.blocks.guidance import NullCondition
from zoo.blocks.mllm import VLMConfig, VLMEncoder
from zoo.blocks.objectives import FlowMatching
from zoo.modules.base import EditingModule, Optimization

log = logging.getLogger(__name__)


class DIMModule(EditingModule):
    """Draw-In-Mind: frozen Qwen2.5-VL → MLP connector → SANA DiT, T2I or editing.

    Args:
        mllm: the VLM (Qwen2.5-VL-3B, frozen) and how it reads the condition.
        denoiser: the SANA DiT; its input layer is widened here for the source latent in ``edit`` mode.
        autoencoder: the codec (``dc`` for DC-AE, ``identity`` for pixel-space toy runs).
        mode: ``"edit"`` concatenates the source latent (MM-PAD), ``"t2i"`` generates from text.
        connector_hidden: hidden width of the connector (paper: the DiT caption width, 2304).
        train_denoiser: ``False`` trains the connector (and null table) only — the warm-up stage.
        use_blueprint: feed the blueprint (from the data, or from ``designer``) instead of the raw
            instruction.
        designer: optional designer asked for a blueprint when an evaluated sample has none.
        cfg_dropout: probability of replacing a sample's condition by the null table in training.
        guidance_scale: text CFG scale at sampling (official: 7.5).
        num_inference_steps: sampler steps (official: 30).
        objective: flow matching settings and sampler (official: shift 3, DPM-Solver++).
        output_size: side in pixels of generated images (and the view of new images to edit) until a
            fit sets the DataModule's; null = DiT ``sample_size`` × codec factor.
        init_from: checkpoint whose trainable weights initialise this model (edit stage 2 starts
            from stage 1).
        optim: optimiser and schedule.
        eval_seed: seed of evaluation noise.
    """

    cache_config = ("mllm", "autoencoder", "mode", "use_blueprint")
    cached_encoders = ("mllm", "codec")

    def __init__(
        self,
        mllm: VLMConfig,
        denoiser: SanaConfig,
        autoencoder: CodecConfig,
        mode: Literal["edit", "t2i"] = "edit",
        connector_hidden: int | None = None,
        train_denoiser: bool = True,
        use_blueprint: bool = True,
        designer: DesignerConfig | None = None,
        cfg_dropout: float = 0.1,
        guidance_scale: float = 7.5,
        num_inference_steps: int = 30,
        objective: FlowMatching | None = None,
        output_size: int | None = None,
        init_from: str | None = None,
        optim: Optimization | None = None,
        eval_seed: int = 0,
    ) -> None:
        super().__init__(
            optim=optim,
            eval_seed=eval_seed,
            guidance_scale=guidance_scale,
            cfg_dropout=cfg_dropout,
            num_inference_steps=num_inference_steps,
        )
        self.save_hyperparameters()
        self.mode = mode
        self.use_blueprint = use_blueprint
        self.instruction_fallbacks = 0
        """Samples conditioned on their raw instruction because ``use_blueprint`` found no blueprint."""

        self.add_encoder("mllm", VLMEncoder(mllm))
        self.keep_frozen("codec", build_codec(autoencoder))
        condition_channels = self.codec.latent_channels if mode == "edit" else 0
        self.denoiser = SanaDenoiser(denoiser, condition_channels=condition_channels)
        context_dim = self.denoiser.context_dim
        self.connector = MLPConnector(self.mllm.hidden_size, context_dim, connector_hidden or context_dim)
        self.null_caption = NullCondition(self.mllm.max_condition_length, context_dim)
        self.denoiser.requires_grad_(train_denoiser)
        self.objective = objective or FlowMatching()
        self.designer = Designer.from_config(designer) if designer is not None else None
        self.resolution = output_size or self.denoiser.sample_size * self.codec.downsample_factor
        self.mllm_resolution = self.mllm.image_size or self.resolution
        if init_from is not None:
            self.load_trainable(init_from)

    @property
    def size_multiple(self) -> int:
        return self.codec.downsample_factor * self.denoiser.model.config.patch_size

    # -- conditioning -----------------------------------------------------------------------

    def condition_text(self, batch: EditBatch) -> list[str]:
        """Blueprint when ``use_blueprint`` and one exists, else the instruction."""
        if not self.use_blueprint:
            return list(batch.instruction)
        return [blueprint or instruction for instruction, blueprint in zip(batch.instruction, batch.blueprint)]

    def count_instruction_fallbacks(self, batch: EditBatch) -> None:
        """Add the samples that ``use_blueprint`` conditions on their raw instruction (no blueprint,
        no designer) to :attr:`instruction_fallbacks`; the first such batch warns, once per module."""
        missing = sum(not blueprint for blueprint in batch.blueprint) if self.use_blueprint else 0
        if missing and not self.instruction_fallbacks:
            log.warning(
                "use_blueprint is set but %d of %d samples in this batch have no blueprint and no designer "
                "writes one: they are conditioned on the raw instruction (stage 1 of DIM does this by design; "
                "for stage 2 give the data's *_cot.jsonl or a designer). Counted in instruction_fallbacks.",
                missing, len(batch.blueprint),
            )
        self.instruction_fallbacks += missing

    def teardown(self, stage: str) -> None:
        """At the end of a stage: the designer's summary line (calls, time, rate, fallbacks) when it
        was asked, and the count of samples conditioned on their raw instruction."""
        if self.designer is not None and self.designer.requests:
            rank_zero_info(self.designer.summary())
        if self.instruction_fallbacks:
            rank_zero_info(
                f"use_blueprint: {self.instruction_fallbacks} samples so far had no blueprint (and no designer) "
                "and were conditioned on their raw instruction"
            )

    def prepare_batch(self, batch: EditBatch, keep_given: bool = False) -> EditBatch:
        """The designer (a paid API call) writes a blueprint for each sample that has none."""
        self.check_task(batch)  # before the designer is paid for a batch that cannot be edited
        if not self.use_blueprint or self.designer is None or all(batch.blueprint):
            return batch
        blueprints = [
            blueprint
            or self.designer.blueprint_or_instruction(batch.mllm_image[i] if batch.mllm_image is not None else None, instruction)
            for i, (instruction, blueprint) in enumerate(zip(batch.instruction, batch.blueprint))
        ]
        return batch.replace(blueprint=blueprints)

    def check_task(self, batch: EditBatch) -> None:
        """Raise unless every sample of ``batch`` is of this model's task (DIM trains one per stage)."""
        wrong = [key for key, edit in zip(batch.key, batch.edits) if edit != (self.mode == "edit")]
        if not wrong:
            return
        if self.mode == "edit":
            raise ValueError(
                f"this edit-mode DIMModule got text-to-image samples {wrong[:3]} (of {len(wrong)}); DIM trains "
                "one task per stage, so give it an edit-only split (in a DIM tos jsonl an edit row carries "
                "image_path_target; DIM's demo files repeat the source path there), or use mode='t2i' for T2I data"
            )
        raise ValueError(
            f"this t2i-mode DIMModule got edit samples {wrong[:3]} (of {len(wrong)}); DIM trains one task per "
            "stage, so give it a text-to-image split, or use mode='edit' (stage 2, init_from the T2I checkpoint)"
        )

    def frozen_features(self, batch: EditBatch) -> dict[str, Tensor]:
        """The frozen MLLM's states over the user turn (``vlm.states``, ``vlm.mask``, padded to the
        condition length) of the blueprint or instruction and, for editing, the source latent."""
        self.check_task(batch)
        edit = self.mode == "edit"
        if edit and batch.source is None:
            raise ValueError("an edit-mode DIMModule needs the source image of every sample (batch.source)")
        states, mask = self.mllm.condition(batch.mllm_image if edit else None, self.condition_text(batch))
        features = {"vlm.states": states, "vlm.mask": mask}
        if edit:
            features["source_latent"] = self.codec.encode(batch.source.to(self.device, self.dtype))
        return features

    def encode_condition(self, batch: EditBatch, losses: bool = False) -> Condition:
        """Projected MLLM states over the user turn (padded to the condition length) and, for
        editing, the source latent as the channel condition (:meth:`frozen_features`, online or cached)."""
        self.check_task(batch)
        self.count_instruction_fallbacks(batch)
        features = self.features(batch)
        context = self.connector(features["vlm.states"].to(self.dtype))
        return Condition(context=context, mask=features["vlm.mask"], channels=features.get("source_latent"))

    def null_condition(self, condition: Condition) -> Condition:
        """The learned null caption under the same mask; the source latent stays (official)."""
        context = self.null_caption.null(len(condition), condition.context.shape[1]).to(condition.context)
        return condition.replace(context=context, losses={})
