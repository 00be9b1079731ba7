"""Benchmarks that report numbers: suite (caption caching, shard streaming, stage 2, memory) and gpu (the GPU
suite). They use the library only."""
