"""The lost-bits tape: exactness, information efficiency, byte format, cross-backend identity (DESIGN.md §3)."""
from __future__ import annotations

import pickle
import struct
import zlib

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from revsgd import Tape, TapeExhaustedError, TapeFormatError
from revsgd.core.tapeformat import CHUNK, HEAD_START
from tests.conftest import (BACKENDS, COMPILED, I64_MAX, I64_MIN, REFERENCE, ModelTape, random_int64, random_schedule,
                            run_tape, tape_snapshot, unscale_all)

SMALL_SIZES = [1, 2, 3, 5, 17, 64, 255, 1001]
CHUNK_SIZES = [CHUNK - 1, CHUNK, CHUNK + 3, 2 * CHUNK - 1, 3 * CHUNK + 5]
HEADER = struct.Struct("<8sHHIQQ")


def fresh_bytes(num_lanes: int) -> bytes:
    return Tape(num_lanes, backend=REFERENCE).to_bytes()


def heads_of(tape: Tape) -> np.ndarray:
    return tape._st.heads.astype(np.int64)


# --- exact round trips ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@given(size=st.sampled_from(SMALL_SIZES + [CHUNK + 3]), steps=st.integers(0, 12),
       per_lane=st.sampled_from([None, True, False]), seed=st.integers(0, 2**32 - 1))
def test_scale_unscale_round_trip(backend, size, steps, per_lane, seed):
    rng = np.random.default_rng(seed)
    X0 = random_int64(rng, size)
    sched = random_schedule(rng, size, steps, per_lane)
    X, _, tape = run_tape(backend, X0, sched)
    assert tape.depth == steps
    h = heads_of(tape)
    assert np.all((h >= 2**16) & (h < 2**32))
    unscale_all(tape, X, sched)
    assert np.array_equal(X, X0)
    assert tape.at_start()
    assert tape.depth == 0
    assert tape.info_bits == 0.0
    assert tape.to_bytes() == fresh_bytes(size)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("size", CHUNK_SIZES)
def test_round_trip_across_chunk_boundaries(backend, size):
    rng = np.random.default_rng(size)
    X0 = random_int64(rng, size)
    sched = random_schedule(rng, size, 10, lo=1, hi=65536)
    sched[3] = 1          # every lane emits a word
    sched[4] = 65536      # identity
    X, _, tape = run_tape(backend, X0, sched)
    assert not tape.at_start()
    unscale_all(tape, X, sched)
    assert np.array_equal(X, X0)
    assert tape.at_start()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("value", [I64_MIN, I64_MAX, 0, -1, 1, -(2**47), 2**47 - 1])
@pytest.mark.parametrize("n", [1, 2, 65535, 65536, 40503])
def test_extreme_values_every_lane(backend, value, n):
    X0 = np.full(7, value, dtype=np.int64)
    X, _, tape = run_tape(backend, X0, [n] * 5)
    unscale_all(tape, X, [n] * 5)
    assert np.array_equal(X, X0)
    assert tape.at_start()


@pytest.mark.parametrize("backend", BACKENDS)
def test_scale_is_multiplication_by_n_over_65536(backend):
    """X' = floor(X / 65536)·n + s with s in [0, n): X' ≈ X·n/65536, the s coming from the tape."""
    rng = np.random.default_rng(1)
    L = 3000
    X = random_int64(rng, L)
    tape = Tape(L, backend=backend)
    for _ in range(25):
        n = rng.integers(1, 65537, L)
        before = X.copy()
        tape.scale(X, n)
        s = X - (before >> 16) * n
        assert np.all((s >= 0) & (s < n))
    # n = 1 keeps nothing but the quotient; n = 65536 is the identity and stores nothing
    before = X.copy()
    tape.scale(X, 1)
    assert np.array_equal(X, before >> 16)
    before, bits = X.copy(), tape.info_bits
    tape.scale(X, 65536)
    assert np.array_equal(X, before)
    assert tape.info_bits == bits


@pytest.mark.parametrize("backend", BACKENDS)
def test_n_65536_on_fresh_tape_stores_nothing(backend):
    X0 = random_int64(np.random.default_rng(2), 100)
    X, b, tape = run_tape(backend, X0, [65536] * 3)
    assert np.array_equal(X, X0)
    assert tape.info_bits == 0.0
    assert np.all(heads_of(tape) == HEAD_START)
    assert tape.depth == 3 and not tape.at_start()


