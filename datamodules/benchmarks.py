"""Benchmark definition files (pinned, checksummed, cached) and the DataModule that serves benchmark cases.

The benchmark definitions are not shipped with the zoo: :func:`fetch` downloads each file from its
official repository at a pinned commit into a local cache (``cache_dir``, else ``$ZOO_BENCHMARK_CACHE``,
else ``~/.cache/zoo/benchmarks``) and checks its sha256; ``local_path`` points at a copy the user
already has (checked the same way), for machines without network.

:class:`BenchmarkDataModule` turns ImgEdit-Bench (basic, UGE, multi-turn) or a GEdit-Bench export
into :class:`~datamodules.samples.EditBatch` batches (:func:`datamodules.samples.collate`) for ``zoo test`` /
``zoo predict``, and a ``limit``-ed subset for validation during ``fit``. A case whose edited
image already exists in ``results_dir`` (see :func:`edited_image_path`) is not served again, which
is how an interrupted evaluation resumes without re-generating finished edits.

Multi-turn cases (ImgEdit-Bench multi-turn, 2-3 instructions on one image) are served as their
first turn with the later instructions in ``EditSample.turns``; the module edits each later turn
from the previous result (``EditingModule.edit_outputs``) and the evaluator saves every turn
(:class:`callbacks.results.BenchmarkEvaluator`). Such a case counts as generated once its last
turn's result exists.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import requests
from torch.utils.data import DataLoader

from datamodules.formats.dim import resolve_image
from datamodules.formats.gedit import GEditCase, load_gedit_case, read_gedit_jsonl
from datamodules.formats.imgedit import ImgEditCase, load_case, read_cases, resolve_case_image
from datamodules.samples import DataConfigError, EditSample, collate
from datamodules.shards import ListDataset

log = logging.getLogger(__name__)

CACHE_ENV = "ZOO_BENCHMARK_CACHE"
IMGEDIT_REPO, IMGEDIT_COMMIT = "PKU-YuanGroup/ImgEdit", "547185d12c08267a862b94248576e1746e479937"


@dataclass(frozen=True)
class PinnedFile:
    """One official file: ``repo`` at ``commit``, path ``path``, expected ``sha256``."""

    repo: str
    commit: str
    path: str
    sha256: str

    def url(self, mirror: str = "https://raw.githubusercontent.com") -> str:
        return f"{mirror.rstrip('/')}/{self.repo}/{self.commit}/{self.path}"


PINNED: dict[str, PinnedFile] = {
    "imgedit/basic_edit.json": PinnedFile(
        IMGEDIT_REPO, IMGEDIT_COMMIT, "Benchmark/Basic/basic_edit.json",
        "5ee9b7d61e918692416f79896300f738598c83adff8de737b25be4aaff72dc69",
    ),
    "imgedit/prompts.json": PinnedFile(
        IMGEDIT_REPO, IMGEDIT_COMMIT, "Benchmark/Basic/prompts.json",
        "f9468dc848776ee0a6c2e2c31e678c7224e9cb61b013747c8c52d4a05627b5a0",
    ),
    "imgedit/UGE_edit.json": PinnedFile(
        IMGEDIT_REPO, IMGEDIT_COMMIT, "Benchmark/UGE/UGE_edit.json",
        "807817d8765f8fc45397be9afbf638b00fad91e37c1d44fabd5103df73074d16",
    ),
}
"""The benchmark files the zoo downloads, by name."""


def sha256_of(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cache_root(cache_dir: str | None = None) -> Path:
    """``cache_dir``, else ``$ZOO_BENCHMARK_CACHE``, else ``~/.cache/zoo/benchmarks``."""
    return Path(cache_dir or os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "zoo" / "benchmarks")


class MissingBenchmarkFileError(DataConfigError, RuntimeError):
    """A pinned benchmark file is neither given, cached nor downloadable: one ``zoo: error:`` line."""


def fetch(
    name: str,
    cache_dir: str | None = None,
    local_path: str | None = None,
    mirror: str = "https://raw.githubusercontent.com",
    timeout: float = 60.0,
) -> Path:
    """The verified local path of the pinned file ``name`` (a key of :data:`PINNED`).

    ``local_path`` is used as-is when its checksum matches; otherwise the cached copy, downloaded
    first when absent. ``mirror`` replaces the GitHub raw host (same ``repo/commit/path`` layout).

    Raises:
        KeyError: unknown name. ValueError: a checksum mismatch (naming both digests).
        MissingBenchmarkFileError: the download failed (naming the URL and where to put the file).
    """
    if name not in PINNED:
        raise KeyError(f"unknown benchmark file {name!r}; known: {sorted(PINNED)}")
    pinned = PINNED[name]
    if local_path is not None:
        _verify(Path(local_path), pinned)
        return Path(local_path)
    target = cache_root(cache_dir) / pinned.repo / pinned.commit / pinned.path
    if target.is_file():
        _verify(target, pinned)
        return target
    url = pinned.url(mirror)
    try:
        response = requests.get(url, timeout=timeout)
        response.raise_for_status()
    except requests.RequestException as error:
        raise MissingBenchmarkFileError(
            f"benchmark file {name} is missing and could not be downloaded from {url} ({type(error).__name__}); "
            f"put that file at {target} or pass it as local_path (sha256 {pinned.sha256})"
        ) from error
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=target.parent, delete=False) as handle:
        handle.write(response.content)
    partial_file = Path(handle.name)
    try:
        _verify(partial_file, pinned)
    except ValueError:
        partial_file.unlink()
        raise
    partial_file.replace(target)
    log.info("downloaded %s from %s to %s", name, url, target)
    return target


def _verify(path: Path, pinned: PinnedFile) -> None:
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (expected {pinned.repo}@{pinned.commit[:7]}:{pinned.path})")
    actual = sha256_of(path)
    if actual != pinned.sha256:
        raise ValueError(
            f"{path} has sha256 {actual}, expected {pinned.sha256} ({pinned.repo}@{pinned.commit[:7]}:{pinned.path}); "
            f"a different revision would give scores that are not comparable"
        )


def edited_image_path(results_dir: str | os.PathLike[str], case_id: str, turn: int | None = None) -> Path:
    """Where an evaluator writes the edit of ``case_id`` (GEdit ids ``task/key`` become sub-folders);
    with ``turn``, the result of that turn (1-based) of a multi-turn case, ``images/<id>_turn<k>.png``."""
    name = case_id if turn is None else f"{case_id}_turn{turn}"
    return Path(results_dir) / "images" / f"{name}.png"


BENCHMARKS = ("imgedit_basic", "imgedit_uge", "imgedit_multiturn", "gedit")
_SUITE_FILES = {"imgedit_basic": "imgedit/basic_edit.json", "imgedit_uge": "imgedit/UGE_edit.json"}


class BenchmarkDataModule(L.LightningDataModule):
    """Serves a benchmark's cases as edit batches for test, predict and (a subset) validation.

    Args:
        benchmark: one of ``imgedit_basic``, ``imgedit_uge``, ``imgedit_multiturn``, ``gedit``.
        images_dir: ImgEdit: the unpacked ``Benchmark`` folder; GEdit: the folder the export's
            image paths are relative to (default: the export's folder).
        definition: the suite file: for ImgEdit basic/UGE a local copy of the official JSON
            (default: downloaded, pinned); required for multi-turn (the JSON of the readme's format)
            and GEdit (the jsonl export, see :mod:`datamodules.formats.gedit`).
        cache_dir: download cache (default ``$ZOO_BENCHMARK_CACHE`` or ``~/.cache/zoo/benchmarks``).
        language: GEdit instruction language, ``en`` or ``cn``.
        results_dir: an evaluator's results folder; cases whose edit is already there are not served.
        limit: serve only the first n cases (a quick validation subset during fit).
        batch_size: cases per batch and rank.
        num_workers: dataloader workers per rank.
        resolution: side of the square ``source`` tensor the model edits.
        mllm_resolution: side of the squashed MLLM view of the source.
        strict: raise on a missing image instead of skipping and counting it.
    """

    def __init__(
        self,
        benchmark: str,
        images_dir: str | None = None,
        definition: str | None = None,
        cache_dir: str | None = None,
        language: str = "en",
        results_dir: str | None = None,
        limit: int | None = None,
        batch_size: int = 1,
        num_workers: int = 0,
        resolution: int = 1024,
        mllm_resolution: int = 1024,
        strict: bool = True,
    ) -> None:
        super().__init__()
        if benchmark not in BENCHMARKS:
            raise DataConfigError(f"benchmark must be one of {BENCHMARKS}, got {benchmark!r}")
        if definition is None and benchmark not in _SUITE_FILES:
            raise DataConfigError(f"benchmark {benchmark!r} needs definition= (the suite JSON / jsonl export)")
        if images_dir is None and benchmark != "gedit":
            raise DataConfigError("ImgEdit-Bench needs images_dir= (the unpacked Benchmark.tar of HF sysuyy/ImgEdit)")
        self.benchmark, self.images_dir, self.definition = benchmark, images_dir, definition
        self.cache_dir, self.language, self.results_dir, self.limit = cache_dir, language, results_dir, limit
        self.batch_size, self.num_workers = batch_size, num_workers
        self.resolution, self.mllm_resolution, self.strict = resolution, mllm_resolution, strict
        self.rank, self.world_size = 0, 1
        self.skipped = 0
        self.cases: dict[str, ImgEditCase | GEditCase] = {}

    def read(self) -> list[ImgEditCase | GEditCase]:
        """All cases of the benchmark (downloading the pinned definition file when needed)."""
        if self.benchmark == "gedit":
            return list(read_gedit_jsonl(self.definition, self.language))  # type: ignore[arg-type]
        path = self.definition
        if self.benchmark in _SUITE_FILES:
            path = str(fetch(_SUITE_FILES[self.benchmark], self.cache_dir, self.definition))
        return list(read_cases(path, self.benchmark.removeprefix("imgedit_")))  # type: ignore[arg-type]

    def case_id(self, case: ImgEditCase | GEditCase) -> str:
        return case.id if isinstance(case, GEditCase) else case.key

    def setup(self, stage: str | None = None) -> None:
        if self.trainer is not None:
            self.rank, self.world_size = self.trainer.global_rank, self.trainer.world_size
        cases = self.read()
        self.cases = {self.case_id(c): c for c in cases}

    def load(self, case: ImgEditCase | GEditCase) -> EditSample:
        if isinstance(case, GEditCase):
            return load_gedit_case(self._image_root(), case)
        return load_case(self._image_root(), self.benchmark.removeprefix("imgedit_"), case)

    def pending(self) -> list[ImgEditCase | GEditCase]:
        """Cases still to generate (first ``limit``, minus finished ones in ``results_dir`` and missing images)."""
        cases = list(self.cases.values())[: self.limit]
        if self.results_dir is not None:
            done = [c for c in cases if self._finished_image(self.results_dir, c).is_file()]
            if done:
                log.info("%d of %d cases already edited in %s: not generated again", len(done), len(cases), self.results_dir)
            cases = [c for c in cases if c not in done]
        kept, missing = [], []
        for case in cases:
            if self._image(case) is None:
                if self.strict:
                    raise FileNotFoundError(
                        f"{self.benchmark} case {self.case_id(case)!r}: source image not found under {self._image_root()} "
                        "(strict=True; set strict=False to skip and count such cases)"
                    )
                missing.append(self.case_id(case))
                continue
            kept.append(case)
        if missing:
            # One line for the whole class of skip, not one per case (a wrong images_dir misses them all).
            self.skipped += len(missing)
            shown = ", ".join(repr(key) for key in missing[:5]) + (", ..." if len(missing) > 5 else "")
            log.warning(
                "skipped %d of %d %s cases whose source image is not under %s: %s",
                len(missing), len(cases), self.benchmark, self._image_root(), shown,
            )
        return kept

    def _finished_image(self, results_dir: str, case: ImgEditCase | GEditCase) -> Path:
        """The image whose presence marks the case as generated: the edit, or the last turn's result
        of a multi-turn case (the evaluator writes it last, so a partly done case is redone)."""
        multiturn = isinstance(case, ImgEditCase) and self.benchmark == "imgedit_multiturn"
        return edited_image_path(results_dir, self.case_id(case), len(case.turns) if multiturn else None)

    def _image_root(self) -> str:
        if self.benchmark == "gedit":
            return self.images_dir or str(Path(self.definition or ".").parent)
        return str(self.images_dir)

    def _image(self, case: ImgEditCase | GEditCase) -> Path | None:
        if isinstance(case, GEditCase):
            return resolve_image(Path(self._image_root()), case.image)
        return resolve_case_image(self._image_root(), self.benchmark.removeprefix("imgedit_"), case.image_id)

    def _loader(self) -> DataLoader:
        if not self.cases:
            self.setup()
        cases = self.pending()
        mine = cases[self.rank * len(cases) // self.world_size : (self.rank + 1) * len(cases) // self.world_size]
        return DataLoader(
            ListDataset(self, mine),
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            collate_fn=partial(collate, resolution=self.resolution, mllm_resolution=self.mllm_resolution),
        )

    def test_dataloader(self) -> DataLoader:
        return self._loader()

    def predict_dataloader(self) -> DataLoader:
        return self._loader()

    def val_dataloader(self) -> DataLoader:
        return self._loader()

    def case_info(self, case_id: str) -> dict[str, Any]:
        """Metadata an evaluator records with each edit beyond the batch (GEdit subset flags, ImgEdit image id)."""
        case = self.cases[case_id]
        if isinstance(case, GEditCase):
            return {"task_type": case.task_type, "key": case.key, "intersection": case.intersection, "language": case.language}
        return {"turns": list(case.turns), "image_id": case.image_id, "edit_type": case.edit_type}
