"""Streamed training data: sources read shard by shard, mixed by weight, shared out between DDP ranks and
DataLoader workers, checked lazily and resumable mid-epoch.

The stream is cut into `partitions = ranks x workers`; worker w of rank r reads partition r * workers + w. When a
source's shard count is a multiple of `partitions`, each partition reads whole shards (this epoch's seeded shard
order, every partitions-th shard); otherwise every partition reads every shard and keeps row r of shard s when
(s + r) % partitions is its index. Either way each row belongs to exactly one partition. Rows are shuffled within
blocks of `shuffle_buffer` consecutive rows (a seeded permutation per block), and a partition mixes its sources by
drawing each next record's source with the sources' weights; the first source to run out ends its epoch.

Everything is a function of (seed, epoch, partition) and a small `Position` per source, so the state after any
batch is a few integers: each batch carries it (`STREAM_KEY`), `StreamProgress` keeps the state of the last batch
the training loop took from each partition, Lightning saves it with the data module, and a resumed run restarts
every partition there.

Under DDP the ranks' streams need not end at the same batch (rows that do not divide evenly between partitions,
skipped rows, a mixture's draws), and a rank that trains on one more batch than the others waits for them forever
(DDP all-reduces gradients at every step). So an epoch ends on every rank when the first rank's stream ends: the
rows the other ranks have not reached are not trained on in that epoch, as DistributedSampler(drop_last=True)
drops a remainder.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from itertools import islice

import numpy as np
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from hybridize.lightning_modules.data.collation import collate
from hybridize.lightning_modules.data.encoding import (
    LENGTH_REASONS,
    ChatEncoder,
    Measured,
    encode_sample,
    measure,
)
from hybridize.lightning_modules.data.formats import BadSample, normalize_record, to_chat_record
from hybridize.lightning_modules.data.sources import OpenSource

logger = logging.getLogger(__name__)

STREAM_KEY = (
    "stream"  # the batch entry with the stream's position; the data module removes it before the model
)


@dataclass
class Position:
    """Where one source's reader of one partition stands: the shuffle block it is in and how much of it was used."""

    shard: int = 0  # index into the partition's shard order of this epoch, where the current block starts
    row: int = 0  # row of that shard where the current block starts
    block: int = 0  # blocks before the current one
    taken: int = 0  # records of the current block already given out


@dataclass
class PartitionState:
    """One partition's place in its epoch: the mixture's draws so far and each source's position."""

    draws: int = 0
    positions: list[Position] = field(default_factory=list)

    @classmethod
    def from_dict(cls, state: dict) -> PartitionState:
        return cls(state["draws"], [Position(**position) for position in state["positions"]])


class SourceReader:
    """The rows of one source that belong to one partition, in this epoch's order, from a `Position` on."""

    def __init__(
        self, source: OpenSource, index: int, partition: int, partitions: int, epoch: int, seed: int, shuffle: bool,
        shuffle_buffer: int,
    ):  # fmt: skip
        self.source, self.partition, self.partitions = source, partition, partitions
        self.shuffle, self.buffer = shuffle, shuffle_buffer
        self.seed = (seed, epoch, index)
        shards = np.arange(source.num_shards)
        if shuffle:
            shards = np.random.default_rng(self.seed).permutation(shards)
        self.by_shard = source.num_shards % partitions == 0
        self.shards = shards[partition::partitions] if self.by_shard else shards

    def _rows(self, position: Position) -> Iterator[tuple[int, int, dict]]:
        """(shard position, row, row data) of the partition's rows from the start of `position`'s block on."""
        for k in range(position.shard, len(self.shards)):
            shard = int(self.shards[k])
            start = position.row if k == position.shard else 0
            for row, data in enumerate(self.source.shard(shard, start), start):
                if self.by_shard or (shard + row) % self.partitions == self.partition:
                    yield k, row, data

    def records(self, position: Position) -> Iterator[tuple[dict, str, Position]]:
        """(row data, where it is, the position after it) for the partition's rows from `position` on."""
        rows = self._rows(position)
        start, block, taken = (position.shard, position.row), position.block, position.taken
        while chunk := list(islice(rows, self.buffer)):
            order = np.arange(len(chunk))
            if self.shuffle:
                order = np.random.default_rng((*self.seed, self.partition, block)).permutation(order)
            for j in range(taken, len(chunk)):
                k, row, data = chunk[order[j]]
                yield data, (int(self.shards[k]), row), Position(*start, block, j + 1)
            k, row, _ = chunk[-1]
            start, block, taken = (k, row + 1), block + 1, 0


