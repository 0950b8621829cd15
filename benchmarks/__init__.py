"""The parity and benchmark suite: ``python -m benchmarks --help``."""
