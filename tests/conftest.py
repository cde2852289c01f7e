"""Shared helpers for the exact-arithmetic core tests.

- ``BACKENDS`` / ``COMPILED``: what this install offers; every backend is compared byte for byte against "numpy".
- ``num_threads(k)``: run a block with ``revsgd.set_num_threads(k)`` and restore a default afterwards.
- ``run_tape`` / ``run_momentum``: push a schedule through a Tape / ExactMomentum and return the final state.
- ``ModelTape``: an independent, plain-Python (arbitrary-precision int) model of DESIGN.md §3 and of the
  byte format, used to check the vectorised and compiled kernels on small cases.
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
from revsgd.core.tapeformat import CHUNK

settings.register_profile(
    "revsgd",
    deadline=None,
    max_examples=30,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile("revsgd")

# Start the compiled backends' thread pools once, before any test pins a thread count (numba's OpenMP layer resets
# the process-wide OpenMP thread count on its first parallel launch).
for _backend in revsgd.BACKENDS:
    revsgd.kernels.warm_up(_backend)

BACKENDS = tuple(revsgd.BACKENDS)
COMPILED = tuple(b for b in BACKENDS if b != "numpy")
REFERENCE = "numpy"
I64_MIN = -(2**63)
I64_MAX = 2**63 - 1
DEFAULT_THREADS = max(1, min(2, os.cpu_count() or 1))


@contextlib.contextmanager
def num_threads(k: int | None):
    """Kernel thread count ``k`` inside the block (``None``: leave it alone)."""
    if k is None:
        yield
        return
    revsgd.set_num_threads(k)
    try:
        yield
    finally:
        revsgd.set_num_threads(DEFAULT_THREADS)


# --- random data ---------------------------------------------------------------------------------------------
def random_int64(rng: np.random.Generator, size: int, extremes: bool = True) -> np.ndarray:
    """int64 values spread over the whole range (mixed magnitudes), with the extremes planted if asked."""
    bits = rng.integers(0, 64, size=size)
    mag = rng.integers(0, 2**63 - 1, size=size, dtype=np.int64, endpoint=True) >> bits.astype(np.int64)
    X = np.where(rng.random(size) < 0.5, -mag - 1, mag).astype(np.int64)
    if extremes:
        special = np.array([I64_MIN, I64_MAX, 0, -1, 1, 65535, -65536], dtype=np.int64)
        k = min(size, special.size)
        pos = rng.choice(size, size=k, replace=False)
        X[pos] = special[:k]
    return X


def random_n(rng: np.random.Generator, size=None, lo: int = 1, hi: int = 65536):
    """n in [lo, hi] with the edges 1, 2, 65535, 65536 over-represented."""
    edges = np.array([1, 2, 3, 255, 256, 65535, 65536], dtype=np.int64)
    edges = edges[(edges >= lo) & (edges <= hi)]
    shape = () if size is None else (size,)
    v = rng.integers(lo, hi, size=shape, endpoint=True)
    if edges.size:
        pick = rng.random(shape) < 0.25
        v = np.where(pick, rng.choice(edges, size=shape), v)
    return int(v) if size is None else v.astype(np.int64)


def random_schedule(rng: np.random.Generator, num_lanes: int, steps: int, per_lane: bool | None = None,
                    lo: int = 1, hi: int = 65536):
    """A list of ``steps`` n's, each a Python int or (per lane) an int64 array."""
    out = []
    for _ in range(steps):
        pl = bool(rng.integers(2)) if per_lane is None else per_lane
        out.append(random_n(rng, num_lanes, lo, hi) if pl else random_n(rng, None, lo, hi))
    return out


# --- drivers -------------------------------------------------------------------------------------------------
def run_tape(backend: str, X0: np.ndarray, schedule, threads: int | None = None):
    """Scale a copy of X0 by every n of the schedule. Returns (X, tape bytes, tape)."""
    X = X0.copy()
    with num_threads(threads):
        tape = revsgd.Tape(X.shape[0], backend=backend)
        for n in schedule:
            tape.scale(X, n)
    return X, tape.to_bytes(), tape


def unscale_all(tape: revsgd.Tape, X: np.ndarray, schedule, threads: int | None = None) -> None:
    with num_threads(threads):
        for n in reversed(schedule):
            tape.unscale(X, n)


