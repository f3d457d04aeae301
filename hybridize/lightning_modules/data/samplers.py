"""Batch samplers of the map-style (JSON) data: packed batches of whole samples, shared out between DDP ranks."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import BatchSampler, DistributedSampler, SequentialSampler

from hybridize.lightning_modules.data.collation import pack_rows


class EpochSampler(SequentialSampler):
    """Carries the epoch to `PackedBatchSampler` (Lightning calls `set_epoch` on a batch sampler's sampler)."""

    epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch


class PackedBatchSampler(BatchSampler):
    """Batches of whole samples that fill at most `batch_size` rows of `max_length` tokens (next-fit in a
    seeded order that changes each epoch).

    Under DDP Lightning hands it a `DistributedSampler`: every rank then packs the same global order and takes
    every world-size-th batch, dropping the remainder, so all ranks run the same number of steps.
    """

    def __init__(
        self,
        sampler,
        batch_size: int,
        drop_last: bool = False,
        *,
        lengths: list[int] | np.ndarray,
        max_length: int,
        shuffle: bool = True,
        seed: int = 0,
    ):
        super().__init__(sampler, batch_size, drop_last)
        self.lengths = np.asarray(lengths, dtype=np.int64)
        if self.lengths.max(initial=0) > max_length:
            raise ValueError(
                f"A sample of {self.lengths.max()} tokens does not fit in rows of max_length={max_length}."
            )
        self.max_length, self.shuffle, self.seed = max_length, shuffle, seed

    def _batches(self) -> list[list[int]]:
        epoch = getattr(self.sampler, "epoch", 0)
        order = np.arange(len(self.lengths))
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            order = torch.randperm(len(order), generator=generator).numpy()
        rows = pack_rows(self.lengths[order], self.max_length)
        batches = [
            [int(order[i]) for row in rows[start : start + self.batch_size] for i in row]
            for start in range(0, len(rows), self.batch_size)
        ]
        if self.drop_last and len(rows) % self.batch_size:
            batches.pop()
        if isinstance(self.sampler, DistributedSampler):
            ranks, rank = self.sampler.num_replicas, self.sampler.rank
            return batches[rank : len(batches) // ranks * ranks : ranks]
        return batches

    def __iter__(self):
        yield from self._batches()

    def __len__(self) -> int:
        return len(self._batches())
