"""The benchmark scripts run on a tiny setting and write their result files; they compare like with like.

No timing is asserted (timings belong to ``benchmarks/``, as ratios): the tests check the files'
structure, that every case ran, and that the cases of a benchmark do the same work.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from benchmarks import data_streaming, loop_overhead
from datamodules.toy import main as toy_main


def _record(out: Path, name: str) -> dict:
    record = json.loads((out / f"{name}.json").read_text())
    assert record["benchmark"] == name and record["machine"]["cpus"] >= 1 and record["machine"]["torch"] == torch.__version__
    assert (out / f"{name}.md").read_text().startswith(f"# {name}\n")
    return record["results"]


def test_data_streaming_runs_every_case(tmp_path: Path) -> None:
    args = ["--samples", "4", "--width", "40", "--height", "30", "--resolution", "16", "--mllm-resolution", "12"]
    assert data_streaming.main(args + ["--batch-size", "2", "--repeats", "1", "--out", str(tmp_path)]) == 0
    results = _record(tmp_path, "data_streaming")
    assert set(results["ratio_to_pil_decode"]) == {"pil_decode", "pil_decode_transform", "shards_w0", "shards_w1", "shards_w2",
                                                  "folder_w0", "folder_w1", "folder_w2"}
    assert results["ratio_to_pil_decode"]["pil_decode"] == 1.0 and all(r > 0 for r in results["median_samples_per_s"].values())


def test_folder_baseline_sees_the_images_the_shards_hold(tmp_path: Path) -> None:
    """Baseline (b) reads the same bytes as the shards and yields the same source tensors."""
    from datamodules.shards import ShardDataModule

    shards, jsonl, members = data_streaming.make_data(tmp_path, 2, 40, 30)
    folder = data_streaming.FolderJsonl(jsonl, 16, 12)
    assert len(members) == 4 and len(folder) == 2
    dm = ShardDataModule(val_shards=str(shards), val_batch_size=2, resolution=16, mllm_resolution=12)
    dm.setup("validate")
    (batch,) = list(dm.val_dataloader())
    for row, key in enumerate(batch.key):
        index = [r["id"] for r in folder.rows].index(key)
        assert torch.allclose(folder[index]["source"], batch.source[row], atol=1e-6)


def test_loop_overhead_loops_do_the_same_work(tmp_path: Path) -> None:
    toy_main(["--out", str(tmp_path / "toy"), "--train", "12", "--val", "4", "--test", "4"])
    model, batches, clip = loop_overhead.build(tmp_path / "toy", 4)
    assert len(batches) == 3 and clip == 1.0
    by_hand, by_fit = copy.deepcopy(model), copy.deepcopy(model)
    torch.manual_seed(0)
    loop_overhead.hand_loop(by_hand, batches, 3, clip)
    torch.manual_seed(0)
    loop_overhead.fit(by_fit, batches, 3, clip)
    trained = [(a, b) for a, b in zip(by_hand.parameters(), by_fit.parameters()) if a.requires_grad]
    assert trained and all(torch.equal(a, b) for a, b in trained)
    assert not all(torch.equal(a, b) for a, b in zip(by_hand.parameters(), model.parameters()) if a.requires_grad)


def test_loop_overhead_writes_its_table(tmp_path: Path) -> None:
    assert loop_overhead.main(["--steps", "3", "--batch-size", "2", "--repeats", "1", "--out", str(tmp_path)]) == 0
    results = _record(tmp_path, "loop_overhead")
    assert set(results["ratio_steady"]) == {"hand_loop", "fit_bare", "fit_logged"} and results["ratio_steady"]["hand_loop"] == 1.0


def test_paper_size_cost_of_dim_matches_its_parts(tmp_path: Path) -> None:
    from benchmarks import paper_size_cost

    assert paper_size_cost.main(["--only", "DIM-4.6B-Edit", "--out", str(tmp_path)]) == 0
    dim = _record(tmp_path, "paper_size_cost")["DIM-4.6B-Edit"]
    parts = {p["name"].split(" (")[0]: p for p in dim["parts"]}
    assert 1.6e9 < dim["trainable_params"] < 1.7e9 and dim["optimizer_state_bytes"] == 8 * dim["trainable_params"]
    sana = parts["SANA-1.6B DiT"]
    # Counted FLOPs of the DiT: at least 2 per weight per token (1,024 latent tokens), attention on top.
    assert 2 * sana["params"] * 1024 < sana["forward_flops"] < 1.5 * 2 * sana["params"] * 1024
    assert sana["step_flops"] == 3 * sana["forward_flops"]
    frozen = sum(p["step_flops"] for p in dim["parts"] if p["cacheable"])
    assert dim["cache_speedup"] == dim["step_flops_per_sample"] / (dim["step_flops_per_sample"] - frozen) > 1


def test_inference_benchmark_measures_every_case(tmp_path: Path) -> None:
    from benchmarks import inference

    assert inference.main(["--repeats", "1", "--only", "DIM", "--out", str(tmp_path)]) == 0
    dim = _record(tmp_path, "inference")["DIM"]
    assert set(dim["ratio_to_base"]) == {"base", "steps x2", "steps x4", "res x2", "one by one"} and dim["ratio_to_base"]["base"] == 1.0
    assert dim["steps"] == 4 and dim["latency_per_edit_s"] > 0


def test_feature_cache_times_both_cases_and_measures_the_cache(tmp_path: Path) -> None:
    from benchmarks import feature_cache

    args = ["--steps", "1", "--batch-size", "2", "--repeats", "1", "--only", "ImgEdit-E1 stage 1 (tiny)", "--out", str(tmp_path)]
    assert feature_cache.main(args) == 0
    result = _record(tmp_path, "feature_cache")["ImgEdit-E1 stage 1 (tiny)"]
    assert set(result["rates"]) == {"online", "cached"} and result["ratio_cached_to_online"] > 0
    assert result["max_abs_update"] > 0 and result["bf16_max_abs_dw"] < 10 * result["max_abs_update"]
    sizes = result["cache_bytes_per_sample"]
    # bf16 halves the float32 bytes (ids and the safetensors header aside); the written cache is the bf16 one.
    assert 0.4 < sizes["bfloat16/none"] / sizes["float32/none"] < 0.6 and sizes["features (bf16, auto)"] <= sizes["bfloat16/none"]


def test_paper_size_cache_bytes_are_the_cached_outputs(tmp_path: Path) -> None:
    from benchmarks import paper_size_cost

    assert paper_size_cost.main(["--only", "DIM-4.6B-Edit", "--out", str(tmp_path)]) == 0
    dim = _record(tmp_path, "paper_size_cost")["DIM-4.6B-Edit"]
    # 1,433 VLM states of 2,048 and two 32-channel 32² DC-AE latents, bf16.
    assert dim["cache_bytes_per_sample"] == 2 * (1433 * 2048 + 2 * 32 * 32 * 32)


def test_paper_size_got_counts_every_vae_encode_of_a_step() -> None:
    """GoT's VAE encodes the reference, the target and one canvas per box of the chain (SSGM); the
    cache stores three latents (reference, mean box-canvas latent, target), as ``frozen_features`` does."""
    from benchmarks.paper_size_cost import GOT_BOXES, _codec, counted, got_parts

    model, parts = got_parts()
    [vae] = [part for part in parts if part.cacheable]
    with torch.device("meta"):
        one = counted(lambda: _codec(model).encode(torch.randn(1, 3, 1024, 1024)))
    assert vae.forward_flops == (2 + GOT_BOXES) * one and vae.passes == 1
    assert vae.cached_bytes == 2 * 3 * 4 * 128 * 128


def test_toy_learning_keeps_the_demos_that_did_not_run_here(tmp_path: Path, monkeypatch) -> None:
    """A rerun of one demo rewrites its own results; the others come from the last toy_learning.json."""
    from benchmarks import toy_learning

    folder = tmp_path / "runs" / "demo_mind_edit"
    (folder / "train").mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps({"trained": {"overall": {"score": 0.7}}}))
    (folder / "train" / "config.yaml").write_text("trainer: {max_steps: 3000}\ndata: {init_args: {batch_size: 16}}\n")
    monkeypatch.setattr(toy_learning, "ROOT", tmp_path)
    there, here = {"cpus": 16}, {"cpus": 2}
    earlier = {"dim": {"steps": 1100, "machine": there}, "mind_edit": {"steps": 1000, "machine": there}, "retired": {"steps": 1}}
    results = toy_learning.collect(earlier, here)
    assert list(results) == ["dim", "mind_edit"] and results["dim"] == {"steps": 1100, "machine": there}
    assert results["mind_edit"]["steps"] == 3000 and results["mind_edit"]["metrics"]["trained"]["overall"]["score"] == 0.7
    assert results["mind_edit"]["machine"] == here  # only the demo that ran here is stamped with this machine
