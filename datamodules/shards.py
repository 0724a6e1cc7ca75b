"""The resumable ``ShardDataModule`` over WebDataset tar shards (schema: :mod:`datamodules.shard_format`).

Epoch plan (train)
------------------
Each epoch the shard list is shuffled with a seed derived from ``(seed, epoch)`` -- the same on every
rank, so the ranks partition one global sample order. Rank r of W takes positions
``[r * N//W, (r+1) * N//W)``: only the ``N mod W`` (< W) samples at the tail of the epoch's order are
dropped, which is what equal per-rank batch counts need. A rank's ``ceil((N//W) / batch_size)``
batches (the last may be short) are dealt round-robin to its dataloader workers, matching the order
in which ``torch.utils.data.DataLoader`` collects them; each worker reads one contiguous run of the
rank's positions and shuffles it through a buffer seeded by ``(seed, epoch, rank, worker)``. Ranks x
workers therefore cover each kept sample exactly once per epoch, and the order is a pure function of
``(seed, epoch, world_size, num_workers, batch_size, shuffle_buffer)``.

The plan trusts ``index.json``'s counts; a tar that disagrees is counted, never silent: samples it
lacks are skipped (lost), and the reader of a shard's last indexed sample reads on to the tar's end,
counting samples the index does not list as skipped (never read), with a warning naming shard and
both counts (``strict``: an error). A shard whose end falls in an epoch's dropped tail (train) or
past ``limit_val_samples`` is not read to its end, so that epoch does not check it.

Resume: the DataModule's ``state_dict`` stores the epoch and the number of batches the trainer has
*processed* in it (Lightning prefetches a batch ahead, so batches handed out would over-count);
every rank processes the same number, and the derived per-worker positions are stored keyed by rank.
On restore the workers skip exactly that many batches without decoding them.

Loaders never draw from the global torch RNG: a ``DataLoader`` takes its workers' base seed from it at
every ``iter()``, so a resumed run (which iterates at a different moment than the uninterrupted one)
would shift every later random draw of training. The train loader's generator is seeded from
``(seed, epoch, rank)`` at each epoch instead, which also makes worker seeds a function of the epoch.

Val/test/predict: index order (no shuffle), contiguous uneven split over ranks, every sample kept,
``limit_val_samples`` keeps the first n samples of val and test.
"""

from __future__ import annotations

import logging
import multiprocessing
import random
import warnings
from collections.abc import Callable
from functools import partial
from typing import Any, Iterator

import lightning as L
import torch
import webdataset as wds
from lightning.pytorch.trainer.states import TrainerStatus
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from datamodules.samples import DataConfigError, EditBatch, EditSample, T2ISample, collate
from datamodules.shard_format import INDEX_NAME, MAX_PIXELS, cache_of, check_shards, decode_sample, read_tar, resolve_shards

log = logging.getLogger(__name__)


def _batch_sizes(num_samples: int, batch_size: int) -> list[int]:
    full, rest = divmod(num_samples, batch_size)
    return [batch_size] * full + ([rest] if rest else [])


def _consumed_by_worker(worker: int, consumed: int, num_workers: int) -> int:
    """Batches of logical worker ``worker`` among the first ``consumed`` round-robin batches."""
    return len(range(worker, consumed, num_workers))