def momentum_schedule(rng: np.random.Generator, num_lanes: int, steps: int, *, per_lane_alpha=None,
                      per_lane_n=None, n_lo: int = 1, n_hi: int = 65536, grad_scale: float = 1.0):
    """(grads, alphas, ns) for ``steps`` momentum steps; per-lane choices random unless fixed."""
    grads, alphas, ns = [], [], []
    for _ in range(steps):
        grads.append(rng.standard_normal(num_lanes) * grad_scale)
        pa = bool(rng.integers(2)) if per_lane_alpha is None else per_lane_alpha
        alphas.append(rng.uniform(0.0, 0.5, num_lanes) if pa else float(rng.uniform(0.0, 0.5)))
        pn = bool(rng.integers(2)) if per_lane_n is None else per_lane_n
        ns.append(random_n(rng, num_lanes, n_lo, n_hi) if pn else random_n(rng, None, n_lo, n_hi))
    return grads, alphas, ns


def run_momentum(backend: str, w0: np.ndarray, grads, alphas, ns, frac_bits: int = 52, threads: int | None = None,
                 v0: np.ndarray | None = None):
    """Forward steps on a fresh ExactMomentum. Returns (W, V, tape bytes, optimiser)."""
    with num_threads(threads):
        opt = revsgd.ExactMomentum(w0, frac_bits=frac_bits, backend=backend, v0=v0)
        for g, a, n in zip(grads, alphas, ns):
            opt.step(g, a, n)
    return opt.fixed_params, opt.fixed_velocity, opt.tape.to_bytes(), opt


def reverse_momentum(opt: revsgd.ExactMomentum, grads, alphas, ns, threads: int | None = None) -> None:
    with num_threads(threads):
        for g, a, n in zip(reversed(grads), reversed(alphas), reversed(ns)):
            opt.unstep_position(a)
            opt.unstep_velocity(g, n)


def tape_snapshot(tape: revsgd.Tape) -> tuple:
    return tape.to_bytes(), tape.depth


def momentum_snapshot(opt: revsgd.ExactMomentum) -> tuple:
    return opt.fixed_params.tobytes(), opt.fixed_velocity.tobytes(), opt.tape.to_bytes(), opt.steps


# --- an independent model ------------------------------------------------------------------------------------
class ModelTape:
    """DESIGN.md §3 in plain Python ints, lane by lane; serializes to the documented version-1 byte format."""

    def __init__(self, num_lanes: int):
        self.L = num_lanes
        self.heads = [1 << 16] * num_lanes
        self.streams = [[] for _ in range((num_lanes + CHUNK - 1) // CHUNK)]
        self.depth = 0

    @staticmethod
    def _lane_n(n, i):
        return int(n) if np.ndim(n) == 0 else int(n[i])

    def scale(self, X: list, n) -> list:
        out = list(X)
        for i in range(self.L):  # ascending lanes: within a chunk, words go out in ascending lane order
            ni = self._lane_n(n, i)
            v = out[i]
            q, r = v // 65536, v % 65536
            x = self.heads[i]
            if x >= ni << 16:
                self.streams[i // CHUNK].append(x & 0xFFFF)
                x >>= 16
            y = (x << 16) + r
            assert y < 2**48
            x, s = divmod(y, ni)
            assert (1 << 16) <= x < (1 << 32)
            self.heads[i] = x
            out[i] = q * ni + s
            assert I64_MIN <= out[i] <= I64_MAX
        self.depth += 1
        return out

    def unscale(self, X: list, n) -> list:
        out = list(X)
        for i in reversed(range(self.L)):  # descending lanes refill from the top of the chunk's stream
            ni = self._lane_n(n, i)
            q, s = divmod(out[i], ni)
            y = self.heads[i] * ni + s
            r, x = y & 0xFFFF, y >> 16
            if x < (1 << 16):
                x = (x << 16) | self.streams[i // CHUNK].pop()
            self.heads[i] = x
            out[i] = q * 65536 + r
        self.depth -= 1
        return out

    def to_bytes(self) -> bytes:
        body = struct.pack("<8sHHIQQ", b"RSGDTAPE", 1, 0, CHUNK, self.L, self.depth)
        body += struct.pack(f"<{self.L}I", *self.heads)
        body += struct.pack(f"<{len(self.streams)}Q", *[len(s) for s in self.streams])
        for s in self.streams:
            body += struct.pack(f"<{len(s)}H", *s)
        return body + struct.pack("<I", zlib.crc32(body))


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param
