"""EditingModule: the method's skeleton every paper module shares.

Data flows one way, never back: ``EditBatch`` -> :meth:`~EditingModule.encode_condition` ->
``Condition`` -> objective + denoiser loss (fit) or sampler (test/predict) -> images -> callbacks.
The base owns that flow; a paper module composes blocks and implements its parts of it:

==========================================  ====================================================
to change                                   override
==========================================  ====================================================
what the denoiser is conditioned on         :meth:`encode_condition` (-> ``Condition``)
what the frozen encoders compute            :meth:`frozen_features` (read through :meth:`features`:
                                            online, or from ``zoo data cache-features`` shards)
the unconditional branch of CFG             :meth:`null_condition`
training-time condition dropout             :meth:`drop_condition` (default: whole samples -> null)
the guidance rule                           :meth:`guidance_branches` (the branches' denoiser batch,
                                            built once per sampling call) and :meth:`guide`
                                            (their combination at each step; default: text CFG)
loss terms and their weights                :meth:`loss_weights`, :meth:`extra_losses`
the objective                               the ``objective`` config (:mod:`zoo.blocks.objectives`)
the denoiser call                           :meth:`denoise`
the sampler                                 :meth:`sample_latents`
texts the model writes before generating    :meth:`prepare_batch` (DIM's designer, GoT's chain)
==========================================  ====================================================

The base owns training_loss, the evaluation and inference entry points (:meth:`edit_outputs` for
evaluators, :meth:`edit` / :meth:`generate` / :meth:`edit_turns` for users, all through the
training preprocessing), multi-turn editing, optimiser and schedule, and checkpoint hygiene. Frozen
encoders are kept out of the module tree (:meth:`keep_frozen`): ``parameters()``, ``state_dict()``,
DDP, DeepSpeed, EMA and checkpoints see only what trains; frozen parts are rebuilt from their source.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import inspect
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.utilities.seed import isolate_rng
from PIL import Image
from torch import Tensor, nn
from torch.nn import functional as F

from datamodules.samples import DataConfigError, EditBatch, EditOutputs, EditSample, TurnOutputs, collate, signed_to_pil
from zoo import export
from zoo.blocks.condition import Condition
from zoo.blocks.config import ConfigError, check_range
from zoo.blocks.dialogue import source_version
from zoo.blocks.frozen import FrozenParts
from zoo.blocks.guidance import text_cfg
from zoo.blocks.pretrained import MissingPretrainedError
from zoo.blocks.sampling import sample


@dataclass
class Optimization:
    """Optimiser and learning-rate schedule, over trainable parameters only."""

    optimizer: str = "AdamW"
    """A ``torch.optim`` class name (``AdamW``, ``Adam``, ``SGD``, ...) or the dotted path of another
    optimiser class, e.g. ``prodigyopt.Prodigy`` (ImgEdit-E1, paper App. A.4: Prodigy at lr 1.0)."""
    optimizer_args: dict[str, Any] = field(default_factory=dict)
    """Extra keyword arguments of the optimiser, e.g. Prodigy's ``d_coef``, ``safeguard_warmup``,
    ``use_bias_correction``; they override ``lr``/``betas``/``eps``/``weight_decay``."""
    lr: float = 1e-4
    """Peak learning rate."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam betas (passed when the optimiser takes ``betas``, as every field below)."""
    eps: float = 1e-8
    """Adam epsilon."""
    weight_decay: float = 0.0
    """Weight decay (decoupled for AdamW and Prodigy)."""
    warmup_steps: int = 0
    """Linear warm-up from 0 to ``lr`` over this many optimiser steps."""
    schedule: Literal["constant", "cosine"] = "constant"
    """Shape after warm-up; cosine decays to ``min_lr_ratio * lr`` at ``trainer.max_steps``."""
    min_lr_ratio: float = 0.0
    """Floor of the cosine schedule as a fraction of ``lr``."""

    def __post_init__(self) -> None:
        check_range("optim.lr", self.lr, 0.0)
        check_range("optim.eps", self.eps, 0.0)
        check_range("optim.weight_decay", self.weight_decay, 0.0)
        check_range("optim.warmup_steps", self.warmup_steps, 0)
        check_range("optim.min_lr_ratio", self.min_lr_ratio, 0.0, 1.0)
        for beta in self.betas:
            check_range("optim.betas", beta, 0.0, 1.0)
        accepted = _keyword_parameters(optimizer_class(self.optimizer))
        unknown = sorted(set(self.optimizer_args) - accepted) if accepted is not None else []
        if unknown:
            takes = ", ".join(sorted(accepted))
            raise ConfigError(f"optim.optimizer_args {unknown} are not arguments of {self.optimizer} (it takes {takes})")


