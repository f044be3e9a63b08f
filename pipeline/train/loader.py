"""Deterministic, resumable per-worker training batches from prepared Parquet shards.

The data position is a pure function of the global step. For epoch ``e`` with ``W`` workers,
batch size ``B`` and ``T`` samples in the corpus:

1. The row groups of all shards are permuted (seeded by ``(seed, e)``) and laid end to end: the
   epoch's row stream.
2. Worker ``r`` takes rows ``[r*Q, (r+1)*Q)`` of that stream, where ``Q = steps_per_epoch * B``
   and ``steps_per_epoch = (T // W) // B``. Splitting by rows rather than dealing row groups
   round-robin keeps the shares equal whatever the row-group sizes (shard tails are short), so
   ``steps_per_epoch`` is the same in every epoch and a position is plain arithmetic. At most
   ``W - 1`` row groups straddle two shares and are read by both workers; the last
   ``T - W*Q < W*B`` rows of the stream are dropped, different ones every epoch.
3. A worker reads its share in windows of ``shuffle_row_groups`` row groups and shuffles the rows
   of each window (seeded by ``(seed, e, r, window)``); step ``i`` is rows ``[i*B, (i+1)*B)``.

So no sample reaches two workers in one epoch, and a stream started at step ``s`` skips whole
epochs and windows without reading them, then yields the very batches an uninterrupted stream
would (augmentation is seeded per sample by its position in the epoch). Curated shards with
several captions per image (``pipeline.data.prepared``) give each sample, at each step, one of
its captions drawn by a generator seeded by the step and the sample's position.

A background thread reads windows (one ahead) and hands whole batches to a small thread pool
that decodes and augments them (Pillow releases the GIL); at most ``prefetch_batches`` wait ready.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipeline.errors import QformerError
from pipeline.data.augment import TrainTransform
from pipeline.data.batches import PIXELS, ImageDecodeError, InputBuilder
from pipeline.data.prepared import (
    KEY,
    MODEL_INPUTS,
    MULTI_TOKEN_COLUMNS,
    TOKEN_COLUMNS,
    TextKind,
    has_multiple_captions,
    pick_captions,
)
from pipeline.io.storage import Location

log = logging.getLogger("qformer.train")

_SHARD_COLUMN = "__shard"
# Domain tags keep the permutation, window-shuffle, augmentation and caption streams independent.
_PERMUTE, _SHUFFLE, _AUGMENT, _CAPTION = 0, 1, 2, 3
_POLL_S = 0.1


def sample_rng(seed: int, epoch: int, position: int) -> np.random.Generator:
    """The augmentation generator of the sample at ``position`` of ``epoch``'s stream: a function
    of the position alone, so a resumed stream augments as an uninterrupted one."""
    return np.random.default_rng(np.random.SeedSequence([seed, _AUGMENT, epoch, position]))


def caption_draw(seed: int, step: int, position: int) -> int:
    """The caption draw of the sample at ``position`` of ``step``'s batch stream (taken modulo
    the sample's caption count): a function of the step and the position alone."""
    return int(np.random.default_rng(np.random.SeedSequence([seed, _CAPTION, step, position])).integers(2**31))


