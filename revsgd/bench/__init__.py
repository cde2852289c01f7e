"""Benchmarks: kernel throughput and hypergradient methods (time, memory, agreement)."""
