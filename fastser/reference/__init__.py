"""The usual way, kept as the baseline for benchmarks and as an independent correctness check."""
