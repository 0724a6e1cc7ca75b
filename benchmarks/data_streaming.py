"""Data streaming: samples/s of the ShardDataModule train loader against two baselines, in one run.

Cases (the same edit samples, half JPEG and half PNG, written once to a temporary folder):

* ``pil_decode`` (baseline a, the decode limit): ``Image.open(...).load()`` of every image member's
  bytes, held in memory, in one loop; no transform.
* ``pil_decode_transform``: the same plus the zoo's resize + centre-crop and the MLLM's squash
  (PIL images, no tensors): what any loader of these samples must at least do.
* ``shards_w{0,1,2}``: ``ShardDataModule.train_dataloader()`` with 0, 1, 2 workers (tar reading,
  shuffle buffer, decode, transforms, collation into ``EditBatch``); the uint8 batches the workers
  ship are converted to float on the main process, as the loader does outside a trainer.
* ``folder_w{0,1,2}`` (baseline b): the official repos' way, a folder of image files and a jsonl
  read by a ``torch.utils.data.Dataset`` (``Image.open(path).convert("RGB")``, torchvision
  ``Resize`` + ``CenterCrop`` + ``ToTensor`` + ``Normalize(0.5, 0.5)``, the squashed MLLM view) and
  the default collate, at the same batch size and worker count.

``python -m benchmarks.data_streaming [--samples N --width W --height H --repeats R]``.
"""

from __future__ import annotations

import argparse
import io
import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from benchmarks.common import interleaved, medians, ratios, table, write
from datamodules.samples import ORIGINAL_BYTES, EditSample, resize_center_crop
from datamodules.shard_format import read_tar, write_split
from datamodules.shards import ShardDataModule

WORKERS = (0, 1, 2)


