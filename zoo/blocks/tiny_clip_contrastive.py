"""Contrastive pretraining of the tiny CLIP image encoder on toy image/layout-caption pairs.

A random tiny ``CLIPVisionModelWithProjection`` pools colour statistics and hardly sees a small
object (cos(CLIP(source), CLIP(target)) of an added or recoloured object is 0.999), so an
IP-Adapter driven by it cannot be told what to draw. :func:`pretrain_contrastively` trains it as
CLIP is trained (Radford et al. 2021, "Learning Transferable Visual Models From Natural Language
Supervision", §2.3 and Fig. 3: the symmetric cross-entropy over a batch's image-text cosine
similarities with a learned temperature, which ``transformers``' ``CLIPModel(return_loss=True)``
computes), with a tiny random text tower that is discarded afterwards.

Two choices make the embedding carry the layout, not only the colours:

* the caption lists all nine cells in a fixed order, each with its colour and shape or "empty",
  then the background (:func:`layout_caption`: "top left red circle, top empty, ..., bottom right
  empty, white background"), so every slot of the text says one cell;
* each batch holds the source and the target of toy edits side by side, so the two images of a
  pair, which differ in one object, must be told apart (hard negatives).
"""

from __future__ import annotations

import numpy as np
import torch
from transformers import CLIPConfig, CLIPModel

from datamodules.toy import edit_sample
from datamodules.toy_scenes import POSITIONS, Scene
from zoo.blocks.tiny import tiny_clip_tokenizer
from zoo.blocks.tiny_cache import TOY_SEED, scene_from_json
from zoo.blocks.vision import CLIPImageEmbedder

CAPTION_TOKENS = 48
"""Tokens of a layout caption (nine cells of at most four words, the background, CLIP's framing)."""
PAIRS_PER_BATCH = 32
"""Toy edits per step: their sources and targets make a batch of 64 (session-8 size)."""
LEARNING_RATE = 1e-3
"""AdamW learning rate (weight decay 0.01), cosine-decayed to 0."""


def layout_caption(scene: Scene) -> str:
    """Every cell in :data:`POSITIONS` order with its object's colour and shape or "empty", then the background."""
    objects = {obj.cell: obj for obj in scene.objects}
    cells = [f"{where} {objects[cell].colour} {objects[cell].shape}" if cell in objects else f"{where} empty" for cell, where in enumerate(POSITIONS)]
    return ", ".join([*cells, f"{scene.background} background"])


def edit_pairs(split: str, count: int, resolution: int) -> tuple[torch.Tensor, list[str]]:
    """``[2 * count, 3, R, R]`` in [0, 1]: the source and target of ``count`` toy edits, interleaved,
    with their :func:`layout_caption`."""
    images, captions = [], []
    for index in range(count):
        sample, extra = edit_sample(TOY_SEED, split, index, resolution)
        for image, scene in ((sample.source, "source_scene"), (sample.target, "target_scene")):
            images.append(torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 255)
            captions.append(layout_caption(scene_from_json(extra[scene])))
    return torch.stack(images), captions


def pretrain_contrastively(encoder: CLIPImageEmbedder, steps: int, pairs: int, seed: int) -> list[float]:
    """Train ``encoder``'s vision tower and projection in place with CLIP's loss on the sources and
    targets of ``pairs`` training toy edits (:data:`PAIRS_PER_BATCH` edits a step, ``steps`` steps);
    returns the loss per step. Deterministic on one thread for a given ``seed``."""
    vision = encoder.model
    tokenizer = tiny_clip_tokenizer(CAPTION_TOKENS, whole_words=True)
    text = vision.config.to_dict() | {"vocab_size": len(tokenizer), "max_position_embeddings": CAPTION_TOKENS}
    text |= {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    config = CLIPConfig(text_config=text, vision_config=vision.config.to_dict(), projection_dim=vision.config.projection_dim)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(config)
    model.vision_model.load_state_dict(vision.vision_model.state_dict())
    model.visual_projection.load_state_dict(vision.visual_projection.state_dict())
    images, captions = edit_pairs("train", pairs, vision.config.image_size)
    pixels = encoder.processor(images=list(images), do_rescale=False, return_tensors="pt")["pixel_values"]
    tokens = tokenizer(captions, padding="max_length", max_length=CAPTION_TOKENS, truncation=True, return_tensors="pt")["input_ids"]
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    generator = torch.Generator().manual_seed(seed)
    losses = []
    model.train()
    for _ in range(steps):
        edits = torch.randperm(pairs, generator=generator)[:PAIRS_PER_BATCH]
        rows = torch.stack([2 * edits, 2 * edits + 1], dim=1).flatten()
        loss = model(input_ids=tokens[rows], pixel_values=pixels[rows], return_loss=True).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    vision.vision_model.load_state_dict(model.vision_model.state_dict())
    vision.visual_projection.load_state_dict(model.visual_projection.state_dict())
    return losses
