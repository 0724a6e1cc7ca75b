"""A vision-language model (VLM) as a condition encoder and a local chat model.

:class:`VLMEncoder` builds transformers' ``AutoModelForImageTextToText`` and ``AutoProcessor`` for
a published checkpoint, or the same classes at toy size (:mod:`zoo.blocks.tiny`), for two families:
Qwen2.5-VL (DIM, GoT, ImgEdit-E1) and LLaVA-OneVision (MIND-Edit). Two uses:

- ``condition()`` — DIM's conditioning (``showlab/DIM@28e644f:models/modeling_dim.py:633-643``):
  one user turn ``[image, instruction]`` in the family's chat format (no generation prompt), the
  hidden states of one layer (:attr:`VLMConfig.hidden_layer`; DIM: the last, after the final
  RMSNorm; MIND-Edit's vision head: ``hidden_states[21]``, MIND-Edit paper §4.1) restricted to the
  user turn's content, zero-padded or truncated (keeping the last tokens) to
  ``max_condition_length`` with a boolean mask. Unlike the official code it runs batches: right
  padding leaves each sample's states unchanged.
- ``generate()`` — greedy chat completion, for a local designer or judge.

GoT's reasoning chain on top of the encoder is :mod:`zoo.blocks.got_chain`.

Every method takes a batch where any subset of the samples has an image (:data:`Images`), so mixed
T2I + edit batches see, per sample, exactly what that sample sees alone.

Hidden states come from one forward of the VLM without its LM head (``model.model``: vision tower
+ LLM), as its ``last_hidden_state`` or, for an earlier layer, the input of that decoder layer read
by a forward pre-hook that lives for the one call. No logits are computed, and transformers'
``output_hidden_states`` machinery (lazily installed hooks and a process-global registry, neither of
which survives pickling) is not involved: an encoder pickled into a fresh process (Lightning's
``ddp_spawn``) gives the same states. One exception: LLaVA-OneVision's vision tower selects its
feature layer through that machinery inside transformers, whose hooks (installed at the first image
forward) pickle cannot write; pickle such an encoder before it encodes an image (ddp_spawn does,
at the start of fit) or launch with strategy ``ddp`` (torchrun and srun start one process per rank).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict
from peft.utils import load_peft_weights
from torch import Tensor
from transformers import (
    AutoConfig,
    AutoModelForImageTextToText,
    AutoProcessor,
    BatchFeature,
    GenerationConfig,
    PreTrainedModel,
    ProcessorMixin,
)
from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

from zoo.blocks.config import ConfigError, TorchDtype, check_choice, check_positive, check_range
from zoo.blocks.frozen import FrozenModule
from zoo.blocks.pretrained import resolve_pretrained
from zoo.blocks.tiny import tiny_llava_onevision, tiny_qwen2_5_vl

Images = Tensor | Sequence[Tensor | None] | None
"""Images for a batch of texts, in [0, 1]: a ``[B, 3, H, W]`` tensor (every sample has one), a
sequence of ``[3, H, W]`` tensors or ``None`` per sample (a batch mixing edit and T2I samples), or
``None`` (no sample has one)."""

Family = Literal["qwen2_5_vl", "llava_onevision"]
AttnImplementation = Literal["sdpa", "eager", "flash_attention_2"]
AddTokens = Callable[[ProcessorMixin, PreTrainedModel], None]
"""Adds tokens to a freshly loaded ``(processor, model)`` before any LoRA wrapping (GoT's 66)."""

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Both families' LLMs are Qwen2-based: a turn ends with <|im_end|>, a document with <|endoftext|>.
_TURN_END = "<|im_end|>"
_STOP_TOKENS = (_TURN_END, "<|endoftext|>")
_ASSISTANT_HEADER = "assistant\n"
"""What follows ``<|im_start|>`` at the start of an assistant turn (both families' chat templates)."""


@dataclass(frozen=True)
class _ChatLayout:
    """What :class:`VLMEncoder` needs to know of one family's chat format and image processor."""

    user_header: str
    """What the chat template writes right before a user turn's content."""
    grid_images: bool
    """``image_size`` snaps to the vision grid (Qwen's ``smart_resize``) and the processor must not
    resize again; otherwise the squashed image goes to the processor's own tiling (LLaVA's anyres)."""


_LAYOUTS: dict[str, _ChatLayout] = {
    # "<|im_start|>user\n<|vision_start|><|image_pad|>…<|vision_end|>{text}<|im_end|>\n"
    "qwen2_5_vl": _ChatLayout("<|im_start|>user\n", grid_images=True),
    # "<|im_start|>user <image>…<image>\n{text}<|im_end|>" (llava-hf's template)
    "llava_onevision": _ChatLayout("<|im_start|>user ", grid_images=False),
}


# --- typed options ------------------------------------------------------------------------------


@dataclass
class LoRAConfig:
    """peft LoRA adapters on the VLM; defaults are peft's ``LoraConfig`` defaults."""

    r: int = 8
    """Rank of each adapter."""
    lora_alpha: int = 8
    """Scale numerator: the adapter output is multiplied by ``lora_alpha / r``."""
    lora_dropout: float = 0.0
    """Dropout on the adapter input, in [0, 1)."""
    target_modules: list[str] | str | None = None
    """Module-name suffixes to adapt (``[q_proj, v_proj]``), or a regex matched against full names
    (``.*language_model.*\\.(q|v)_proj``); ``None`` = peft's default for the architecture."""
    modules_to_save: list[str] | None = None
    """Modules trained in full next to the adapters (e.g. ``[embed_tokens, lm_head]``)."""

    def __post_init__(self) -> None:
        check_range("lora.r", self.r, 1)
        check_positive("lora.lora_alpha", self.lora_alpha)
        if not 0 <= self.lora_dropout < 1:
            raise ConfigError(f"lora.lora_dropout must be in [0, 1), got {self.lora_dropout}")

    def peft_config(self) -> LoraConfig:
        """The ``peft.LoraConfig`` of these options for a causal LM."""
        return LoraConfig(
            r=self.r,
            lora_alpha=self.lora_alpha,
            lora_dropout=self.lora_dropout,
            target_modules=self.target_modules,
            modules_to_save=self.modules_to_save,
            task_type="CAUSAL_LM",
        )


# Size options that only one family's tiny factory takes.
_FAMILY_ONLY: dict[str, tuple[str, ...]] = {
    "qwen2_5_vl": ("merge_size", "temporal_patch_size", "min_pixels", "max_pixels"),
    "llava_onevision": ("tile_size", "max_tiles"),
}


@dataclass
class TinyVLMConfig:
    """A tiny random VLM of the real transformers classes (:mod:`zoo.blocks.tiny`), for tests and toy runs.

    Same options → identical tokenizer and weights. The defaults are the factories' defaults.
    """

    family: Family = "qwen2_5_vl"
    """Architecture: ``qwen2_5_vl`` (Qwen2.5-VL) or ``llava_onevision`` (LLaVA-OneVision)."""
    seed: int = 0
    """Seed of the random weights (drawn in a forked RNG: the global one is untouched)."""
    vocab_size: int = 768
    """Learned BPE vocabulary (>= 256 byte symbols; the toy corpus supports about 1000)."""
    hidden_size: int = 64
    """Width of the LLM (and of the vision output projected into it)."""
    num_layers: int = 2
    """Decoder layers of the LLM."""
    num_heads: int = 4
    """Attention heads of the LLM (``hidden_size / num_heads`` must be even)."""
    num_kv_heads: int = 2
    """Key/value heads of the LLM (grouped-query attention)."""
    intermediate_size: int = 128
    """Width of the LLM's MLP."""
    vision_hidden_size: int = 32
    """Width of the vision tower."""
    vision_depth: int = 2
    """Blocks of the vision tower."""
    vision_heads: int = 2
    """Attention heads of the vision tower."""
    patch_size: int = 4
    """Side of a vision patch in pixels (published: 14)."""
    merge_size: int = 2
    """Qwen2.5-VL only: patches merged per side into one LLM token."""
    temporal_patch_size: int = 2
    """Qwen2.5-VL only: frames per temporal patch."""
    min_pixels: int = 16 * 16
    """Qwen2.5-VL only: the image processor's lower bound on ``H * W``."""
    max_pixels: int = 64 * 64
    """Qwen2.5-VL only: the image processor's upper bound on ``H * W``."""
    tile_size: int = 16
    """LLaVA-OneVision only: side of one anyres tile and of SigLIP's input (published: 384)."""
    max_tiles: int = 2
    """LLaVA-OneVision only: anyres grids of up to this many tiles a side (published: 6)."""

    def __post_init__(self) -> None:
        check_choice("tiny.family", self.family, Family)
        check_range("tiny.vocab_size", self.vocab_size, 256)
        for option in dataclasses.fields(self):
            if option.name not in ("family", "seed", "vocab_size"):
                check_range(f"tiny.{option.name}", getattr(self, option.name), 1)
        foreign = [
            option.name
            for option in dataclasses.fields(self)
            if any(option.name in names for family, names in _FAMILY_ONLY.items() if family != self.family)
            and getattr(self, option.name) != option.default
        ]
        if foreign:
            raise ConfigError(f"tiny.{foreign[0]} does not apply to family {self.family!r}")

    def build(self, attn_implementation: AttnImplementation = "sdpa") -> tuple[PreTrainedModel, ProcessorMixin]:
        """``(model, processor)`` from the family's tiny factory."""
        options = {
            option.name: getattr(self, option.name)
            for option in dataclasses.fields(self)
            if option.name != "family" and not any(option.name in names for names in _FAMILY_ONLY.values())
        }
        options.update({name: getattr(self, name) for name in _FAMILY_ONLY[self.family]})
        factory = tiny_qwen2_5_vl if self.family == "qwen2_5_vl" else tiny_llava_onevision
        return factory(attn_implementation=attn_implementation, **options)


@dataclass
class VLMConfig:
    """Options of :class:`VLMEncoder`: the model's source, the condition's layer and length, training mode."""

    pretrained: str | None = None
    """Local folder or cached hub id of a Qwen2.5-VL or LLaVA-OneVision checkpoint (model +
    processor), e.g. ``Qwen/Qwen2.5-VL-3B-Instruct`` (DIM) or
    ``llava-hf/llava-onevision-qwen2-7b-ov-hf`` (MIND-Edit). Exclusive with ``tiny``."""
    tiny: TinyVLMConfig | None = None
    """A tiny random model instead (tests, toy runs). Exclusive with ``pretrained``."""
    max_condition_length: int = 8192
    """Length ``L`` of ``condition()`` outputs (DIM scripts: 8192)."""
    image_size: int | None = None
    """Squash images (aspect not kept) to this square side. Qwen2.5-VL rounds it with its
    ``smart_resize`` to a multiple of patch × merge (DIM: 1024 → 1036, 1369 tokens); LLaVA-OneVision
    then tiles it (anyres). ``None`` leaves sizing to the processor (aspect kept)."""
    hidden_layer: int = -1
    """Which entry of transformers' ``hidden_states`` tuple the condition reads: ``0`` = the input
    embeddings (image features merged in), ``k`` = the output of decoder layer ``k`` (1-based),
    ``-1`` = the last = the output of the final norm (DIM, GoT). MIND-Edit's "21st hidden layer" of
    LLaVA-OneVision-7B's 28 is ``21``. Must lie in ``[-(N + 1), N]`` for an ``N``-layer LLM."""
    freeze: bool = True
    """No gradients and always in eval mode, so the owner leaves it out of the optimizer and the
    checkpoint; ``False`` trains every weight. With ``lora`` peft freezes the base weights and the
    adapters train, so ``freeze: false`` with ``lora`` is an error."""
    torch_dtype: TorchDtype = "float32"
    """Weight dtype."""
    attn_implementation: AttnImplementation = "sdpa"
    """transformers attention backend."""
    lora: LoRAConfig | None = None
    """peft LoRA adapters; only they (and ``modules_to_save``) then get gradients and the encoder
    follows its parent's train/eval mode. ``None`` = no adapters."""

    def __post_init__(self) -> None:
        if (self.pretrained is None) == (self.tiny is None):
            raise ConfigError("the VLM needs exactly one of `pretrained` (id or folder) and `tiny`")
        if self.lora is not None and not self.freeze:
            raise ConfigError("freeze: false trains every weight while lora trains only adapters: give one of them")
        check_range("max_condition_length", self.max_condition_length, 1)
        if self.image_size is not None:
            check_range("image_size", self.image_size, 1)
        check_choice("torch_dtype", self.torch_dtype, TorchDtype)
        check_choice("attn_implementation", self.attn_implementation, AttnImplementation)


# --- the encoder --------------------------------------------------------------------------------


class VLMEncoder(FrozenModule):
    """Frozen (by default) Qwen2.5-VL or LLaVA-OneVision giving conditions and greedy chat replies.

    Args:
        config: the model's source and options (:class:`VLMConfig`).
        add_tokens: called with ``(processor, model)`` after loading and before LoRA wrapping, to
            add tokens and grow the embeddings (GoT's generation tokens,
            :class:`~zoo.blocks.got_chain.GoTReasoner`); ``modules_to_save`` then copies the grown
            embeddings.

    Attributes:
        model: the transformers model (a peft ``PeftModel`` around it with ``lora``).
        processor: its processor (tokenizer, image processor, chat template).
    """

    def __init__(self, config: VLMConfig, *, add_tokens: AddTokens | None = None) -> None:
        super().__init__()
        self.config = config
        dtype = _DTYPES[config.torch_dtype]
        if config.pretrained is not None:
            folder = resolve_pretrained(config.pretrained)
            # Checked before loading billions of weights.
            self._layout = _layout(AutoConfig.from_pretrained(folder).model_type, config.pretrained)
            self.model = AutoModelForImageTextToText.from_pretrained(
                folder, dtype=dtype, attn_implementation=config.attn_implementation
            )
            self.processor = AutoProcessor.from_pretrained(folder)
        else:
            self._layout = _LAYOUTS[config.tiny.family]
            model, self.processor = config.tiny.build(config.attn_implementation)
            self.model = model.to(dtype)
        self._layer = self._resolve_layer(config.hidden_layer)
        tokenizer = self.processor.tokenizer
        self._im_end_id = tokenizer.convert_tokens_to_ids(_TURN_END)
        self._stop_ids = tokenizer.convert_tokens_to_ids(list(_STOP_TOKENS))
        if add_tokens is not None:
            add_tokens(self.processor, self.model)
        if config.lora is not None:
            self.model = get_peft_model(self.model, config.lora.peft_config())
        if config.freeze and config.lora is None:
            self.freeze()
        else:
            self.train()

    @property
    def family(self) -> str:
        """transformers' ``model_type``: ``qwen2_5_vl`` or ``llava_onevision``."""
        return self.model.config.model_type

    @property
    def hidden_size(self) -> int:
        """Width ``D`` of the LLM's hidden states (Qwen2.5-VL-3B: 2048, LLaVA-OneVision-7B: 3584)."""
        return self.model.config.get_text_config().hidden_size

    @property
    def max_condition_length(self) -> int:
        return self.config.max_condition_length

    @property
    def image_size(self) -> int | None:
        return self.config.image_size

    def _resolve_layer(self, hidden_layer: int) -> int:
        """``hidden_layer`` as a non-negative index into the ``N + 1`` hidden states."""
        num_layers = self.model.config.get_text_config().num_hidden_layers
        if not -(num_layers + 1) <= hidden_layer <= num_layers:
            raise ConfigError(
                f"hidden_layer must be in [{-(num_layers + 1)}, {num_layers}] for this {num_layers}-layer LLM, got {hidden_layer}"
            )
        return hidden_layer % (num_layers + 1)

    def _unwrapped(self) -> PreTrainedModel:
        """The transformers model, inside peft's wrapper when there is one."""
        return self.model.get_base_model() if isinstance(self.model, PeftModel) else self.model

    # --- persistence ----------------------------------------------------------------------------

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        # transformers 5 learns which submodules its hidden-state capture reads when a model of
        # that class is built in the process; unpickling builds nothing. LLaVA-OneVision's vision
        # tower picks its feature layer through that capture, so in a fresh process (ddp_spawn) one
        # model of each class is built on the meta device (no weights allocated), as loading does.
        model = self._unwrapped()
        with torch.device("meta"):
            type(model)(copy.deepcopy(model.config))

    def save_pretrained(self, path: str) -> None:
        """Write model and processor so that ``VLMEncoder(VLMConfig(pretrained=path))`` reloads them.

        With ``lora`` use :meth:`save_adapter`: the base model is reloaded from its source.
        """
        if isinstance(self.model, PeftModel):
            raise ValueError("this encoder has LoRA adapters: save them with save_adapter(path), reload with load_adapter")
        self.model.save_pretrained(path)
        self.processor.save_pretrained(path)

    def save_adapter(self, path: str) -> None:
        """Write the LoRA adapters and ``modules_to_save`` copies (peft format) and the processor."""
        if not isinstance(self.model, PeftModel):
            raise ValueError("this encoder has no LoRA adapters (build it with lora=LoRAConfig(...))")
        self.model.save_pretrained(path)
        self.processor.save_pretrained(path)

    def load_adapter(self, path: str) -> None:
        """Load weights written by :meth:`save_adapter` into this encoder's adapters (same ``lora``)."""
        if not isinstance(self.model, PeftModel):
            raise ValueError("this encoder has no LoRA adapters to load into (build it with the saved lora=LoRAConfig(...))")
        result = set_peft_model_state_dict(self.model, load_peft_weights(path, device="cpu"))
        if result.unexpected_keys:
            raise ValueError(f"adapter at {path} does not fit this encoder's lora config: unexpected {result.unexpected_keys[:3]}")

    # --- inputs ---------------------------------------------------------------------------------

    def _prompts(self, has_image: list[bool], texts: list[str], add_generation_prompt: bool) -> list[str]:
        """One single-turn ``[image?, text]`` user conversation per sample, rendered by the chat template."""
        conversations = [
            [{"role": "user", "content": [*([{"type": "image"}] if image else []), {"type": "text", "text": text}]}]
            for image, text in zip(has_image, texts)
        ]
        return self.processor.apply_chat_template(
            conversations, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def _images(self, images: Images, batch: int) -> tuple[list[bool], list[Tensor] | None, dict]:
        """``(has_image per sample, the given images in batch order or None, processor kwargs)``.

        The processor fills the image placeholders of the batch with the images in order, so a
        list holding only the samples that have an image lines up with their prompts.
        """
        if images is None:
            return [False] * batch, None, {}
        if isinstance(images, Tensor):
            if images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
                raise ValueError(f"images must be a float tensor [B, 3, H, W], got {tuple(images.shape)} {images.dtype}")
            images = list(images)
        if len(images) != batch:
            raise ValueError(f"got {len(images)} images for {batch} texts; give one image per text (None for a text without one)")
        has_image = [image is not None for image in images]
        pixels = [self._prepare(image) for image in images if image is not None]
        if not pixels:
            return has_image, None, {}
        kwargs = {"do_rescale": False}  # already in [0, 1]
        if self.image_size is not None and self._layout.grid_images:
            kwargs["do_resize"] = False  # already on Qwen's grid (_prepare)
        return has_image, pixels, kwargs

    def _prepare(self, image: Tensor) -> Tensor:
        """Check one ``[3, H, W]`` image in [0, 1]; squash it to ``image_size`` when set."""
        if image.ndim != 3 or image.shape[0] != 3 or not image.is_floating_point():
            raise ValueError(f"each image must be a float tensor [3, H, W], got {tuple(image.shape)} {image.dtype}")
        if image.min() < 0 or image.max() > 1:
            raise ValueError("images must be in [0, 1] (got values outside); undo any [-1, 1] normalisation first")
        image = image.float()
        if self.image_size is None:
            return image.cpu()
        side = (self.image_size, self.image_size)
        if self._layout.grid_images:
            # One resample straight to Qwen's grid-aligned size, as the official DIM pipeline does.
            ip = self.processor.image_processor
            side = smart_resize(
                self.image_size,
                self.image_size,
                factor=ip.patch_size * ip.merge_size,
                min_pixels=ip.size.shortest_edge,
                max_pixels=ip.size.longest_edge,
            )
        resized = F.interpolate(image[None], size=side, mode="bicubic", antialias=True, align_corners=False)
        return resized[0].clamp(0, 1).cpu()

    def build_inputs(self, images: Images, texts: list[str], replies: list[str] | None = None) -> BatchFeature:
        """Tokenise ``[image?, text]`` user turns, right-padded, plus the boolean ``user_span`` [B, T].

        ``user_span`` marks the user turn's content: with an image, from its first placeholder token
        (Qwen: ``<|vision_start|>``; LLaVA-OneVision: the first ``<image>``) through the last text
        token; without one, the text alone. Never the system prompt, the role header or
        ``<|im_end|>`` (DIM's ``user_labels``, ``showlab/DIM@28e644f:data/tos_dataset.py:242-258``).
        With ``replies``, each conversation continues with the assistant's reply and ``<|im_end|>``
        (teacher forcing, :meth:`reply_loss_and_states`).
        """
        if not texts:
            raise ValueError("texts must hold at least one instruction")
        if replies is not None and len(replies) != len(texts):
            raise ValueError(f"got {len(replies)} replies for {len(texts)} texts; give one reply per text")
        has_image, pixels, image_kwargs = self._images(images, len(texts))
        prompts = self._prompts(has_image, texts, add_generation_prompt=replies is not None)
        full = prompts if replies is None else [p + r + _TURN_END for p, r in zip(prompts, replies)]
        inputs = self.processor(
            text=full,
            images=pixels,
            padding=True,
            padding_side="right",
            return_offsets_mapping=True,
            return_tensors="pt",
            **image_kwargs,
        )
        offsets = inputs.pop("offset_mapping")
        header = self._layout.user_header
        span = torch.zeros_like(inputs["input_ids"], dtype=torch.bool)
        for b, (prompt, text, image) in enumerate(zip(prompts, texts, has_image)):
            if header not in prompt or _TURN_END not in prompt:
                raise ValueError(f"the processor's chat template does not render the user header {header!r} and {_TURN_END!r}")
            # Images expand only after these character offsets, so they hold in the expanded text
            # (and a reply only follows them). Without an image the text is the whole content,
            # except a separator the template may put before it (LLaVA-OneVision's "\n").
            start_char = prompt.rindex(header) + len(header) if image else prompt.rindex(_TURN_END) - len(text)
            real = inputs["attention_mask"][b].bool()
            after = (offsets[b, :, 0] >= start_char) & real
            ends = ((inputs["input_ids"][b] == self._im_end_id) & after).nonzero()
            start = int(after.nonzero()[0]) if after.any() else len(real)
            end = int(ends[0]) if len(ends) else start
            if end <= start:
                raise ValueError(f"sample {b} has nothing to condition on: no image and empty text")
            span[b, start:end] = True
        inputs["user_span"] = span
        return inputs

    # --- hidden states --------------------------------------------------------------------------

    def _forward_states(self, inputs: BatchFeature) -> tuple[Tensor, Tensor]:
        """``(final states, hidden_layer states)``, both ``[B, T, D]``, from one forward without the LM head.

        The final states are the output of the LLM's last norm (``hidden_states[-1]``, what the LM
        head reads); the second are ``hidden_states[hidden_layer]`` (the same tensor by default).
        """
        decoder = self._unwrapped().base_model  # vision tower + LLM, no LM head
        layers = decoder.get_decoder().layers
        captured: list[Tensor] = []
        # hidden_states[k] (k < N) is the input of decoder layer k (0-based), which is the output of
        # layer k - 1; the hook lives for this call only, so the model stays picklable.
        handle = (
            layers[self._layer].register_forward_pre_hook(lambda _module, args: captured.append(args[0]))
            if self._layer < len(layers)
            else None
        )
        try:
            with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
                final = decoder(**inputs, use_cache=False).last_hidden_state
        finally:
            if handle is not None:
                handle.remove()
        return final, captured[0] if captured else final

    def _span_states(self, hidden: Tensor, span: Tensor) -> tuple[Tensor, Tensor]:
        """Each sample's ``span`` of ``hidden`` as ``(states [B, L, D] float32, mask [B, L] bool)``.

        ``L = max_condition_length``; shorter spans are zero-padded on the right, longer ones keep
        their last ``L`` tokens (official DIM ``y[..., -max_length:]``).
        """
        length = self.max_condition_length
        states = hidden.new_zeros(len(span), length, hidden.shape[-1], dtype=torch.float32)
        mask = torch.zeros(len(span), length, dtype=torch.bool, device=hidden.device)
        for b in range(len(span)):
            selected = hidden[b, span[b]][-length:]
            states[b, : len(selected)] = selected.float()
            mask[b, : len(selected)] = True
        return states, mask

    def condition(self, images: Images, texts: list[str]) -> tuple[Tensor, Tensor]:
        """Condition: user-span states of ``hidden_layer``, ``(states [B, L, D] float32, mask [B, L] bool)``
        (:meth:`_span_states`)."""
        states, mask, _ = self.condition_and_ids(images, texts)
        return states, mask

    def condition_and_ids(self, images: Images, texts: list[str]) -> tuple[Tensor, Tensor, Tensor]:
        """:meth:`condition` plus the token id at each condition position ``[B, L]`` (0 at padding),
        for conditions that splice other tokens in at a special token (ImgEdit-E1's ``<|vision_end|>``)."""
        inputs = self.build_inputs(images, texts).to(self.model.device)
        span = inputs.pop("user_span")
        _, hidden = self._forward_states(inputs)
        states, mask = self._span_states(hidden, span)
        ids = torch.zeros(mask.shape, dtype=torch.long, device=mask.device)
        for b in range(len(span)):
            selected = inputs["input_ids"][b, span[b]][-self.max_condition_length :]
            ids[b, : len(selected)] = selected
        return states, mask, ids

    def token_id(self, token: str) -> int:
        """The id of a special token of this model's tokenizer (e.g. ``<|vision_end|>``); KeyError if absent."""
        tokenizer = self.processor.tokenizer
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token_id is None or token_id == tokenizer.unk_token_id:
            raise KeyError(f"the {self.family} tokenizer has no token {token!r}")
        return int(token_id)

    def reply_cross_entropy(self, input_ids: Tensor, final: Tensor, stop_id: int) -> Tensor:
        """Next-token CE over every sample's reply: the tokens after the last assistant header
        (``<|im_start|>assistant\n``) through the first ``stop_id`` after it (the model must learn
        to stop), averaged over the batch's reply tokens; ``final`` are the final-norm states."""
        tokenizer = self.processor.tokenizer
        im_start = tokenizer.convert_tokens_to_ids("<|im_start|>")
        header = len(tokenizer(_ASSISTANT_HEADER, add_special_tokens=False).input_ids)
        rows, targets = [], []
        for b in range(len(input_ids)):
            start = int((input_ids[b] == im_start).nonzero()[-1]) + 1 + header
            stops = (input_ids[b, start:] == stop_id).nonzero()
            if not len(stops):
                raise ValueError(f"reply {b} does not end with token {stop_id} ({tokenizer.convert_ids_to_tokens(stop_id)})")
            stop = start + int(stops[0])
            rows.append(final[b, start - 1 : stop])
            targets.append(input_ids[b, start : stop + 1])
        # Logits only where needed: the LM head over the whole sequence (image pads included) is
        # the largest activation of the forward at 151936 rows.
        logits = self.model.get_output_embeddings()(torch.cat(rows))
        return F.cross_entropy(logits.float(), torch.cat(targets))

    def reply_loss_and_states(self, images: Images, texts: list[str], replies: list[str]) -> tuple[Tensor, Tensor, Tensor]:
        """Teacher-forced training forward: ``(reply CE, user-span states of hidden_layer, mask)``.

        One pass over ``[image?, text]`` + the assistant's ``reply`` + ``<|im_end|>``. The CE is
        the LM head's on the final states (:meth:`reply_cross_entropy`); the states are those of
        :meth:`condition` — under the causal mask the user turn never sees the reply, so they equal
        what :meth:`condition` returns at inference, before any reply is written.
        """
        inputs = self.build_inputs(images, texts, replies).to(self.model.device)
        span = inputs.pop("user_span")
        final, hidden = self._forward_states(inputs)
        states, mask = self._span_states(hidden, span)
        return self.reply_cross_entropy(inputs["input_ids"], final, self._im_end_id), states, mask

    # --- chat -----------------------------------------------------------------------------------

    @torch.no_grad()
    def _generate_ids(
        self,
        prompts: list[str],
        pixels: list[Tensor] | None,
        image_kwargs: dict,
        max_new_tokens: int,
        stop_ids: list[int],
        stop_strings: list[str] | None = None,
    ) -> list[list[int]]:
        """Greedy continuation ids of rendered ``prompts`` (with :meth:`_images`' pixels), per sample.

        Generation stops at any of ``stop_ids`` (kept at the end of a reply) or a ``stop_strings``
        match and never runs past ``max_new_tokens``; a reply that stopped before the batch's
        longest ends in padding.
        """
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        # Left padding: every sample's reply then starts at the same position.
        inputs = self.processor(
            text=prompts, images=pixels, padding=True, padding_side="left", return_tensors="pt", **image_kwargs
        ).to(self.model.device)
        tokenizer = self.processor.tokenizer
        config = GenerationConfig(
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=stop_ids,
            pad_token_id=tokenizer.pad_token_id,
            stop_strings=stop_strings,
        )
        output = self.model.generate(**inputs, generation_config=config, tokenizer=tokenizer)
        return output[:, inputs["input_ids"].shape[1] :].tolist()

    def generate(
        self,
        images: Images,
        texts: list[str],
        max_new_tokens: int = 256,
        stop_strings: list[str] | None = None,
    ) -> list[str]:
        """Greedy reply per sample (special tokens removed), at most ``max_new_tokens`` tokens.

        Stops at ``<|im_end|>``/``<|endoftext|>`` or a ``stop_strings`` match (the match is kept
        in the reply, as transformers does).
        """
        if not texts:
            raise ValueError("texts must hold at least one prompt")
        has_image, pixels, image_kwargs = self._images(images, len(texts))
        prompts = self._prompts(has_image, texts, add_generation_prompt=True)
        replies = self._generate_ids(prompts, pixels, image_kwargs, max_new_tokens, self._stop_ids, stop_strings)
        return self.processor.tokenizer.batch_decode(replies, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def _layout(model_type: str, source: str | None) -> _ChatLayout:
    if model_type not in _LAYOUTS:
        raise ConfigError(
            f"pretrained VLM '{source}' is a {model_type!r} model; the VLM encoder serves {sorted(_LAYOUTS)}"
        )
    return _LAYOUTS[model_type]
