"""DIMModule: Draw-In-Mind (DIM-4.6B-T2I / DIM-4.6B-Edit), composed from zoo blocks.

Map to the paper (``../shared/papers/dim-draw-in-mind.txt``) and the official code facts
(``official-code-facts.md`` §1):

- MLLM (§3, "frozen 3.0B VLM"): Qwen2.5-VL-3B reads the source image and the instruction, or the
  designer's chain-of-thought blueprint; the last hidden state after the final norm over the user
  turn is the condition (:class:`~zoo.blocks.mllm.QwenVLEncoder`).
- Connector: a 2-layer GELU MLP 2048 → 2304 → 2304 (:class:`~zoo.blocks.connectors.MLPConnector`).
- Decoder: SANA1.5-1.6B DiT (:class:`~zoo.blocks.denoisers.SanaDenoiser`); editing concatenates the
  source latent to the noisy latent along channels (input layer widened, "MM-PAD"), T2I does not.
- Latents: DC-AE f32c32 with scaling factor 0.41407 (:class:`~zoo.blocks.autoencoders.DCAutoencoder`);
  tiny runs use the identity codec in pixel space.
- Objective: SANA flow matching, shift 3, logit-normal timesteps, target ε − x0
  (:class:`~zoo.blocks.objectives.FlowMatching`).
- Guidance: text CFG against a learned null caption table, dropped with p = 0.1 in training; the
  source latent goes to both branches (:mod:`zoo.blocks.guidance`). Sampling: DPM-Solver++ for
  flow; steps and scale come from config (the official code hard-codes 30 / 7.5, here defaults).
- Designer (§3.2): an external VLM turns instruction + source into the 5-section blueprint that
  replaces the instruction (:mod:`zoo.blocks.designer`); optional.
- Stages: T2I pretraining, then editing; a model trains one task, so a batch holding samples of
  the other task (``batch["task"]``, e.g. a split mixing both) is an error, never a silent edit of a
  black source.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from PIL import Image
from torch import Tensor
from torchvision.transforms.functional import pil_to_tensor, resize, to_pil_image

from datamodules.samples import edit_rows
from zoo.blocks.autoencoders import build_codec
from zoo.blocks.connectors import MLPConnector
from zoo.blocks.denoisers import SanaDenoiser
from zoo.blocks.designer import Designer, DesignerConfig
from zoo.blocks.guidance import NullCondition, text_cfg
from zoo.blocks.mllm import QwenVLEncoder
from zoo.blocks.objectives import FlowMatching
from zoo.blocks.sampling import build_scheduler, sample
from zoo.modules.base import EditingModule, Optimization


class DIMModule(EditingModule):
    """Draw-In-Mind: frozen Qwen2.5-VL → MLP connector → SANA DiT, T2I or editing.

    Args:
        mllm: keyword arguments of :class:`~zoo.blocks.mllm.QwenVLEncoder` (``pretrained`` or
            ``tiny``, ``max_condition_length``, ``image_size``).
        denoiser: keyword arguments of :class:`~zoo.blocks.denoisers.SanaDenoiser` (``pretrained``
            or ``config``); ``condition_channels`` is set here from ``mode``.
        autoencoder: ``{"kind": "dc", ...DCAutoencoder kwargs}`` or ``{"kind": "identity"}``.
        mode: ``"edit"`` concatenates the source latent (MM-PAD), ``"t2i"`` generates from text.
        connector_hidden: hidden width of the connector (paper: the DiT caption width, 2304).
        zero_init_condition: zero-initialise the widened input channels (the official code keeps
            PyTorch's random init; zero makes step 0 equal the T2I model).
        train_denoiser: ``False`` trains the connector (and null table) only — the warm-up stage.
        use_blueprint: feed the blueprint (from the data, or from ``designer``) instead of the raw
            instruction.
        designer: optional :class:`~zoo.blocks.designer.DesignerConfig` used when a sample has no
            blueprint (inference on new instructions).
        cfg_dropout: probability of replacing a sample's condition by the null table in training.
        guidance_scale: text CFG scale at sampling (official: 7.5).
        num_inference_steps: sampler steps (official: 30).
        scheduler: ``"dpm_solver++"`` (official) or ``"flow_euler"``.
        flow_shift: SANA's flow shift, used in training and sampling (official: 3.0).
        init_from: checkpoint whose trainable weights initialise this model (edit stage 2 starts
            from stage 1).
        optim: optimiser and schedule.
        eval_seed: seed of evaluation noise.
    """

    def __init__(
        self,
        mllm: dict[str, Any],
        denoiser: dict[str, Any],
        autoencoder: dict[str, Any],
        mode: Literal["edit", "t2i"] = "edit",
        connector_hidden: int | None = None,
        zero_init_condition: bool = False,
        train_denoiser: bool = True,
        use_blueprint: bool = True,
        designer: DesignerConfig | None = None,
        cfg_dropout: float = 0.1,
        guidance_scale: float = 7.5,
        num_inference_steps: int = 30,
        scheduler: Literal["dpm_solver++", "flow_euler"] = "dpm_solver++",
        flow_shift: float = 3.0,
        init_from: str | None = None,
        optim: Optimization | None = None,
        eval_seed: int = 0,
    ) -> None:
        super().__init__(optim=optim, eval_seed=eval_seed)
        self.save_hyperparameters()
        self.mode = mode
        self.use_blueprint = use_blueprint
        self.cfg_dropout = cfg_dropout
        self.guidance_scale = guidance_scale
        self.num_inference_steps = num_inference_steps

        self.mllm = QwenVLEncoder(**mllm)
        self.codec = build_codec(**autoencoder)
        condition_channels = self.codec.latent_channels if mode == "edit" else 0
        self.denoiser = SanaDenoiser(
            **denoiser, condition_channels=condition_channels, zero_init_condition=zero_init_condition
        )
        context_dim = self.denoiser.context_dim
        self.connector = MLPConnector(self.mllm.hidden_size, context_dim, connector_hidden or context_dim)
        self.null_condition = NullCondition(self.mllm.max_condition_length, context_dim)
        self.denoiser.requires_grad_(train_denoiser)
        self.flow = FlowMatching(shift=flow_shift)
        self.scheduler = build_scheduler(scheduler, flow_shift=flow_shift)
        self.designer = Designer.from_config(designer) if designer is not None else None
        if init_from is not None:
            self.load_trainable(init_from)

    # -- conditioning -----------------------------------------------------------------------

    def condition_text(self, batch: dict[str, Any]) -> list[str]:
        """Blueprint when ``use_blueprint`` and one exists (or the designer writes one), else the instruction."""
        if not self.use_blueprint:
            return list(batch["instruction"])
        texts = []
        for i, (instruction, blueprint) in enumerate(zip(batch["instruction"], batch["blueprint"])):
            if not blueprint and self.designer is not None:
                source = batch["mllm_image"][i] if "mllm_image" in batch else None
                blueprint = self.designer.blueprint_or_instruction(source, instruction)
            texts.append(blueprint or instruction)
        return texts

    def edit_with_text(
        self, batch: dict[str, Any], generator: torch.Generator | None = None
    ) -> tuple[Tensor, list[str]]:
        """Edits and their condition texts, asking the designer (a paid API call) once per sample."""
        self.check_task(batch)  # before the designer is paid for a batch that cannot be edited
        texts = self.condition_text(batch)
        resolved = {**batch, "blueprint": texts} if self.use_blueprint else batch
        return self.edit_batch(resolved, generator=generator), texts

    def check_task(self, batch: dict[str, Any]) -> None:
        """Raise unless every sample of ``batch`` is of this model's task (DIM trains one per stage)."""
        edits = edit_rows(batch)
        wrong = [key for key, edit in zip(batch["key"], edits) if edit != (self.mode == "edit")]
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

    def encode_condition(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor]:
        """Projected MLLM states over the user turn, padded to the condition length, and their mask."""
        self.check_task(batch)
        images = batch.get("mllm_image") if self.mode == "edit" else None
        states, mask = self.mllm.condition(images, self.condition_text(batch))
        return self.connector(states.to(self.dtype)), mask

    def source_latent(self, batch: dict[str, Any]) -> Tensor | None:
        """Channel condition: the source latent for editing, none for T2I."""
        if self.mode != "edit":
            return None
        if "source" not in batch:
            raise KeyError(
                "an edit-mode DIMModule needs batch['source'] (the image to edit); in a DIM tos jsonl an edit "
                "row carries image_path_target (DIM's demo files repeat the source path there)"
            )
        return self.codec.encode(batch["source"].to(self.dtype))

    # -- training ---------------------------------------------------------------------------

    def training_loss(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """Flow-matching MSE of the DiT's velocity given the MLLM condition (SANA objective)."""
        x0 = self.codec.encode(batch["target"].to(self.dtype))
        context, mask = self.encode_condition(batch)
        if self.training and self.cfg_dropout > 0:
            context, _ = self.null_condition.drop(context, self.cfg_dropout)
        noise = torch.randn_like(x0)
        t = self.flow.sample_timesteps(x0.shape[0], device=x0.device)
        x_t, _, model_t = self.flow.add_noise(x0, noise, t)
        pred = self.denoiser(x_t, model_t, context, mask, self.source_latent(batch))
        return {"loss": self.flow.loss(pred, self.flow.target(x0, noise))}

    # -- inference --------------------------------------------------------------------------

    @torch.no_grad()
    def edit_batch(self, batch: dict[str, Any], generator: torch.Generator | None = None) -> Tensor:
        """Sample images with text CFG; the source latent is given to both branches (official)."""
        context, mask = self.encode_condition(batch)
        condition = self.source_latent(batch)
        batch_size = context.shape[0]
        size = self._output_size(batch)
        factor = self.codec.downsample_factor
        shape = (batch_size, self.codec.latent_channels, size[0] // factor, size[1] // factor)
        noise = torch.randn(shape, generator=generator).to(self.device, self.dtype)
        both_context = torch.cat([self.null_condition.null(batch_size).to(context), context])
        both_mask = torch.cat([mask, mask])
        both_condition = None if condition is None else torch.cat([condition, condition])

        def predict(x_t: Tensor, timestep: Tensor) -> Tensor:
            x_in = torch.cat([x_t, x_t])
            t_in = torch.cat([timestep, timestep]).to(x_in.device)
            uncond, cond = self.denoiser(x_in, t_in, both_context, both_mask, both_condition).chunk(2)
            return text_cfg(uncond, cond, self.guidance_scale)

        latents = sample(predict, noise, self.scheduler, self.num_inference_steps)
        return self.codec.decode(latents).clamp(-1, 1)

    def _output_size(self, batch: dict[str, Any]) -> tuple[int, int]:
        for name in ("source", "target"):
            if name in batch:
                return tuple(batch[name].shape[-2:])
        size = self.denoiser.sample_size * self.codec.downsample_factor
        return size, size

    def edit(self, image: Image.Image, instruction: str, blueprint: str | None = None) -> Image.Image:
        """Edit one PIL image; the designer writes the blueprint when configured and none is given."""
        if self.mode != "edit":
            raise ValueError("edit() needs a model built with mode='edit'; use generate() for T2I")
        resolution = self.denoiser.sample_size * self.codec.downsample_factor
        pixels = pil_to_tensor(image.convert("RGB")).float().div(255)
        square = resize(pixels, [resolution, resolution], antialias=True)
        mllm_size = self.mllm.image_size or resolution
        batch = {
            "key": ["0"],
            "source": (square * 2 - 1).unsqueeze(0).to(self.device),
            "mllm_image": resize(pixels, [mllm_size, mllm_size], antialias=True).unsqueeze(0).to(self.device),
            "instruction": [instruction],
            "blueprint": [blueprint or ""],
        }
        generator = torch.Generator().manual_seed(self.eval_seed)
        edited = self.edit_batch(batch, generator=generator)[0]
        return to_pil_image(((edited.float().cpu() + 1) / 2).clamp(0, 1))

    def generate(self, prompt: str, size: int | None = None) -> Image.Image:
        """Text-to-image generation (T2I mode)."""
        if self.mode != "t2i":
            raise ValueError("generate() needs a model built with mode='t2i'; use edit() for editing")
        resolution = size or self.denoiser.sample_size * self.codec.downsample_factor
        batch = {
            "key": ["0"],
            "target": torch.zeros(1, 3, resolution, resolution, device=self.device),
            "instruction": [prompt],
            "blueprint": [""],
        }
        generator = torch.Generator().manual_seed(self.eval_seed)
        image = self.edit_batch(batch, generator=generator)[0]
        return to_pil_image(((image.float().cpu() + 1) / 2).clamp(0, 1))
