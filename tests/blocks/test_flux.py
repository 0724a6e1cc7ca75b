"""FluxDenoiser over a tiny real FluxTransformer2DModel (parity with FluxPipeline's packing) and the
image-branch selector of ImgEdit-E1's stage 2."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from diffusers import FluxPipeline, FluxTransformer2DModel

from zoo.blocks.config import ConfigError
from zoo.blocks.flux import (
    FLUX_BRANCHES,
    FluxConfig,
    FluxDenoiser,
    check_selector,
    latent_image_ids,
    grid_text_ids,
    pack_latents,
    select_parameters,
    set_trainable,
    unpack_latents,
)

# Tiny FLUX.1-dev: 4 latent channels (in_channels 4*4), 2 double + 2 single blocks, inner width 16,
# rotary axes summing to the head dim, guidance-distilled.
TINY_FLUX = {
    "in_channels": 16,
    "num_layers": 2,
    "num_single_layers": 2,
    "attention_head_dim": 8,
    "num_attention_heads": 2,
    "joint_attention_dim": 12,
    "pooled_projection_dim": 6,
    "guidance_embeds": True,
    "axes_dims_rope": [2, 2, 4],
}


def make_denoiser(seed: int = 0, **kwargs: object) -> FluxDenoiser:
    torch.manual_seed(seed)
    return FluxDenoiser(FluxConfig(config=TINY_FLUX, **kwargs)).eval()  # type: ignore[arg-type]


def make_inputs(batch: int = 2, length: int = 5, height: int = 6, width: int = 8) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {
        "latents": torch.randn(batch, 4, height, width, generator=g),
        "timestep": torch.tensor([700.0, 250.0][:batch]),
        "context": torch.randn(batch, length, 12, generator=g),
        "context_mask": torch.ones(batch, length, dtype=torch.bool),
    }


def pipeline_call(model: FluxTransformer2DModel, x: dict[str, torch.Tensor], guidance: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
    """What FluxPipeline.__call__ does around the transformer for one step (diffusers 0.42)."""
    b, c, h, w = x["latents"].shape
    packed = FluxPipeline._pack_latents(x["latents"], b, c, h, w)
    image_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, packed.device, packed.dtype)
    out = model(
        hidden_states=packed,
        timestep=x["timestep"].expand(b).to(packed.dtype) / 1000,
        guidance=guidance,
        pooled_projections=pooled,
        encoder_hidden_states=x["context"],
        txt_ids=torch.zeros(x["context"].shape[1], 3),
        img_ids=image_ids,
        return_dict=False,
    )[0]
    return FluxPipeline._unpack_latents(out, h * 8, w * 8, 8)


def test_packing_and_ids_match_the_pipeline() -> None:
    latents = torch.randn(2, 4, 6, 8)
    packed = pack_latents(latents)
    torch.testing.assert_close(packed, FluxPipeline._pack_latents(latents, 2, 4, 6, 8), rtol=0, atol=0)
    assert packed.shape == (2, 12, 16)
    torch.testing.assert_close(unpack_latents(packed, 6, 8), latents, rtol=0, atol=0)
    expected_ids = FluxPipeline._prepare_latent_image_ids(2, 3, 4, "cpu", torch.float32)
    torch.testing.assert_close(latent_image_ids(6, 8, torch.device("cpu"), torch.float32), expected_ids, rtol=0, atol=0)


def test_call_equals_the_pipeline_step_with_default_guidance_and_zero_pooled() -> None:
    denoiser = make_denoiser()
    assert (denoiser.in_channels, denoiser.context_dim, denoiser.pooled_dim) == (4, 12, 6)
    x = make_inputs()
    with torch.no_grad():
        ours = denoiser(**x)
        expected = pipeline_call(denoiser.model, x, torch.full((2,), 3.5), torch.zeros(2, 6))
        # Another guidance or timestep convention (t instead of t/1000) would change the output.
        other = pipeline_call(denoiser.model, x, torch.full((2,), 1.0), torch.zeros(2, 6))
    assert ours.shape == x["latents"].shape
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    assert (ours - other).abs().max() > 1e-3


def test_added_pooled_and_guidance_reach_the_model() -> None:
    denoiser = make_denoiser()
    x = make_inputs()
    pooled, guidance = torch.randn(2, 6), torch.tensor([1.0, 5.0])
    with torch.no_grad():
        ours = denoiser(**x, added_conditions={"pooled": pooled, "guidance": guidance})
        expected = pipeline_call(denoiser.model, x, guidance, pooled)
        default = denoiser(**x)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    assert (ours - default).abs().max() > 1e-3
    configured = make_denoiser(guidance=5.0)
    with torch.no_grad():
        torch.testing.assert_close(
            configured(**x), pipeline_call(configured.model, x, torch.full((2,), 5.0), torch.zeros(2, 6)), rtol=1e-5, atol=1e-5
        )


def test_padded_context_tokens_change_nothing() -> None:
    denoiser = make_denoiser()
    x = make_inputs(length=3)
    padded = {**x, "context": torch.cat([x["context"], 9 * torch.randn(2, 2, 12)], dim=1)}
    padded["context_mask"] = torch.tensor([[1, 1, 1, 0, 0]] * 2, dtype=torch.bool)
    with torch.no_grad():
        short, long = denoiser(**x), denoiser(**padded)
    torch.testing.assert_close(long, short, rtol=1e-5, atol=1e-5)
    # FLUX's own behaviour (no mask): padding is zeroed but attended, so the prediction moves.
    unmasked = make_denoiser(mask_padding=False)
    zero_pad = {**padded, "context": padded["context"].clone()}
    zero_pad["context"][:, 3:] = 0
    with torch.no_grad():
        attended = unmasked(**padded)
        torch.testing.assert_close(attended, unmasked(**{**zero_pad, "context_mask": torch.ones(2, 5, dtype=torch.bool)}))
    assert (attended - short).abs().max() > 1e-3


def test_gradient_checkpointing_keeps_the_mask_output_and_gradients() -> None:
    x = make_inputs(length=4)
    x["context_mask"] = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.bool)
    results = []
    for checkpointing in (False, True):
        denoiser = make_denoiser(gradient_checkpointing=checkpointing).train()
        out = denoiser(**x)
        out.square().mean().backward()
        results.append((out.detach(), denoiser.model.x_embedder.weight.grad.clone()))
    assert denoiser.model.gradient_checkpointing
    torch.testing.assert_close(results[1][0], results[0][0])
    torch.testing.assert_close(results[1][1], results[0][1])


def test_text_ids_reach_flux_and_grid_ids_cover_the_packed_patches() -> None:
    denoiser = make_denoiser()
    x = make_inputs()
    length = x["context"].shape[1]
    ids = torch.zeros(length, 3)
    ids[-1] = torch.tensor([1.0, 2.0, 3.0])
    seen: list[torch.Tensor] = []
    hook = denoiser.model.register_forward_pre_hook(lambda _m, _a, kwargs: seen.append(kwargs["txt_ids"]), with_kwargs=True)
    moved = denoiser(**x, added_conditions={"text_ids": ids.expand(2, -1, -1)})
    plain = denoiser(**x)
    hook.remove()
    assert torch.equal(seen[0], ids) and torch.count_nonzero(seen[1]) == 0
    assert not torch.allclose(moved, plain), "a text token's rotary position changes the prediction"
    grid = grid_text_ids(2, 8, 8)  # 2 x 2 patches over a 4 x 4 packed grid
    assert grid.tolist() == [[1, 0.5, 0.5], [1, 0.5, 2.5], [1, 2.5, 0.5], [1, 2.5, 2.5]]


def test_bad_inputs_are_clear_errors() -> None:
    denoiser = make_denoiser()
    x = make_inputs()
    with pytest.raises(ValueError, match="must be even"):
        denoiser(**make_inputs(height=5))
    with pytest.raises(ValueError, match="'pooled', 'guidance' and 'text_ids' only"):
        denoiser(**x, added_conditions={"text_embeds": torch.zeros(2, 6)})
    length = x["context"].shape[1]
    with pytest.raises(ValueError, match="the same for every sample"):
        denoiser(**x, added_conditions={"text_ids": torch.arange(2.0).view(2, 1, 1).expand(2, length, 3)})
    with pytest.raises(ValueError, match=r"pooled must be \[2 or 1, 6\]"):
        denoiser(**x, added_conditions={"pooled": torch.zeros(2, 5)})
    with pytest.raises(ValueError, match="condition_channels=0"):
        denoiser(**x, condition=torch.zeros(2, 4, 6, 8))
    torch.manual_seed(0)
    schnell = FluxDenoiser(FluxConfig(config={**TINY_FLUX, "guidance_embeds": False}))
    assert not schnell.has_guidance_embedding
    with pytest.raises(ValueError, match="no guidance embedding"):
        schnell(**x, added_conditions={"guidance": torch.ones(2)})
    with pytest.raises(ValueError, match="in_channels = 4 x latent channels"):
        FluxDenoiser(FluxConfig(config={**TINY_FLUX, "in_channels": 6}))
    with pytest.raises(ConfigError, match="denoiser.guidance"):
        FluxConfig(config=TINY_FLUX, guidance=-1.0)


def test_loads_from_a_pipeline_folder(tmp_path: Path) -> None:
    denoiser = make_denoiser()
    denoiser.model.save_pretrained(tmp_path / "transformer")
    loaded = FluxDenoiser(FluxConfig(pretrained=str(tmp_path))).eval()
    x = make_inputs()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**x), denoiser(**x), rtol=0, atol=0)


# --- the image branch -------------------------------------------------------------------------

IMAGE_STREAM = re.compile(r"^transformer_blocks\.\d\.(norm1\.linear|attn\.(to_q|to_k|to_v|to_out\.0|norm_q|norm_k)|ff\.net)\.")


def test_double_image_is_exactly_the_image_stream_of_every_double_block() -> None:
    model = make_denoiser().model
    names = select_parameters(model, "double_image")
    all_names = [n for n, _ in model.named_parameters()]
    assert names == [n for n in all_names if IMAGE_STREAM.match(n)]
    for block in range(2):
        picked = {n.split(".", 2)[2] for n in names if n.startswith(f"transformer_blocks.{block}.")}
        assert {"norm1.linear.weight", "attn.to_q.weight", "attn.to_k.bias", "attn.to_v.weight", "attn.to_out.0.weight",
                "attn.norm_q.weight", "attn.norm_k.weight", "ff.net.0.proj.weight", "ff.net.2.bias"} <= picked
    context_stream = ("norm1_context", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "norm_added", "ff_context")
    assert not [n for n in names if any(part in n for part in context_stream)]
    assert not [n for n in names if not n.startswith("transformer_blocks.")]
    print(f"double_image: {len(names)} of {len(all_names)} tiny FLUX tensors")


def test_named_branches_and_regexes() -> None:
    model = make_denoiser().model
    all_names = [n for n, _ in model.named_parameters()]
    double = select_parameters(model, "double")
    single = select_parameters(model, "single")
    assert double == [n for n in all_names if n.startswith("transformer_blocks.")]
    assert single == [n for n in all_names if n.startswith("single_transformer_blocks.")]
    assert select_parameters(model, "all") == [n for n in all_names if n in set(double) | set(single)]
    assert not {"x_embedder.weight", "context_embedder.weight", "proj_out.weight"} & set(select_parameters(model, "all"))
    assert select_parameters(model, [r"^x_embedder\.", r"^proj_out\."]) == ["x_embedder.weight", "x_embedder.bias", "proj_out.weight", "proj_out.bias"]
    # The same selector works through the denoiser (and any module holding it).
    assert select_parameters(make_denoiser(), "double_image") == ["model." + n for n in select_parameters(model, "double_image")]
    assert set(FLUX_BRANCHES) == {"double_image", "double", "single", "all"}


def test_bad_selectors_are_errors() -> None:
    model = make_denoiser().model
    with pytest.raises(ConfigError, match="double_image, double, single, all"):
        check_selector("image")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="bad FLUX parameter regex"):
        check_selector(["("])
    with pytest.raises(ValueError, match="matches no parameter"):
        select_parameters(model, [r"^lora_"])


def test_set_trainable_gives_gradients_to_the_branch_only() -> None:
    denoiser = make_denoiser()
    trained = set(set_trainable(denoiser, "double_image"))
    assert trained == set(select_parameters(denoiser, "double_image"))
    assert {n for n, p in denoiser.named_parameters() if p.requires_grad} == trained
    denoiser(**make_inputs()).square().mean().backward()
    with_grad = {n for n, p in denoiser.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert with_grad == trained
