#!/usr/bin/env python
"""The unroll benchmark: every hypergradient method (and torchopt / higher where installed) vs T on the digits MLP,
a 1M-parameter MLP and a 1M-parameter CNN, each (problem, method, T) in a fresh process. Options, problems and the
protocol: ``python scripts/bench_unroll.py --help`` and the docstring of ``revsgd/bench/unroll.py``."""
import sys

from revsgd.bench.unroll import main

if __name__ == "__main__":
    sys.exit(main())
