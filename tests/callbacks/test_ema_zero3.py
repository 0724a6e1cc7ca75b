"""EMA under ZeRO-3 for real: the DeepSpeed engine on CPU (``DS_ACCELERATOR=cpu``, gloo), 2 ranks, each
holding only its shard of every parameter. The average must be of the full parameters (not of the
empty local views), equal on both ranks, and the swap must reach the partitions and come back.

Lightning's DeepSpeedStrategy refuses CPU, so the engine is driven directly and the callback's own
steps (:meth:`EMA.track`, :meth:`EMA.update`, :meth:`EMA.swap_in`, :meth:`EMA.swap_out`) are the
ones its Lightning hooks call.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn

from callbacks.ema import EMA
from tests.helpers.ddp import launch

STEPS = 4
DECAY = 0.7


def _full(module: nn.Module) -> dict[str, Tensor]:
    """The trainable parameters gathered to their full shapes."""
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(module.parameters())):
        return {name: p.detach().clone() for name, p in module.named_parameters() if p.requires_grad}


def zero3_job(out: str) -> None:
    """One rank: a 2-layer net with its first weight frozen, ZeRO-3 AdamW steps, the EMA after each."""
    os.environ["DS_ACCELERATOR"] = "cpu"
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2))
    model[0].weight.requires_grad_(False)
    config = {
        "train_micro_batch_size_per_gpu": 2,
        "zero_optimization": {"stage": 3},
        "optimizer": {"type": "AdamW", "params": {"lr": 0.05, "torch_adam": True}},
    }
    engine, *_ = deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters() if p.requires_grad], config=config)
    ema = EMA(decay=DECAY)
    ema.track(engine.module)
    local = {name: p.data.numel() for name, p in engine.module.named_parameters()}
    history = [_full(engine.module)]
    inputs = torch.Generator().manual_seed(rank)
    for step in range(1, STEPS + 1):
        loss = engine(torch.randn(2, 4, generator=inputs)).pow(2).mean()
        engine.backward(loss)
        engine.step()
        ema.update(step)
        history.append(_full(engine.module))
    ema.swap_in(engine.module)
    swapped = _full(engine.module)
    ema.swap_out()
    restored = _full(engine.module)
    averages = {name: value.clone() for name, value in ema.weights.items()}
    torch.save(
        {"local": local, "history": history, "averages": averages, "swapped": swapped, "restored": restored},
        Path(out) / f"rank{rank}.pt",
    )


def test_zero3_average_is_of_the_full_parameters_on_every_rank(tmp_path: Path) -> None:
    launch(zero3_job, (str(tmp_path),), world_size=2, deadlock_after_s=600)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    for result in ranks:
        assert all(n == 0 for n in result["local"].values()), "every parameter is partitioned outside a gather"
        averages, history = result["averages"], result["history"]
        assert {k: tuple(v.shape) for k, v in averages.items()} == {"0.bias": (8,), "1.weight": (2, 8), "1.bias": (2,)}
        expected = {k: v.double() for k, v in history[0].items()}
        for weights in history[1:]:
            expected = {k: DECAY * expected[k] + (1 - DECAY) * weights[k].double() for k in expected}
        worst = max(float((averages[k].double() - expected[k]).abs().max()) for k in expected)
        assert worst < 1e-6, f"average off the closed form by {worst:.3g}"
        moved = max(float((history[-1][k] - history[0][k]).abs().max()) for k in expected)
        assert moved > 1e-2, "the weights moved, so an average of empty shards or zeros would be caught"
        assert all(torch.equal(result["swapped"][k], averages[k]) for k in averages), "the average reached the shards"
        assert all(torch.equal(result["restored"][k], history[-1][k]) for k in averages), "training weights came back"
    assert all(torch.equal(ranks[0]["averages"][k], ranks[1]["averages"][k]) for k in ranks[0]["averages"])