def optimizer_class(name: str) -> type[torch.optim.Optimizer]:
    """The optimiser class ``name`` names: a ``torch.optim`` class or a dotted ``module.Class`` path."""
    module_name, _, class_name = name.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name or "torch.optim"), class_name)
    except (ImportError, AttributeError, ValueError):
        cls = None
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        choices = sorted(
            n for n, c in vars(torch.optim).items()
            if isinstance(c, type) and issubclass(c, torch.optim.Optimizer) and c is not torch.optim.Optimizer
        )
        raise ConfigError(
            f"optim.optimizer must be a torch.optim class ({', '.join(choices)}) or the dotted path of an "
            f"installed optimiser class such as prodigyopt.Prodigy; got {name!r}"
        )
    return cls


def _keyword_parameters(cls: type[torch.optim.Optimizer]) -> set[str] | None:
    """Keyword arguments of ``cls`` besides ``params`` (None when it takes ``**kwargs``)."""
    parameters = list(inspect.signature(cls.__init__).parameters.values())[1:]
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return None
    return {p.name for p in parameters if p.name != "params"}


def optimizer_kwargs(optim: Optimization) -> dict[str, Any]:
    """The keyword arguments ``optim.optimizer`` is built with: the lr/betas/eps/weight_decay it
    takes, then ``optimizer_args``."""
    common = {"lr": optim.lr, "betas": tuple(optim.betas), "eps": optim.eps, "weight_decay": optim.weight_decay}
    accepted = _keyword_parameters(optimizer_class(optim.optimizer))
    kwargs = {k: v for k, v in common.items() if accepted is None or k in accepted}
    return {**kwargs, **optim.optimizer_args}


def build_optimizer(params: list[nn.Parameter], optim: Optimization) -> torch.optim.Optimizer:
    """``optim.optimizer`` over ``params`` with :func:`optimizer_kwargs`."""
    return optimizer_class(optim.optimizer)(params, **optimizer_kwargs(optim))


def check_schedule(schedule: str, max_steps: int) -> None:
    """Refuse a cosine schedule without ``trainer.max_steps`` (its length)."""
    if schedule == "cosine" and max_steps <= 0:
        raise ConfigError("a cosine schedule needs trainer.max_steps > 0 (streaming data has no epoch length)")


