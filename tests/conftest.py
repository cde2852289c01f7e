"""Shared helpers for the exact-arithmetic core tests (docs/design.md §2, §3, §6).

- ``BACKENDS`` / ``HOST_BACKENDS``: what this install offers (``revsgd.BACKENDS``; host = NumPy arrays, i.e. every
  backend but torch). Tests parametrise over them, so compiled backends are covered as soon as they exist.
- ``num_threads(k)``: run a block with ``revsgd.set_num_threads(k)`` and restore the previous count afterwards.
- ``lanes(X, backend)`` / ``host(X)``: an int64 state as the array kind a backend takes (torch: a tensor), and back.
- ``ModelTape``: an independent plain-Python (arbitrary-precision int, lane by lane) model of the tape of
  docs/design.md §3 and of the documented byte format, version 2.
"""
from __future__ import annotations

import contextlib
import os
import struct
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

import revsgd

settings.register_profile(
    "revsgd",
    deadline=None,
    max_examples=30,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.function_scoped_fixture],
)
settings.load_profile("revsgd")

# Start the compiled backends once (JIT, thread pools) before any test pins a thread count: numba's OpenMP layer
# resets the process-wide OpenMP thread count on its first parallel launch.
for _backend in revsgd.BACKENDS:
    revsgd.kernels.warm_up(_backend)

BACKENDS = tuple(revsgd.BACKENDS)
HOST_BACKENDS = tuple(b for b in BACKENDS if b != "torch")
REFERENCE = "numpy"
I64_MIN = -(2**63)
I64_MAX = 2**63 - 1
CHUNK = 16384            # the compiled kernels' lane chunk: sizes around it exercise chunk boundaries
WORD_BITS = 16


@contextlib.contextmanager
def num_threads(k: int | None):
    """Kernel thread count ``k`` inside the block (``None``: leave it alone); the previous count is restored."""
    if k is None:
        yield
        return
    old = revsgd.kernels.get_num_threads()
    revsgd.set_num_threads(k)
    try:
        yield
    finally:
        revsgd.set_num_threads(old)


def lanes(X: np.ndarray, backend: str):
    """A fresh copy of the int64 array ``X`` as the backend's state type."""
    if backend == "torch":
        import torch
        return torch.from_numpy(np.array(X, dtype=np.int64, copy=True))
    return np.array(X, dtype=np.int64, copy=True)


def host(X) -> np.ndarray:
    """A NumPy copy of a state of any backend."""
    if hasattr(X, "detach"):
        return X.detach().cpu().numpy().copy()
    return np.array(X, copy=True)


# --- random data ---------------------------------------------------------------------------------------------
def random_int64(rng: np.random.Generator, size: int, extremes: bool = True) -> np.ndarray:
    """int64 values spread over the whole range (mixed magnitudes, both signs), with the extremes planted."""
    bits = rng.integers(0, 64, size=size)
    mag = rng.integers(0, 2**63 - 1, size=size, dtype=np.int64, endpoint=True) >> bits.astype(np.int64)
    X = np.where(rng.random(size) < 0.5, -mag - 1, mag).astype(np.int64)
    if extremes:
        special = np.array([I64_MIN, I64_MAX, 0, -1, 1, 65535, -65536], dtype=np.int64)
        k = min(size, special.size)
        pos = rng.choice(size, size=k, replace=False)
        X[pos] = special[:k]
    return X


def random_offsets(rng: np.random.Generator, num_lanes: int, max_groups: int = 6) -> np.ndarray:
    """Group offsets: strictly increasing from 0 to num_lanes, 1..max_groups groups."""
    G = int(rng.integers(1, min(max_groups, num_lanes) + 1))
    cuts = np.sort(rng.choice(np.arange(1, num_lanes), size=G - 1, replace=False)) if G > 1 else np.array([], int)
    return np.concatenate([[0], cuts, [num_lanes]]).astype(np.int64)


def random_shifts(rng: np.random.Generator, steps: int, groups: int) -> list:
    """``steps`` shift vectors (int64, one per group) in [0, 16], zeros and 16s over-represented."""
    out = []
    for _ in range(steps):
        h = rng.integers(0, 17, size=groups)
        h = np.where(rng.random(groups) < 0.2, 0, h)
        h = np.where(rng.random(groups) < 0.1, 16, h)
        out.append(h.astype(np.int64))
    return out


