"""``zoo data cache-features``: a model trained from cached features equals one trained online (DIM,
ImgEdit-E1, GoT), the frozen encoders do not run on cached batches, CFG dropout still reaches the null
condition, and what a cache would freeze (a designer, another configuration) is refused in one line
before any model is built."""

from __future__ import annotations

from itertools import islice
from pathlib import Path

import pytest
import torch
from torch import nn

from datamodules.samples import DataConfigError
from datamodules.shards import ShardDataModule
from datamodules.toy import main as toy_main
from tests.helpers.recipes import configs, error_lines
from tests.modules.conftest import TINY_MLLM, tiny_dim_kwargs
from tests.modules.test_got import make as make_got
from tests.modules.test_imgedit_e1 import make as make_imgedit
from zoo import feature_cache
from zoo.blocks.config import ConfigError
from zoo.blocks.mllm import TinyVLMConfig, VLMConfig
from zoo.feature_cache import cache_split
from zoo.modules.base import EditingModule, build_optimizer
from zoo.modules.dim import DIMModule
from zoo.trainer_cli import ZooCLI, recipe_fingerprint, run


TINY_DIM = ["recipes/dim_edit_stage1.yaml", "recipes/tiny/dim.yaml"]


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("toy")
    toy_main(["--out", str(out), "--train", "24", "--val", "4", "--test", "4", "--resolution", "16", "--samples-per-shard", "24"])
    return out


def data(spec: Path, cached: bool = True, shuffle_buffer: int = 1) -> ShardDataModule:
    """Batches of 4 at 16²; ``shuffle_buffer`` 1 keeps the shard's order (the cache's batches)."""
    module = ShardDataModule(
        train_shards=str(spec), batch_size=4, resolution=16, mllm_resolution=16, num_workers=0, shuffle_buffer=shuffle_buffer,
        use_cached_features=cached,
    )
    module.setup("fit")
    return module


def dim(**overrides: object) -> DIMModule:
    torch.manual_seed(0)
    return DIMModule(**tiny_dim_kwargs(**overrides))


def cache(module: EditingModule, toy: Path, out: Path, dtype: str = "float32") -> Path:
    cache_split(module, data(toy / "train"), str(toy / "train"), out, dtype=dtype)
    return out


def calls(encoder: nn.Module) -> list[int]:
    """A counter of the forward calls of ``encoder``'s submodules (forward hooks)."""
    counter = [0]
    for sub in encoder.modules():
        sub.register_forward_hook(lambda *_: counter.__setitem__(0, counter[0] + 1))
    return counter


def train(module: EditingModule, loader: ShardDataModule, steps: int = 4) -> dict[str, torch.Tensor]:
    """``steps`` optimiser steps of ``module`` over the loader's first batches, seed 0; its trainable weights."""
    torch.manual_seed(0)
    module.train()
    optimizer = build_optimizer([p for p in module.parameters() if p.requires_grad], module.optim)
    for batch in islice(loader.train_dataloader(), steps):
        module.training_loss(batch)["loss"].backward()
        optimizer.step()
        optimizer.zero_grad()
    return {name: p.detach().clone() for name, p in module.named_parameters() if p.requires_grad}