@pytest.mark.parametrize("backend", BACKENDS)
@given(size=st.sampled_from([1, 2, 3, 9, 40]), steps=st.integers(1, 10), seed=st.integers(0, 2**32 - 1))
def test_matches_independent_python_model(backend, size, steps, seed):
    rng = np.random.default_rng(seed)
    X0 = random_int64(rng, size)
    sched = random_schedule(rng, size, steps)
    model = ModelTape(size)
    tape = Tape(size, backend=backend)
    X, Xm = X0.copy(), X0.tolist()
    for n in sched:
        tape.scale(X, n)
        Xm = model.scale(Xm, n)
        assert X.tolist() == Xm
        assert tape.to_bytes() == model.to_bytes()
    for n in reversed(sched):
        tape.unscale(X, n)
        Xm = model.unscale(Xm, n)
        assert X.tolist() == Xm
        assert tape.to_bytes() == model.to_bytes()


@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_python_model_over_two_chunks(backend):
    """Stream order inside a chunk (ascending emits, descending refills) and per-chunk streams."""
    L = CHUNK + 3
    rng = np.random.default_rng(3)
    X0 = random_int64(rng, L)
    sched = [1, rng.integers(1, 300, L), 7, rng.integers(1, 65537, L)]
    model = ModelTape(L)
    X, _, tape = run_tape(backend, X0, sched)
    Xm = X0.tolist()
    for n in sched:
        Xm = model.scale(Xm, n)
    assert X.tolist() == Xm
    assert tape.to_bytes() == model.to_bytes()
    assert len(model.streams[0]) > 1000 and len(model.streams[1]) >= 3
    tape.unscale(X, sched[-1])
    tape.unscale(X, sched[-2])
    Xm = model.unscale(model.unscale(Xm, sched[-1]), sched[-2])
    assert X.tolist() == Xm
    assert tape.to_bytes() == model.to_bytes()


@pytest.mark.parametrize("backend", BACKENDS)
@given(size=st.sampled_from([1, 6, 333]), steps=st.integers(1, 40), seed=st.integers(0, 2**32 - 1))
def test_head_invariant(backend, size, steps, seed):
    rng = np.random.default_rng(seed)
    X = random_int64(rng, size)
    tape = Tape(size, backend=backend)
    assert np.all(heads_of(tape) == 2**16)
    for n in random_schedule(rng, size, steps):
        tape.scale(X, n)
        h = heads_of(tape)
        assert h.min() >= 2**16 and h.max() < 2**32
        assert tape._st.heads.dtype == np.uint32


# --- information efficiency ----------------------------------------------------------------------------------
def ideal_bits(schedule, num_lanes: int) -> float:
    total = 0.0
    for n in schedule:
        nn = np.broadcast_to(np.asarray(n, dtype=np.float64), (num_lanes,))
        total += float(np.sum(-np.log2(nn / 65536.0)))
    return total


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lo, hi, per_lane", [(58982, 58982, False), (30000, 65000, None), (1, 65536, True),
                                              (64000, 65535, False)])
def test_info_bits_within_a_tenth_of_a_percent(backend, lo, hi, per_lane):
    rng = np.random.default_rng(lo + hi)
    L, T = 1500, 150
    X = random_int64(rng, L, extremes=False)
    sched = random_schedule(rng, L, T, per_lane, lo, hi)
    tape = Tape(L, backend=backend)
    ideal = 0.0
    for t, n in enumerate(sched):
        tape.scale(X, n)
        ideal += ideal_bits([n], L)
        if t >= 30:  # past the O(1)-bit-per-lane start-up of a fresh head
            assert 0.999 * ideal <= tape.info_bits <= 1.001 * ideal
        assert tape.nbytes <= 1.05 * tape.info_bits / 8 + 4 * L + 2**20
        # words in the streams really are 16 bits each: the count can't exceed what the info accounts for
        assert 16 * tape._st.num_words <= tape.info_bits + 1e-6
    unscale_all(tape, X, sched)
    assert tape.at_start()
    assert tape.nbytes <= 4 * L + 2**20