# --- an independent model ------------------------------------------------------------------------------------
class ModelTape:
    """docs/design.md §3 in plain Python ints, lane by lane, serialised to the documented byte format (v2).

    Written from the documentation only: per group a pending count p (0 <= p < 16), per lane a head x holding its p
    newest bits (newest lowest); ONE LIFO stack of 16-bit words; a push that brings p to 16 or more emits one row (a
    word per lane, ascending lanes), rows of one push in ascending group order."""

    def __init__(self, num_lanes: int, offsets=None):
        self.L = num_lanes
        self.offsets = [0, num_lanes] if offsets is None else [int(o) for o in offsets]
        self.G = len(self.offsets) - 1
        self.pending = [0] * self.G
        self.rows = [0] * self.G
        self.heads = [0] * num_lanes
        self.words: list[int] = []
        self.depth = 0

    def group_lanes(self, g: int) -> range:
        return range(self.offsets[g], self.offsets[g + 1])

    def shift(self, X: list, h) -> list:
        hs = [int(v) for v in np.broadcast_to(np.asarray(h), (self.G,))]
        out = list(X)
        emitted = []
        for g in range(self.G):
            k, p = hs[g], self.pending[g]
            row = []
            for i in self.group_lanes(g):
                b = out[i] & ((1 << k) - 1)       # low k bits (two's complement for negatives)
                out[i] >>= k                      # floor
                c = (self.heads[i] << k) | b
                q = p + k
                if q >= WORD_BITS:
                    row.append(c >> (q - WORD_BITS))
                    c &= (1 << (q - WORD_BITS)) - 1
                self.heads[i] = c
            q = p + k
            if q >= WORD_BITS:
                emitted.extend(row)
                self.rows[g] += 1
                q -= WORD_BITS
            self.pending[g] = q
        self.words.extend(emitted)
        self.depth += 1
        return out

    def unshift(self, X: list, h) -> list:
        hs = [int(v) for v in np.broadcast_to(np.asarray(h), (self.G,))]
        out = list(X)
        need = [g for g in range(self.G) if hs[g] > 0 and self.pending[g] < hs[g]]
        n = sum(self.offsets[g + 1] - self.offsets[g] for g in need)
        block = self.words[len(self.words) - n:] if n else []
        if n:
            del self.words[len(self.words) - n:]
        pos = 0
        rows = {}
        for g in need:                            # the rows of one push lie in ascending group order
            size = self.offsets[g + 1] - self.offsets[g]
            rows[g] = block[pos:pos + size]
            pos += size
        for g in range(self.G):
            k, p = hs[g], self.pending[g]
            for j, i in enumerate(self.group_lanes(g)):
                c = self.heads[i]
                if g in rows:
                    c = (rows[g][j] << p) | c
                b = c & ((1 << k) - 1)
                self.heads[i] = c >> k
                out[i] = (out[i] << k) | b
                assert I64_MIN <= out[i] <= I64_MAX
            q = p + WORD_BITS if g in rows else p
            if g in rows:
                self.rows[g] -= 1
            self.pending[g] = q - k
        self.depth -= 1
        return out

    @property
    def info_bits(self) -> int:
        return sum((WORD_BITS * self.rows[g] + self.pending[g]) * (self.offsets[g + 1] - self.offsets[g])
                   for g in range(self.G))

    def to_bytes(self) -> bytes:
        body = struct.pack("<8sHHQQQQ", b"RSGDTAPE", 2, 0, self.L, self.G, self.depth, len(self.words))
        body += struct.pack(f"<{self.G + 1}Q", *self.offsets)
        body += struct.pack(f"<{self.G}B", *self.pending)
        body += struct.pack(f"<{self.G}Q", *self.rows)
        body += struct.pack(f"<{self.L}H", *self.heads)
        body += struct.pack(f"<{len(self.words)}H", *self.words)
        return body + struct.pack("<I", zlib.crc32(body))


def with_crc(body: bytes) -> bytes:
    """``body`` (a tape without its CRC) with the CRC-32 appended."""
    return body + struct.pack("<I", zlib.crc32(body))


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


DEFAULT_THREADS = max(1, min(2, os.cpu_count() or 1))