@dataclass(frozen=True)
class LoaderConfig:
    """What a worker's batch stream reads and how it turns rows into model inputs."""

    shards: tuple[Location, ...]
    """Prepared ``.parquet`` shards, in corpus order (see :func:`shards_from_manifest`)."""
    batch_size: int
    """Samples per batch on each worker."""
    image_size: int
    """Side of the square ``pixel_values`` the vision tower expects."""
    text: TextKind
    """Token columns to read: ``qformer`` (objective 1) or ``llm`` (objective 2); only those are read."""
    augment: bool = True
    """Random resized crop and flip; when off, images are only resized to ``image_size``."""
    crop_scale: tuple[float, float] = (0.5, 1.0)
    """Area fraction range of the random crop."""
    hflip: bool = True
    """Flip horizontally with probability 1/2 when augmenting."""
    seed: int = 0
    """Seeds the epoch permutations, window shuffles and augmentation."""
    shuffle_row_groups: int = 2
    """Row groups whose rows are shuffled together; more mixes better but delays the first batch."""
    prefetch_batches: int = 4
    """Batches decoded ahead of the consumer."""
    decode_threads: int = 2
    """Threads decoding and augmenting (each works on one whole batch)."""
    pin_memory: bool = False
    """Hand batches over in page-locked memory (training on a GPU: asynchronous copies)."""

    def __post_init__(self):
        object.__setattr__(self, "shards", tuple(self.shards))
        problems = []
        if not self.shards:
            problems.append("shards: no shard given")
        for name in ("batch_size", "image_size", "shuffle_row_groups", "prefetch_batches", "decode_threads"):
            if getattr(self, name) < 1:
                problems.append(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.text not in TOKEN_COLUMNS:
            problems.append(f"text: must be one of {sorted(TOKEN_COLUMNS)}, got {self.text!r}")
        low, high = self.crop_scale
        if not 0 < low <= high <= 1:
            problems.append(f"crop_scale: need 0 < low <= high <= 1, got {self.crop_scale}")
        if self.seed < 0:
            problems.append(f"seed: must be >= 0, got {self.seed}")
        if problems:
            raise ValueError("invalid LoaderConfig: " + "; ".join(problems))

    @property
    def columns(self) -> tuple[str, ...]:
        """The Parquet columns a stream reads from single-caption shards."""
        return (KEY, *self.input_builder().columns)

    def read_columns(self, multiple_captions: bool) -> tuple[str, ...]:
        """The Parquet columns a stream reads: with ``multiple_captions``, every kept caption's
        tokens instead of the single caption's."""
        if not multiple_captions:
            return self.columns
        single = TOKEN_COLUMNS[self.text]
        return tuple(c for c in self.columns if c not in single) + MULTI_TOKEN_COLUMNS[self.text]

    def input_builder(self) -> InputBuilder:
        """Rows -> model inputs, augmenting as configured."""
        transform = TrainTransform(self.image_size, self.augment, self.crop_scale, self.hflip)
        return InputBuilder(transform, self.text, pin_memory=self.pin_memory)


class Batch(dict):
    """One worker's batch for one global step: the model's keyword arguments, by name.

    The mapping holds only tensors: ``pixel_values`` (B, 3, S, S) uint8 (normalise them on the
    model's device with ``pipeline.data.batches.to_device``), and either ``input_ids`` /
    ``attention_mask`` (B, L) int64 (``text="qformer"``) or ``llm_input_ids`` /
    ``llm_attention_mask`` (B, L2) int64 (``text="llm"``).

    Attributes:
        step: The global step this batch is for.
        epoch: The epoch it comes from.
        sample_keys: The samples' keys, in batch order (for logging and debugging).
    """

    def __init__(self, inputs: dict[str, torch.Tensor], *, step: int, epoch: int, sample_keys: tuple[str, ...]):
        super().__init__(inputs)
        self.step, self.epoch, self.sample_keys = step, epoch, sample_keys


class DataError(QformerError, RuntimeError):
    """A prepared shard could not be read, or one of its rows not turned into model inputs."""


class CorruptSample(DataError):
    """A prepared row's image cannot be decoded: every restart would meet it again."""

    permanent = True


def placeholder_batch(config: LoaderConfig) -> Batch:
    """A batch of the stream's shapes, all zeros (masks all ones), with no sample in it: fed with
    loss weight 0 where a worker has no data for a micro-step but must join its collectives."""
    _, types = _read_footer(config.shards[0], config.columns)
    size, batch = config.image_size, config.batch_size
    inputs = {PIXELS: torch.zeros(batch, 3, size, size, dtype=torch.uint8)}  # (B, 3, S, S)
    for column, name in zip(TOKEN_COLUMNS[config.text], MODEL_INPUTS[config.text]):
        length = types[column].list_size
        fill = torch.ones if column.endswith("attention_mask") else torch.zeros
        inputs[name] = fill(batch, length, dtype=torch.int64)  # (B, L)
    return Batch(inputs, step=-1, epoch=-1, sample_keys=())


@dataclass(frozen=True)
class _RowGroups:
    """Every non-empty row group of the corpus, in (shard, row group) order."""

    shard: np.ndarray  # (G,) index into LoaderConfig.shards
    group: np.ndarray  # (G,) row-group index inside its shard
    rows: np.ndarray  # (G,) row count


@dataclass(frozen=True)
class _Piece:
    """Rows ``[start, stop)`` of one row group."""

    shard: int
    group: int
    start: int
    stop: int


@dataclass(frozen=True)
class _Failure:
    error: BaseException


def _open(location: Location):
    fs, path = location.filesystem()
    # Parquet reads exact byte ranges; fsspec's default read-ahead would fetch megabytes more.
    return fs.open(path, "rb", cache_type="none")


def _read_footer(location: Location, columns: tuple[str, ...]) -> tuple[list[int], dict]:
    with _open(location) as handle:
        metadata = pq.read_metadata(handle)
    schema = metadata.schema.to_arrow_schema()
    missing = [name for name in columns if name not in schema.names]
    if missing:
        raise ValueError(f"{location.url}: prepared shard has no column(s) {missing}")
    rows = [metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)]
    return rows, {name: schema.field(name).type for name in columns}


