"""Resolution buckets: nearest-bucket assignment and one-bucket batches in a reproducible order."""

from __future__ import annotations

from cogvx.data.buckets import Bucket, BucketBatchSampler, assign_bucket

BUCKETS = [Bucket(49, 480, 720), Bucket(49, 720, 480), Bucket(49, 512, 512), Bucket(25, 480, 720)]


def test_nearest_aspect_wins_then_most_frames():
    assert assign_bucket(60, 1080, 1920, BUCKETS) == Bucket(49, 480, 720)  # 16:9 -> 3:2
    assert assign_bucket(60, 1920, 1080, BUCKETS) == Bucket(49, 720, 480)  # portrait
    assert assign_bucket(60, 600, 640, BUCKETS) == Bucket(49, 512, 512)  # near square
    assert assign_bucket(30, 1080, 1920, BUCKETS) == Bucket(25, 480, 720)  # too short for 49
    assert assign_bucket(20, 1080, 1920, BUCKETS) is None


def test_aspect_distance_is_symmetric_in_log_space():
    square_or_wide = [Bucket(9, 64, 64), Bucket(9, 64, 128)]
    # 1:1.41 is equally far (in log ratio) from 1:1 and 1:2; the tie goes to the larger area.
    assert assign_bucket(9, 100, 141, square_or_wide) in square_or_wide
    assert assign_bucket(9, 100, 120, square_or_wide) == Bucket(9, 64, 64)
    assert assign_bucket(9, 100, 180, square_or_wide) == Bucket(9, 64, 128)


def test_batches_hold_one_bucket_and_cover_every_sample_once():
    buckets = [BUCKETS[i % 3] for i in range(23)]
    sampler = BucketBatchSampler(buckets, batch_size=4, seed=1)
    batches = list(sampler)
    assert sorted(i for batch in batches for i in batch) == list(range(23))
    assert all(len({buckets[i] for i in batch}) == 1 for batch in batches)
    assert len(sampler) == len(batches)


def test_order_depends_only_on_seed_and_epoch():
    buckets = [BUCKETS[i % 2] for i in range(16)]
    first = list(BucketBatchSampler(buckets, batch_size=2, seed=7))
    assert list(BucketBatchSampler(buckets, batch_size=2, seed=7)) == first
    assert list(BucketBatchSampler(buckets, batch_size=2, seed=8)) != first
    later = BucketBatchSampler(buckets, batch_size=2, seed=7)
    later.set_epoch(1)
    assert list(later) != first


def test_drop_last_and_no_shuffle():
    buckets = [BUCKETS[0]] * 5 + [BUCKETS[1]] * 3
    kept = list(BucketBatchSampler(buckets, batch_size=2, shuffle=False, drop_last=True))
    assert all(len(batch) == 2 for batch in kept) and len(kept) == 3
    assert list(BucketBatchSampler(buckets, batch_size=2, shuffle=False))[0] == [0, 1]