@dataclass
class StreamOptions:
    """How samples are built and batched (the data module's settings)."""

    max_length: int
    batch_size: int
    pack: bool
    shuffle: bool
    seed: int
    shuffle_buffer: int
    on_too_long: str
    on_bad_sample: str


def encode_row(
    encoder: ChatEncoder, source: OpenSource, data: dict, shard: int, max_length: int, on_too_long: str
):
    """(Measured, sample) of one row; the sample is None and `reason` set when the row cannot be used as it is."""
    try:
        messages, media = normalize_record(to_chat_record(data, source.layout), source.media_root_of(shard))
    except BadSample as error:
        return Measured(reason=error.reason, detail=error.detail), None
    measured = measure(encoder, messages, media, max_length, on_too_long)
    if measured.reason is not None:
        return measured, None
    try:
        return measured, encode_sample(encoder, messages, media, measured)
    except BadSample as error:  # found only when the media are decoded
        return dataclasses.replace(measured, reason=error.reason, detail=error.detail), None


class ChatStream(IterableDataset):
    """Batches of the samples of `sources` for one rank: each DataLoader worker reads its own partition.

    Items are collated batches (see `collate`) with a `STREAM_KEY` entry: the partition, its `PartitionState`
    after the batch, the rows skipped since its previous batch (per reason) and the batch's sample count. `start`
    (set by `StreamLoader` when an epoch's iterator is made) holds the epoch, the partitions' states to resume
    from and `rotation`: worker w reads the rank's partition (w + rotation) % workers, so that the partition whose
    batch is due comes first (DataLoader asks its workers in turn, starting with worker 0).
    """

    def __init__(
        self, sources: list[OpenSource], weights: list[float], encoder: ChatEncoder, options: StreamOptions, *,
        rank: int = 0, world_size: int = 1, workers: int = 1,
    ):  # fmt: skip
        self.sources, self.encoder, self.options = sources, encoder, options
        self.cumulative = np.cumsum(weights) / np.sum(weights)  # the mixture's draws: searchsorted(u)
        self.rank, self.workers, self.partitions = rank, workers, world_size * workers
        self.start = {"epoch": 0, "states": {}, "rotation": 0}

    def partition(self) -> int:
        info = get_worker_info()
        if (info.num_workers if info else 1) != self.workers:
            raise RuntimeError(
                f"ChatStream was built for {self.workers} workers but runs in {info.num_workers}."
            )
        return self.rank * self.workers + ((info.id if info else 0) + self.start["rotation"]) % self.workers

    def records(
        self, partition: int, epoch: int, state: PartitionState
    ) -> Iterator[tuple[int, dict, tuple, PartitionState]]:
        """(source index, row data, (shard, row), state after it) of the partition's mixture from `state` on."""
        options = self.options
        readers = [
            SourceReader(source, index, partition, self.partitions, epoch, options.seed, options.shuffle,
                         options.shuffle_buffer).records(position)
            for index, (source, position) in enumerate(zip(self.sources, state.positions, strict=True))
        ]  # fmt: skip
        draws = np.random.default_rng((options.seed, epoch, partition, len(self.sources)))
        draws.random(state.draws)  # the draws made before `state`
        positions = list(state.positions)
        for count in range(state.draws + 1, 2**62):
            index = int(np.searchsorted(self.cumulative, draws.random(), side="right"))
            item = next(readers[index], None)
            if item is None:  # the first source to run out ends this partition's epoch
                return
            data, where, positions[index] = item
            yield index, data, where, PartitionState(count, list(positions))

    def __iter__(self) -> Iterator[dict]:
        partition, epoch, options = self.partition(), self.start["epoch"], self.options
        state = self.start["states"].get(partition)
        state = (
            PartitionState.from_dict(state)
            if state
            else PartitionState(0, [Position() for _ in self.sources])
        )
        samples, rows, filled, skipped = [], 0, 0, Counter()
        for index, data, (shard, row), after in self.records(partition, epoch, state):
            measured, sample = encode_row(
                self.encoder, self.sources[index], data, shard, options.max_length, options.on_too_long
            )
            if sample is None:
                self._refuse(measured, self.sources[index].locate(shard, row))
                skipped[measured.reason] += 1
                state = after
                continue
            length = len(sample["input_ids"])
            new_row = not samples or not options.pack or filled + length > options.max_length
            if new_row and rows == options.batch_size:
                yield self._batch(samples, partition, state, skipped)
                samples, rows, skipped = [], 0, Counter()
            rows, filled = (rows + 1, length) if new_row else (rows, filled + length)
            samples.append(sample)
            state = after
        if samples:
            yield self._batch(samples, partition, state, skipped)

    def _refuse(self, measured: Measured, where: str) -> None:
        """Raise for a row that `on_bad_sample` / `on_too_long` say is an error; else log that it is skipped."""
        length_problem = measured.reason in LENGTH_REASONS
        if measured.reason == "too_long" and self.options.on_too_long == "error":
            raise ValueError(
                f"{where}: too_long: {measured.detail}, over data.max_length={self.options.max_length}. Raise "
                "data.max_length, or set data.on_too_long: truncate (cuts at max_length, never inside an image) or skip."
            )
        if not length_problem and self.options.on_bad_sample == "error":
            raise ValueError(
                f"{where}: {measured.reason}: {measured.detail}. Fix the record, or set data.on_bad_sample: skip to "
                "skip such rows (they are counted in skipped)."
            )
        logger.warning("%s: %s: %s (skipped)", where, measured.reason, measured.detail)

    def _batch(self, samples: list[dict], partition: int, state: PartitionState, skipped: Counter) -> dict:
        options = self.options
        batch = collate(samples, self.encoder.pad_token_id, pack=options.pack, max_length=options.max_length)
        batch[STREAM_KEY] = {
            "partition": partition, "state": dataclasses.asdict(state), "skipped": dict(skipped),
            "samples": len(samples),
        }  # fmt: skip
        return batch