def _photo(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """Photo-like pixels: a smooth random field (bicubic upsampling of coarse noise) plus grain."""
    coarse = Image.fromarray(rng.integers(0, 256, (max(2, height // 64), max(2, width // 64), 3), dtype=np.uint8))
    smooth = np.asarray(coarse.resize((width, height), Image.BICUBIC), dtype=np.int16)
    return np.clip(smooth + rng.integers(-8, 9, smooth.shape), 0, 255).astype(np.uint8)


def _image(array: np.ndarray, jpeg: bool) -> Image.Image:
    """A PNG image, or a decoded JPEG that the shard writer stores as its original bytes."""
    if not jpeg:
        return Image.fromarray(array)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=90)
    image = Image.open(io.BytesIO(buffer.getvalue()))
    image.info[ORIGINAL_BYTES] = buffer.getvalue()
    return image


def make_data(root: Path, samples: int, width: int, height: int) -> tuple[Path, Path, list[bytes]]:
    """Shards, the same images as files + a jsonl, and every image member's bytes."""
    rng = np.random.default_rng(0)
    records = [
        EditSample(
            key=f"s{i:05d}",
            source=_image(_photo(rng, width, height), jpeg=i % 2 == 0),
            target=_image(_photo(rng, width, height), jpeg=i % 2 == 1),
            instruction=f"edit number {i}",
        )
        for i in range(samples)
    ]
    shards = root / "shards"
    write_split(shards, records, samples_per_shard=max(1, samples // 4))
    folder = root / "folder"
    (folder / "images").mkdir(parents=True)
    members: list[bytes] = []
    with (folder / "data.jsonl").open("w") as jsonl:
        for tar in sorted(shards.glob("*.tar")):
            for raw in read_tar(str(tar)):
                row = {"id": raw["__key__"], "prompt": json.loads(raw["json"])["instruction"]}
                for name, field in (("source.png", "image_path"), ("target.png", "image_path_target")):
                    members.append(raw[name])
                    (folder / "images" / f"{raw['__key__']}_{name}").write_bytes(raw[name])
                    row[field] = f"images/{raw['__key__']}_{name}"
                jsonl.write(json.dumps(row) + "\n")
    return shards, folder / "data.jsonl", members


class FolderJsonl(Dataset):
    """Baseline (b): a jsonl of ``image_path`` / ``image_path_target`` / ``prompt`` over image files."""

    def __init__(self, jsonl: Path, resolution: int, mllm_resolution: int) -> None:
        self.root, self.rows = jsonl.parent, [json.loads(line) for line in jsonl.read_text().splitlines()]
        normalize = [transforms.ToTensor(), transforms.Normalize([0.5], [0.5])]
        self.transform = transforms.Compose(
            [transforms.Resize(resolution, transforms.InterpolationMode.BICUBIC), transforms.CenterCrop(resolution), *normalize]
        )
        self.mllm = transforms.Compose(
            [transforms.Resize((mllm_resolution, mllm_resolution), transforms.InterpolationMode.BICUBIC), transforms.ToTensor()]
        )

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        row = self.rows[index]
        source = Image.open(self.root / row["image_path"]).convert("RGB")
        target = Image.open(self.root / row["image_path_target"]).convert("RGB")
        return {"source": self.transform(source), "target": self.transform(target), "mllm_image": self.mllm(source), "prompt": row["prompt"]}


def cases(
    shards: Path, jsonl: Path, members: list[bytes], batch_size: int, resolution: int, mllm_resolution: int
) -> dict[str, Callable[[], float]]:
    """One trial per case; each returns the number of samples it produced."""

    def pil_decode() -> float:
        for data in members:
            Image.open(io.BytesIO(data)).load()
        return len(members) / 2

    def pil_decode_transform() -> float:
        for i, data in enumerate(members):
            image = Image.open(io.BytesIO(data)).convert("RGB")
            resize_center_crop(image, resolution)
            if i % 2 == 0:
                image.resize((mllm_resolution, mllm_resolution), Image.BICUBIC)
        return len(members) / 2

    def shard_loader(workers: int) -> Callable[[], float]:
        dm = ShardDataModule(
            train_shards=str(shards), batch_size=batch_size, num_workers=workers, resolution=resolution, mllm_resolution=mllm_resolution
        )
        dm.setup("fit")
        return lambda: float(sum(len(batch) for batch in dm.train_dataloader()))

    def folder_loader(workers: int) -> Callable[[], float]:
        dataset = FolderJsonl(jsonl, resolution, mllm_resolution)
        generator = torch.Generator().manual_seed(0)
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers, generator=generator)
        return lambda: float(sum(len(batch["prompt"]) for batch in loader))

    runs: dict[str, Callable[[], float]] = {"pil_decode": pil_decode, "pil_decode_transform": pil_decode_transform}
    runs.update({f"shards_w{w}": shard_loader(w) for w in WORKERS})
    runs.update({f"folder_w{w}": folder_loader(w) for w in WORKERS})
    return runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--samples", type=int, default=32, help="edit samples (two images each)")
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--height", type=int, default=768)
    parser.add_argument("--resolution", type=int, default=512, help="side of the source/target tensors")
    parser.add_argument("--mllm-resolution", type=int, default=448, help="side of the MLLM's squashed view")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the main process (workers use one)")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        shards, jsonl, members = make_data(Path(tmp), args.samples, args.width, args.height)
        runs = cases(shards, jsonl, members, args.batch_size, args.resolution, args.mllm_resolution)
        for run in runs.values():  # warm the page cache and the imports
            run()
        rates = interleaved(runs, args.repeats)
    rate, against_decode, against_folder = medians(rates), ratios(rates, "pil_decode"), ratios(rates, "folder_w0")
    same_workers = {f"shards_w{w}": ratios(rates, f"folder_w{w}")[f"shards_w{w}"] for w in WORKERS}
    bytes_per_sample = sum(len(m) for m in members) / args.samples
    rows = [
        [name, rate[name], 2 * rate[name], rate[name] * bytes_per_sample / 1e6, against_decode[name], against_folder[name], same_workers.get(name, "")]
        for name in runs
    ]
    header = ["case", "samples/s", "images/s", "MB/s (compressed)", "x pil_decode (a)", "x folder_w0 (b)", "x folder, same workers"]
    markdown = (
        f"{args.samples} edit samples of two {args.width}x{args.height} images (JPEG q90 / PNG level 1 alternating, "
        f"{bytes_per_sample / 1e6:.2f} MB per sample), batches of {args.batch_size} at {args.resolution}² "
        f"(MLLM view {args.mllm_resolution}²); median of {args.repeats} interleaved repeats.\n\n" + table(header, rows)
    )
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    results = {"rates_samples_per_s": rates, "median_samples_per_s": rate, "ratio_to_pil_decode": against_decode,
               "ratio_to_folder_w0": against_folder, "ratio_to_folder_same_workers": same_workers, "bytes_per_sample": bytes_per_sample}
    write("data_streaming", settings, results, markdown, **({"out": args.out} if args.out else {}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
