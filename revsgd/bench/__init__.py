"""Benchmarks: hypergradient methods and peer libraries vs T (:mod:`.unroll`, :mod:`.peers`), kernel throughput
(:mod:`.kernels`), and the shared measurement helpers (:mod:`.timing`: repeats, contention meter, allocator
settling, process memory, environment record, a CPU load generator). Drivers: ``revsgd bench`` and
``scripts/bench_unroll.py``, ``scripts/bench_kernels.py``, ``scripts/bench_threads.py``."""