class StreamProgress:
    """What the training loop has taken from one rank's stream: per partition, the state after its last batch
    taken; the samples and skipped rows so far. Lightning saves it with the data module (`state_dict`)."""

    def __init__(self):
        self.epoch, self.partitions, self.states, self.last = 0, None, {}, None
        self.samples, self.skipped = 0, Counter()

    def begin(self, epoch: int, stream: ChatStream) -> dict:
        """Where `stream` starts an epoch's iterator: where it stopped in this epoch, else at its start."""
        if self.partitions is not None and self.partitions != stream.partitions:
            raise ValueError(
                f"The checkpoint's data position was saved with {self.partitions} stream partitions (ranks x "
                f"workers) and this run has {stream.partitions}: resume with the same trainer.devices and "
                "data.num_workers."
            )
        if epoch != self.epoch:
            self.epoch, self.states, self.last = epoch, {}, None
        self.partitions = stream.partitions
        first = stream.rank * stream.workers
        rotation = 0 if self.last is None else (self.last - first + 1) % stream.workers
        return {"epoch": epoch, "states": dict(self.states), "rotation": rotation}

    def update(self, meta: dict) -> None:
        self.states[meta["partition"]] = meta["state"]
        self.last = meta["partition"]
        self.samples += meta["samples"]
        self.skipped.update(meta["skipped"])

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch, "partitions": self.partitions, "states": self.states, "last": self.last,
            "samples": self.samples, "skipped": dict(self.skipped),
        }  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.partitions, self.last = state["epoch"], state["partitions"], state["last"]
        self.states = {int(partition): value for partition, value in state["states"].items()}
        self.samples, self.skipped = state["samples"], Counter(state["skipped"])


class StreamLoader(DataLoader):
    """A DataLoader over a `ChatStream` that restarts it where `progress` says each time an epoch begins.

    `every_rank_has(has_batch) -> bool` (DDP: the strategy's `reduce_boolean_decision`) is asked before each batch
    whether every rank has one too; the epoch ends at the first batch some rank lacks."""

    def __init__(
        self, stream: ChatStream, progress: StreamProgress, epoch: Callable[[], int], num_workers: int = 0,
        every_rank_has: Callable[[bool], bool] | None = None,
    ):  # fmt: skip
        super().__init__(stream, batch_size=None, num_workers=num_workers)
        self.progress, self.epoch, self.every_rank_has = progress, epoch, every_rank_has

    def __iter__(self):
        self.dataset.start = self.progress.begin(self.epoch(), self.dataset)
        batches = _one_line_errors(super().__iter__())
        return (
            batches
            if self.every_rank_has is None
            else _while_every_rank_has_one(batches, self.every_rank_has)
        )


def _while_every_rank_has_one(
    batches: Iterator[dict], every_rank_has: Callable[[bool], bool]
) -> Iterator[dict]:
    """`batches` as long as every rank has its next batch (one collective call per batch, and one at the end)."""
    for batch in batches:
        if not every_rank_has(True):
            return
        yield batch
    every_rank_has(False)


def _one_line_errors(batches: Iterator[dict]) -> Iterator[dict]:
    """A worker's ValueError (a bad row with on_bad_sample: error) as its own one-line message: DataLoader re-raises
    it as "Caught ValueError in DataLoader worker process i. Original Traceback ... ValueError: <message>"."""
    try:
        yield from batches
    except ValueError as error:
        raise ValueError(str(error).strip().splitlines()[-1].removeprefix("ValueError: ")) from None