def lr_factor(step: int, optim: Optimization, max_steps: int) -> float:
    """Multiplier of the peak learning rate at optimiser step ``step``."""
    if step < optim.warmup_steps:
        return (step + 1) / optim.warmup_steps
    if optim.schedule == "constant":
        return 1.0
    decay_steps = max(1, max_steps - optim.warmup_steps)
    progress = min(1.0, (step - optim.warmup_steps) / decay_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return optim.min_lr_ratio + (1.0 - optim.min_lr_ratio) * cosine


@dataclass
class Edit:
    """One result of :meth:`EditingModule.edit` / :meth:`EditingModule.generate`."""

    image: Image.Image
    """The edited (or generated) image, at the model's training view of the source."""
    text: str
    """The text that produced it: the instruction, DIM's blueprint, GoT's reasoning chain."""


class EditingModule(L.LightningModule):
    """Shared LightningModule flow for MLLM-guided editing and generation.

    A subclass builds ``codec`` (kept frozen), ``denoiser``, ``objective`` and its condition
    encoder, sets the training view (``resolution``, ``mllm_resolution``; a fit adopts its
    DataModule's and checkpoints keep them), and implements :meth:`encode_condition` and
    :meth:`null_condition`.

    Args:
        optim: optimiser and schedule.
        eval_seed: seed of the noise used in validation loss, test and predict, so numbers and
            images are comparable across runs and checkpoints.
        guidance_scale: classifier-free guidance scale of :meth:`guide` (>= 0; 1 = conditional only).
        cfg_dropout: probability of training a sample on the null condition (:meth:`drop_condition`).
        num_inference_steps: sampler steps (>= 1).
    """

    codec: nn.Module
    resolution: int
    mllm_resolution: int
    cache_config: tuple[str, ...] = ("autoencoder",)
    """Init arguments that decide what a feature cache holds (:meth:`frozen_features`, and the target
    latent of the codec's ``autoencoder`` config): with the class and the training view they make the
    fingerprint (:meth:`feature_fingerprint`) a feature cache must match, checked before the model is built."""
    cached_encoders: tuple[str, ...] = ("codec",)
    """The encoders :meth:`frozen_features` runs: a feature cache is refused while any of them trains."""
    exported_from: dict[str, Any] | None = None
    """Where ``zoo export`` read the weights (checkpoint, global step, live or EMA); None when built fresh."""

    def __init__(
        self,
        optim: Optimization | None = None,
        eval_seed: int = 0,
        guidance_scale: float = 7.5,
        cfg_dropout: float = 0.1,
        num_inference_steps: int = 30,
    ) -> None:
        check_range("guidance_scale", guidance_scale, 0.0)
        check_range("cfg_dropout", cfg_dropout, 0.0, 1.0)
        check_range("num_inference_steps", num_inference_steps, 1)
        super().__init__()
        self.optim = optim or Optimization()
        self.eval_seed = eval_seed
        self.guidance_scale = guidance_scale
        self.cfg_dropout = cfg_dropout
        self.num_inference_steps = num_inference_steps
        self._frozen = FrozenParts()
        # Stage-frozen submodules (DIM's warm-up DiT) are not in checkpoints either, so loading
        # tolerates their absence; on_load_checkpoint checks that nothing trainable is missing.
        self.strict_loading = False
        # A resumed benchmark run may have fewer cases left than ranks; a rank without any then skips
        # the test loop and its evaluators finish in teardown (callbacks/results.py).
        self.allow_zero_length_dataloader_with_multiple_devices = True

    # -- frozen parts, outside the module tree ---------------------------------------------------

    def keep_frozen(self, name: str, module: nn.Module) -> None:
        """Hold a frozen block as ``self.<name>`` without making it a submodule (see module docstring)."""
        self._frozen.add(name, module)

    def add_encoder(self, name: str, module: nn.Module) -> None:
        """``self.<name> = module``: a submodule when it trains (LoRA, fine-tuning), a frozen part otherwise."""
        if any(p.requires_grad for p in module.parameters()):
            setattr(self, name, module)
        else:
            self.keep_frozen(name, module)

    @property
    def frozen_parts(self) -> FrozenParts:
        return self._frozen

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            frozen = self.__dict__.get("_frozen")
            if frozen is not None and name in frozen:
                return frozen[name]
            raise

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> EditingModule:
        # .to() / .half() / .cuda() reach the frozen parts too: they follow the module's device and dtype.
        super()._apply(fn, recurse)
        self._frozen.apply(fn)
        return self

    # -- hooks a paper module implements ------------------------------------------------------

    def encode_condition(self, batch: EditBatch, losses: bool = False) -> Condition:
        """The denoiser's condition for every sample of ``batch`` (in training, before dropout).

        ``losses``: also compute the condition's own loss terms (``Condition.losses``, e.g. GoT's
        chain CE) — True for training and validation losses, False when sampling.
        """
        raise NotImplementedError

    def null_condition(self, condition: Condition) -> Condition:
        """The unconditional counterpart of ``condition`` (CFG's negative branch, dropout's target)."""
        raise NotImplementedError

    def drop_condition(self, condition: Condition) -> Condition:
        """Training-time CFG dropout: each sample's whole condition becomes its null with ``cfg_dropout``."""
        if self.cfg_dropout == 0:
            return condition
        return condition.drop_to(self.null_condition(condition), self.cfg_dropout)[0]

    def loss_weights(self) -> dict[str, float]:
        """Weight of each loss term in ``loss``; ``diffusion_mse`` is computed only when weighted > 0."""
        return {"diffusion_mse": 1.0}

    def extra_losses(self, batch: EditBatch, condition: Condition) -> dict[str, Tensor]:
        """Loss terms beyond the diffusion MSE and the condition's own (e.g. MIND-Edit's cosine term)."""
        return {}

    def denoise(self, latents: Tensor, timestep: Tensor, condition: Condition) -> Tensor:
        """One denoiser prediction in the objective's convention."""
        return self.denoiser.predict(latents, timestep, condition)

    def guidance_branches(self, condition: Condition, null: Condition) -> Condition:
        """The conditions of every CFG branch stacked into one denoiser batch, built once per sampling
        call (they do not change between steps): ``[null, condition]`` for text CFG."""
        return Condition.cat([null, condition])

    def guide(self, latents: Tensor, timestep: Tensor, branches: Condition) -> Tensor:
        """The guided prediction at one sampler step from :meth:`guidance_branches`' batch: text CFG
        ``u + s (c - u)``, both branches in one denoiser call."""
        uncond, cond = self.denoise(torch.cat([latents, latents]), torch.cat([timestep, timestep]), branches).chunk(2)
        return text_cfg(uncond, cond, self.guidance_scale)

    def prepare_batch(self, batch: EditBatch, keep_given: bool = False) -> EditBatch:
        """Texts the model writes before generating (DIM's designer blueprints, GoT's chains).

        ``keep_given``: the batch's texts were given by a user (:meth:`edit` arguments) and are kept;
        for data batches the module decides (GoT reasons anew unless told to use the data's chains).
        """
        return batch

    def condition_text(self, batch: EditBatch) -> list[str]:
        """The text that conditions each sample (reported with its edit)."""
        return list(batch.instruction)

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this (codec downsampling x denoiser patching)."""
        return self.codec.downsample_factor

    # -- frozen features: computed online or read from a feature cache ------------------------------

    def frozen_features(self, batch: EditBatch) -> dict[str, Tensor]:
        """What the frozen encoders make of ``batch`` for :meth:`encode_condition`, batch-first, by name;
        a padded group ``g`` is ``g.<name>`` tensors ``[B, L, ...]`` with its right-padding mask
        ``g.mask`` ``[B, L]``. ``zoo data cache-features`` stores exactly this (and the target latent),
        so it must be a deterministic function of the sample. Default: none (nothing cached but the
        target latent)."""
        return {}

    def features(self, batch: EditBatch) -> dict[str, Tensor]:
        """:meth:`frozen_features` of ``batch``: its feature cache's tensors when it carries one (floating
        ones in the module's dtype), else computed by the frozen encoders. The one place that decides
        whether the frozen encoders run."""
        if batch.features is None:
            return self.frozen_features(batch)
        self.check_cacheable()
        return {
            name: value.to(self.device, self.dtype) if value.is_floating_point() else value.to(self.device)
            for name, value in batch.features.items()
        }

    def target_latent(self, batch: EditBatch) -> Tensor:
        """The codec's latent of ``batch.target`` (the objective's x0), or its feature cache's."""
        if batch.features is not None and "target_latent" in batch.features:
            return batch.features["target_latent"].to(self.device, self.dtype)
        if batch.target is None:
            raise ValueError(f"training needs target images; samples {batch.key[:3]} have none (a prediction set?)")
        with torch.no_grad():
            return self.codec.encode(batch.target.to(self.device, self.dtype))

    def features_to_cache(self, batch: EditBatch) -> dict[str, Tensor]:
        """Everything a feature cache stores of ``batch``: :meth:`frozen_features` and, given targets, the target latent."""
        self.check_cacheable()
        online = batch.replace(features=None)
        with torch.no_grad():
            features = self.frozen_features(online)
        if online.target is not None:
            features["target_latent"] = self.target_latent(online)
        return features

    def check_cacheable(self) -> None:
        """Refuse (:class:`ConfigError`) cached features while an encoder that makes them trains (LoRA, unfrozen)."""
        training = [name for name in self.cached_encoders if name not in self.frozen_parts and isinstance(getattr(self, name, None), nn.Module)]
        if training:
            raise ConfigError(
                f"{type(self).__name__}'s {', '.join(training)} trains here, so its outputs cannot come from a feature "
                "cache: freeze it, or set data.init_args.use_cached_features=false"
            )

    def feature_fingerprint(self) -> tuple[str, dict[str, Any]]:
        """:func:`cache_fingerprint` of this module: its class, its training view and its
        :attr:`cache_config` init arguments."""
        module = f"{type(self).__module__}.{type(self).__qualname__}"
        return cache_fingerprint(module, self.resolution, self.mllm_resolution, {name: self.hparams.get(name) for name in self.cache_config})

    def check_feature_cache(self, cache: dict[str, Any], where: str) -> None:
        """Refuse (:class:`ConfigError`) a feature cache written for another configuration of the frozen
        parts: the backstop of ``zoo``'s check before any model is built (:func:`refuse_other_cache`)."""
        refuse_other_cache(cache, *self.feature_fingerprint(), type(self).__name__, where)

    # -- the objective ---------------------------------------------------------------------------

    def training_loss(self, batch: EditBatch) -> dict[str, Tensor]:
        """Loss terms for one batch; ``"loss"`` (the weighted sum) is optimised, every term is logged."""
        condition = self.encode_condition(batch, losses=True)
        if self.training:
            condition = self.drop_condition(condition)
        terms = dict(condition.losses)
        weights = self.loss_weights()
        if weights.get("diffusion_mse", 0) > 0:
            terms["diffusion_mse"] = self.diffusion_loss(batch, condition)
        terms.update(self.extra_losses(batch, condition))
        unknown = sorted(set(weights) - set(terms))
        if unknown:
            raise KeyError(f"{type(self).__name__}.loss_weights names terms that were not computed: {unknown}")
        loss = sum(weight * terms[name] for name, weight in weights.items())
        return {"loss": loss, **{name: value.detach() for name, value in terms.items()}}

    def diffusion_loss(self, batch: EditBatch, condition: Condition) -> Tensor:
        """The objective's MSE of the denoiser on the noised target latent."""
        x0 = self.target_latent(batch)
        noise = self.objective.sample_noise(x0)
        t = self.objective.sample_timesteps(x0.shape[0], device=x0.device)
        x_t, _, model_t = self.objective.add_noise(x0, noise, t)
        pred = self.denoise(x_t, model_t, condition)
        return self.objective.loss(pred, self.objective.target(x0, noise, t), self.edit_region(batch, x0.shape[-2:]))

    def edit_region(self, batch: EditBatch, size: tuple[int, int]) -> Tensor | None:
        """The batch's edit-region mask at latent ``size`` (a latent cell touching the region counts),
        when the objective balances the loss over it (``edit_region_share``); else None."""
        if self.objective.edit_region_share is None:
            return None
        if batch.mask is None:
            raise DataConfigError(
                f"objective.edit_region_share={self.objective.edit_region_share} needs the edit-region mask of "
                f"every training sample (EditBatch.mask); samples {batch.key[:3]} come without one (set it to null)"
            )
        return self.mask_at(batch.mask, size)

    def mask_at(self, mask: Tensor, size: tuple[int, int]) -> Tensor:
        """An image-size ``{0, 1}`` mask ``[B, 1, H, W]`` at latent ``size``: a latent cell touching the region counts."""
        return F.adaptive_max_pool2d(mask.to(self.device, torch.float32), tuple(size))

    # -- generation ------------------------------------------------------------------------------

    @torch.no_grad()
    def sample_latents(
        self, condition: Condition, null: Condition, size: tuple[int, int], generator: torch.Generator | None = None
    ) -> Tensor:
        """Denoise seeded noise of ``size`` with :meth:`guide` over the objective's scheduler."""
        factor = self.codec.downsample_factor
        shape = (len(condition), self.codec.latent_channels, size[0] // factor, size[1] // factor)
        noise = torch.randn(shape, generator=generator).to(self.device, self.dtype)
        scheduler = self.objective.sampling_scheduler()
        branches = self.guidance_branches(condition, null)

        def predict(x_t: Tensor, timestep: Tensor) -> Tensor:
            return self.guide(x_t, timestep.to(x_t.device), branches)

        return sample(predict, noise, scheduler, self.num_inference_steps, generator=generator)

    @torch.no_grad()
    def synthesize(self, batch: EditBatch, generator: torch.Generator | None = None) -> Tensor:
        """Images in [-1, 1], ``[B, 3, H, W]`` at ``batch.size``, for a prepared batch."""
        condition = self.encode_condition(batch)
        latents = self.sample_latents(condition, self.null_condition(condition), batch.size, generator)
        return self.codec.decode(latents).clamp(-1, 1)

    @torch.no_grad()
    def edit_batch(
        self, batch: EditBatch, generator: torch.Generator | None = None, keep_given: bool = False
    ) -> tuple[Tensor, list[str]]:
        """Images for every sample of ``batch`` and, per sample, the text that produced them."""
        prepared = self.prepare_batch(batch, keep_given=keep_given)
        if prepared is not batch:  # texts were written: cached features encode the old ones
            prepared = prepared.replace(features=None)
        return self.synthesize(prepared, generator), self.condition_text(prepared)

    @torch.no_grad()
    def edit_outputs(self, batch: EditBatch, batch_idx: int = 0, keep_given: bool = False) -> EditOutputs:
        """What evaluators consume: every sample's edit, and each later turn of its multi-turn case.

        Noise is seeded with ``eval_seed + batch_idx`` for every turn. Turn k edits the version
        :meth:`source_version` picks (the latest unless the instruction goes back to an earlier
        one), as a saved PNG holds it (uint8), through the training preprocessing; its ``history``
        holds the dialogue's earlier instructions (:mod:`zoo.blocks.dialogue`).
        """
        edited, texts = self.edit_batch(batch, self._eval_generator(batch_idx), keep_given)
        outputs = EditOutputs(key=list(batch.key), edited=edited, text=texts)
        # versions[i][v]: version v of case i (0 = its source, k = the result of turn k).
        versions = {i: [batch.source[i] if batch.source is not None else None, image] for i, image in enumerate(edited)}
        for turn in range(2, max((len(t) for t in batch.turns), default=0) + 2):
            rows = [i for i, later in enumerate(batch.turns) if len(later) >= turn - 1]
            samples = []
            for i in rows:
                instruction = batch.turns[i][turn - 2]
                source = versions[i][self.source_version(instruction, turn)]
                if source is None:
                    raise ValueError(f"case {batch.key[i]} goes back to its original image, but it has none (a T2I case)")
                history = [*batch.history[i], batch.instruction[i], *batch.turns[i][: turn - 2]]
                samples.append(
                    EditSample(
                        key=batch.key[i], source=signed_to_pil(source), instruction=instruction,
                        edit_type=batch.edit_type[i] or None, history=history,
                    )
                )
            step = collate(samples, self.resolution, self.mllm_resolution).to(self.device)
            images, step_texts = self.edit_batch(step, self._eval_generator(batch_idx))
            for i, image in zip(rows, images):
                versions[i].append(image)
            outputs.turns.append(TurnOutputs(rows=rows, edited=images, text=step_texts))
        return outputs

    def source_version(self, instruction: str, turn: int) -> int:
        """Which version turn ``turn`` (1-based) of a dialogue edits: 0 = the original, k = the
        result of turn k; the latest unless the instruction names another (:func:`zoo.blocks.dialogue.source_version`)."""
        return source_version(instruction, turn)

    def _eval_generator(self, batch_idx: int) -> torch.Generator:
        return torch.Generator(device="cpu").manual_seed(self.eval_seed + batch_idx)

    # -- user entry points ------------------------------------------------------------------------

    def inference_batch(
        self,
        images: list[Image.Image | None],
        texts: list[str],
        *,
        size: int | None = None,
        blueprints: list[str | None] | None = None,
        chains: list[str | None] | None = None,
        turns: list[list[str]] | None = None,
        masks: list[Image.Image | None] | None = None,
    ) -> EditBatch:
        """An :class:`EditBatch` of new inputs, preprocessed exactly as training preprocesses its data."""
        side = size or self.resolution
        if side < 1 or side % self.size_multiple:
            raise ValueError(f"image side {side} must be a positive multiple of {self.size_multiple} for this model")
        batch = EditBatch.for_inference(
            images, texts, side, self.mllm_resolution, blueprints=blueprints, chains=chains, masks=masks
        )
        if turns is not None:
            batch.turns = turns
        return batch.to(self.device)

    def edit(
        self, image: Image.Image, instruction: str, *, blueprint: str | None = None, chain: str | None = None, size: int | None = None
    ) -> Edit:
        """Edit one image; a given ``blueprint`` (DIM) or ``chain`` (GoT) replaces the one the model would write.

        The source is seen as in training: shorter side resized to ``size`` (default: the training
        resolution) and centre-cropped for the denoiser, the whole image squashed for the MLLM.
        """
        return self.edit_turns(image, [instruction], blueprint=blueprint, chain=chain, size=size)[0]

    def generate(self, prompt: str, *, blueprint: str | None = None, chain: str | None = None, size: int | None = None) -> Edit:
        """Text-to-image generation of a ``size`` x ``size`` image (default: the training resolution)."""
        batch = self.inference_batch([None], [prompt], size=size, blueprints=[blueprint], chains=[chain])
        outputs = self.edit_outputs(batch, keep_given=True)
        return Edit(image=signed_to_pil(outputs.edited[0]), text=outputs.text[0])

    def edit_turns(
        self,
        image: Image.Image,
        instructions: list[str],
        *,
        blueprint: str | None = None,
        chain: str | None = None,
        size: int | None = None,
    ) -> list[Edit]:
        """Multi-turn editing: each instruction edits the previous turn's result, or the earlier version
        it names ("go back to the result of turn 1 and ...", :meth:`source_version`), with the earlier
        instructions as its ``history``; one :class:`Edit` per turn.

        The same implementation as the multi-turn benchmark's (:meth:`edit_outputs`); ``blueprint``
        / ``chain`` apply to the first turn.
        """
        if not instructions:
            raise ValueError("give at least one instruction")
        batch = self.inference_batch(
            [image], instructions[:1], size=size, blueprints=[blueprint], chains=[chain], turns=[list(instructions[1:])]
        )
        outputs = self.edit_outputs(batch, keep_given=True)
        edits = [Edit(image=signed_to_pil(outputs.edited[0]), text=outputs.text[0])]
        edits += [Edit(image=signed_to_pil(turn.edited[0]), text=turn.text[0]) for turn in outputs.turns]
        return edits

    # -- Lightning flow ----------------------------------------------------------------------------

    def setup(self, stage: str) -> None:
        # The training view of a fit is the DataModule's; checkpoints carry it to inference.
        data = self.trainer.datamodule if self._trainer is not None else None
        if data is not None and hasattr(data, "resolution") and hasattr(data, "mllm_resolution"):
            self.resolution, self.mllm_resolution = int(data.resolution), int(data.mllm_resolution)
        for split, cache in getattr(data, "feature_caches", {}).items():
            self.check_feature_cache(cache, f"data.init_args.{split}_shards")

    def training_step(self, batch: EditBatch, batch_idx: int) -> Tensor:
        terms = self.training_loss(batch)
        for name, value in terms.items():
            self.log(f"train/{name}", value, prog_bar=name == "loss", batch_size=len(batch))
        return terms["loss"]

    def validation_step(self, batch: EditBatch, batch_idx: int) -> dict[str, Tensor]:
        # The same noise at every evaluation; the training RNG streams (CUDA included) are untouched.
        with isolate_rng(include_cuda=True):
            torch.manual_seed(self.eval_seed + batch_idx)
            terms = self.training_loss(batch)
        for name, value in terms.items():
            self.log(f"val/{name}", value, batch_size=len(batch), sync_dist=True)
        return {"loss": terms["loss"]}

    def test_step(self, batch: EditBatch, batch_idx: int) -> EditOutputs:
        return self.edit_outputs(batch, batch_idx)

    def predict_step(self, batch: EditBatch, batch_idx: int) -> EditOutputs:
        return self.edit_outputs(batch, batch_idx)

    # -- optimisation ------------------------------------------------------------------------------

    def configure_optimizers(self) -> dict[str, Any]:
        params = [p for p in self.parameters() if p.requires_grad]
        if not params:
            raise ConfigError(f"{type(self).__name__} has no trainable parameters: check the freeze flags")
        optimizer = build_optimizer(params, self.optim)
        # Streaming loaders have no length (Lightning cannot estimate the number of steps of an
        # iterable loader), so the schedule is defined by trainer.max_steps.
        max_steps = self.trainer.max_steps if self.trainer.max_steps > 0 else 0
        check_schedule(self.optim.schedule, max_steps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_factor(step, self.optim, max_steps)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -- checkpoint hygiene ------------------------------------------------------------------------

    def trainable_state_keys(self) -> set[str]:
        """State-dict keys that checkpoints keep: trainable parameters and their modules' buffers."""
        keys: set[str] = set()
        for module_name, module in self.named_modules():
            own = list(module.named_parameters(recurse=False))
            if not any(p.requires_grad for _, p in own):
                continue
            prefix = f"{module_name}." if module_name else ""
            keys.update(prefix + name for name, _ in own)
            keys.update(prefix + name for name, _ in module.named_buffers(recurse=False))
        return keys

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        keep = self.trainable_state_keys()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        checkpoint["zoo_view"] = {"resolution": self.resolution, "mllm_resolution": self.mllm_resolution}
        # The class, for `zoo export` of a checkpoint not written through the CLI (no hparams `_class_path`).
        checkpoint["zoo_class"] = f"{type(self).__module__}.{type(self).__qualname__}"

    def save_pretrained(self, out: str | Path) -> Path:
        """Write this module as a self-contained folder (trainable weights as safetensors, a config
        that rebuilds it, references to its frozen bases, a diffusers subfolder per trained diffusers
        model): the folder ``zoo export`` writes (:mod:`zoo.export`)."""
        return export.save_pretrained(self, out)

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> EditingModule:
        """The module a :meth:`save_pretrained` / ``zoo export`` folder holds, in eval mode: rebuilt from
        its config (frozen bases from their sources), its trainable weights loaded (:mod:`zoo.export`)."""
        return export.from_pretrained(cls, folder)

    def load_trainable(self, checkpoint_path: str) -> None:
        """Initialise trainable weights from a zoo checkpoint of an earlier stage: a checkpoint file
        or a DeepSpeed ZeRO checkpoint folder (consolidated to fp32, :func:`zoo.export.read_checkpoint`).

        An input layer widened in this stage (T2I → edit: extra channels for the concatenated
        source latent) takes the checkpoint's weights in its leading channels and keeps its own
        initialisation for the new ones — the official order "load, then expand channels".
        """
        if not (Path(checkpoint_path).is_file() or export.is_zero_checkpoint(Path(checkpoint_path))):
            raise MissingPretrainedError(
                f"init_from checkpoint '{checkpoint_path}' does not exist: train the previous stage first "
                f"or set model.init_args.init_from to its last.ckpt"
            )
        state = export.read_checkpoint(checkpoint_path)["state_dict"]
        own = self.state_dict()
        unexpected = sorted(set(state) - set(own))
        if unexpected:
            raise KeyError(
                f"{checkpoint_path} holds {len(unexpected)} tensors this model lacks (first: {unexpected[0]}); "
                f"is it a checkpoint of the same model family?"
            )
        for key, value in state.items():
            if value.shape != own[key].shape:
                state[key] = _widen_into(own[key].clone(), value, key)
        self.load_state_dict(state, strict=False)

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """``nn.Module.load_state_dict``, reporting as missing only the keys a checkpoint should hold.

        Checkpoints leave frozen weights out (:meth:`on_save_checkpoint`), and Lightning's
        ``load_from_checkpoint`` warns with the list of every key a checkpoint lacks: hundreds of
        names for a stage-frozen DiT. Those are dropped from ``missing_keys``; a missing trainable
        tensor was already refused by :meth:`on_load_checkpoint`.
        """
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        left_out = set(self.state_dict()) - self.trainable_state_keys()
        result.missing_keys[:] = [key for key in result.missing_keys if key not in left_out]
        return result

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint whose trainable tensors do not fit this model (:class:`ConfigError`,
        before anything is loaded), then adopt its training view.

        A DeepSpeed checkpoint folder has no ``state_dict`` here: its engine loads the weights itself,
        after this hook (and refuses tensors of another shape)."""
        mismatch = self._checkpoint_mismatch(checkpoint["state_dict"]) if "state_dict" in checkpoint else None
        if mismatch is not None:
            raise ConfigError(f"the checkpoint does not fit this {type(self).__name__} configuration: {mismatch}")
        view = checkpoint.get("zoo_view")
        if view is not None:
            self.resolution, self.mllm_resolution = view["resolution"], view["mllm_resolution"]

    def _checkpoint_mismatch(self, state: dict[str, Tensor]) -> str | None:
        """The first difference between a checkpoint's tensors and this model's trainable state, or None."""
        own = self.state_dict()
        missing = sorted(self.trainable_state_keys() - set(state))
        unexpected = sorted(set(state) - set(own))
        reshaped = [k for k in sorted(set(state) & set(own)) if state[k].shape != own[k].shape]
        if reshaped:
            key = reshaped[0]
            return (
                f"{key} has shape {tuple(state[key].shape)} there, {tuple(own[key].shape)} here "
                f"({len(reshaped)} tensors differ in shape)"
            )
        if missing:
            return f"it lacks {len(missing)} trainable tensors (first: {missing[0]}): were they frozen when it was written?"
        if unexpected:
            return f"it holds {len(unexpected)} tensors this model lacks (first: {unexpected[0]})"
        return None

    def on_train_start(self) -> None:
        """The configuration wins over a resumed checkpoint's optimiser hyperparameters.

        Restoring a fit restores the optimiser's param groups (lr, betas, eps, weight decay) and the
        schedule's ``base_lrs`` as they were saved, so ``--model.init_args.optim.lr`` would be
        ignored on resume; here they are set from :attr:`optim`, and the current lr from the
        configured schedule at the restored step (warm-up, shape and ``trainer.max_steps`` are the
        schedule's closure, never saved). Without a checkpoint this sets the values they already have.
        A subclass that overrides :meth:`configure_optimizers` overrides this hook with it.
        """
        [optimizer] = self.trainer.optimizers
        [config] = self.trainer.lr_scheduler_configs
        scheduler = config.scheduler
        # The values the optimiser was built with (optimizer_args included), not a second copy of them.
        hyper = optimizer_kwargs(self.optim)
        peak = hyper.pop("lr", self.optim.lr)
        lr = peak * scheduler.lr_lambdas[0](scheduler.last_epoch)
        for group in optimizer.param_groups:
            group.update(initial_lr=peak, lr=lr, **{k: v for k, v in hyper.items() if k in group})
        scheduler.base_lrs = [peak] * len(optimizer.param_groups)


def cache_fingerprint(module: str, resolution: int, mllm_resolution: int, cache_args: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """``(fingerprint, config)``: what a feature cache of module class ``module`` (its dotted path) was
    computed from — the class, the training view and the values of its :attr:`EditingModule.cache_config`
    init arguments (typed configs as their dataclasses) — and a short hash of it. The module computes it
    from itself, ``zoo fit/validate/test/predict`` from the parsed configuration before building it."""
    config = {"class": module, "resolution": int(resolution), "mllm_resolution": int(mllm_resolution), **cache_args}
    plain = json.loads(json.dumps(config, sort_keys=True, default=_plain))
    return hashlib.sha256(json.dumps(plain, sort_keys=True).encode()).hexdigest()[:16], plain


def refuse_other_cache(cache: Mapping[str, Any], fingerprint: str, config: Mapping[str, Any], owner: str, where: str) -> None:
    """Raise :class:`ConfigError` unless feature cache ``cache`` (:func:`datamodules.features.cache_info`)
    has ``fingerprint`` (:func:`cache_fingerprint`); the line names the settings that differ."""
    if cache.get("fingerprint") == fingerprint:
        return
    stored = cache.get("config", {})
    differ = sorted(name for name in set(stored) | set(config) if stored.get(name) != config.get(name))
    raise ConfigError(
        f"{where} holds features cached for another configuration (fingerprint {cache.get('fingerprint')}, "
        f"this {owner}: {fingerprint}; differs in {', '.join(differ) or 'its format'}): "
        "run `zoo data cache-features` with this recipe, or set data.init_args.use_cached_features=false"
    )


def _plain(value: Any) -> Any:
    """JSON form of a config value: dataclasses as dicts, anything else as its string."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    return str(value)


def _widen_into(target: Tensor, value: Tensor, key: str) -> Tensor:
    """Copy ``value`` into the leading input channels (dim 1) of ``target``; other shapes must match."""
    same_rest = value.dim() == target.dim() and value.shape[0] == target.shape[0] and value.shape[2:] == target.shape[2:]
    if not (same_rest and value.shape[1] < target.shape[1]):
        raise ValueError(f"checkpoint tensor {key} has shape {tuple(value.shape)}, model has {tuple(target.shape)}")
    target[:, : value.shape[1]] = value
    return target
