"""ImgEditE1Module: the condition's token order and mask, what each stage trains, FLUX's inputs,
multi-turn dialogues (history, backtracking), stage-2 initialisation and checkpoints."""

from __future__ import annotations

from typing import Any

import lightning as L
import pytest
import torch
from PIL import Image

from datamodules.samples import EditBatch, collate, signed_to_pil
from datamodules.toy import edit_sample
from tests.modules.conftest import PIXELS, TINY_MLLM
from zoo.blocks.config import ConfigError
from zoo.blocks.dialogue import backtrack
from zoo.blocks.flux import FluxConfig, select_parameters
from zoo.modules.base import Optimization
from zoo.modules.imgedit_e1 import ImgEditE1Module

TINY_FLUX = FluxConfig(
    config={
        "in_channels": 12, "num_layers": 2, "num_single_layers": 1, "attention_head_dim": 8, "num_attention_heads": 2,
        "joint_attention_dim": 16, "pooled_projection_dim": 8, "guidance_embeds": True, "axes_dims_rope": [2, 2, 4],
    },
    subfolder=None,
    seed=0,
)
TINY_SIGLIP = {"tiny": {"seed": 0, "image_size": 16, "patch_size": 4, "hidden_size": 16}}


def make(stage: int = 1, **overrides: Any) -> ImgEditE1Module:
    kwargs: dict[str, Any] = {
        "mllm": TINY_MLLM, "denoiser": TINY_FLUX, "autoencoder": PIXELS, "stage": stage, "num_inference_steps": 3,
        "output_size": 16,
    }
    if stage == 2:
        kwargs["siglip"] = TINY_SIGLIP
    torch.manual_seed(0)
    return ImgEditE1Module(**(kwargs | overrides))


def toy_batch(size: int = 3) -> EditBatch:
    return collate([edit_sample(0, "train", i, 16)[0] for i in range(size)], 16, 16)


def _params(module: torch.nn.Module) -> set[int]:
    return {id(p) for p in module.parameters()}


def test_stage_1_trains_the_vlm_projector_only_and_keeps_flux_outside_the_tree() -> None:
    model = make(stage=1)
    assert "denoiser" in model.frozen_parts and "mllm" in model.frozen_parts
    assert _params(model) == _params(model.vlm_projector)
    model.zero_grad()
    model.training_loss(toy_batch())["loss"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.vlm_projector.parameters())
    assert all(p.grad is None for p in model.denoiser.parameters())
    assert set(model.state_dict()) == {f"vlm_projector.{k}" for k in model.vlm_projector.state_dict()}


def test_stage_2_trains_both_projectors_and_the_selected_flux_parameters_only() -> None:
    model = make(stage=2)
    image_stream = set(select_parameters(model.denoiser, "double_image"))
    trained = {name for name, p in model.denoiser.named_parameters() if p.requires_grad}
    assert trained == image_stream and not any("context" in name or "add_" in name for name in trained)
    model.zero_grad()
    model.training_loss(toy_batch())["loss"].backward()
    with_grad = {name for name, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    expected = {f"denoiser.{name}" for name in image_stream} | {
        f"{part}.{name}" for part in ("vlm_projector", "siglip_projector") for name, _ in getattr(model, part).named_parameters()
    }
    assert with_grad <= expected and len(with_grad) > 0.9 * len(expected)
    assert not any(name.startswith("denoiser.") and name[len("denoiser.") :] not in image_stream for name in with_grad)
    every_double = make(stage=2, image_branch="double")
    assert {n for n, p in every_double.denoiser.named_parameters() if p.requires_grad} > image_stream


def test_the_optimizer_holds_exactly_what_trains_with_prodigy(tmp_path: Any) -> None:
    model = make(stage=2, optim=Optimization(optimizer="prodigyopt.Prodigy", lr=1.0))
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False, default_root_dir=tmp_path)
    model.trainer = trainer
    optimizer = model.configure_optimizers()["optimizer"]
    assert type(optimizer).__name__ == "Prodigy" and optimizer.param_groups[0]["lr"] == 1.0
    grouped = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert grouped == {id(p) for p in model.parameters() if p.requires_grad}
    before = model.vlm_projector.net[0].weight.detach().clone()
    loss = model.training_loss(toy_batch())["loss"]
    loss.backward()
    optimizer.step()
    assert not torch.equal(before, model.vlm_projector.net[0].weight)