class ShardStream(IterableDataset):
    """One split of one rank, yielding collated batches (``DataLoader(batch_size=None)``).

    The DataModule sets ``epoch`` and ``skip_batches`` in the main process before each
    ``iter(loader)``; workers are started afterwards and receive that copy.
    """

    def __init__(
        self,
        shards: list[tuple[str, int]],
        *,
        rank: int,
        world_size: int,
        batch_size: int,
        resolution: int,
        mllm_resolution: int,
        train: bool,
        seed: int,
        shuffle_buffer: int,
        strict: bool,
        limit_samples: int | None,
        skipped: Any,
        need_target: bool,
        max_pixels: int | None,
        features: bool = False,
    ) -> None:
        self.shards, self.rank, self.world_size = shards, rank, world_size
        self.features = features
        self.need_target, self.max_pixels = need_target, max_pixels
        self.batch_size, self.resolution, self.mllm_resolution = batch_size, resolution, mllm_resolution
        self.train, self.seed, self.shuffle_buffer, self.strict = train, seed, shuffle_buffer, strict
        self.skipped = skipped
        total = sum(n for _, n in shards)
        self.num_samples = total if limit_samples is None else min(total, limit_samples)
        if train:
            per_rank = self.num_samples // world_size
            if per_rank == 0:
                raise ValueError(f"{self.num_samples} training samples cannot feed {world_size} ranks")
            self.rank_start, self.rank_stop = rank * per_rank, (rank + 1) * per_rank
        else:
            self.rank_start = rank * self.num_samples // world_size
            self.rank_stop = (rank + 1) * self.num_samples // world_size
        self.epoch = 0
        self.skip_batches = 0

    @property
    def rank_batch_sizes(self) -> list[int]:
        return _batch_sizes(self.rank_stop - self.rank_start, self.batch_size)

    def __len__(self) -> int:
        return len(self.rank_batch_sizes)

    def _shard_order(self) -> list[tuple[str, int]]:
        order = list(self.shards)
        if self.train:
            random.Random(f"shards/{self.seed}/{self.epoch}").shuffle(order)
        return order

    def _worker_intervals(self, worker: int, num_workers: int) -> tuple[list[tuple[int, int]], list[int]]:
        """Global positions read by a logical worker, and the sizes of its batches in order."""
        sizes = self.rank_batch_sizes
        mine = list(range(worker, len(sizes), num_workers))
        starts = [self.rank_start + sum(sizes[:j]) for j in range(len(sizes))]
        if not self.train:
            # Index order is kept: each worker reads its own batches where they lie.
            return [(starts[j], starts[j] + sizes[j]) for j in mine], [sizes[j] for j in mine]
        # Train: one contiguous run per worker (cheap I/O); the shuffle buffer mixes it.
        before = sum(sizes[j] for w in range(worker) for j in range(w, len(sizes), num_workers))
        length = sum(sizes[j] for j in mine)
        start = self.rank_start + before
        return [(start, start + length)], [sizes[j] for j in mine]

    def _count_skip(self, url: str, key: str, error: BaseException, lost: int = 1) -> None:
        if self.strict:
            raise RuntimeError(f"bad data in shard {url}, key {key!r}: {error}") from error
        with self.skipped.get_lock():
            self.skipped.value += lost
        log.warning("skipped %d sample(s) in shard %s, key %r: %s", lost, url, key, error)

    def _raw_stream(self, intervals: list[tuple[int, int]]) -> Iterator[tuple[str, dict[str, Any]]]:
        """``(shard url, raw sample)`` at the given positions of the epoch order; losses are counted."""
        cursor = 0
        stop_all = intervals[-1][1] if intervals else 0
        for url, count in self._shard_order():
            first, cursor = cursor, cursor + count
            wanted = [(max(a, first), min(b, cursor)) for a, b in intervals if a < cursor and b > first]
            if not wanted:
                if first >= stop_all:
                    return
                continue
            expected = sum(b - a for a, b in wanted)
            # The one reader of the shard's last indexed sample reads on to the tar's end, so samples
            # an index under-claims are counted instead of never being read.
            reads_end = wanted[-1][1] == cursor
            delivered = unlisted = 0
            position, key = first, "<start of shard>"
            try:
                for raw in read_tar(url):
                    key = raw.get("__key__", key)
                    if position >= wanted[-1][1] and not reads_end:
                        break
                    if position >= cursor:
                        unlisted += 1
                    elif any(a <= position < b for a, b in wanted):
                        delivered += 1
                        yield url, raw
                    position += 1
            except Exception as error:  # a damaged tar ends its shard; the rest is counted as lost
                self._count_skip(url, f"after {key}", error, lost=expected - delivered)
                delivered = expected
            held = f"the tar holds {position - first} samples, {INDEX_NAME} says {count}"
            if delivered < expected:
                self._count_skip(url, "<end of shard>", ValueError(f"{held}: {expected - delivered} lost"), expected - delivered)
            if unlisted:
                self._count_skip(url, "<end of shard>", ValueError(f"{held}: {unlisted} never read (rewrite the index)"), unlisted)

    def _shuffled(self, stream: Iterator[Any], worker: int) -> Iterator[Any]:
        """webdataset's buffer shuffle with an rng pinned to (seed, epoch, rank, worker)."""
        if not self.train or self.shuffle_buffer <= 1:
            return stream
        rng = random.Random(f"buffer/{self.seed}/{self.epoch}/{self.rank}/{worker}")
        return wds.filters.shuffle(bufsize=self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng)(stream)

    def __iter__(self) -> Iterator[EditBatch]:
        info = get_worker_info()
        physical, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        # After a resume at batch k, batch k must come from the loader's first worker.
        worker = (physical + self.skip_batches) % num_workers
        intervals, sizes = self._worker_intervals(worker, num_workers)
        skip = _consumed_by_worker(worker, self.skip_batches, num_workers)
        stream = self._shuffled(self._raw_stream(intervals), worker)
        previous: list[EditSample | T2ISample] = []
        for index, size in enumerate(sizes):
            raws = [item for _, item in zip(range(size), stream)]
            if index < skip:
                continue
            samples = []
            for url, raw in raws:
                try:
                    samples.append(decode_sample(raw, self.need_target, self.max_pixels, self.features))
                except Exception as error:
                    self._count_skip(url, raw.get("__key__", "?"), error)
            if not samples:
                if not previous:
                    raise RuntimeError(
                        f"rank {self.rank} worker {worker}: no decodable sample in batch {index} "
                        f"(epoch {self.epoch}); see the skipped-sample warnings above"
                    )
                # Ranks must yield equal batch counts (else DDP hangs), so a fully lost batch repeats the last one.
                log.warning("rank %d worker %d: batch %d fully lost, repeating the previous batch", self.rank, worker, index)
                samples = previous
            previous = samples
            yield collate(samples, self.resolution, self.mllm_resolution, levels=True)
        # The batches took every planned sample; reading on checks the last shard's tail against the index.
        for _ in stream:
            pass


