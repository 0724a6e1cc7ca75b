"""``zoo export``: a checkpoint (a Lightning file or a DeepSpeed ZeRO folder) -> a self-contained folder.

The folder :meth:`EditingModule.save_pretrained <zoo.modules.base.EditingModule.save_pretrained>`
writes and :meth:`EditingModule.from_pretrained <zoo.modules.base.EditingModule.from_pretrained>`
reads, in the ``save_pretrained``/``from_pretrained`` convention of transformers and diffusers::

    config.json         class_path + init_args that rebuild the module (init_from cleared), its
                        training view (resolution), which weights these are (live or EMA), the source
    bases.json          the frozen parts (held outside the module tree, never in checkpoints) and the
                        config entries they are rebuilt from: published ids/paths, or tiny configs with
                        their seeds
    model.safetensors   the trainable weights only (EditingModule.trainable_state_keys)
    <attribute>/        each trained diffusers model (DIM's SANA transformer, GoT's UNet, ImgEdit-E1
                        stage 2's FLUX transformer), as ``<Class>.save_pretrained`` writes it, so
                        ``diffusers.<Class>.from_pretrained(folder, subfolder=<attribute>)`` loads it

A ZeRO folder is consolidated with Lightning's ``convert_zero_checkpoint_to_fp32_state_dict``
(DeepSpeed's ``zero_to_fp32``): the same dictionary as a single-file checkpoint, in fp32.
EMA weights (``--ema``) are the average :class:`callbacks.ema.EMA` keeps in the checkpoint's callback
state (:func:`callbacks.ema.ema_weights`); it must cover every trainable parameter.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from callbacks.ema import ema_weights
from zoo.blocks.config import ConfigError
from zoo.blocks.pretrained import MissingPretrainedError
from zoo.checkpoint_io import allowing_configs

if TYPE_CHECKING:
    from zoo.modules.base import EditingModule

FORMAT = "zoo-pretrained/1"
"""``config.json``'s ``format``: the layout of the folder this module writes."""
WEIGHTS = "model.safetensors"
_BASE_KEYS = ("pretrained", "tiny", "config", "seed")
"""An init argument that is a mapping with one of these keys names a component's source."""


def is_zero_checkpoint(path: Path) -> bool:
    """Whether ``path`` is a DeepSpeed checkpoint folder (Lightning's ``last.ckpt/`` under ZeRO)."""
    return path.is_dir() and (path / "latest").is_file()