@pytest.mark.parametrize("backend", BACKENDS)
def test_allocation_tracks_information(backend):
    """Many words in a few chunks: streams grow by a few percent at a time and shrink back on reversal."""
    L, T = 2 * CHUNK + 1, 100
    X = random_int64(np.random.default_rng(4), L, extremes=False)
    X0 = X.copy()
    tape = Tape(L, backend=backend)
    for _ in range(T):
        tape.scale(X, 1)  # 16 bits per lane per step
    info = tape.info_bits
    assert 0.999 * 16 * L * T <= info <= 1.001 * 16 * L * T
    assert info / 8 <= tape.nbytes <= 1.05 * info / 8 + 4 * L + 2**20
    for _ in range(T // 2):
        tape.unscale(X, 1)
    assert tape.nbytes <= 1.05 * tape.info_bits / 8 + 4 * L + 2**20
    for _ in range(T // 2):
        tape.unscale(X, 1)
    assert np.array_equal(X, X0) and tape.at_start()
    assert tape.nbytes <= 4 * L + 2**20


def test_info_bits_long_run_single_gamma():
    L, T, n = 2000, 600, 58982  # γ = 0.9: ≈ 0.152 bits per lane per step
    rng = np.random.default_rng(9)
    X = random_int64(rng, L, extremes=False)
    tape = Tape(L, backend=REFERENCE)
    for _ in range(T):
        tape.scale(X, n)
    ideal = L * T * -np.log2(n / 65536)
    assert 0.999 * ideal <= tape.info_bits <= 1.001 * ideal
    assert tape.nbytes <= 1.05 * tape.info_bits / 8 + 4 * L + 2**20


# --- cross-backend and cross-thread identity -----------------------------------------------------------------
def _history(L: int, seed: int):
    rng = np.random.default_rng(seed)
    X0 = random_int64(rng, L)
    sched = random_schedule(rng, L, 9)
    sched[2] = 1
    sched[5] = rng.integers(1, 400, L)
    return X0, sched


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("threads", [1, 2])
def test_identical_to_reference_bytes_and_state(backend, threads):
    L = 3 * CHUNK + 5
    X0, sched = _history(L, 11)
    Xr, br, tr = run_tape(REFERENCE, X0, sched)
    X, b, tape = run_tape(backend, X0, sched, threads=threads)
    assert np.array_equal(X, Xr)
    assert b == br
    # half way back: still identical
    half = sched[4:]
    unscale_all(tr, Xr, half)
    unscale_all(tape, X, half, threads=threads)
    assert np.array_equal(X, Xr)
    assert tape.to_bytes() == tr.to_bytes()
    unscale_all(tape, X, sched[:4], threads=threads)
    assert np.array_equal(X, X0) and tape.at_start()


@pytest.mark.parametrize("backend", COMPILED)
def test_thread_count_does_not_change_bytes(backend):
    L = 3 * CHUNK + 5
    X0, sched = _history(L, 12)
    X1, b1, t1 = run_tape(backend, X0, sched, threads=1)
    X2, b2, t2 = run_tape(backend, X0, sched, threads=2)
    assert np.array_equal(X1, X2)
    assert b1 == b2
    # forward with 2 threads, reverse with 1 (and vice versa) still returns to the start
    unscale_all(t2, X2, sched, threads=1)
    unscale_all(t1, X1, sched, threads=2)
    assert np.array_equal(X1, X0) and np.array_equal(X2, X0)
    assert t1.at_start() and t2.at_start()


@pytest.mark.parametrize("backend", BACKENDS)
@given(size=st.sampled_from([1, 4, 31, 500]), steps=st.integers(1, 8), seed=st.integers(0, 2**32 - 1))
def test_identical_to_reference_property(backend, size, steps, seed):
    rng = np.random.default_rng(seed)
    X0 = random_int64(rng, size)
    sched = random_schedule(rng, size, steps)
    Xr, br, _ = run_tape(REFERENCE, X0, sched)
    X, b, _ = run_tape(backend, X0, sched)
    assert np.array_equal(X, Xr)
    assert b == br


# --- serialization -------------------------------------------------------------------------------------------
def _tape_with_history(L=CHUNK + 3, seed=21, backend=REFERENCE):
    rng = np.random.default_rng(seed)
    X0 = random_int64(rng, L)
    sched = random_schedule(rng, L, 6)
    sched[1] = 3
    X, b, tape = run_tape(backend, X0, sched)
    return X0, sched, X, b, tape


def _with_crc(body: bytes) -> bytes:
    return body + struct.pack("<I", zlib.crc32(body))


def test_byte_layout_header():
    X0, sched, X, b, tape = _tape_with_history()
    magic, version, reserved, chunk, L, depth = HEADER.unpack_from(b, 0)
    assert (magic, version, reserved, chunk, L, depth) == (b"RSGDTAPE", 1, 0, CHUNK, CHUNK + 3, 6)
    lens = np.frombuffer(b, "<u8", count=2, offset=HEADER.size + 4 * L)
    assert len(b) == HEADER.size + 4 * L + 8 * 2 + 2 * int(lens.sum()) + 4
    assert int(lens.sum()) == tape._st.num_words
    assert struct.unpack("<I", b[-4:])[0] == zlib.crc32(b[:-4])


@pytest.mark.parametrize("backend", BACKENDS)
def test_from_bytes_round_trip_then_unscale_to_start(backend):
    X0, sched, X, b, tape = _tape_with_history()
    for data in (b, bytearray(b), memoryview(b)):
        t2 = Tape.from_bytes(data, backend=backend)
        assert t2.backend == backend
        assert t2.to_bytes() == b
        assert t2.depth == tape.depth and t2.num_lanes == tape.num_lanes
        assert t2.info_bits == tape.info_bits
        X2 = X.copy()
        unscale_all(t2, X2, sched)
        assert np.array_equal(X2, X0)
        assert t2.at_start()
    # the original is untouched by all of that
    assert tape.to_bytes() == b


@pytest.mark.parametrize("backend", BACKENDS)
def test_from_bytes_then_continue_forward(backend):
    X0, sched, X, b, tape = _tape_with_history()
    t2 = Tape.from_bytes(b, backend=backend)
    X2 = X.copy()
    more = [5, 60000, 1]
    for n in more:
        tape.scale(X, n)
        t2.scale(X2, n)
    assert np.array_equal(X, X2)
    assert t2.to_bytes() == tape.to_bytes()
    unscale_all(t2, X2, sched + more)
    assert np.array_equal(X2, X0) and t2.at_start()


def test_from_bytes_copies_its_input():
    X0, sched, X, b, tape = _tape_with_history()
    buf = bytearray(b)
    t2 = Tape.from_bytes(buf)
    buf[HEADER.size:] = bytes(len(buf) - HEADER.size)
    assert t2.to_bytes() == b


def _corrupt_positions(b: bytes, L: int):
    heads = HEADER.size
    counts = heads + 4 * L
    words = counts + 8 * 2
    return {
        "magic": 0, "version": 8, "reserved": 10, "chunk": 12, "num_lanes": 16, "num_lanes_high": 23,
        "depth": 24, "first_head": heads, "last_head_high": counts - 1, "count": counts, "count_high": counts + 7,
        "second_count": counts + 8, "first_word": words, "mid_word": (words + len(b) - 4) // 2,
        "last_word": len(b) - 5, "crc": len(b) - 4, "crc_last": len(b) - 1,
    }


@pytest.mark.parametrize("where", ["magic", "version", "reserved", "chunk", "num_lanes", "num_lanes_high", "depth",
                                   "first_head", "last_head_high", "count", "count_high", "second_count",
                                   "first_word", "mid_word", "last_word", "crc", "crc_last"])
@pytest.mark.parametrize("flip", [0x01, 0x80, 0xFF])
def test_corrupt_byte_is_rejected(where, flip):
    X0, sched, X, b, tape = _tape_with_history()
    pos = _corrupt_positions(b, CHUNK + 3)[where]
    bad = bytearray(b)
    bad[pos] ^= flip
    with pytest.raises(TapeFormatError) as ei:
        Tape.from_bytes(bytes(bad))
    assert len(str(ei.value)) > 10
    assert isinstance(ei.value, ValueError)


@pytest.mark.parametrize("keep", [0, 1, 8, HEADER.size - 1, HEADER.size, HEADER.size + 4, HEADER.size + 100, -1, -2,
                                  -5])
def test_truncated_is_rejected(keep):
    X0, sched, X, b, tape = _tape_with_history()
    with pytest.raises(TapeFormatError, match="truncated|length"):
        Tape.from_bytes(b[:keep])


def test_extra_trailing_bytes_rejected():
    b = _tape_with_history()[3]
    with pytest.raises(TapeFormatError):
        Tape.from_bytes(b + b"\x00")
    with pytest.raises(TapeFormatError):
        Tape.from_bytes(b + b"\x00\x00")


def test_wrong_magic_with_valid_crc():
    b = _tape_with_history()[3]
    bad = _with_crc(b"RSGDTAPX" + b[8:-4])
    with pytest.raises(TapeFormatError, match="magic"):
        Tape.from_bytes(bad)


@pytest.mark.parametrize("version", [0, 2, 65535])
def test_wrong_version_with_valid_crc(version):
    b = _tape_with_history()[3]
    body = bytearray(b[:-4])
    struct.pack_into("<H", body, 8, version)
    with pytest.raises(TapeFormatError, match="version") as ei:
        Tape.from_bytes(_with_crc(bytes(body)))
    assert str(version) in str(ei.value)


def test_wrong_chunk_with_valid_crc():
    b = _tape_with_history()[3]
    body = bytearray(b[:-4])
    struct.pack_into("<I", body, 12, CHUNK // 2)
    with pytest.raises(TapeFormatError, match="chunk"):
        Tape.from_bytes(_with_crc(bytes(body)))


def test_zero_lanes_with_valid_crc():
    body = HEADER.pack(b"RSGDTAPE", 1, 0, CHUNK, 0, 0)
    with pytest.raises(TapeFormatError):
        Tape.from_bytes(_with_crc(body))


def test_head_below_start_with_valid_crc():
    body = bytearray(fresh_bytes(5)[:-4])
    struct.pack_into("<I", body, HEADER.size + 8, 2**16 - 1)
    with pytest.raises(TapeFormatError, match="head"):
        Tape.from_bytes(_with_crc(bytes(body)))


def test_inconsistent_word_count_with_valid_crc():
    b = _tape_with_history()[3]
    body = bytearray(b[:-4])
    off = HEADER.size + 4 * (CHUNK + 3)
    (k,) = struct.unpack_from("<Q", body, off)
    struct.pack_into("<Q", body, off, k + 1)
    with pytest.raises(TapeFormatError):
        Tape.from_bytes(_with_crc(bytes(body)))
    struct.pack_into("<Q", body, off, 2**64 - 1)
    with pytest.raises(TapeFormatError):
        Tape.from_bytes(_with_crc(bytes(body)))


def test_bits_without_outstanding_steps_with_valid_crc():
    b = _tape_with_history()[3]
    body = bytearray(b[:-4])
    struct.pack_into("<Q", body, HEADER.size - 8, 0)  # depth := 0 while heads and words hold bits
    with pytest.raises(TapeFormatError, match="inconsistent"):
        Tape.from_bytes(_with_crc(bytes(body)))


def test_from_bytes_never_unpickles(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("pickle used")

    b = _tape_with_history()[3]
    monkeypatch.setattr(pickle, "loads", boom)
    monkeypatch.setattr(pickle, "load", boom)
    monkeypatch.setattr(pickle, "Unpickler", boom)
    monkeypatch.setattr(np, "load", boom)
    assert Tape.from_bytes(b).to_bytes() == b
    payload = pickle.dumps({"heads": [1, 2, 3]})
    with pytest.raises(TapeFormatError):
        Tape.from_bytes(payload)
    with pytest.raises(TapeFormatError):
        Tape.from_bytes(payload + bytes(64))


# --- bad inputs: clear errors and nothing changed ------------------------------------------------------------
L_BAD = 37


def _bad_X_cases():
    good = np.zeros(L_BAD, dtype=np.int64)
    big = np.zeros(2 * L_BAD, dtype=np.int64)
    ro = np.zeros(L_BAD, dtype=np.int64)
    ro.flags.writeable = False
    return {
        "int32": (good.astype(np.int32), TypeError),
        "float64": (good.astype(np.float64), TypeError),
        "uint64": (good.astype(np.uint64), TypeError),
        "list": (good.tolist(), TypeError),
        "short": (np.zeros(L_BAD - 1, dtype=np.int64), ValueError),
        "long": (np.zeros(L_BAD + 1, dtype=np.int64), ValueError),
        "2d": (np.zeros((1, L_BAD), dtype=np.int64), ValueError),
        "noncontig": (big[::2], ValueError),
        "readonly": (ro, ValueError),
    }


def _bad_n_cases():
    return {
        "zero": (0, ValueError), "above": (65537, ValueError), "negative": (-3, ValueError),
        "huge": (2**70, ValueError), "bool": (True, TypeError), "float": (0.5, TypeError),
        "float_int": (3.0, TypeError), "np_float": (np.float64(3.0), TypeError), "none": (None, TypeError),
        "list": ([3] * L_BAD, TypeError), "lane_short": (np.full(L_BAD - 1, 3), ValueError),
        "lane_long": (np.full(L_BAD + 1, 3), ValueError), "lane_2d": (np.full((1, L_BAD), 3), ValueError),
        "lane_float": (np.full(L_BAD, 3.0), TypeError), "lane_zero": (np.r_[np.full(L_BAD - 1, 3), 0], ValueError),
        "lane_above": (np.r_[np.full(L_BAD - 1, 3), 65537], ValueError),
        "lane_bool": (np.ones(L_BAD, dtype=bool), TypeError),
    }


def _tape_in_progress(backend):
    rng = np.random.default_rng(5)
    X = random_int64(rng, L_BAD)
    sched = random_schedule(rng, L_BAD, 4)
    X, _, tape = run_tape(backend, X, sched)
    return X, tape


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["scale", "unscale"])
@pytest.mark.parametrize("case", list(_bad_X_cases()))
def test_bad_X_rejected_and_nothing_changes(backend, op, case):
    X, tape = _tape_in_progress(backend)
    before = tape_snapshot(tape)
    bad, exc = _bad_X_cases()[case]
    bad_before = np.array(bad, copy=True)
    with pytest.raises(exc) as ei:
        getattr(tape, op)(bad, 3)
    assert "X" in str(ei.value)
    assert tape_snapshot(tape) == before
    assert np.array_equal(np.asarray(bad), bad_before)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["scale", "unscale"])
@pytest.mark.parametrize("case", list(_bad_n_cases()))
def test_bad_n_rejected_and_nothing_changes(backend, op, case):
    X, tape = _tape_in_progress(backend)
    X_before, before = X.copy(), tape_snapshot(tape)
    bad, exc = _bad_n_cases()[case]
    with pytest.raises(exc) as ei:
        getattr(tape, op)(X, bad)
    assert "n" in str(ei.value)
    assert np.array_equal(X, X_before)
    assert tape_snapshot(tape) == before


def test_tape_constructor_rejects_bad_sizes():
    for bad, exc in ((0, ValueError), (-1, ValueError), (2.0, TypeError), (True, TypeError)):
        with pytest.raises(exc):
            Tape(bad)
    with pytest.raises(ValueError, match="backend"):
        Tape(3, backend="fortran")


@pytest.mark.parametrize("backend", BACKENDS)
def test_unscale_past_start(backend):
    L = 9
    X0 = random_int64(np.random.default_rng(6), L)
    tape = Tape(L, backend=backend)
    X = X0.copy()
    with pytest.raises(TapeExhaustedError, match="start|unscale"):
        tape.unscale(X, 3)
    assert np.array_equal(X, X0) and tape.at_start()
    sched = [3, 1, 65536, 40000]
    for n in sched:
        tape.scale(X, n)
    unscale_all(tape, X, sched)
    before = tape_snapshot(tape)
    for n in (3, 1, 65536):
        with pytest.raises(TapeExhaustedError):
            tape.unscale(X, n)
        assert np.array_equal(X, X0)
        assert tape_snapshot(tape) == before and tape.at_start()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad_lane", [0, 5, CHUNK - 1, 2 * CHUNK + 7, 3 * CHUNK + 4])
def test_stream_runs_dry_inside_kernel_nothing_changes(backend, bad_lane):
    """depth > 0 but one lane needs a word its chunk's stream doesn't hold. A compiled kernel has already undone
    the lanes above it (descending order) and the other chunks; the driver must replay them forward."""
    L = 3 * CHUNK + 5
    rng = np.random.default_rng(7)
    X0 = rng.integers(-(2**40), 2**40, L)  # within the range of a scaled value: n = 1 below must not overflow
    n_arr = rng.integers(2**15, 2**16, L)  # fresh heads emit nothing for n >= 2: every stream stays empty
    sched = [65536, n_arr]
    X, _, tape = run_tape(backend, X0, sched)
    assert tape._st.num_words == 0 and not tape.at_start()
    before, X_before = tape_snapshot(tape), X.copy()
    bad_n = n_arr.copy()
    bad_n[bad_lane] = 1   # head >> 16 == 1 < 2^16: this lane must pop a word from an empty stream
    with pytest.raises(TapeExhaustedError, match="nothing was changed"):
        tape.unscale(X, bad_n)
    assert np.array_equal(X, X_before)
    assert tape_snapshot(tape) == before
    unscale_all(tape, X, sched)
    assert np.array_equal(X, X0) and tape.at_start()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lane", [5, CHUNK + 9, 2 * CHUNK + 1])
def test_unscale_overflow_inside_kernel_nothing_changes(backend, lane):
    L = 2 * CHUNK + 3
    rng = np.random.default_rng(lane)
    X0 = rng.integers(-(2**40), 2**40, L)
    X0[lane] = I64_MAX if lane % 2 else I64_MIN
    n_arr = rng.integers(2**15, 2**16, L)
    X, _, tape = run_tape(backend, X0, [n_arr])
    before, X_before = tape_snapshot(tape), X.copy()
    bad_n = n_arr.copy()
    bad_n[lane] = 1  # floor(X / 1) leaves the ±2^47 range of a scaled value
    with pytest.raises((OverflowError, TapeExhaustedError), match="nothing was changed"):
        tape.unscale(X, bad_n)
    assert np.array_equal(X, X_before)
    assert tape_snapshot(tape) == before
    tape.unscale(X, n_arr)
    assert np.array_equal(X, X0) and tape.at_start()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sign", [1, -1])
def test_unscale_near_the_2_50_division_fast_path_boundary(backend, sign):
    """Compiled kernels divide |v| < 2^50 with one float product and split larger v: cover both sides."""
    rng = np.random.default_rng(13 + sign)
    L = 600
    n_arr = np.where(rng.random(L) < 0.5, rng.integers(16, 300, L), rng.integers(16, 65537, L))  # 2^47·n > 2^50
    target = sign * (2**50) + rng.integers(-3, 4, L) * n_arr + rng.integers(-2, 3, L)  # scaled values near ±2^50
    X0 = np.array([(int(t) * 65536) // int(n) for t, n in zip(target, n_arr)], dtype=np.int64)
    X0 += rng.integers(0, 65536, L)
    model = ModelTape(L)
    X, b, tape = run_tape(backend, X0, [n_arr])
    Xm = model.scale(X0.tolist(), n_arr)
    assert X.tolist() == Xm and b == model.to_bytes()
    assert np.any(np.abs(X) < 2**50) and np.any(np.abs(X) >= 2**50)
    tape.unscale(X, n_arr)
    assert np.array_equal(X, X0) and tape.at_start()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seed", range(4))
def test_unscale_with_different_n_is_detected(backend, seed):
    L, T = 50, 30
    rng = np.random.default_rng(seed)
    X0 = random_int64(rng, L, extremes=False)
    sched = random_schedule(rng, L, T, lo=100, hi=64000)
    X, _, tape = run_tape(backend, X0, sched)
    wrong = list(sched)
    k = int(rng.integers(T))
    wrong[k] = wrong[k] + 1
    try:
        unscale_all(tape, X, wrong)
    except (TapeExhaustedError, OverflowError):
        return
    assert not tape.at_start()


# --- error messages say where ----------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad_lane", [5, CHUNK + 7])
def test_tape_exhausted_message_names_the_lane(backend, bad_lane):
    L = 2 * CHUNK + 5
    X = np.zeros(L, dtype=np.int64)
    tape = Tape(L, backend=backend)
    tape.scale(X, 65536)
    n = np.full(L, 65536, dtype=np.int64)
    n[bad_lane] = 1
    with pytest.raises(TapeExhaustedError) as ei:
        tape.unscale(X, n)
    assert f"lane {bad_lane} " in str(ei.value)


# --- the float division tricks of the compiled kernels -------------------------------------------------------
def _divisors(rng):
    return np.unique(np.concatenate([np.arange(1, 301), np.arange(65236, 65537), rng.integers(1, 65537, 300),
                                     2 ** np.arange(17), 2 ** np.arange(1, 17) - 1, 2 ** np.arange(1, 16) + 1]))


def test_float_division_exact_below_2_48():
    """floor((y + 0.5)·(1/n)) == y // n for 0 <= y < 2^48, 1 <= n <= 2^16 (float64)."""
    rng = np.random.default_rng(8)
    top = 2**48 - 1
    edge_y = np.array([0, 1, 2, 65535, 65536, 2**32 - 1, 2**32, top - 1, top], dtype=np.int64)
    for n in _divisors(rng):
        n = int(n)
        kmax = top // n
        k = np.unique(np.concatenate([np.arange(0, 200), kmax - np.arange(0, 200), rng.integers(0, kmax + 1, 600)]))
        k = k[(k >= 0) & (k <= kmax)]
        y = np.concatenate([k * n, k * n + n - 1, k * n - 1, k * n + n // 2, k * n + (n - 1) // 2, edge_y,
                            top - np.arange(0, min(3 * n + 3, 1000)), rng.integers(0, top + 1, 500)])
        y = y[(y >= 0) & (y <= top)]
        q = np.floor((y.astype(np.float64) + 0.5) * (1.0 / n)).astype(np.int64)
        expect = y // n
        bad = np.flatnonzero(q != expect)
        assert bad.size == 0, (n, int(y[bad[0]]))
        # and the truncating form the kernels use (y >= 0)
        assert np.array_equal(((y.astype(np.float64) + 0.5) * (1.0 / n)).astype(np.int64), expect)


def test_float_division_fails_where_not_promised():
    """The check above is not vacuous: the trick really breaks well beyond 2^48 (so the bound matters)."""
    n = 65535
    y = np.arange(2**62 - 10**6, 2**62, dtype=np.int64)
    q = np.floor((y.astype(np.float64) + 0.5) * (1.0 / n)).astype(np.int64)
    assert np.any(q != y // n)


def test_float_floor_division_below_2_50():
    """floor((v + 0.5)·(1/n)) == v // n for -2^50 <= v < 2^50 (signed), also as trunc(z) − (z < 0)."""
    rng = np.random.default_rng(12)
    T = 2**50
    for n in _divisors(rng):
        n = int(n)
        m = min(3 * n + 3, 1000)
        v = np.concatenate([np.arange(-T, -T + m), np.arange(T - m, T), np.arange(-m, m + 1),
                            -T + np.arange(1, 200) * n + rng.choice([0, 1, n - 1, -1], 199),
                            T - np.arange(1, 200) * n + rng.choice([0, 1, n - 1, -1], 199),
                            rng.integers(-T, T, 300) // n * n + rng.choice([0, 1, n - 1, -1], 300),
                            rng.integers(-T, T, 300)]).astype(np.int64)
        v = v[(v >= -T) & (v < T)]
        z = (v.astype(np.float64) + 0.5) * (1.0 / n)
        expect = np.floor_divide(v, n)
        assert np.array_equal(np.floor(z).astype(np.int64), expect), n
        assert np.array_equal(z.astype(np.int64) - (z < 0.0), expect), n


def _split_floordiv(v: np.ndarray, n: int):
    inv = 1.0 / n
    a = v >> 32
    z = (a.astype(np.float64) + 0.5) * inv
    qa = np.floor(z).astype(np.int64)
    ra = a - qa * n
    b = v & 0xFFFFFFFF
    y2 = (ra << 32) | b
    assert np.all((ra >= 0) & (ra < n))
    assert np.all((y2 >= 0) & (y2 < 2**48))
    q2 = np.floor((y2.astype(np.float64) + 0.5) * inv).astype(np.int64)
    r2 = y2 - q2 * n
    return qa, q2, r2


def test_signed_split_floor_division():
    rng = np.random.default_rng(10)
    special = np.array([I64_MIN, I64_MIN + 1, I64_MAX, I64_MAX - 1, 0, -1, 1, 2**32, -(2**32), 2**32 - 1,
                        -(2**32) - 1, 2**47, -(2**47), 2**47 - 1, -(2**47) - 1], dtype=np.int64)
    for n in _divisors(rng):
        n = int(n)
        base = np.concatenate([special, random_int64(rng, 400)])
        mult = rng.integers(-(2**46), 2**46, 100) * n
        v = np.concatenate([base, mult, mult - 1, mult + n - 1, I64_MIN + np.arange(0, 2 * n, max(1, n // 7)),
                            I64_MAX - np.arange(0, 2 * n, max(1, n // 7))])
        qa, q2, r2 = _split_floordiv(v, n)
        # python ints: no wrap anywhere
        for vi, qai, q2i, r2i in zip(v.tolist(), qa.tolist(), q2.tolist(), r2.tolist()):
            q = qai * 2**32 + q2i
            assert q == vi // n, (vi, n)
            assert r2i == vi % n, (vi, n)
        # and in int64 as the kernels compute it
        assert np.array_equal(qa * 4294967296 + q2, np.floor_divide(v, n))
