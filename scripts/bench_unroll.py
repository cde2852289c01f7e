#!/usr/bin/env python
"""The unroll benchmark (every method vs T, fresh process each): see ``revsgd/bench.py`` for the protocol."""
import sys

from revsgd.bench.unroll import main

if __name__ == "__main__":
    sys.exit(main())
