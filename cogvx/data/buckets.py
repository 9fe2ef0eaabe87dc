"""Resolution buckets: each clip goes to the nearest (frames, height, width) bucket, and batches
are drawn from one bucket at a time, so clips of several sizes and lengths train together."""

from __future__ import annotations

import math
import random
from typing import Iterator, NamedTuple, Sequence


class Bucket(NamedTuple):
    """One training shape: frames x height x width (pixels)."""

    frames: int
    height: int
    width: int

    def __str__(self) -> str:
        return f"{self.frames}x{self.height}x{self.width}"

    @classmethod
    def parse(cls, text: str) -> Bucket:
        """The bucket written as ``str(bucket)`` ("49x480x720", as manifests record them)."""
        parts = str(text).split("x")
        if len(parts) != 3 or not all(part.isdigit() for part in parts):
            raise ValueError(f"{text!r} is not a bucket (FRAMESxHEIGHTxWIDTH, e.g. 49x480x720)")
        return cls(*map(int, parts))


def assign_bucket(available_frames: int, height: int, width: int,
                  buckets: Sequence[Bucket]) -> Bucket | None:
    """The bucket for a clip of ``available_frames`` usable frames and ``height`` x ``width``.

    Only buckets the clip is long enough for qualify. Among them the nearest aspect ratio wins
    (compared in log space, so 2:1 and 1:2 are equally far from 1:1), then the most frames, then
    the resolution closest in area. None when the clip is shorter than every bucket.
    """
    fitting = [b for b in buckets if b.frames <= available_frames]
    if not fitting:
        return None
    aspect = math.log(width / height)
    area = height * width

    def distance(bucket: Bucket) -> tuple[float, int, float]:
        aspect_gap = round(abs(math.log(bucket.width / bucket.height) - aspect), 6)
        return aspect_gap, -bucket.frames, abs(math.log(bucket.height * bucket.width / area))

    return min(fitting, key=distance)


class BucketBatchSampler:
    """Batches of sample indices, each batch from a single bucket (a DataLoader batch_sampler).

    The order is a pure function of (seed, epoch): a resumed run that sets the same epoch and
    skips the batches it already did sees exactly the batches an uninterrupted run would.
    """

    def __init__(self, buckets: Sequence[Bucket], batch_size: int, shuffle: bool = True,
                 seed: int = 0, drop_last: bool = False) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.buckets = list(buckets)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _batches(self) -> list[list[int]]:
        rng = random.Random(f"{self.seed}:{self.epoch}")
        groups: dict[Bucket, list[int]] = {}
        for index, bucket in enumerate(self.buckets):
            groups.setdefault(bucket, []).append(index)
        batches = []
        for bucket in sorted(groups):
            members = groups[bucket]
            if self.shuffle:
                rng.shuffle(members)
            for start in range(0, len(members), self.batch_size):
                batch = members[start:start + self.batch_size]
                if len(batch) == self.batch_size or not self.drop_last:
                    batches.append(batch)
        if self.shuffle:
            rng.shuffle(batches)
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self._batches())

    def __len__(self) -> int:
        return len(self._batches())