def test_vlm_first_puts_the_vlm_tokens_then_the_siglip_tokens_at_the_same_positions_in_every_row() -> None:
    model = make(stage=2).eval()
    batch = toy_batch()
    condition = model.encode_condition(batch)
    states, mask = model.mllm.condition(batch.mllm_images, list(batch.instruction))
    vlm = model.vlm_projector(states)
    siglip = model.siglip_projector(model.siglip.image_features((batch.source + 1) / 2))
    tokens, longest = siglip.shape[1], int(mask.sum(1).max())
    assert tokens == 16, "a 16 px image in 4 px patches"
    assert condition.context.shape[1] == longest + tokens
    assert mask.sum(1).tolist() != [longest] * len(batch), "instructions differ in length"
    for b in range(len(batch)):
        n = int(mask[b].sum())
        assert condition.mask[b].tolist() == [True] * n + [False] * (longest - n) + [True] * tokens
        torch.testing.assert_close(condition.context[b, :n], vlm[b, :n])
        torch.testing.assert_close(condition.context[b, longest:], siglip[b])
    assert "text_ids" not in condition.added, "zero text ids, as FLUX-Redux gives its SigLIP tokens"


def test_grid_positions_put_each_siglip_patch_where_it_lies_on_the_packed_latent() -> None:
    model = make(stage=2, siglip_positions="grid").eval()
    condition = model.encode_condition(toy_batch(2))
    ids = condition.added["text_ids"]
    tokens = model.siglip.num_tokens
    assert ids.shape == (2, condition.context.shape[1], 3) and torch.equal(ids[0], ids[1])
    assert torch.count_nonzero(ids[0, :-tokens]) == 0
    # 16 px, 4 x 4 SigLIP patches of 4 px over the 8 x 8 packed 2-px patches: centres at 0.5, 2.5, 4.5, 6.5.
    assert ids[0, -tokens:, 0].eq(1).all()
    assert ids[0, -tokens:, 1].unique().tolist() == [0.5, 2.5, 4.5, 6.5]
    assert ids[0, -tokens + 1].tolist() == [1.0, 0.5, 2.5], "row-major like the packed patches"
    calls: list[dict[str, Any]] = []
    hook = model.denoiser.model.register_forward_pre_hook(lambda _m, _a, kwargs: calls.append(kwargs), with_kwargs=True)
    model.synthesize(toy_batch(2), torch.Generator().manual_seed(0))
    hook.remove()
    assert torch.equal(calls[0]["txt_ids"][-tokens:], ids[0, -tokens:])
    with pytest.raises(ConfigError, match="needs token_order 'vlm_first'"):
        make(stage=2, siglip_positions="grid", token_order="vision_end")


def test_vision_end_splices_the_siglip_tokens_before_the_vlms_vision_end() -> None:
    model = make(stage=2, token_order="vision_end").eval()
    batch = toy_batch(2)
    condition = model.encode_condition(batch)
    states, mask, ids = model.mllm.condition_and_ids(batch.mllm_images, list(batch.instruction))
    vlm = model.vlm_projector(states)
    siglip = model.siglip_projector(model.siglip.image_features((batch.source + 1) / 2))
    for b in range(2):
        at = ids[b].tolist().index(model.mllm.token_id("<|vision_end|>"))
        n, tokens = int(mask[b].sum()), siglip.shape[1]
        torch.testing.assert_close(condition.context[b, :at], vlm[b, :at])
        torch.testing.assert_close(condition.context[b, at : at + tokens], siglip[b])
        torch.testing.assert_close(condition.context[b, at + tokens : n + tokens], vlm[b, at:n])
        assert int(condition.mask[b].sum()) == n + tokens


def test_flux_gets_the_distilled_guidance_and_sampling_makes_one_denoiser_call_per_step() -> None:
    model = make(stage=1).eval()
    calls: list[dict[str, Any]] = []
    flux = model.denoiser.model
    hook = flux.register_forward_pre_hook(lambda _m, _a, kwargs: calls.append(kwargs), with_kwargs=True)
    images = model.synthesize(toy_batch(2), torch.Generator().manual_seed(0))
    hook.remove()
    assert images.shape == (2, 3, 16, 16) and images.abs().max() <= 1
    assert len(calls) == 3, "no negative branch: guidance-distilled FLUX"
    assert all(call["hidden_states"].shape[0] == 2 for call in calls)
    assert all(torch.equal(call["guidance"], torch.full((2,), 3.5)) for call in calls)
    assert torch.equal(calls[0]["txt_ids"], torch.zeros_like(calls[0]["txt_ids"]))


