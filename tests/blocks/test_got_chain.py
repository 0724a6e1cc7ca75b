"""GoTReasoner: GoT's LoRA and tokens, bounded chain generation, image-token states, chain loss."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from jsonargparse import ArgumentParser
from torch import nn

from zoo.blocks.config import ConfigError
from zoo.blocks.got_chain import GoTLoRAConfig, GoTReasoner, GoTVLMConfig
from zoo.blocks.got_tokens import got_prompt
from zoo.blocks.mllm import TinyVLMConfig, VLMConfig, VLMEncoder

TINY = TinyVLMConfig(hidden_size=32, num_layers=2, intermediate_size=64, vision_depth=1, seed=0)
GOT_TARGETS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
GOT_SAVED = ["embed_tokens", "lm_head", "input_layernorm", "post_attention_layernorm"]
PROMPTS = ["Remove the red circle.", "Add a blue square at the top left, keep the rest."]
CHAINS = [
    "<|object_ref_start|>square<|object_ref_end|><|box_start|>(10,20),(300,400)<|box_end|> (blue)",
    "A gray background.",
]


def _got(**kwargs: object) -> GoTReasoner:
    return GoTReasoner(GoTVLMConfig(tiny=TINY, **{"image_size": 32, **kwargs}))


@pytest.fixture(scope="module")
def frozen_lora() -> GoTReasoner:
    """A LoRA encoder the read-only tests share (eval mode: no dropout)."""
    return _got().eval()


def _images(batch: int) -> torch.Tensor:
    return torch.rand(batch, 3, 32, 40, generator=torch.Generator().manual_seed(3))


def _perturb_trainables(encoder: GoTReasoner, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in encoder.parameters():
            if parameter.requires_grad:
                parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))


def test_lora_defaults_are_gots_config(frozen_lora: GoTReasoner) -> None:
    config = frozen_lora.model.peft_config["default"]
    assert (config.r, config.lora_alpha, config.lora_dropout) == (32, 32, 0.05)
    assert set(config.target_modules) == GOT_TARGETS
    assert set(config.modules_to_save) >= set(GOT_SAVED)
    assert isinstance(GoTVLMConfig(tiny=TINY).lora, GoTLoRAConfig) and GoTVLMConfig(tiny=TINY).image_tokens == 64


def test_partial_lora_override_keeps_gots_other_values() -> None:
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--mllm", type=GoTVLMConfig)
    config = parser.instantiate(parser.parse_args(["--mllm={tiny: {hidden_size: 32}, lora: {r: 8}}"])).mllm
    assert isinstance(config.lora, GoTLoRAConfig)
    assert (config.lora.r, config.lora.lora_alpha, config.lora.lora_dropout) == (8, 32, 0.05)
    assert set(config.lora.target_modules) == GOT_TARGETS and config.lora.modules_to_save == GOT_SAVED
    assert parser.instantiate(parser.parse_args(["--mllm={tiny: {hidden_size: 32}, lora: null}"])).mllm.lora is None


def test_only_adapters_and_saved_modules_get_gradients() -> None:
    encoder = _got()
    encoder.train()
    assert encoder.model.training  # LoRA must not be forced into eval like a frozen encoder
    trainable = {n for n, p in encoder.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n or ".modules_to_save." in n for n in trainable)
    # The official suffix match also reaches the ViT MLPs.
    assert any(".visual." in n and "mlp.gate_proj.lora_A" in n for n in trainable)
    assert any("embed_tokens.modules_to_save" in n for n in trainable)
    assert any("lm_head.modules_to_save" in n for n in trainable)
    loss, states = encoder.chain_loss_and_states(_images(2), PROMPTS, CHAINS)
    (loss + states.square().mean()).backward()
    graded = {n for n, p in encoder.named_parameters() if p.grad is not None}
    assert graded == trainable
    lora_b = [p.grad for n, p in encoder.named_parameters() if "language_model" in n and ".lora_B." in n]
    assert lora_b and all(g.abs().sum() > 0 for g in lora_b)


def test_target_modules_and_modules_to_save_are_configurable() -> None:
    llm_only = _got(lora=GoTLoRAConfig(target_modules=r".*language_model.*\.(q|v)_proj", modules_to_save=["lm_head"]))
    trainable = [n for n, p in llm_only.named_parameters() if p.requires_grad]
    assert not any(".visual." in n for n in trainable)
    assert {n.split(".")[-4] for n in trainable if ".lora_A." in n} == {"q_proj", "v_proj"}
    assert [n for n in trainable if "modules_to_save" in n] == ["model.base_model.model.lm_head.modules_to_save.default.weight"]
    with pytest.raises(ConfigError, match="freeze: false"):
        _got(freeze=False)
    with pytest.raises(TypeError, match="rank"):
        GoTLoRAConfig(rank=4)


def test_adapter_save_load_round_trip(tmp_path: Path) -> None:
    trained = _got()
    _perturb_trainables(trained, seed=1)
    trained.eval()
    expected = trained.image_token_states(_images(2), PROMPTS, CHAINS)
    trained.save_adapter(str(tmp_path))
    with pytest.raises(ValueError, match="save_adapter"):
        trained.save_pretrained(str(tmp_path / "full"))
    fresh = _got().eval()
    assert not torch.allclose(fresh.image_token_states(_images(2), PROMPTS, CHAINS), expected)
    fresh.load_adapter(str(tmp_path))
    assert torch.allclose(fresh.image_token_states(_images(2), PROMPTS, CHAINS), expected, atol=1e-6)
    trained_state, fresh_state = trained.state_dict(), fresh.state_dict()
    assert all(torch.equal(trained_state[k], fresh_state[k]) for k in trained_state)


def test_image_token_states_are_final_normed_states_at_the_64_placeholders(frozen_lora: GoTReasoner) -> None:
    encoder = frozen_lora
    ids = encoder.got_ids
    states = encoder.image_token_states(None, PROMPTS[:1], CHAINS[:1])
    assert states.shape == (1, 64, encoder.hidden_size)
    input_ids, _, _ = encoder._chain_forward(None, PROMPTS[:1], CHAINS[:1])
    assert input_ids[0, -65:].tolist() == [ids.gen_start, *ids.image_ids]
    with torch.no_grad():
        logits = encoder.model(input_ids=input_ids).logits[0, -64:]
    # The LM head applies to states after the final RMSNorm, so this holds only for post-norm states.
    assert torch.allclose(encoder.model.get_output_embeddings()(states[0]), logits, atol=1e-4)


def test_states_are_batch_invariant_and_depend_on_the_chain(frozen_lora: GoTReasoner) -> None:
    encoder = frozen_lora
    images = _images(2)
    batched = encoder.image_token_states(images, PROMPTS, CHAINS)
    for b in range(2):
        single = encoder.image_token_states(images[b : b + 1], PROMPTS[b : b + 1], CHAINS[b : b + 1])
        assert torch.allclose(batched[b], single[0], atol=1e-5)
    moved = CHAINS[0].replace("(10,20)", "(500,20)")
    assert not torch.allclose(encoder.image_token_states(images[:1], PROMPTS[:1], [moved]), batched[:1], atol=1e-4)
    with pytest.raises(ValueError, match="GoT generation tokens"):
        encoder.image_token_states(None, ["x"], ["a <|im_gen_0003|> b"])
    # The chain methods belong to GoT's reasoner: a plain encoder has no GoT tokens to read.
    assert not hasattr(VLMEncoder(VLMConfig(tiny=TINY, image_size=32)), "image_token_states")


def test_mixed_t2i_and_edit_batch_equals_each_sample_alone(frozen_lora: GoTReasoner) -> None:
    # GoT pretraining batches mix captions (no image) with edits; each sample must see what it sees alone.
    encoder, tokenizer = frozen_lora, frozen_lora.processor.tokenizer
    images = [_images(2)[0], None, _images(2)[1]]
    prompts = [PROMPTS[0], "A red circle on a white background.", PROMPTS[1]]
    chains = [CHAINS[0], CHAINS[1], CHAINS[1]]
    loss, states = encoder.chain_loss_and_states(images, prompts, chains)
    alone = [
        encoder.chain_loss_and_states(None if image is None else image[None], [prompt], [chain])
        for image, prompt, chain in zip(images, prompts, chains)
    ]
    for b, (_, alone_states) in enumerate(alone):
        torch.testing.assert_close(states[b], alone_states[0], rtol=0, atol=1e-5)
    # The CE averages over the batch's targets: each chain's tokens and its closing <|im_gen_start|>.
    targets = [len(tokenizer(chain, add_special_tokens=False).input_ids) + 1 for chain in chains]
    expected = sum(n * alone_loss for n, (alone_loss, _) in zip(targets, alone)) / sum(targets)
    torch.testing.assert_close(loss, expected, rtol=0, atol=1e-5)
    input_ids, _, _ = encoder._chain_forward(images, prompts, chains)
    texts = tokenizer.batch_decode(input_ids)
    assert got_prompt(prompts[1], edit=False) in texts[1] and "<|image_pad|>" not in texts[1]
    for b in (0, 2):
        assert got_prompt(prompts[b], edit=True) in texts[b] and texts[b].count("<|image_pad|>") == 16
    generated = encoder.generate_chain(images, prompts, max_new_tokens=6)
    for image, prompt, chain in zip(images, prompts, generated):
        assert encoder.generate_chain(None if image is None else image[None], [prompt], max_new_tokens=6) == [chain]


def test_chain_loss_is_ce_on_chain_and_closing_gen_start(frozen_lora: GoTReasoner) -> None:
    encoder = frozen_lora
    loss, _ = encoder.chain_loss_and_states(None, PROMPTS[:1], CHAINS[:1])
    tokenizer = encoder.processor.tokenizer
    prompt = encoder.processor.apply_chat_template(
        [[{"role": "user", "content": [{"type": "text", "text": got_prompt(PROMPTS[0], edit=False)}]}]],
        tokenize=False,
        add_generation_prompt=True,
    )[0]
    start = len(tokenizer(prompt).input_ids)
    input_ids, _, _ = encoder._chain_forward(None, PROMPTS[:1], CHAINS[:1])
    labels = torch.full_like(input_ids, -100)
    labels[0, start : input_ids.shape[1] - 64] = input_ids[0, start:-64]  # chain + <|im_gen_start|>
    assert int(input_ids[0, -65]) == encoder.got_ids.gen_start
    with torch.no_grad():
        logits = encoder.model(input_ids=input_ids).logits
    reference = F.cross_entropy(logits[0, :-1], labels[0, 1:], ignore_index=-100)
    assert torch.allclose(loss, reference, atol=1e-5)


def test_edit_prompt_sees_the_source_at_448_as_256_tokens() -> None:
    qwen_patching = dataclasses.replace(TINY, patch_size=14, min_pixels=56 * 56, max_pixels=16384 * 28 * 28)
    encoder = GoTReasoner(GoTVLMConfig(tiny=qwen_patching, image_size=448, lora=None))
    input_ids, _, states = encoder._chain_forward(torch.rand(1, 3, 300, 500), ["remove the hat"], ["ok"])
    assert int((input_ids == encoder.model.config.image_token_id).sum()) == 256
    assert got_prompt("remove the hat", edit=True) in encoder.processor.tokenizer.decode(input_ids[0])
    assert states.shape == (1, 64, encoder.hidden_size)


def _force_next_token(encoder: GoTReasoner, token: str) -> None:
    """Make the LM always predict ``token`` (zero weights, one-hot bias)."""
    head = encoder.model.lm_head
    forced = nn.Linear(head.in_features, head.out_features, bias=True)
    with torch.no_grad():
        forced.weight.zero_()
        forced.bias.fill_(-10.0)
        forced.bias[encoder.processor.tokenizer.convert_tokens_to_ids(token)] = 10.0
    encoder.model.lm_head = forced


def test_chain_generation_is_bounded_and_stops_at_gen_start_or_im_end() -> None:
    random_model = _got(lora=None)
    short = random_model.generate_chain(_images(2), PROMPTS, max_new_tokens=4)
    longer = random_model.generate_chain(_images(2), PROMPTS, max_new_tokens=8)
    assert all(b.startswith(a) for a, b in zip(short, longer))
    never_stops = _got(lora=None)
    _force_next_token(never_stops, "<|box_start|>")
    assert never_stops.generate_chain(None, PROMPTS, max_new_tokens=9) == ["<|box_start|>" * 9] * 2
    for stop in ("<|im_gen_start|>", "<|im_end|>", "<|endoftext|>"):
        _force_next_token(never_stops, stop)
        assert never_stops.generate_chain(_images(2), PROMPTS, max_new_tokens=50) == ["", ""]


@pytest.mark.parametrize("token", ["<|video_pad|>", "<|image_pad|>", "<|vision_start|>", "<|im_gen_end|>", "<|im_gen_0007|>"])
def test_generated_chains_drop_tokens_a_chain_cannot_hold(token: str) -> None:
    # An untrained model emits anything; read back, such a token would make the processor expand or
    # reject it (vision placeholders) or break the 64 image-token positions (GoT's own tokens).
    model = _got(lora=None)
    _force_next_token(model, token)
    chains = model.generate_chain(None, PROMPTS, max_new_tokens=5)
    assert chains == ["", ""]
    assert model.image_token_states(None, PROMPTS, chains).shape == (2, 64, TINY.hidden_size)


def test_a_given_chain_with_a_vision_token_is_an_error(frozen_lora: GoTReasoner) -> None:
    with pytest.raises(ValueError, match="vision token"):
        frozen_lora.image_token_states(None, PROMPTS[:1], ["a cat <|image_pad|> on a mat"])


def test_states_read_hidden_layer_while_the_loss_reads_the_final_norm() -> None:
    final, middle = _got(lora=None), _got(lora=None, hidden_layer=1)
    loss, states = middle.chain_loss_and_states(None, PROMPTS[:1], CHAINS[:1])
    final_loss, final_states = final.chain_loss_and_states(None, PROMPTS[:1], CHAINS[:1])
    assert torch.equal(loss, final_loss) and not torch.allclose(states, final_states)
    input_ids, _, _ = final._chain_forward(None, PROMPTS[:1], CHAINS[:1])
    with torch.no_grad():
        hidden_states = final.model.model(input_ids=input_ids, output_hidden_states=True).hidden_states
    assert torch.equal(states[0], hidden_states[1][0, -64:])


def test_image_tokens_option_and_family_are_checked() -> None:
    few = _got(lora=None, image_tokens=8)
    assert few.got_ids.num_image_tokens == 8
    assert few.image_token_states(None, PROMPTS[:1], CHAINS[:1]).shape == (1, 8, TINY.hidden_size)
    with pytest.raises(ConfigError, match="image_tokens"):
        GoTVLMConfig(tiny=TINY, image_tokens=0)
    with pytest.raises(ConfigError, match="Qwen2.5-VL"):
        GoTVLMConfig(tiny=TinyVLMConfig(family="llava_onevision"))
