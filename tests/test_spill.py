"""Tape spill (SpillTapeStorage): the same tape, bytes and hypergradients as in memory, bit for bit, with the word
stack's bottom in files that disappear when the tape is back at its start, on close, on garbage collection and after
errors."""
from __future__ import annotations

import gc
import os
import threading

import numpy as np
import pytest
import torch

import revsgd
from revsgd import kernels
from revsgd.core import tapeformat
from revsgd.core.tapeformat import SpillTapeStorage, TapeStorage, tape_storage

BACKENDS = [b for b in ("numpy", "cpp", "torch") if b in revsgd.BACKENDS]
OFFSETS = [0, 5, 20, 37]


def _pair(be, tape_dir, block_bytes=80):
    return (TapeStorage(37, OFFSETS, be.arrays),
            SpillTapeStorage(37, OFFSETS, be.arrays, tape_dir=tape_dir, block_bytes=block_bytes))


def _state(be, X):
    return torch.from_numpy(X.copy()) if be.name == "torch" else X.copy()


def _schedule(n, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(-2**62, 2**62, 37), [rng.integers(0, 17, 3) for _ in range(n)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_storage_matches_memory(tmp_path, backend):
    be = kernels.get_backend(backend)
    a, b = _pair(be, tmp_path)
    X0, hs = _schedule(300)
    Xa, Xb = _state(be, X0), _state(be, X0)
    peak = 0
    for i, h in enumerate(hs):
        kernels.shift(be, a, Xa, h, True)
        kernels.shift(be, b, Xb, h, True)
        peak = max(peak, b.spilled_bytes)
        if i % 25 == 0:
            assert a.to_bytes() == b.to_bytes()
    assert a.to_bytes() == b.to_bytes()
    assert b.spilled_bytes > 0 and peak == b.peak_spilled_bytes
    assert len(os.listdir(tmp_path)) == 1 and b.spill_dir is not None
    assert b.nbytes < a.nbytes                         # memory holds about two blocks, not the stack
    assert np.array_equal(np.asarray(Xa), np.asarray(Xb))
    for i, h in enumerate(reversed(hs)):
        kernels.shift(be, a, Xa, h, False)
        kernels.shift(be, b, Xb, h, False)
        if i % 31 == 0:
            assert a.to_bytes() == b.to_bytes()
    assert np.array_equal(np.asarray(Xb), X0) and b.at_start() and a.to_bytes() == b.to_bytes()
    assert os.listdir(tmp_path) == [] and b.spill_dir is None   # back at the start: no files


def test_round_trips_and_factory(tmp_path):
    be = kernels.get_backend("numpy")
    a = TapeStorage(37, OFFSETS)
    X0, hs = _schedule(200, seed=1)
    X = X0.copy()
    for h in hs:
        kernels.shift(be, a, X, h, True)
    data = a.to_bytes()
    b = SpillTapeStorage.from_bytes(data, tape_dir=tmp_path, block_bytes=64)
    assert b.spilled_bytes > 0 and b.to_bytes() == data
    c = SpillTapeStorage.adopt(TapeStorage.from_bytes(data), tape_dir=tmp_path, block_bytes=100)
    assert c.to_bytes() == data and len(os.listdir(tmp_path)) == 2      # one directory per tape
    Xb = X.copy()
    for h in reversed(hs):
        kernels.shift(be, a, X, h, False)
        kernels.shift(be, b, Xb, h, False)
    assert np.array_equal(Xb, X0) and b.at_start()
    c.close()
    assert os.listdir(tmp_path) == []
    with pytest.raises(RuntimeError, match="close"):
        c.to_bytes()
    assert type(tape_storage(4)) is TapeStorage
    assert type(tape_storage(4, tape_dir=tmp_path, block_bytes=8)) is SpillTapeStorage
    with pytest.raises(TypeError):
        tape_storage(4, block_bytes=8)
    with pytest.raises(TypeError):
        SpillTapeStorage(4, tape_dir=3)
    with pytest.raises(ValueError):
        SpillTapeStorage(4, tape_dir=tmp_path, block_bytes=1)


def test_failed_write_changes_nothing(tmp_path, monkeypatch):
    be = kernels.get_backend("numpy")
    a, b = _pair(be, tmp_path, block_bytes=40)
    X0, hs = _schedule(120, seed=2)
    Xa, Xb = X0.copy(), X0.copy()
    real = tapeformat._SpillFile.append
    calls = {"n": 0}

    def flaky(self, data):
        calls["n"] += 1
        if calls["n"] == 3:
            real(self, data[:1])          # a partial write, then the disk is full
            raise OSError(28, "No space left on device")
        return real(self, data)
    monkeypatch.setattr(tapeformat._SpillFile, "append", flaky)
    failed = 0
    for h in hs:
        kernels.shift(be, a, Xa, h, True)
        before, Xbefore = b.to_bytes(), Xb.copy()
        try:
            kernels.shift(be, b, Xb, h, True)
        except OSError:
            failed += 1
            assert b.to_bytes() == before and np.array_equal(Xb, Xbefore)   # all or nothing
            kernels.shift(be, b, Xb, h, True)                                # the retry succeeds
        assert b.to_bytes() == a.to_bytes()
    assert failed == 1
    for h in reversed(hs):
        kernels.shift(be, b, Xb, h, False)
    assert np.array_equal(Xb, X0) and os.listdir(tmp_path) == []


def test_concurrent_tapes(tmp_path):
    """Tapes in the same directory, pushed from several threads at once, never share files."""
    be = kernels.get_backend("numpy")
    X0, hs = _schedule(150, seed=3)
    ref = TapeStorage(37, OFFSETS)
    X = X0.copy()
    for h in hs:
        kernels.shift(be, ref, X, h, True)
    tapes = [SpillTapeStorage(37, OFFSETS, tape_dir=tmp_path, block_bytes=2 * (8 + k)) for k in range(4)]
    errors = []
    dirs = []

    def work(st):
        try:
            Y = X0.copy()
            for h in hs:
                kernels.shift(be, st, Y, h, True)
            dirs.append(st.spill_dir)
            assert st.to_bytes() == ref.to_bytes()
            for h in reversed(hs):
                kernels.shift(be, st, Y, h, False)
            assert np.array_equal(Y, X0)
        except BaseException as e:   # pragma: no cover - reported below
            errors.append(e)
    threads = [threading.Thread(target=work, args=(st,)) for st in tapes]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(set(dirs)) == 4 and os.listdir(tmp_path) == []


def test_garbage_collection_removes_files(tmp_path):
    st = SpillTapeStorage(37, OFFSETS, tape_dir=tmp_path, block_bytes=16)
    X0, hs = _schedule(100, seed=4)
    for h in hs:
        kernels.shift(kernels.get_backend("numpy"), st, X0, h, True)
    assert os.listdir(tmp_path)
    del st
    gc.collect()
    assert os.listdir(tmp_path) == []


# --- through the engine: the exact method with spilling tapes -------------------------------------------------------

T = 30


def _problem(fail_at=None):
    from revsgd.frontend.inputs import as_hypers, as_params
    from revsgd.frontend.problem import TorchProblem
    g = torch.Generator().manual_seed(0)
    X = torch.randn(40, 5, generator=g, dtype=torch.float64)
    Y = torch.randn(40, 3, generator=g, dtype=torch.float64)
    p0 = {"W": torch.randn(5, 8, generator=g, dtype=torch.float64) * 0.4,
          "V": torch.randn(8, 3, generator=g, dtype=torch.float64) * 0.4}
    f = lambda p, x: torch.tanh(x @ p["W"]) @ p["V"]  # noqa: E731
    calls = {}

    def train_loss(p, h, t):
        calls[t] = calls.get(t, 0) + 1
        if fail_at is not None and t == fail_at and calls[t] == 2:
            raise ValueError("injected failure in the reverse pass")
        i = torch.arange(10) + 10 * (t % 4)
        return ((f(p, X[i]) - Y[i]) ** 2).mean() + h["l2"] * (p["W"] ** 2).sum()
    params = as_params(p0)
    hyp = as_hypers({"l2": 1e-3}, params)
    return TorchProblem(train_loss, lambda p, h: ((f(p, X) - Y) ** 2).mean(), params, hyp, 1, 0, T), params


def _sched(opt):
    if opt == "sgd":
        return {"lr": np.linspace(0.05, 0.2, T), "momentum": np.full(T, 0.25), "dampening": np.zeros(T),
                "weight_decay": np.full(T, 1e-3)}
    return {"lr": np.full(T, 0.01), "beta1": np.full(T, 0.3), "beta2": np.full(T, 0.6), "eps": np.full(T, 1e-6),
            "weight_decay": np.zeros(T)}


def _unroll(opt, backend, tape_dir=None, fail_at=None):
    from revsgd.distributed import exact_state_factory
    from revsgd.engine import Unroll
    from revsgd.optim import get_optimizer
    prob, params = _problem(fail_at)
    make = None if tape_dir is None else exact_state_factory(None, tape_dir=tape_dir, block_bytes=32)
    return Unroll(prob, get_optimizer(opt), _sched(opt), params.flat(), backend=backend, exact_state=make), prob


@pytest.mark.parametrize("opt", ["sgd", "adamw"])
@pytest.mark.parametrize("backend", [b for b in ("cpp", "torch") if b in revsgd.BACKENDS])
def test_same_hypergradient_as_in_memory(tmp_path, opt, backend):
    out = {}
    for mode in ("memory", "spill"):
        with revsgd.pinned_threads(1):
            u, prob = _unroll(opt, backend, tmp_path if mode == "spill" else None)
            u.forward()
            tapes = {k: t.to_bytes() for k, t in u.prov.ex.tapes.items()}
            spilled = sum(getattr(t, "spilled_bytes", 0) for t in u.prov.ex.tapes.values())
            f, dw, dth = prob.val()
            res = u.reverse(dw, dth)
        out[mode] = (tapes, spilled, res)
    (tm, _, rm), (ts, spilled, rs) = out["memory"], out["spill"]
    assert spilled > 0 and tm == ts                   # the same tapes, byte for byte, and the run did spill
    for k in rm.grads:
        assert torch.equal(rm.grads[k], rs.grads[k]), k
    assert torch.equal(rm.d_w0, rs.d_w0) and all(torch.equal(a, b) for a, b in zip(rm.d_theta, rs.d_theta))
    assert rs.stats["info_bits"] == rm.stats["info_bits"]
    assert os.listdir(tmp_path) == []


def test_error_removes_files(tmp_path):
    with revsgd.pinned_threads(1):
        u, prob = _unroll("sgd", "cpp" if "cpp" in revsgd.BACKENDS else "numpy", tmp_path, fail_at=20)
        u.forward()
        assert os.listdir(tmp_path)                   # spilled
        f, dw, dth = prob.val()
        with pytest.raises(ValueError, match="injected"):
            u.reverse(dw, dth)
    del u
    gc.collect()
    assert os.listdir(tmp_path) == []
