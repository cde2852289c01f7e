"""The lost-bits tape (docs/design.md §3, revsgd/core/tapeformat.py, public ``revsgd.Tape``).

- shift/unshift round trips bit for bit (random lane counts incl. 1 and > 16k, random groups, random shifts with
  zeros and 16s, int64 extremes); ``info_bits`` is exactly the sum of outstanding shifts; ``depth``, ``at_start``;
- an independent plain-Python model (tests/conftest.py: ModelTape) gives the same states and bytes;
- ``to_bytes()`` and states are identical across every backend and kernel thread counts 1 and 2;
- ``from_bytes`` round trip, across backends; hardening: every malformed input is exactly ``TapeFormatError``
  (explicit cases and a seeded fuzz of ≥ 2,000 inputs); ``to_bytes`` refuses what ``from_bytes`` would refuse;
- bad arguments leave state and tape unchanged; unshift past the start is ``TapeExhaustedError``;
- one Tape shared by two Python threads stays consistent (the object serialises its calls);
- memory: after a large forward/reverse the process's RSS returns to its start (subprocess, /proc/self/status).
"""
from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from revsgd import Tape, TapeExhaustedError, TapeFormatError
from tests.conftest import (BACKENDS, CHUNK, I64_MAX, I64_MIN, REFERENCE, ModelTape, host, lanes, num_threads,
                            random_int64, random_offsets, random_shifts, with_crc)

HEADER = struct.Struct("<8sHHQQQQ")
BIG = 2 * CHUNK + 123


# --- helpers ---------------------------------------------------------------------------------------------------
def run(backend, X0, offsets, shifts, threads=None):
    """A fresh tape; every shift applied to a copy of X0. Returns (tape, X as the backend's type)."""
    with num_threads(threads):
        tape = Tape(X0.shape[0], groups=offsets, backend=backend)
        X = lanes(X0, backend)
        for h in shifts:
            tape.shift(X, h)
    return tape, X


def unrun(tape, X, shifts, threads=None):
    with num_threads(threads):
        for h in reversed(shifts):
            tape.unshift(X, h)


def expected_bits(offsets, shifts) -> int:
    sizes = np.diff(np.asarray(offsets, dtype=np.int64))
    return int(sum(int(np.dot(np.broadcast_to(h, sizes.shape), sizes)) for h in shifts))


def fresh_bytes(num_lanes, offsets=None) -> bytes:
    return Tape(num_lanes, groups=offsets, backend=REFERENCE).to_bytes()


def split(b: bytes) -> dict:
    """The fields of a version-2 tape (documented layout), for rewriting."""
    magic, version, reserved, L, G, depth, nw = HEADER.unpack_from(b, 0)
    off = HEADER.size
    offsets = list(struct.unpack_from(f"<{G + 1}Q", b, off))
    off += 8 * (G + 1)
    pending = list(b[off:off + G])
    off += G
    rows = list(struct.unpack_from(f"<{G}Q", b, off))
    off += 8 * G
    heads = list(struct.unpack_from(f"<{L}H", b, off))
    off += 2 * L
    words = list(struct.unpack_from(f"<{nw}H", b, off))
    off += 2 * nw
    assert off + 4 == len(b)
    return dict(magic=magic, version=version, reserved=reserved, L=L, G=G, depth=depth, nw=nw, offsets=offsets,
                pending=pending, rows=rows, heads=heads, words=words)


def join(f: dict, crc: bool = True) -> bytes:
    """Bytes of (possibly rewritten) fields; header fields are written as given, sections as they are."""
    body = HEADER.pack(f["magic"], f["version"], f["reserved"], f["L"], f["G"], f["depth"], f["nw"])
    body += struct.pack(f"<{len(f['offsets'])}Q", *f["offsets"])
    body += bytes(f["pending"])
    body += struct.pack(f"<{len(f['rows'])}Q", *f["rows"])
    body += struct.pack(f"<{len(f['heads'])}H", *f["heads"])
    body += struct.pack(f"<{len(f['words'])}H", *f["words"])
    return with_crc(body) if crc else body


