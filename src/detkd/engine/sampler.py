"""Deterministic, resumable, distributed batches.

Global batch k of an epoch is the same set of images whatever the number of
workers: worker r takes the r-th slice of it. Resuming at step s skips exactly
the batches already trained, without loading them.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class EpochBatchSampler(Sampler[list[int]]):
    def __init__(self, *, size: int, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0) -> None:
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"bad sampler arguments: batch_size={batch_size} rank={rank} world_size={world_size}")
        self.size, self.batch_size, self.rank, self.world_size, self.seed = size, batch_size, rank, world_size, seed
        self.epoch, self.start_batch = 0, 0

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    @property
    def batches_per_epoch(self) -> int:
        return self.size // self.global_batch  # the incomplete last global batch is dropped

    def set_epoch(self, epoch: int, *, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def global_order(self) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return torch.randperm(self.size, generator=generator).tolist()

    def __iter__(self) -> Iterator[list[int]]:
        order = self.global_order()
        for k in range(self.start_batch, self.batches_per_epoch):
            first = k * self.global_batch + self.rank * self.batch_size
            yield order[first : first + self.batch_size]

    def __len__(self) -> int:
        return self.batches_per_epoch - self.start_batch
