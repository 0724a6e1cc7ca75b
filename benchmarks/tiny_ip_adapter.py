"""What the tiny pretrained SD1.5 + IP-Adapter side has learned, on held-out toy images.

Per side (``plain``: the default UNet, the source kept outside the mask at every step;
``inpainting``: ``tiny: {inpainting: true}``, mask and masked source as input channels; each also
with a ``contrastive-`` image encoder, ``tiny: {contrastive_steps: 1000}``): generation
from (caption, the image's own CLIP embedding) vs (caption, zero embedding) vs (empty caption,
embedding), scored by toy palette agreement over all pixels; and inpainting held-out toy edits
inside their ground-truth masks with the target caption and CLIP(target) (a perfect vision head),
CLIP(source) (copying) or a zero embedding, scored by the toy edit score (and its inside-the-mask
``edit`` agreement) overall and per edit type, against copy-the-source.
``python benchmarks/tiny_ip_adapter.py [--count N] [--sides plain ...]`` prints and writes
``benchmarks/tiny_ip_adapter.json``.
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


EMBEDDINGS = ("target", "source", "zero")
"""The image embedding the inpainting is given: CLIP(target), CLIP(source) or zeros."""


def inpainting_scores(side: IPAdapterSD15, count: int, steps: int = 30) -> dict[str, dict[str, float]]:
    """Toy edit ``score`` and inside-the-mask ``edit`` agreement of inpainting held-out edits, per
    :data:`EMBEDDINGS` entry and edit type (``overall`` too), and of copying the source; and
    ``cos_source_target``, how alike the image encoder finds source and target (1: it cannot tell the
    edit from the source)."""
    samples = [edit_sample(TOY_SEED, "test", i) for i in range(count)]
    source = torch.stack([pil(s.source).permute(2, 0, 1) / 255 for s, _ in samples])
    target = torch.stack([pil(s.target).permute(2, 0, 1) / 255 for s, _ in samples])
    mask = torch.stack([pil(s.mask)[None] / 255 for s, _ in samples])
    types = [s.edit_type for s, _ in samples]
    captions = [scene_caption(scene_from_json(extra["target_scene"])) for _, extra in samples]
    target_embeds = side.image_encoder.image_embeds(list(target))
    embeds = {"target": target_embeds, "source": side.image_encoder.image_embeds(list(source)), "zero": torch.zeros_like(target_embeds)}
    results = {}
    for name in EMBEDDINGS:
        edited = generate(side.denoiser, side.condition(captions, embeds[name]), side.scheduler, steps=steps, inpaint=(source, mask))
        results[name] = by_type(toy_edit_scores(edited, target, mask), types)
    results["copy_source"] = by_type(toy_edit_scores(source, target, mask), types)
    cos = torch.nn.functional.cosine_similarity(embeds["source"], target_embeds, dim=-1)
    results["cos_source_target"] = by_type({"cos": cos}, types, ("cos",))
    return results


def by_type(scores: dict[str, torch.Tensor], types: list[str], metrics: tuple[str, ...] = ("score", "edit")) -> dict[str, float]:
    """``<metric>/<type>`` means of per-sample ``scores`` per edit type and ``overall``."""
    out = {}
    for kind in [*sorted(set(types)), "overall"]:
        rows = torch.tensor([kind in ("overall", t) for t in types])
        for metric in metrics:
            out[f"{metric}/{kind}"] = round(scores[metric][rows].mean().item(), 4)
    return out


def table(results: dict[str, dict], metric: str) -> str:
    """A markdown table of ``metric`` per edit type (rows) for every side and embedding (columns)."""
    columns = [(side, name) for side, runs in results.items() for name in (*EMBEDDINGS, "copy_source") if name in runs["inpaint"]]
    kinds = [key.split("/", 1)[1] for key in next(iter(results.values()))["inpaint"]["target"] if key.startswith(f"{metric}/")]
    lines = ["| edit type | " + " | ".join(f"{side}: {name}" for side, name in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for kind in kinds:
        lines.append(f"| {kind} | " + " | ".join(f"{results[side]['inpaint'][name][f'{metric}/{kind}']:.3f}" for side, name in columns) + " |")
    return "\n".join(lines)


SIDES = {
    "plain": {},
    "inpainting": {"inpainting": True},
    "contrastive-plain": {"contrastive_steps": 1000},
    "contrastive-inpainting": {"inpainting": True, "contrastive_steps": 1000},
}
"""The tiny sides measured: their ``IPAdapterSD15Config.tiny`` options (``contrastive-``: the image
encoder pretrained with CLIP's loss on layout captions first)."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=48)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--sides", nargs="+", choices=sorted(SIDES), default=list(SIDES))
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = {}
    for name in args.sides:
        start = time.perf_counter()
        side = IPAdapterSD15(IPAdapterSD15Config(tiny=SIDES[name]))
        built = time.perf_counter() - start
        results[name] = {
            "build_or_load_s": round(built, 1),
            "generation": generation_scores(side, args.count, args.steps),
            "inpaint": inpainting_scores(side, args.count, args.steps),
        }
    print(json.dumps(results, indent=2))
    for metric in ("score", "edit"):
        print(f"\n{metric}:\n" + table(results, metric))
    for name, runs in results.items():
        print(f"\n{name}: cos(CLIP(source), CLIP(target)) " + json.dumps({k.split("/")[1]: v for k, v in runs["inpaint"]["cos_source_target"].items()}))
    Path(__file__).with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