def sample_tape(backend=REFERENCE) -> tuple:
    """7 lanes in groups [0, 3) and [3, 7), each with a row on the stack and pending bits (5 and 1), depth 3."""
    rng = np.random.default_rng(7)
    X0 = random_int64(rng, 7)
    shifts = [np.array([9, 5]), np.array([9, 12]), np.array([3, 0])]
    tape, X = run(backend, X0, [0, 3, 7], shifts)
    return tape, X, X0, shifts


def refused(data) -> TapeFormatError:
    """``Tape.from_bytes(data)`` must raise exactly TapeFormatError (not a subclass, not another error)."""
    try:
        Tape.from_bytes(data)
    except Exception as e:  # noqa: BLE001
        assert type(e) is TapeFormatError, f"{type(e).__name__}: {e}"
        return e
    raise AssertionError("from_bytes accepted malformed bytes")


# --- round trips -------------------------------------------------------------------------------------------------
SIZES = [1, 2, 3, 17, 100, CHUNK - 1, CHUNK + 3]


@pytest.mark.parametrize("backend", BACKENDS)
@given(size=st.sampled_from(SIZES), steps=st.integers(0, 16), seed=st.integers(0, 2**32 - 1),
       per_group=st.booleans())
def test_shift_unshift_round_trip(backend, size, steps, seed, per_group):
    rng = np.random.default_rng(seed)
    X0 = random_int64(rng, size)
    offsets = random_offsets(rng, size) if per_group else None
    G = 1 if offsets is None else offsets.shape[0] - 1
    shifts = random_shifts(rng, steps, G)
    if not per_group:
        shifts = [int(h[0]) for h in shifts]      # an int applies to every group
    tape = Tape(size, groups=offsets, backend=backend)
    X = lanes(X0, backend)
    held = 0
    for k, h in enumerate(shifts):
        before = host(X)
        tape.shift(X, h)
        hl = np.repeat(np.broadcast_to(h, (G,)), np.diff(tape.offsets))
        assert np.array_equal(host(X), before >> hl)               # floor division by 2^h
        held += expected_bits(tape.offsets, [h])
        assert tape.info_bits == held
        assert tape.depth == k + 1
        assert not tape.at_start()
    for k, h in enumerate(reversed(shifts)):
        tape.unshift(X, h)
        held -= expected_bits(tape.offsets, [h])
        assert tape.info_bits == held
        assert tape.depth == steps - k - 1
    assert np.array_equal(host(X), X0)
    assert tape.at_start() and tape.depth == 0 and tape.info_bits == 0
    assert tape.to_bytes() == fresh_bytes(size, offsets)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("value", [I64_MIN, I64_MAX, 0, -1, 1, -(2**47), 2**47 - 1, -(2**62), 2**62])
def test_extreme_values_every_lane(backend, value):
    X0 = np.full(9, value, dtype=np.int64)
    shifts = [16, 16, 16, 15, 0, 1, 16, 16]         # more bits than a lane has: X reaches 0 or -1
    tape, X = run(backend, X0, [0, 4, 9], shifts)
    assert host(X).tolist() == [value >> sum(shifts)] * 9 == [0 if value >= 0 else -1] * 9
    unrun(tape, X, shifts)
    assert np.array_equal(host(X), X0) and tape.at_start()


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_shift_counts_depth_but_holds_nothing(backend):
    X0 = np.arange(5, dtype=np.int64) - 2
    tape, X = run(backend, X0, None, [0, 0, 0])
    assert tape.depth == 3 and tape.info_bits == 0
    assert not tape.at_start()                        # three outstanding (empty) shifts
    assert np.array_equal(host(X), X0)
    unrun(tape, X, [0, 0, 0])
    assert tape.at_start()