def test_a_later_turn_reads_the_numbered_dialogue_and_backtracking_edits_the_named_version() -> None:
    model = make(stage=2).eval()
    batch = toy_batch(1).replace(history=[["Add a red circle at the top left."]])
    assert model.condition_text(batch) == [f"Turn 1: Add a red circle at the top left.\nTurn 2 (now): {batch.instruction[0]}"]
    plain = model.encode_condition(toy_batch(1)).context
    assert model.encode_condition(batch).context.shape[1] > plain.shape[1], "the history reaches the condition"
    source = Image.new("RGB", (16, 16), (200, 30, 30))
    history, moon = ["Make it blue.", "Add a star."], backtrack(1, "Add a moon.")
    turns = model.edit_turns(source, [*history, moon])
    by_hand = model.inference_batch([turns[0].image], [moon])  # version 1, with the dialogue so far
    by_hand.history = [history]
    expected = signed_to_pil(model.edit_outputs(by_hand, keep_given=True).edited[0])
    assert turns[2].image.tobytes() == expected.tobytes()
    latest = model.inference_batch([turns[1].image], [moon])
    latest.history = [history]
    assert signed_to_pil(model.edit_outputs(latest, keep_given=True).edited[0]).tobytes() != expected.tobytes()


def test_stage_2_starts_from_stage_1_and_checkpoints_hold_only_what_trains(tmp_path: Any) -> None:
    first = make(stage=1)
    with torch.no_grad():
        first.vlm_projector.net[0].weight.add_(1.0)
    path = tmp_path / "stage1.ckpt"
    torch.save({"state_dict": first.state_dict()}, path)
    second = make(stage=2, init_from=str(path))
    assert torch.equal(second.vlm_projector.net[0].weight, first.vlm_projector.net[0].weight)
    checkpoint: dict[str, Any] = {"state_dict": second.state_dict()}
    second.on_save_checkpoint(checkpoint)
    kept = set(checkpoint["state_dict"])
    assert kept == second.trainable_state_keys()
    assert not any(key.startswith(("denoiser.model.single_transformer_blocks", "denoiser.model.x_embedder")) for key in kept)
    assert any(key.startswith("denoiser.model.transformer_blocks.0.attn.to_q") for key in kept)


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        ({"stage": 3}, "stage must be 1 or 2"),
        ({"stage": 2}, "stage 2 adds the SigLIP encoder"),
        ({"siglip": TINY_SIGLIP}, "stage 1 trains the VLM projector alone"),
        ({"token_order": "siglip_last"}, "token_order"),
        ({"image_branch": "decoder"}, "decoder"),
        ({"denoiser": FluxConfig(config=TINY_FLUX.config, subfolder=None)}, "needs denoiser.seed"),
    ],
)
def test_bad_configurations_are_config_errors(overrides: dict[str, Any], needle: str) -> None:
    kwargs = {"mllm": TINY_MLLM, "denoiser": TINY_FLUX, "autoencoder": PIXELS} | overrides
    with pytest.raises(ConfigError, match=needle):
        ImgEditE1Module(**kwargs)


def test_a_reloaded_checkpoint_rebuilds_the_same_frozen_flux_whatever_the_global_rng(tmp_path: Any) -> None:
    model = make(stage=2)
    checkpoint: dict[str, Any] = {"state_dict": model.state_dict()}
    model.on_save_checkpoint(checkpoint)
    torch.manual_seed(123)
    again = ImgEditE1Module(mllm=TINY_MLLM, denoiser=TINY_FLUX, autoencoder=PIXELS, stage=2, siglip=TINY_SIGLIP, output_size=16)
    again.load_state_dict(checkpoint["state_dict"], strict=False)
    for (name, p), q in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(p, q), name


def test_text_to_image_samples_are_refused_with_their_keys() -> None:
    from datamodules.toy import t2i_sample

    batch = collate([edit_sample(0, "train", 0, 16)[0], t2i_sample(0, "train", 1, 16)[0]], 16, 16)
    with pytest.raises(ValueError, match="text-to-image"):
        make(stage=1).encode_condition(batch)