# --- the DataModule ----------------------------------------------------------------------------


class _LevelsLoader(DataLoader):
    """A DataLoader of uint8-level batches (a quarter of the bytes across the worker boundary) that
    yields float batches, converted on the main process, unless a running trainer drives it: then
    :meth:`ShardDataModule.on_after_batch_transfer` converts them on the device."""

    def __init__(self, dataset: Any, trainer_running: Callable[[], bool], **kwargs: Any) -> None:
        super().__init__(dataset, **kwargs)
        self._trainer_running = trainer_running

    def __iter__(self) -> Any:
        batches = super().__iter__()
        return batches if self._trainer_running() else map(EditBatch.to_float, batches)


class _TrainLoader(_LevelsLoader):
    """A DataLoader that asks the DataModule for the epoch (and resume skip) at every ``iter()``.

    Lightning creates the train loader once and calls ``iter()`` at each epoch start with
    ``trainer.current_epoch`` already advanced; non-persistent workers are spawned at that moment
    and receive the updated ``ShardStream`` copy.
    """

    def __init__(self, dataset: ShardStream, begin_epoch: Any, trainer_running: Callable[[], bool], **kwargs: Any) -> None:
        super().__init__(dataset, trainer_running, batch_size=None, **kwargs)
        self._begin_epoch = begin_epoch

    def __iter__(self) -> Any:
        self._begin_epoch(self.dataset)
        stream = self.dataset
        self.generator = _seeded(f"loader/{stream.seed}/{stream.epoch}/{stream.rank}")
        return super().__iter__()


def _seeded(key: str) -> torch.Generator:
    """A CPU generator seeded from ``key`` (the source of a loader's worker base seed)."""
    return torch.Generator().manual_seed(random.Random(key).getrandbits(63))


class ListDataset(Dataset):
    """Predict rows of a DIM jsonl, decoded lazily (images can be 1024 px)."""

    def __init__(self, reader: Any, rows: list[Any]) -> None:
        self.reader, self.rows = reader, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> EditSample | T2ISample:
        return self.reader.load(self.rows[index])


STAGE_SPLITS = {"fit": ["train", "val"], "validate": ["val"], "test": ["test"], "predict": ["predict"]}
"""The splits each stage reads."""


def check_stage_shards(init_args: dict[str, Any], stage: str) -> None:
    """Raise :class:`DataConfigError` unless the shards of every split ``stage`` reads exist, from
    ``ShardDataModule``'s arguments (``zoo`` checks them before any model is built)."""
    for split in STAGE_SPLITS.get(stage, []):
        spec = init_args.get(f"{split}_shards")
        if spec is not None:
            check_shards(spec)