def zero_client_state(folder: Path) -> dict[str, Any]:
    """Lightning's part of a ZeRO folder (hyperparameters, callback and loop state, no weights): rank
    0's model-states file of the tag named in ``latest``, read without consolidating the shards."""
    tag = (folder / "latest").read_text().strip()
    [states, *_] = sorted((folder / tag).glob("*mp_rank_00_model_states.pt"))
    with allowing_configs():
        return torch.load(states, map_location="cpu", weights_only=True, mmap=True)


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The Lightning checkpoint dictionary at ``path``: a file, or a ZeRO folder consolidated to fp32,
    read weights-only (tensors, plain values and the zoo's typed configs, :func:`allowing_configs`).
    Raises :class:`ConfigError` for a path that is neither.
    """
    path = Path(path)
    if is_zero_checkpoint(path):
        from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict

        with tempfile.TemporaryDirectory() as scratch:
            merged = Path(scratch) / "merged.ckpt"
            convert_zero_checkpoint_to_fp32_state_dict(str(path), str(merged))
            with allowing_configs():
                return torch.load(merged, map_location="cpu", weights_only=True)
    if not path.is_file():
        raise ConfigError(f"{path} is neither a checkpoint file nor a DeepSpeed checkpoint folder (one with a 'latest' file)")
    try:
        with allowing_configs():
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises UnpicklingError, RuntimeError, EOFError... for a non-checkpoint
        raise ConfigError(f"{path} is not a readable checkpoint: {type(error).__name__}: {str(error).splitlines()[0][:200]}") from error
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ConfigError(f"{path} is not a Lightning checkpoint (it has no state_dict)")
    return checkpoint


def checkpoint_class_path(checkpoint: dict[str, Any]) -> str | None:
    """The module class a checkpoint records: LightningCLI's ``_class_path``, else the zoo's own mark."""
    return (checkpoint.get("hyper_parameters") or {}).get("_class_path") or checkpoint.get("zoo_class")


def module_class(class_path: str | None, where: str) -> type[EditingModule]:
    """The :class:`EditingModule` subclass ``class_path`` names; :class:`ConfigError` otherwise."""
    from zoo.modules.base import EditingModule

    module_name, _, name = (class_path or "").rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError):
        cls = None
    if not (isinstance(cls, type) and issubclass(cls, EditingModule)):
        raise ConfigError(f"{where} was written by an unknown module class {class_path!r} (not an importable EditingModule)")
    return cls


def plain(value: Any) -> Any:
    """``value`` as JSON data: typed configs (dataclasses) become mappings of their fields."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value) if f.init}
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot write a {type(value).__name__} init argument into config.json")


def init_arguments(hyper_parameters: dict[str, Any]) -> dict[str, Any]:
    """A module's init arguments from its saved hyperparameters, as JSON data, without ``init_from``
    (the exported weights replace the earlier stage's)."""
    arguments = {k: plain(v) for k, v in hyper_parameters.items() if not k.startswith("_")}
    if "init_from" in arguments:
        arguments["init_from"] = None
    return arguments


def build(class_path: str, arguments: dict[str, Any], where: str) -> EditingModule:
    """The module ``class_path(**arguments)``, through the typed parsing ``load_from_checkpoint`` of a
    LightningCLI checkpoint uses (jsonargparse turns mappings back into typed configs)."""
    from lightning.pytorch.cli import instantiate_module

    cls = module_class(class_path, where)
    return instantiate_module(cls, {"_class_path": class_path, **arguments})


def module_from_checkpoint(path: str | Path, ema: bool = False) -> EditingModule:
    """The module a checkpoint file or ZeRO folder holds, with its trainable (or EMA) weights loaded."""
    checkpoint = read_checkpoint(path)
    class_path = checkpoint_class_path(checkpoint)
    module_class(class_path, str(path))
    if not checkpoint.get("hyper_parameters"):
        raise ConfigError(f"{path} holds no hyperparameters: it cannot rebuild its module")
    module = build(class_path, init_arguments(checkpoint["hyper_parameters"]), str(path))
    state = dict(checkpoint["state_dict"])
    if ema:
        state.update(trainable_ema(checkpoint, module, str(path)))
    load_state(module, state, str(path))
    view = checkpoint.get("zoo_view")
    if view is not None:
        module.resolution, module.mllm_resolution = view["resolution"], view["mllm_resolution"]
    module.exported_from = {"checkpoint": str(path), "global_step": checkpoint.get("global_step"), "weights": "ema" if ema else "live"}
    return module.eval()


def trainable_ema(checkpoint: dict[str, Any], module: EditingModule, where: str) -> dict[str, Tensor]:
    """The EMA average of every trainable parameter; :class:`ConfigError` if the checkpoint has none."""
    weights = ema_weights(checkpoint)
    if weights is None:
        raise ConfigError(f"--ema: {where} holds no EMA weights (it was not trained with recipes/ema.yaml); export without --ema")
    trainable = sorted(n for n, p in module.named_parameters() if p.requires_grad)
    missing = [n for n in trainable if n not in weights]
    if missing:
        raise ConfigError(f"--ema: the EMA state of {where} lacks {len(missing)} trainable parameters (first: {missing[0]})")
    return {n: weights[n] for n in trainable}


def load_state(module: EditingModule, state: dict[str, Tensor], where: str) -> None:
    """Load trainable ``state`` into ``module``, refusing one that does not fit it exactly."""
    mismatch = module._checkpoint_mismatch(state)
    if mismatch is not None:
        raise ConfigError(f"{where} does not fit its {type(module).__name__} configuration: {mismatch}")
    module.load_state_dict(state, strict=False)


def frozen_bases(module: EditingModule, arguments: dict[str, Any]) -> dict[str, Any]:
    """``bases.json``: each frozen part's class, and the init arguments that name component sources."""
    parts = {name: f"{type(part).__module__}.{type(part).__qualname__}" for name, part in module.frozen_parts.items()}
    sources = {k: v for k, v in arguments.items() if isinstance(v, dict) and any(key in v for key in _BASE_KEYS)}
    if arguments.get("instruction_writer"):
        sources["instruction_writer"] = arguments["instruction_writer"]
    return {"frozen_parts": parts, "sources": sources}


def trained_diffusers_models(module: EditingModule) -> dict[str, torch.nn.Module]:
    """Attribute path -> each outermost diffusers model in the module tree that has trainable parameters."""
    from diffusers.models.modeling_utils import ModelMixin

    found: dict[str, torch.nn.Module] = {}
    for name, child in module.named_modules():
        if not isinstance(child, ModelMixin) or any(name.startswith(f"{outer}.") for outer in found):
            continue
        if any(p.requires_grad for p in child.parameters()):
            found[name] = child
    return found


def subfolder_name(attribute: str) -> str:
    """The export subfolder of a diffusers model at ``attribute``: ``denoiser.model`` -> ``denoiser``."""
    return attribute.split(".")[0]


def save_pretrained(module: EditingModule, out: str | Path) -> Path:
    """Write ``module`` into the folder layout of this module's docstring; returns the folder."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    class_path = f"{type(module).__module__}.{type(module).__qualname__}"
    arguments = init_arguments(dict(module.hparams))
    keep = module.trainable_state_keys()
    state = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in module.state_dict().items() if k in keep}
    save_file(state, str(out / WEIGHTS))
    config = {
        "format": FORMAT,
        "class_path": class_path,
        "init_args": arguments,
        "view": {"resolution": module.resolution, "mllm_resolution": module.mllm_resolution},
        "source": getattr(module, "exported_from", None),
    }
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "bases.json").write_text(json.dumps(frozen_bases(module, arguments), indent=2) + "\n")
    for attribute, model in trained_diffusers_models(module).items():
        model.save_pretrained(out / subfolder_name(attribute))
    return out


def from_pretrained(cls: type[EditingModule], folder: str | Path) -> EditingModule:
    """The module a :func:`save_pretrained` folder holds, in eval mode; ``cls`` must be its class or a base."""
    folder = Path(folder)
    path = folder / "config.json"
    if not path.is_file():
        raise ConfigError(f"{folder} is not a zoo export (no config.json): write one with `zoo export` or save_pretrained")
    config = json.loads(path.read_text())
    if config.get("format") != FORMAT:
        raise ConfigError(f"{path} is not a {FORMAT} config (format {config.get('format')!r})")
    stored = module_class(config["class_path"], str(folder))
    if not issubclass(stored, cls):
        raise ConfigError(f"{folder} holds a {stored.__name__}, not a {cls.__name__}")
    module = build(config["class_path"], config["init_args"], str(folder))
    load_state(module, load_file(str(folder / WEIGHTS)), str(folder))
    module.resolution, module.mllm_resolution = config["view"]["resolution"], config["view"]["mllm_resolution"]
    module.exported_from = config.get("source")
    return module.eval()


def main(argv: list[str] | None = None) -> int:
    """``zoo export CHECKPOINT OUT [--ema]``; returns the exit status."""
    parser = argparse.ArgumentParser(prog="zoo export", allow_abbrev=False, description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a checkpoint file (last.ckpt) or a DeepSpeed ZeRO checkpoint folder")
    parser.add_argument("out", help="the folder to write (config.json, bases.json, model.safetensors, diffusers subfolders)")
    parser.add_argument("--ema", action="store_true", help="export the average of the EMA callback (recipes/ema.yaml) instead of the live weights")
    args = parser.parse_args(argv)
    try:
        module = module_from_checkpoint(args.checkpoint, ema=args.ema)
    except (ConfigError, MissingPretrainedError) as error:
        print(f"zoo: error: {error}", file=sys.stderr)
        return 2
    out = save_pretrained(module, args.out)
    subfolders = [subfolder_name(a) for a in trained_diffusers_models(module)]
    extra = f" + diffusers {', '.join(subfolders)}/" if subfolders else ""
    print(f"zoo: exported {type(module).__name__} ({module.exported_from['weights']} weights, step {module.exported_from['global_step']}) to {out}{extra}")
    return 0
