"""What the tiny pretrained SD1.5 + IP-Adapter side has learned, on held-out toy images.

Generation from (caption, the image's own CLIP embedding) vs (caption, zero embedding) vs (empty
caption, embedding), scored by toy palette agreement over all pixels; and inpainting a toy edit
(source kept outside the ground-truth mask at every step, target caption + CLIP(target)), scored by
the toy edit score against copy-the-source. ``python benchmarks/tiny_ip_adapter.py [--count N]``
prints and writes ``benchmarks/tiny_ip_adapter.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from callbacks.toy_score import palette_agreement, toy_edit_scores  # noqa: E402
from datamodules.toy import edit_sample  # noqa: E402
from zoo.blocks.sd15_ip_adapter import IPAdapterSD15, IPAdapterSD15Config  # noqa: E402
from zoo.blocks.tiny_cache import TOY_SEED, scene_caption, scene_from_json, toy_images  # noqa: E402
from zoo.blocks.tiny_ip_adapter import generate  # noqa: E402


def generation_scores(side: IPAdapterSD15, count: int, steps: int = 30) -> dict[str, float]:
    """Mean palette agreement of generations with the held-out images under the three conditions."""
    images, captions = toy_images("test", count)
    embeds = side.image_encoder.image_embeds(list(images))
    runs = {
        "caption+embedding": side.condition(captions, embeds),
        "caption+zero_embedding": side.condition(captions, torch.zeros_like(embeds)),
        "empty_caption+embedding": side.condition([""] * count, embeds),
    }
    return {name: palette_agreement(generate(side.denoiser, cond, side.scheduler, steps=steps), images).mean().item() for name, cond in runs.items()}


def pil(image: object) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image).copy()).float()


def inpainting_scores(side: IPAdapterSD15, count: int, steps: int = 30) -> dict[str, float]:
    """Toy edit score of mask-inpainting held-out edits toward CLIP(target), and of copying the source."""
    samples = [edit_sample(TOY_SEED, "test", i) for i in range(count)]
    source = torch.stack([pil(s.source).permute(2, 0, 1) / 255 for s, _ in samples])
    target = torch.stack([pil(s.target).permute(2, 0, 1) / 255 for s, _ in samples])
    mask = torch.stack([pil(s.mask)[None] / 255 for s, _ in samples])
    captions = [scene_caption(scene_from_json(extra["target_scene"])) for _, extra in samples]
    cond = side.condition(captions, side.image_encoder.image_embeds(list(target)))
    edited = generate(side.denoiser, cond, side.scheduler, steps=steps, inpaint=(source, mask))
    ours, copy = toy_edit_scores(edited, target, mask), toy_edit_scores(source, target, mask)
    return {"inpaint_score": ours["score"].mean().item(), "inpaint_edit": ours["edit"].mean().item(), "copy_score": copy["score"].mean().item()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=48)
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    side = IPAdapterSD15(IPAdapterSD15Config(tiny={}))
    built = time.perf_counter() - start
    results = {"build_or_load_s": round(built, 1), **generation_scores(side, args.count, args.steps), **inpainting_scores(side, args.count, args.steps)}
    print(json.dumps(results, indent=2))
    Path(__file__).with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