def _has_multiple_captions(shard: Location, text: TextKind) -> bool:
    with _open(shard) as handle:
        return has_multiple_captions(pq.read_schema(handle), text)


def _index_row_groups(shards: tuple[Location, ...], columns: tuple[str, ...]) -> _RowGroups:
    """Read every footer (in threads: on S3 each is a round trip) and check the shards agree."""
    with ThreadPoolExecutor(min(16, len(shards))) as pool:
        footers = list(pool.map(lambda shard: _read_footer(shard, columns), shards))
    expected = footers[0][1]
    shard_ids, groups, rows = [], [], []
    for index, (counts, types) in enumerate(footers):
        if types != expected:
            raise ValueError(
                f"{shards[index].url}: column types {types} differ from {shards[0].url}'s "
                f"{expected} (shards of different prep runs?)"
            )
        for group, count in enumerate(counts):
            if count:
                shard_ids.append(index)
                groups.append(group)
                rows.append(count)
    return _RowGroups(np.array(shard_ids, np.int64), np.array(groups, np.int64), np.array(rows, np.int64))


class BatchStream:
    """An endless iterator of one worker's :class:`Batch` es, from ``start_step`` on.

    Every worker builds its own stream with the same config; batches of one step never share a
    sample across workers, and a stream started at step ``s`` yields exactly what an
    uninterrupted one yields from ``s`` (same samples, same augmentation). Close it (or use it
    as a context manager) to stop its threads.

    Args:
        config: What to read and how.
        rank: This worker's rank, in ``[0, world_size)``.
        world_size: Number of data-parallel workers.
        start_step: Global step of the first batch (the step a resumed run continues at).

    Attributes:
        total_samples: Samples in the corpus.
        steps_per_epoch: Steps in every epoch, the same for all epochs and workers.
        wait_seconds: Seconds the consumer has spent blocked in ``__next__`` so far.

    Raises:
        ValueError: bad arguments, a shard lacking a needed column, or a corpus too small for
            one step of ``world_size x batch_size`` samples.

    Example:
        >>> with BatchStream(config, rank=ctx.rank, world_size=ctx.world_size, start_step=step) as stream:
        ...     loss = model(**next(stream)).loss
    """

    def __init__(self, config: LoaderConfig, rank: int, world_size: int, start_step: int = 0):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if start_step < 0:
            raise ValueError(f"start_step must be >= 0, got {start_step}")
        self.config, self.rank, self.world_size = config, rank, world_size
        self._multiple_captions = _has_multiple_captions(config.shards[0], config.text)
        self._columns = config.read_columns(self._multiple_captions)
        self._groups = _index_row_groups(config.shards, self._columns)
        self.total_samples = int(self._groups.rows.sum())
        self.steps_per_epoch = self.total_samples // world_size // config.batch_size
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"the corpus is too small: {self.total_samples} samples in {len(config.shards)} "
                f"shard(s) cannot fill one step of world_size {world_size} x batch_size "
                f"{config.batch_size} = {world_size * config.batch_size} samples"
            )
        self.wait_seconds = 0.0
        self._share = self.steps_per_epoch * config.batch_size
        self._inputs = config.input_builder()
        self._queue: queue.Queue = queue.Queue(maxsize=config.prefetch_batches)
        self._stop = threading.Event()
        self._closed = False
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="batch-stream-read")
        self._decoders = ThreadPoolExecutor(config.decode_threads, thread_name_prefix="batch-stream-decode")
        self._producer = threading.Thread(
            target=self._produce, args=(start_step,), name="batch-stream", daemon=True
        )
        self._producer.start()

    @property
    def samples_per_epoch(self) -> int:
        """Samples trained per epoch by all workers together; the other ones are dropped."""
        return self._share * self.world_size

    @property
    def ready(self) -> int:
        """Batches decoded and waiting for the consumer (at most ``prefetch_batches``)."""
        with self._queue.mutex:
            return sum(1 for item in self._queue.queue if isinstance(item, Future) and item.done())

    def position(self, step: int) -> dict[str, int]:
        """Where global step ``step`` starts, for checkpoint metadata.

        Returns:
            ``{"epoch", "step_in_epoch", "samples_in_epoch"}``; the last counts the samples of
            the epoch that all workers trained before ``step``.
        """
        epoch, in_epoch = divmod(step, self.steps_per_epoch)
        return {
            "epoch": epoch,
            "step_in_epoch": in_epoch,
            "samples_in_epoch": in_epoch * self.config.batch_size * self.world_size,
        }

    def __iter__(self) -> "BatchStream":
        return self

    def __next__(self) -> Batch:
        if self._closed:
            raise RuntimeError("the batch stream is closed")
        started = time.perf_counter()
        try:
            item = self._queue.get()
            if isinstance(item, _Failure):
                raise item.error
            return item.result()
        except BaseException:
            self.close()
            raise
        finally:
            self.wait_seconds += time.perf_counter() - started

    def close(self) -> None:
        """Stop the background threads; pending batches are discarded."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        self._producer.join()
        self._reader.shutdown(cancel_futures=True)
        self._decoders.shutdown(cancel_futures=True)

    def __enter__(self) -> "BatchStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # Background side: the producer thread and the decode pool.

    def _produce(self, step: int) -> None:
        try:
            while True:
                epoch, in_epoch = divmod(step, self.steps_per_epoch)
                for rows in self._epoch_batches(epoch, in_epoch):
                    if not self._put(self._decoders.submit(self._assemble, rows, epoch, step)):
                        return
                    step += 1
        except BaseException as error:
            self._put(_Failure(error))

    def _put(self, item: Future | _Failure) -> bool:
        """Queue ``item``, waiting for room; False once the stream is closing."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def _windows(self, epoch: int) -> list[list[_Piece]]:
        """This worker's share of ``epoch``, as windows of row-group pieces (see module doc)."""
        groups, seed = self._groups, self.config.seed
        order = np.random.default_rng([seed, _PERMUTE, epoch]).permutation(len(groups.rows))
        rows = groups.rows[order]  # (G,)
        ends = np.cumsum(rows)  # (G,)
        starts = ends - rows  # (G,)
        low = self.rank * self._share
        high = low + self._share
        first = int(np.searchsorted(ends, low, side="right"))
        last = int(np.searchsorted(starts, high, side="left"))
        pieces = [
            _Piece(
                shard=int(groups.shard[order[k]]),
                group=int(groups.group[order[k]]),
                start=int(max(low - starts[k], 0)),
                stop=int(min(high - starts[k], rows[k])),
            )
            for k in range(first, last)
        ]
        size = self.config.shuffle_row_groups
        return [pieces[i : i + size] for i in range(0, len(pieces), size)]

    def _epoch_batches(self, epoch: int, first_step: int) -> Iterator[pa.Table]:
        """The row tables of this worker's steps ``first_step..`` of ``epoch``."""
        batch_size = self.config.batch_size
        windows = self._windows(epoch)
        sizes = np.array([sum(p.stop - p.start for p in window) for window in windows])
        ends = np.cumsum(sizes)
        offset = first_step * batch_size
        first = int(np.searchsorted(ends, offset, side="right"))
        skip = offset - int(ends[first] - sizes[first])
        upcoming = self._reader.submit(self._read_window, epoch, first, windows[first])
        pending: pa.Table | None = None
        for index in range(first, len(windows)):
            table = upcoming.result()
            if index + 1 < len(windows):
                upcoming = self._reader.submit(self._read_window, epoch, index + 1, windows[index + 1])
            table = table.slice(skip)
            skip = 0
            pending = table if pending is None else pa.concat_tables([pending, table])
            # A share is a whole number of batches, so nothing is left after the last window.
            while pending.num_rows >= batch_size:
                yield pending.slice(0, batch_size)
                pending = pending.slice(batch_size)

    def _read_window(self, epoch: int, index: int, pieces: list[_Piece]) -> pa.Table:
        """The rows of ``pieces``, shuffled, with the shard index of each row."""
        tables = []
        for piece in pieces:
            location = self.config.shards[piece.shard]
            try:
                with _open(location) as handle:
                    # pre_buffer coalesces the projected column chunks into few range requests.
                    parquet = pq.ParquetFile(handle, pre_buffer=True)
                    table = parquet.read_row_group(piece.group, columns=list(self._columns))
            except Exception as error:
                raise DataError(f"{location.url}: cannot read row group {piece.group}: {error}") from error
            table = table.slice(piece.start, piece.stop - piece.start)
            shard = pa.array(np.full(table.num_rows, piece.shard, np.int32))
            tables.append(table.append_column(_SHARD_COLUMN, shard))
        table = pa.concat_tables(tables)
        rng = np.random.default_rng([self.config.seed, _SHUFFLE, epoch, self.rank, index])
        return table.take(rng.permutation(table.num_rows))

    def _assemble(self, rows: pa.Table, epoch: int, step: int) -> Batch:
        """Decode, augment and normalise one batch (runs in the decode pool)."""
        config = self.config
        # The sample's position in the epoch's stream seeds its augmentation.
        first = self.rank * self._share + (step - epoch * self.steps_per_epoch) * config.batch_size
        keys = rows.column(KEY).to_pylist()
        rngs = [sample_rng(config.seed, epoch, first + j) for j in range(rows.num_rows)] if config.augment else None
        if self._multiple_captions:
            draws = np.array([caption_draw(config.seed, step, first + j) for j in range(rows.num_rows)])
            rows = pick_captions(rows, config.text, draws)
        try:
            inputs = self._inputs(rows, rngs)
        except ImageDecodeError as error:
            shard = config.shards[rows.column(_SHARD_COLUMN)[error.row].as_py()]
            raise CorruptSample(f"{shard.url}: sample {keys[error.row]!r}: {error}") from error
        return Batch(inputs, step=step, epoch=epoch, sample_keys=tuple(keys))