@pytest.mark.parametrize("backend", BACKENDS)
def test_info_bits_and_stack_of_a_long_run(backend):
    """15 bits per lane per step at momentum 2^-15; Σ h·lanes exactly, and the stack holds ⌊bits/16⌋ rows."""
    L, T = 1000, 64
    rng = np.random.default_rng(5)
    X0 = random_int64(rng, L)
    tape, X = run(backend, X0, None, [15] * T)
    assert tape.info_bits == 15 * T * L
    st_ = tape._st
    assert st_.num_words == (15 * T // 16) * L and int(st_.pending[0]) == 15 * T % 16
    unrun(tape, X, [15] * T)
    assert np.array_equal(host(X), X0) and tape.at_start()


# --- the independent model -----------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@given(size=st.integers(1, 40), steps=st.integers(0, 30), seed=st.integers(0, 2**32 - 1))
def test_matches_independent_python_model(backend, size, steps, seed):
    rng = np.random.default_rng(seed)
    X0 = random_int64(rng, size)
    offsets = random_offsets(rng, size)
    shifts = random_shifts(rng, steps, offsets.shape[0] - 1)
    model = ModelTape(size, offsets)
    tape = Tape(size, groups=offsets, backend=backend)
    X, Xm = lanes(X0, backend), [int(v) for v in X0]
    assert tape.to_bytes() == model.to_bytes()
    for h in shifts:
        tape.shift(X, h)
        Xm = model.shift(Xm, h)
        assert host(X).tolist() == Xm
        assert tape.to_bytes() == model.to_bytes()
        assert tape.info_bits == model.info_bits
    for h in reversed(shifts):
        tape.unshift(X, h)
        Xm = model.unshift(Xm, h)
        assert host(X).tolist() == Xm
        assert tape.to_bytes() == model.to_bytes()
    assert Xm == X0.tolist()


def test_model_known_bytes():
    """The model itself against a hand-worked case: one lane, shifts 9 then 9 (18 bits: one word, 2 pending)."""
    lo, hi = 0x1FF, 0b110101010
    m = ModelTape(1)
    x = m.shift([(hi << 9) | lo], 9)
    assert x == [hi] and m.heads == [lo] and m.pending == [9] and m.words == []
    x = m.shift(x, 9)
    c = (lo << 9) | hi                                   # older bits above newer ones
    assert x == [0] and m.words == [c >> 2] and m.heads == [c & 3] and m.pending == [2] and m.rows == [1]
    assert m.info_bits == 18
    assert m.unshift(m.unshift(x, 9), 9) == [(hi << 9) | lo] and m.words == [] and m.heads == [0]


# --- byte identity across backends and thread counts ---------------------------------------------------------
def _big_history(seed=11):
    rng = np.random.default_rng(seed)
    X0 = random_int64(rng, BIG)
    offsets = np.array([0, 1, 5000, CHUNK + 7, 2 * CHUNK, BIG], dtype=np.int64)
    return X0, offsets, random_shifts(rng, 16, offsets.shape[0] - 1)


@pytest.fixture(scope="module")
def big_reference():
    X0, offsets, shifts = _big_history()
    tape, X = run(REFERENCE, X0, offsets, shifts, threads=1)
    half = [tape.to_bytes(), host(X)]
    unrun(tape, X, shifts[8:], threads=1)
    return half, [tape.to_bytes(), host(X)]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("backend", BACKENDS)
def test_identical_bytes_across_backends_and_threads(backend, threads, big_reference):
    X0, offsets, shifts = _big_history()
    tape, X = run(backend, X0, offsets, shifts, threads=threads)
    (ref_b, ref_X), (ref_b2, ref_X2) = big_reference
    assert tape.to_bytes() == ref_b
    assert np.array_equal(host(X), ref_X)
    unrun(tape, X, shifts[8:], threads=threads)
    assert tape.to_bytes() == ref_b2
    assert np.array_equal(host(X), ref_X2)
    unrun(tape, X, shifts[:8], threads=3 - threads)   # the other thread count finishes the reverse pass
    assert np.array_equal(host(X), X0) and tape.at_start()


# --- serialisation ---------------------------------------------------------------------------------------------
def test_documented_layout():
    tape, X, X0, shifts = sample_tape()
    f = split(tape.to_bytes())
    assert f["magic"] == b"RSGDTAPE" and f["version"] == 2 and f["reserved"] == 0
    assert (f["L"], f["G"], f["depth"]) == (7, 2, 3)
    assert f["offsets"] == [0, 3, 7] and f["pending"] == [5, 1] and f["rows"] == [1, 1] and f["nw"] == 7
    assert all(h < 1 << p for h, p in zip(f["heads"], [5] * 3 + [1] * 4))


@pytest.mark.parametrize("dst", BACKENDS)
@pytest.mark.parametrize("src", BACKENDS)
def test_from_bytes_round_trip_then_reverse(src, dst):
    rng = np.random.default_rng(3)
    X0 = random_int64(rng, CHUNK + 9)
    offsets = np.array([0, 10, CHUNK + 9])
    shifts = random_shifts(rng, 12, 2)
    tape, X = run(src, X0, offsets, shifts)
    b = tape.to_bytes()
    loaded = Tape.from_bytes(b, backend=dst)
    assert loaded.backend == dst and loaded.to_bytes() == b
    assert (loaded.depth, loaded.info_bits, loaded.num_groups) == (tape.depth, tape.info_bits, 2)
    Y = lanes(host(X), dst)
    unrun(loaded, Y, shifts)
    assert np.array_equal(host(Y), X0) and loaded.at_start()
    assert tape.to_bytes() == b            # the source is untouched


def test_from_bytes_copies_its_input():
    tape, X, X0, shifts = sample_tape()
    buf = bytearray(tape.to_bytes())
    loaded = Tape.from_bytes(buf)
    buf[HEADER.size + 30] ^= 0xFF
    unrun(loaded, X, shifts)
    assert np.array_equal(X, X0) and loaded.at_start()


def test_from_bytes_accepts_memoryview_and_bytearray():
    b = sample_tape()[0].to_bytes()
    assert Tape.from_bytes(memoryview(b)).to_bytes() == b
    assert Tape.from_bytes(bytearray(b)).to_bytes() == b


# --- from_bytes hardening: explicit cases ----------------------------------------------------------------------
def _rewrite(**changes) -> bytes:
    f = split(sample_tape()[0].to_bytes())
    f.update(changes)
    return join(f)


def test_bad_magic():
    e = refused(_rewrite(magic=b"RSGDTAPX"))
    assert "magic" in str(e)
    refused(b"\0" * 100)


def test_version_1_is_refused_with_a_clear_message():
    e = refused(_rewrite(version=1))
    assert "version 1" in str(e) and "cannot be read" in str(e)


@pytest.mark.parametrize("version", [0, 3, 255, 65535])
def test_unknown_version(version):
    e = refused(_rewrite(version=version))
    assert str(version) in str(e)


@pytest.mark.parametrize("reserved", [1, 0x8000, 0xFFFF])
def test_reserved_field_must_be_zero(reserved):
    refused(_rewrite(reserved=reserved))


def test_truncated_and_extended():
    b = sample_tape()[0].to_bytes()
    for n in sorted({0, 1, 8, 43, 44, 47, 48, 60, len(b) // 2, len(b) - 5, len(b) - 4, len(b) - 1}):
        refused(b[:n])
        if n < len(b) - 4:
            refused(with_crc(b[:n]))           # a cut body with a valid CRC
    for extra in (b"\0", b"\0\0", b"\0" * 4, b"xyz" * 11):
        refused(b + extra)
        refused(with_crc(b[:-4] + extra))      # extra data under a valid CRC


@pytest.mark.parametrize("field, delta", [("nw", 2**63), ("L", 2**63), ("nw", 2**64 - 7), ("G", 2**61)])
def test_length_fields_that_wrap_int64(field, delta):
    """Length fields whose byte count wraps 64-bit arithmetic back to the true size must still be refused."""
    f = split(sample_tape()[0].to_bytes())
    f[field] = (f[field] + delta) % 2**64
    t0 = time.perf_counter()
    refused(join(f))
    assert time.perf_counter() - t0 < 1.0      # refused from the header: nothing huge allocated


@pytest.mark.parametrize("field", ["L", "G", "nw"])
@pytest.mark.parametrize("value", [2**64 - 1, 2**63, 2**63 - 1, 2**32])
def test_huge_header_fields(field, value):
    refused(_rewrite(**{field: value}))


def test_large_depth_below_2_63_is_valid():
    """depth only bounds the bits held from above: any depth in [current, 2^63) is a consistent tape."""
    for depth in (4, 2**32, 2**63 - 1):
        b = _rewrite(depth=depth)
        assert Tape.from_bytes(b).to_bytes() == b


@pytest.mark.parametrize("L, G", [(0, 0), (0, 1), (7, 0), (7, 8)])
def test_lane_and_group_counts(L, G):
    refused(_rewrite(L=L, G=G))


@pytest.mark.parametrize("depth", [2**63, 2**64 - 1])
def test_depth_at_least_2_63(depth):
    refused(_rewrite(depth=depth))


@pytest.mark.parametrize("pending", [[16, 1], [5, 16], [255, 1], [5, 200]])
def test_pending_at_least_16(pending):
    refused(_rewrite(pending=pending))


@pytest.mark.parametrize("lane, value", [(0, 1 << 5), (2, 0xFFFF), (3, 2), (6, 1 << 15)])
def test_head_with_bits_above_pending(lane, value):
    heads = split(sample_tape()[0].to_bytes())["heads"]
    heads[lane] = value
    e = refused(_rewrite(heads=heads))
    assert "head" in str(e)


@pytest.mark.parametrize("offsets", [[0, 3, 3], [0, 0, 7], [0, 5, 3], [1, 3, 7], [0, 3, 8], [0, 7, 7],
                                     [0, 2**64 - 1, 7], [0, 3, 2**63 + 7]])
def test_offsets_not_increasing(offsets):
    refused(_rewrite(offsets=offsets))


@pytest.mark.parametrize("depth", [0, 1])
def test_more_bits_than_outstanding_shifts(depth):
    e = refused(_rewrite(depth=depth))       # 21 bits held in group 0
    assert "bits" in str(e) or "depth" in str(e)


@pytest.mark.parametrize("rows", [[2, 1], [0, 1], [1, 0], [2**63, 1], [2**64 - 1, 1]])
def test_rows_inconsistent(rows):
    refused(_rewrite(rows=rows))


def test_crc_mismatch():
    b = sample_tape()[0].to_bytes()
    for pos in (0, 10, HEADER.size + 3, len(b) - 10, len(b) - 5, len(b) - 1):
        bad = bytearray(b)
        bad[pos] ^= 0x10
        e = refused(bytes(bad))
        if pos >= HEADER.size:
            assert "checksum" in str(e)


def test_from_bytes_refuses_non_bytes():
    with pytest.raises(TypeError):
        Tape.from_bytes("RSGDTAPE")


# --- from_bytes hardening: seeded fuzz -------------------------------------------------------------------------
def _fuzz_seeds() -> list:
    out = [fresh_bytes(1), sample_tape()[0].to_bytes()]
    rng = np.random.default_rng(99)
    X0 = random_int64(rng, 33)
    tape, _ = run(REFERENCE, X0, [0, 1, 9, 20, 33], random_shifts(rng, 9, 4))
    out.append(tape.to_bytes())
    return out


def _mutate(rng: np.random.Generator, b: bytes) -> bytes:
    kind = int(rng.integers(8))
    body = bytearray(b[:-4])
    if kind == 0:                                     # bit flips, CRC left alone
        out = bytearray(b)
        for _ in range(int(rng.integers(1, 4))):
            p = int(rng.integers(len(out)))
            out[p] ^= 1 << int(rng.integers(8))
        return bytes(out)
    if kind == 1:                                     # bit flips under a recomputed CRC
        for _ in range(int(rng.integers(1, 4))):
            p = int(rng.integers(len(body)))
            body[p] ^= 1 << int(rng.integers(8))
        return with_crc(bytes(body))
    if kind == 2:                                     # truncation
        return b[:int(rng.integers(len(b)))]
    if kind == 3:                                     # appended bytes
        return b + rng.bytes(int(rng.integers(1, 24)))
    if kind == 4:                                     # truncated / extended body with a valid CRC
        if rng.random() < 0.5:
            return with_crc(bytes(body[:int(rng.integers(len(body)))]))
        return with_crc(bytes(body) + rng.bytes(int(rng.integers(1, 24))))
    f = split(b)
    if kind == 5:                                     # a header field rewritten, CRC recomputed
        key = ["version", "reserved", "L", "G", "depth", "nw"][int(rng.integers(6))]
        width = 16 if key in ("version", "reserved") else 64
        cur = f[key]
        choices = [0, 1, 2, cur - 1, cur + 1, cur + 16, 2**(width - 1), 2**width - 1,
                   (cur + 2**(width - 1)) % 2**width, int(rng.integers(0, 2**63)) % 2**width]
        f[key] = int(choices[int(rng.integers(len(choices)))]) % 2**width
        return join(f)
    if kind == 6:                                     # a section entry rewritten, CRC recomputed
        key = ["offsets", "pending", "rows", "heads", "words"][int(rng.integers(5))]
        if not f[key]:
            return join(f)
        i = int(rng.integers(len(f[key])))
        lim = {"offsets": 2**64, "rows": 2**64, "pending": 256, "heads": 2**16, "words": 2**16}[key]
        small = [0, 1, 15, 16, f[key][i] - 1, f[key][i] + 1]
        v = int(small[int(rng.integers(len(small)))]) if rng.random() < 0.7 else int(rng.integers(0, 2**63))
        f[key][i] = v % lim
        return join(f)
    # kind 7: random byte overwrite anywhere in the body, CRC recomputed
    p = int(rng.integers(len(body)))
    body[p] = int(rng.integers(256))
    return with_crc(bytes(body))


def test_from_bytes_fuzz():
    seeds = _fuzz_seeds()
    rng = np.random.default_rng(20240607)
    n, loaded, t0 = 0, 0, time.perf_counter()
    while n < 2400:
        src = seeds[n % len(seeds)]
        data = _mutate(rng, src)
        backend = BACKENDS[n % len(BACKENDS)]
        try:
            tape = Tape.from_bytes(data, backend=backend)
        except Exception as e:  # noqa: BLE001
            assert type(e) is TapeFormatError, f"input {n} ({backend}): {type(e).__name__}: {e}"
        else:
            assert tape.to_bytes() == data, f"input {n} ({backend}) loaded but serialises differently"
            loaded += 1
        n += 1
    assert 0 < loaded < n                              # both outcomes were exercised
    assert time.perf_counter() - t0 < 60


def test_to_bytes_refuses_an_inconsistent_state():
    """Unshifting with a different h than the shift leaves more bits than the outstanding shifts can hold:
    to_bytes refuses what from_bytes would refuse, with a clear message."""
    for backend in BACKENDS:
        tape = Tape(4, backend=backend)
        X = lanes(np.array([1, -2, 3, 2**40], dtype=np.int64), backend)
        tape.shift(X, 16)
        tape.shift(X, 16)
        tape.unshift(X, 1)                # 31 bits held by one outstanding shift
        with pytest.raises(TapeFormatError) as ei:
            tape.to_bytes()
        assert type(ei.value) is TapeFormatError
        assert "serialis" in str(ei.value)


# --- bad arguments leave everything unchanged --------------------------------------------------------------------
def _in_progress(backend, L=BIG, seed=4):
    rng = np.random.default_rng(seed)
    X0 = random_int64(rng, L)
    offsets = np.array([0, 3, min(CHUNK + 1, L - 1), L])
    shifts = random_shifts(rng, 7, 3)
    tape, X = run(backend, X0, offsets, shifts)
    return tape, X, X0, shifts


def _bad_X(backend, X):
    """(label, bad array, exception) for a state of the backend's type."""
    L = X.shape[0]
    if backend == "torch":
        import torch
        return [("numpy", host(X), TypeError), ("int32", X.to(torch.int32), TypeError),
                ("float64", X.to(torch.float64), TypeError), ("short", X[:-1].clone(), ValueError),
                ("2d", X.clone().reshape(L, 1), ValueError),
                ("strided", torch.zeros(2 * L, dtype=torch.int64)[::2], ValueError),
                ("list", host(X).tolist(), TypeError)]
    ro = X.copy()
    ro.flags.writeable = False
    return [("int32", X.astype(np.int32), TypeError), ("float64", X.astype(np.float64), TypeError),
            ("uint64", X.view(np.uint64).copy(), TypeError), ("short", X[:-1].copy(), ValueError),
            ("long", np.zeros(L + 1, np.int64), ValueError), ("2d", X.copy().reshape(L, 1), ValueError),
            ("strided", np.zeros(2 * L, np.int64)[::2], ValueError), ("readonly", ro, ValueError),
            ("list", X.tolist(), TypeError), ("torch", __import__("torch").from_numpy(X.copy()), TypeError)]


BAD_H = [(-1, ValueError), (17, ValueError), (np.array([3, 17, 0]), ValueError), (np.array([3, -1, 0]), ValueError),
         (np.array([3, 0]), TypeError), (np.array([3, 0, 1, 2]), TypeError), (np.array([[3, 0, 1]]), TypeError),
         (np.array([3.0, 0.0, 1.0]), TypeError), (3.0, TypeError), (True, TypeError), (None, TypeError),
         ([3, 0, 1], TypeError)]


@pytest.mark.parametrize("op", ["shift", "unshift"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_arguments_change_nothing(backend, op):
    tape, X, X0, shifts = _in_progress(backend, L=3001)
    before = (tape.to_bytes(), tape.depth, tape.info_bits, host(X))
    for label, bad, exc in _bad_X(backend, X):
        with pytest.raises(exc):
            getattr(tape, op)(bad, 3)
    for h, exc in BAD_H:
        with pytest.raises(exc):
            getattr(tape, op)(X, h)
    assert (tape.to_bytes(), tape.depth, tape.info_bits) == before[:3]
    assert np.array_equal(host(X), before[3])
    unrun(tape, X, shifts)
    assert np.array_equal(host(X), X0) and tape.at_start()


@pytest.mark.parametrize("backend", BACKENDS)
def test_shift_count_too_big_for_int64_is_a_value_error(backend):
    """h out of [0, 16] is a ValueError, also when it does not fit int64 (not numpy's OverflowError)."""
    tape = Tape(5, groups=[0, 2, 5], backend=backend)
    X = lanes(np.arange(5, dtype=np.int64), backend)
    tape.shift(X, 7)
    before = tape.to_bytes()
    for h in (2**63, 2**70, -(2**70)):
        with pytest.raises(ValueError):
            tape.shift(X, h)
    assert tape.to_bytes() == before


@pytest.mark.parametrize("backend", BACKENDS)
def test_unshift_past_the_start(backend):
    tape = Tape(5, backend=backend)
    X = lanes(np.arange(5, dtype=np.int64), backend)
    with pytest.raises(TapeExhaustedError):
        tape.unshift(X, 0)
    with pytest.raises(TapeExhaustedError):
        tape.unshift(X, 3)
    tape.shift(X, 3)
    tape.unshift(X, 3)
    with pytest.raises(TapeExhaustedError):
        tape.unshift(X, 0)
    assert tape.at_start() and host(X).tolist() == [0, 1, 2, 3, 4]
    # fewer bits held than the unshift needs: refused, nothing changed
    tape.shift(X, 3)
    before = (tape.to_bytes(), host(X))
    with pytest.raises(TapeExhaustedError):
        tape.unshift(X, 5)
    assert tape.to_bytes() == before[0] and np.array_equal(host(X), before[1])
    tape.unshift(X, 3)
    assert tape.at_start() and host(X).tolist() == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lane", [BIG - 1, CHUNK + 5, 2 * CHUNK - 1])
def test_unshift_overflow_at_a_late_lane_changes_nothing(backend, lane):
    """X << h leaving int64 (X is not what the forward pass left) is an OverflowError; earlier lanes (other
    chunks of a compiled kernel) are not left changed."""
    tape, X, X0, shifts = _in_progress(backend)
    tape.shift(X, np.array([16, 16, 16]))
    before = (tape.to_bytes(), host(X))
    Xbad = host(X)
    Xbad[lane] = I64_MAX
    Xbad = lanes(Xbad, backend)
    snap = host(Xbad)
    with pytest.raises(OverflowError) as ei:
        tape.unshift(Xbad, np.array([16, 16, 16]))
    assert str(lane) in str(ei.value)
    assert np.array_equal(host(Xbad), snap) and tape.to_bytes() == before[0]
    tape.unshift(X, np.array([16, 16, 16]))
    unrun(tape, X, shifts)
    assert np.array_equal(host(X), X0) and tape.at_start()


def test_constructor_rejects_bad_sizes_and_groups():
    for bad, exc in [(0, ValueError), (-1, ValueError), (2.0, TypeError), (True, TypeError), ("3", TypeError)]:
        with pytest.raises(exc):
            Tape(bad)
    for groups in ([0, 5], [1, 10], [0, 5, 5, 10], [0, 6, 4, 10], [0], np.array([0.0, 10.0]), [[0, 10]]):
        with pytest.raises(ValueError):
            Tape(10, groups=groups)
    with pytest.raises(ValueError):
        Tape(10, backend="nope")


# --- concurrency ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_shared_tape_two_threads(backend):
    """Two threads run shift/unshift pairs on their own arrays through ONE tape. The arrays hold the same values and
    every pair uses the same h, so any serialisation of the calls restores both arrays exactly; a racing tape
    (unsynchronised heads, counters or stack) corrupts them or crashes."""
    L = 40000
    rng = np.random.default_rng(8)
    X0 = random_int64(rng, L)
    offsets = [0, 100, 20001, L]
    h = np.array([3, 16, 9])
    tape = Tape(L, groups=offsets, backend=backend)
    pairs, errors, bad = 60, [], []
    barrier = threading.Barrier(2)

    def worker():
        try:
            X = lanes(X0, backend)
            barrier.wait()
            for _ in range(pairs):
                tape.shift(X, h)
                tape.unshift(X, h)
                if not np.array_equal(host(X), X0):
                    bad.append(1)
                    X = lanes(X0, backend)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    with num_threads(2):
        threads = [threading.Thread(target=worker) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    assert not errors, errors
    assert not bad, f"{len(bad)} pairs left a wrong array"
    assert tape.at_start() and tape.depth == 0 and tape.to_bytes() == fresh_bytes(L, offsets)


# --- memory is returned ----------------------------------------------------------------------------------------
MEMORY_SCRIPT = r"""
import gc, json, sys
import numpy as np
import revsgd

def rss():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024

L = 10**6
PUSHES = {"cpp": 50, "numba": 50, "numpy": 16, "torch": 12}     # rows of 2 MB: 100, 100, 32, 24 MB of words
out = {}
for be in sys.argv[1].split(","):
    revsgd.kernels.warm_up(be)
    X0 = (np.arange(L, dtype=np.int64) * 7919) - 12345
    if be == "torch":
        import torch
        X = torch.from_numpy(X0.copy())
    else:
        X = X0.copy()
    tape = revsgd.Tape(L, backend=be)
    tape.shift(X, 0); tape.unshift(X, 0)          # lane lookups cached, kernels warm
    gc.collect()
    base = rss()
    K = PUSHES[be]
    for _ in range(K):
        tape.shift(X, 16)
    peak = rss()
    for _ in range(K):
        tape.unshift(X, 16)
    gc.collect()
    end = rss()
    out[be] = dict(base=base, peak=peak, end=end, words=2 * L * K, ok=bool(np.array_equal(np.asarray(X), X0)),
                   at_start=tape.at_start())
    del tape, X
    gc.collect()
print(json.dumps(out))
"""


_MEMORY: dict = {}


@pytest.fixture(scope="module", autouse=True)
def _memory_process(request):
    """Start the memory measurement (its own process, so RSS is clean) when the module starts, if selected, so it
    runs beside the other tests; killed at the end of the module if nobody collected it."""
    if any(getattr(it, "originalname", None) == "test_memory_returned_after_reverse" for it in request.session.items):
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([root] + sys.path))
        _MEMORY["proc"] = subprocess.Popen([sys.executable, "-c", MEMORY_SCRIPT, ",".join(BACKENDS)],
                                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    yield
    proc = _MEMORY.pop("proc", None)
    if proc is not None and proc.poll() is None:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def memory_run():
    if "result" not in _MEMORY:
        proc = _MEMORY.get("proc")
        assert proc is not None
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
        _MEMORY["result"] = json.loads(out.strip().splitlines()[-1])
    return _MEMORY["result"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_memory_returned_after_reverse(backend, memory_run):
    m = memory_run[backend]
    mib = 1 << 20
    assert m["ok"] and m["at_start"]
    assert m["peak"] - m["base"] >= 0.5 * m["words"], m      # the measurement sees the tape
    assert m["end"] - m["base"] <= 8 * mib, (
        f"{backend}: RSS {m['base'] / mib:.0f} MiB at the start, {m['peak'] / mib:.0f} after the forward pass "
        f"({m['words'] / mib:.0f} MiB of words), {m['end'] / mib:.0f} after the reverse pass")