def predict_jsonl_kind(init_args: dict[str, Any], stage: str) -> str | None:
    """The task (``edit``/``t2i``) of the predict jsonl a ``predict`` stage reads from ``ShardDataModule``'s
    arguments, checked by :func:`~datamodules.formats.dim.predict_kind`; None when it reads none."""
    path = init_args.get("predict_jsonl")
    if stage != "predict" or init_args.get("predict_shards") is not None or path is None:
        return None
    from datamodules.formats.dim import predict_kind

    return predict_kind(path)


class ShardDataModule(L.LightningDataModule):
    """Streams WebDataset shards (schema in this module's docstring) into :class:`~datamodules.samples.EditBatch` batches.

    Args:
        train_shards: Training split: a folder holding ``index.json`` and its tars, or a brace
            pattern of tar paths. None leaves the split unused.
        val_shards: Validation split (same forms), read in index order.
        test_shards: Test split (same forms), read in index order.
        predict_shards: Predict split (same forms); targets may be absent.
        predict_jsonl: A DIM "tos" jsonl for ``zoo predict`` (image paths relative to the jsonl's
            folder); used when ``predict_shards`` is None. Its rows are all edits or all
            text-to-image: a row's ``kind`` ("edit"/"t2i"), else edit when it has ``image_path_target``
            (edit rows need no target here).
        batch_size: Training batch size per rank.
        val_batch_size: Batch size of val/test/predict; defaults to ``batch_size``.
        num_workers: Dataloader worker processes per rank (0 = read in the main process).
        resolution: Side R of the square ``source``/``target``/``mask`` tensors.
        mllm_resolution: Side M of the squashed full source image fed to the MLLM.
        seed: Seed of the shard order and shuffle buffers (combined with epoch, rank, worker).
        shuffle_buffer: Samples held by each worker's shuffle buffer (1 = shard order only).
        strict: Raise on the first undecodable sample (naming shard and key) instead of
            skipping and counting it.
        max_pixels: Skip (and count) a sample with an image of more pixels than this, read from
            the image header before decoding. None: no cap.
        limit_val_samples: Keep only the first n samples of the val and test splits.
        wrong_instructions: Ablation for ``zoo test``: each test sample gets the instruction (and
            blueprint, chain, boxes) of the next sample in its batch (:meth:`EditBatch.with_texts_of`),
            so the score shows how much the model uses its instruction. Needs ``val_batch_size >= 2``.
        use_cached_features: Read the frozen-encoder features of a split written by ``zoo data
            cache-features`` (detected from its ``index.json``), so the module skips those encoders;
            False encodes online from the same shards' images.
    """

    def __init__(
        self,
        train_shards: str | None = None,
        val_shards: str | None = None,
        test_shards: str | None = None,
        predict_shards: str | None = None,
        predict_jsonl: str | None = None,
        batch_size: int = 8,
        val_batch_size: int | None = None,
        num_workers: int = 0,
        resolution: int = 32,
        mllm_resolution: int = 32,
        seed: int = 0,
        shuffle_buffer: int = 256,
        strict: bool = False,
        max_pixels: int | None = MAX_PIXELS,
        limit_val_samples: int | None = None,
        wrong_instructions: bool = False,
        use_cached_features: bool = True,
    ) -> None:
        super().__init__()
        if batch_size < 1 or (val_batch_size is not None and val_batch_size < 1):
            raise DataConfigError(f"batch_size and val_batch_size must be >= 1, got {batch_size} and {val_batch_size}")
        if num_workers < 0:
            raise DataConfigError(f"num_workers must be >= 0, got {num_workers}")
        if max_pixels is not None and max_pixels < 1:
            raise DataConfigError(f"max_pixels must be >= 1 or null, got {max_pixels}")
        self.save_hyperparameters()
        self.train_shards, self.val_shards, self.test_shards = train_shards, val_shards, test_shards
        self.predict_shards, self.predict_jsonl = predict_shards, predict_jsonl
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.num_workers, self.resolution, self.mllm_resolution = num_workers, resolution, mllm_resolution
        self.seed, self.shuffle_buffer, self.strict, self.max_pixels = seed, shuffle_buffer, strict, max_pixels
        self.limit_val_samples = limit_val_samples
        if wrong_instructions and self.val_batch_size < 2:
            raise DataConfigError(
                "wrong_instructions swaps texts between the samples of a test batch: set val_batch_size >= 2"
            )
        self.wrong_instructions = wrong_instructions
        self.use_cached_features = use_cached_features
        self.feature_caches: dict[str, dict[str, Any]] = {}
        """Per split read from a feature cache, its description (:func:`datamodules.features.cache_info`)."""
        self.rank, self.world_size = 0, 1
        self.streams: dict[str, ShardStream] = {}
        self._counters: dict[str, Any] = {}
        self._predict_reader: Any = None
        self._epoch = 0
        self._resume: dict[str, Any] | None = None

    # -- setup --

    def setup(self, stage: str | None = None) -> None:
        """Capture rank/world size from the trainer (workers must not guess them from the env)."""
        if self.trainer is not None:
            self.rank, self.world_size = self.trainer.global_rank, self.trainer.world_size
        wanted = STAGE_SPLITS.get(stage or "", ["train", "val", "test", "predict"])
        specs = {"train": self.train_shards, "val": self.val_shards, "test": self.test_shards, "predict": self.predict_shards}
        for split in wanted:
            if specs[split] is None or split in self.streams:
                continue
            self._counters.setdefault(split, multiprocessing.Value("q", 0))
            train = split == "train"
            cache = cache_of(specs[split]) if self.use_cached_features else None
            if cache is not None:
                view = (cache["resolution"], cache["mllm_resolution"])
                if view != (self.resolution, self.mllm_resolution):
                    raise DataConfigError(
                        f"{split}_shards {specs[split]} hold features cached at resolution {view[0]} / mllm_resolution {view[1]}, "
                        f"but this DataModule reads {self.resolution} / {self.mllm_resolution}: cache again or set use_cached_features=false"
                    )
                self.feature_caches[split] = cache
            self.streams[split] = ShardStream(
                resolve_shards(specs[split]),
                rank=self.rank,
                world_size=self.world_size,
                batch_size=self.batch_size if train else self.val_batch_size,
                resolution=self.resolution,
                mllm_resolution=self.mllm_resolution,
                train=train,
                seed=self.seed,
                shuffle_buffer=self.shuffle_buffer,
                strict=self.strict,
                limit_samples=self.limit_val_samples if split in ("val", "test") else None,
                skipped=self._counters[split],
                need_target=split in ("train", "val"),
                max_pixels=self.max_pixels,
                features=cache is not None,
            )
        test = self.streams.get("test")
        if self.wrong_instructions and test is not None and 1 in test.rank_batch_sizes:
            raise ValueError(
                f"wrong_instructions: this rank's test batches {test.rank_batch_sizes} include one of a single sample, "
                "which has no other sample's instruction to take; choose a val_batch_size that leaves none"
            )
        if "predict" in wanted and self.predict_shards is None and self.predict_jsonl is not None:
            from datamodules.formats.dim import TosJsonl

            self._predict_reader = TosJsonl(self.predict_jsonl, strict=self.strict, targets=False)

    @property
    def skipped(self) -> dict[str, int]:
        """Samples skipped so far per split (undecodable or lost), summed over this rank's workers."""
        counts = {split: counter.value for split, counter in self._counters.items()}
        if self._predict_reader is not None:
            counts["predict"] = counts.get("predict", 0) + self._predict_reader.skipped
        return counts

    @property
    def num_batches_per_epoch(self) -> int:
        """Training batches each rank yields per epoch (equal on every rank)."""
        return len(self._stream("train"))

    def _stream(self, split: str) -> ShardStream:
        if split not in self.streams:
            raise RuntimeError(f"no {split} split: pass {split}_shards and call setup() first")
        return self.streams[split]

    # -- epochs and resume --

    def set_epoch(self, epoch: int) -> None:
        """Epoch used by the next ``iter(train_dataloader)`` when no trainer is attached."""
        self._epoch = epoch

    def _layout(self) -> dict[str, int]:
        stream = self._stream("train")
        return {
            "world_size": self.world_size,
            "num_workers": self.num_workers,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "shuffle_buffer": self.shuffle_buffer,
            "num_samples": stream.num_samples,
        }

    def _batches_processed_total(self) -> int:
        return self.trainer.fit_loop.epoch_loop.batch_progress.total.processed if self.trainer is not None else 0

    def _begin_train_epoch(self, stream: ShardStream) -> None:
        if self.trainer is not None:
            self._epoch = self.trainer.current_epoch
        stream.epoch, stream.skip_batches = self._epoch, 0
        resume = self._resume
        if resume is None:
            return
        if resume["layout"] != self._layout():
            self._resume = None
            log.warning(
                "data layout changed since the checkpoint (%s -> %s): epoch %d restarts from its first batch "
                "under the new layout, so samples already seen this epoch may repeat",
                resume["layout"],
                self._layout(),
                resume["epoch"],
            )
            return
        if resume["batches_consumed"] < len(stream):
            if self._epoch == resume["epoch"]:
                stream.skip_batches = resume["batches_consumed"]
            self._resume = None
            return
        # Saved after the epoch's last batch. Lightning then first iterates with the old epoch number
        # (and, for a save at epoch end, trains one batch from that iterator before iterating again
        # with the next epoch number), so both iterators must serve the next epoch, the second one
        # skipping the batches trained since the restore.
        if self._epoch == resume["epoch"]:
            stream.epoch = self._epoch + 1
            stream.skip_batches = self._batches_processed_total() - resume["batches_total"]
            return
        if self._epoch == resume["epoch"] + 1:
            stream.skip_batches = self._batches_processed_total() - resume["batches_total"]
        self._resume = None

    def state_dict(self) -> dict[str, Any]:
        """Epoch and batches processed in it, with each rank's per-worker position (Lightning saves rank 0's)."""
        if "train" not in self.streams or self.trainer is None:
            return {}
        consumed = self.trainer.fit_loop.epoch_loop.batch_progress.current.processed
        workers = max(1, self.num_workers)
        return {
            "epoch": self.trainer.current_epoch,
            "batches_consumed": consumed,
            "batches_total": self._batches_processed_total(),
            "layout": self._layout(),
            "ranks": {
                str(rank): {"worker_batches_consumed": [_consumed_by_worker(w, consumed, workers) for w in range(workers)]}
                for rank in range(self.world_size)
            },
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Remember the position; applied at the next ``iter(train_dataloader)`` calls."""
        if state_dict:
            # Lightning warns on a mid-epoch resume unless the *loader* has state_dict/load_state_dict;
            # here the DataModule holds that state (restored by this method, per rank), so the warning is false.
            warnings.filterwarnings("ignore", message=r"You're resuming from a checkpoint that ended before the epoch ended")
            self._resume = {
                "epoch": int(state_dict["epoch"]),
                "batches_consumed": int(state_dict["batches_consumed"]),
                "batches_total": int(state_dict["batches_total"]),
                "layout": dict(state_dict["layout"]),
            }

    def _trainer_running(self) -> bool:
        """Whether Lightning is iterating the loaders now (and will call the batch hooks)."""
        return self.trainer is not None and self.trainer.state.status == TrainerStatus.RUNNING

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """uint8 pixel levels -> float on the device (bit-identical to converting on the CPU); the
        ``wrong_instructions`` ablation, applied to test batches only."""
        if isinstance(batch, EditBatch):
            batch = batch.to_float()
        testing = self.trainer is not None and self.trainer.testing
        if self.wrong_instructions and testing and isinstance(batch, EditBatch):
            return batch.with_texts_of(1)  # a one-sample batch is refused there (and in setup)
        return batch

    # -- loaders --

    def _loader(self, stream: ShardStream) -> DataLoader:
        # Read in index order, so worker seeds do not matter; the generator keeps iter() off the global RNG.
        return _LevelsLoader(
            stream, self._trainer_running, batch_size=None, num_workers=self.num_workers, generator=_seeded(f"eval/{self.seed}")
        )

    def train_dataloader(self) -> DataLoader:
        return _TrainLoader(self._stream("train"), self._begin_train_epoch, self._trainer_running, num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self._stream("val"))

    def test_dataloader(self) -> DataLoader:
        return self._loader(self._stream("test"))

    def predict_dataloader(self) -> DataLoader:
        if "predict" in self.streams:
            return self._loader(self.streams["predict"])
        if self._predict_reader is None:
            raise RuntimeError("no predict split: pass predict_shards or predict_jsonl and call setup('predict')")
        rows = self._predict_reader.rows()
        mine = rows[self.rank * len(rows) // self.world_size : (self.rank + 1) * len(rows) // self.world_size]
        return DataLoader(
            ListDataset(self._predict_reader, mine),
            batch_size=self.val_batch_size,
            num_workers=self.num_workers,
            collate_fn=partial(collate, resolution=self.resolution, mllm_resolution=self.mllm_resolution),
        )