def max_delta(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_dim_trained_from_float32_features_equals_online_and_skips_the_mllm(toy: Path, tmp_path: Path) -> None:
    cached = cache(dim(), toy, tmp_path / "fp32")
    plain, stored = data(toy / "train"), data(cached)
    assert stored.feature_caches["train"]["dtype"] == "float32" and plain.feature_caches == {}
    online_model, cached_model = dim(), dim()
    online_calls, cached_calls = calls(online_model.mllm), calls(cached_model.mllm)
    online, from_cache = train(online_model, plain), train(cached_model, stored)
    assert online_calls[0] > 0 and cached_calls[0] == 0
    start = dim().state_dict()
    assert max_delta(online, {k: start[k] for k in online}) > 1e-4  # it trained
    assert max_delta(online, from_cache) == 0.0  # batches of the cache's composition: bit for bit
    # Shuffled batches pad the MLLM's inputs to other lengths than the cache's batches did, so its
    # states agree to float32 rounding only (measured 1.5e-6 after 4 AdamW steps).
    shuffled = train(dim(), data(toy / "train", shuffle_buffer=24)), train(dim(), data(cached, shuffle_buffer=24))
    assert 0 < max_delta(*shuffled) <= 1e-5


def test_bfloat16_features_drift_little(toy: Path, tmp_path: Path) -> None:
    stored = data(cache(dim(), toy, tmp_path / "bf16", dtype="bfloat16"))
    online, from_cache = train(dim(), data(toy / "train")), train(dim(), stored)
    drift = max_delta(online, from_cache)
    print(f"bf16 feature storage: max |dw| after 4 steps {drift:.2e}")
    assert 1e-6 < drift < 1e-2


def test_cfg_dropout_reaches_the_null_condition_after_the_cache(toy: Path, tmp_path: Path) -> None:
    """Dropout happens after the cache: with p = 1 every cached sample is trained on DIM's learned
    null caption, exactly as online, and that differs from the conditional loss."""
    stored, plain = data(cache(dim(), toy, tmp_path / "cfg")), data(toy / "train")
    losses = {}
    for name, loader, p in (("cached", stored, 1.0), ("online", plain, 1.0), ("kept", stored, 0.0)):
        model = dim(cfg_dropout=p).train()
        torch.manual_seed(0)
        losses[name] = model.training_loss(next(iter(loader.train_dataloader())))["loss"].item()
    assert losses["cached"] == pytest.approx(losses["online"], abs=1e-6) and abs(losses["cached"] - losses["kept"]) > 1e-4


def test_imgedit_e1_stage1_from_features_equals_online(toy: Path, tmp_path: Path) -> None:
    stored = data(cache(make_imgedit(1), toy, tmp_path / "e1"))
    assert {"vlm.states", "vlm.ids", "target_latent"} <= set(next(iter(stored.train_dataloader())).features)
    online, from_cache = train(make_imgedit(1), data(toy / "train"), 3), train(make_imgedit(1), stored, 3)
    assert max_delta(online, from_cache) == 0.0


def test_got_trained_from_float32_features_equals_online_and_runs_no_vae_encode(tmp_path: Path) -> None:
    """GoT's VLM trains (LoRA), so only its VAE encodes are cached: reference, box canvases, target.
    On a mixed T2I + edit split, training from them equals training online and never runs the VAE."""
    toy_main(["--out", str(tmp_path / "mixed"), "--train", "16", "--val", "2", "--test", "2", "--resolution", "16", "--samples-per-shard", "16", "--task", "mixed"])
    stored = data(cache(make_got(), tmp_path / "mixed", tmp_path / "got"))
    first = next(iter(stored.train_dataloader()))
    assert set(first.features) == {"reference_latent", "spatial_latent", "target_latent"} and set(first.task) == {"edit", "t2i"}
    online_model, cached_model = make_got(), make_got()
    online_vae, cached_vae, cached_vlm = calls(online_model.codec), calls(cached_model.codec), calls(cached_model.mllm)
    online, from_cache = train(online_model, data(tmp_path / "mixed" / "train")), train(cached_model, stored)
    assert online_vae[0] > 0 and cached_vae[0] == 0 and cached_vlm[0] > 0
    start = make_got().state_dict()
    assert max_delta(online, {k: start[k] for k in online}) > 1e-4  # it trained
    assert max_delta(online, from_cache) == 0.0


def test_a_cache_of_another_configuration_is_refused(toy: Path, tmp_path: Path) -> None:
    stored = data(cache(dim(), toy, tmp_path / "other"))
    other = dim(mllm=VLMConfig(tiny=TinyVLMConfig(seed=1, hidden_size=32, num_layers=1), max_condition_length=96, image_size=16))
    with pytest.raises(ConfigError, match="differs in mllm"):
        other.check_feature_cache(stored.feature_caches["train"], "train")
    dim().check_feature_cache(stored.feature_caches["train"], "train")  # the same configuration passes
    assert TINY_MLLM.tiny.seed == 0


def test_the_data_module_reads_or_ignores_a_cache(toy: Path, tmp_path: Path) -> None:
    cached = cache(dim(), toy, tmp_path / "read")
    batch = next(iter(data(cached).train_dataloader()))
    assert batch.features is not None and batch.features["vlm.states"].shape == (4, 96, 32)  # padded back to the condition length
    assert batch.select([2, 0]).features["source_latent"].equal(batch.features["source_latent"][[2, 0]])
    assert batch.with_texts_of(1).features is None  # shifted texts are encoded online
    ignored = data(cached, cached=False)
    assert ignored.feature_caches == {} and next(iter(ignored.train_dataloader())).features is None
    with pytest.raises(DataConfigError, match="cached at resolution 16"):
        ShardDataModule(train_shards=str(cached), resolution=32, mllm_resolution=16).setup("fit")


def test_a_cache_of_another_recipe_is_refused_before_any_model_is_built(toy: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The fingerprint is checked from the parsed configuration: a changed frozen-part setting or view
    is one line, and the seeded RNG stream is left as seeding left it, so no weight was initialised."""
    out = tmp_path / "cli"
    args = ["--data.init_args.train_shards=" + str(toy / "train"), "--data.init_args.val_shards=null", "--data.init_args.test_shards=null",
            "--data.init_args.resolution=16", "--data.init_args.mllm_resolution=16", "--data.init_args.batch_size=4"]
    assert feature_cache.main([*configs(TINY_DIM), "--out", str(out), "--dtype", "float32", *args]) == 0
    assert "cached 24 train samples in 1 shard(s)" in capsys.readouterr().out
    common = [*configs(TINY_DIM), *args[1:], f"--trainer.default_root_dir={tmp_path / 'run'}", f"--trainer.logger.init_args.save_dir={tmp_path / 'run'}"]
    fit = ["fit", *common, f"--data.init_args.train_shards={out / 'train'}", "--trainer.max_steps=1", "--trainer.limit_val_batches=0"]
    torch.manual_seed(0)
    seeded = torch.get_rng_state()
    dim()  # building a model draws its initial weights from the seeded stream
    assert not torch.equal(torch.get_rng_state(), seeded)
    changes = [
        (fit, "--model.init_args.mllm.max_condition_length=64", "mllm"),
        (fit, "--model.init_args.mllm.tiny.seed=3", "mllm"),
        (fit, "--data.init_args.resolution=32", "resolution"),
        (["validate", *common, "--data.init_args.train_shards=null", f"--data.init_args.val_shards={out / 'train'}"], "--model.init_args.use_blueprint=true", "use_blueprint"),
    ]
    for command, change, differs in changes:
        torch.rand(8)  # the CLI's seed_everything (recipe seed 0) must reset this
        assert run([*command, change]) == 2, change
        [line] = error_lines(capsys.readouterr().err)
        assert "features cached for another configuration" in line and f"differs in {differs})" in line, line
        assert torch.equal(torch.get_rng_state(), seeded), f"a model was built before {change} was refused"
    assert run(fit) == 0  # the recipe it was cached with passes the check and trains from it
    assert not torch.equal(torch.get_rng_state(), seeded)


@pytest.mark.parametrize(("recipes", "overrides"), [
    (TINY_DIM, []),
    (["recipes/imgedit_e1_stage2.yaml", "recipes/tiny/imgedit_e1_stage2.yaml"], ["--model.init_args.init_from=null"]),
    (["recipes/got_pretrain.yaml", "recipes/tiny/got.yaml"], []),
    (["recipes/mind_edit.yaml", "recipes/tiny/mind_edit.yaml"], []),
], ids=["dim", "imgedit_e1_stage2", "got", "mind_edit"])
def test_a_recipe_fingerprint_is_the_one_its_built_model_computes(recipes: list[str], overrides: list[str]) -> None:
    """No false refusal: the check before building sees what the built model's setup() check sees."""
    no_shards = ["--data.init_args.train_shards=null", "--data.init_args.val_shards=null", "--data.init_args.test_shards=null"]
    cli = ZooCLI(args=[*configs(recipes), *no_shards, *overrides], run=False)
    model, data = cli.model, cli.datamodule
    model.resolution, model.mllm_resolution = data.resolution, data.mllm_resolution  # as setup() adopts them
    assert recipe_fingerprint(cli.config) == model.feature_fingerprint()


def test_a_designer_is_refused_before_any_model_is_built(toy: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    designer = "--model.init_args.designer={kind: openai, base_url: 'http://127.0.0.1:9', model: m}"
    status = feature_cache.main([*configs(TINY_DIM), "--out", str(tmp_path / "d"), f"--data.init_args.train_shards={toy / 'train'}", designer])
    assert status == 2
    [line] = error_lines(capsys.readouterr().err)
    assert "never asks a designer" in line and not (tmp_path / "d").exists()
