"""Data: dataset formats and validation, video decoding, buckets, synthetic clips, download."""
