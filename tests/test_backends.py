"""Every kernel backend against the NumPy reference (:mod:`revsgd.kernels.vectorized`, the specification).

For random lanes, groups and parameters: states, P outputs and tapes (``to_bytes()``) byte-identical to the
reference after every op, for thread counts 1 and 2; multi-step forward runs reversed back to the start bit for
bit; and the error protocol (same exception type and message — hence lane — as the reference, everything left
exactly as before), with failures planted at late lanes of later chunks. Self-contained: no conftest helpers.
"""
from __future__ import annotations

import os
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as hst

import revsgd
from revsgd import kernels as K
from revsgd.core.tapeformat import TapeStorage
from revsgd.kernels import AdamParams, MomentumParams

REFERENCE = "numpy"
CANDIDATES = ("cpp", "numba", "torch")
REQUIRED = {b for b in os.environ.get("REVSGD_REQUIRE_BACKENDS", "").split(",") if b}
CHUNK = 16384          # the compiled kernels' chunk (checked below)
I64_MAX = 2**63 - 1
BIG = 2 * CHUNK + 123  # a few chunks and a remainder

HYP = settings(max_examples=25, deadline=None, derandomize=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                      HealthCheck.function_scoped_fixture])


def _backend_or_skip(name: str):
    if name not in revsgd.BACKENDS:
        if name in REQUIRED:
            pytest.fail(f"backend {name!r} is required (REVSGD_REQUIRE_BACKENDS) but not available")
        pytest.skip(f"backend {name!r} not available")
    return K.get_backend(name)


@pytest.fixture(params=CANDIDATES)
def backend(request):
    _backend_or_skip(request.param)
    return request.param


@pytest.fixture(autouse=True)
def _restore_threads():
    yield
    revsgd.set_num_threads(1)


def test_required_backends_load():
    for name in sorted(REQUIRED):
        _backend_or_skip(name)
    for name in ("cpp", "numba"):
        if name in revsgd.BACKENDS:
            assert K.get_backend(name).CHUNK == CHUNK


# --- one backend's copy of a problem --------------------------------------------------------------------------
class Sim:
    """States, gradients, P and tapes of one backend (NumPy arrays, or torch tensors for "torch")."""

    def __init__(self, name: str, L: int, offsets: np.ndarray, states: dict, p_dtype):
        self.name = name
        self.be = K.get_backend(name)
        self.torch = name == "torch"
        self.L = L
        self.tapes = {k: TapeStorage(L, offsets, self.be.arrays) for k in ("a", "b", "w")}
        self.x = {k: self.put(v) for k, v in states.items()}
        self.P = None if p_dtype is None else self.put(np.full(L, 0.25, dtype=p_dtype))

    def put(self, a):
        a = np.array(a, copy=True)
        if self.torch:
            import torch
            return torch.from_numpy(a)
        return a

    @staticmethod
    def get(x) -> np.ndarray:
        return x.numpy() if hasattr(x, "numpy") and not isinstance(x, np.ndarray) else np.asarray(x)

    def snapshot(self) -> dict:
        snap = {k: self.get(v).tobytes() for k, v in self.x.items()}
        snap.update({f"tape_{k}": t.to_bytes() for k, t in self.tapes.items()})
        if self.P is not None:
            snap["P"] = self.get(self.P).tobytes()
        return snap

    def at_start(self) -> bool:
        return all(t.at_start() for t in self.tapes.values())

    # --- ops through the driver (as the optimisers call them) ---
    def shift(self, h, forward):
        K.shift(self.be, self.tapes["a"], self.x["a"], h, forward, name="X", frac_bits=40)

    def momentum(self, g, prm, forward, state, position, use_p=True):
        K.momentum(self.be, self.tapes["a"], self.x["a"], self.x["w"], None if g is None else self.put(g),
                   self.P if use_p else None, prm, forward=forward, state=state, position=position)

    def adam(self, g, prm, forward, state, position, use_p=True, w_tape=True):
        tapes = (self.tapes["a"], self.tapes["b"], self.tapes["w"] if w_tape else None)
        K.adam(self.be, tapes, self.x["a"], (self.x["b"], self.x["c"]), self.x["w"], None if g is None else self.put(g),
               self.P if use_p else None, prm, forward=forward, state=state, position=position)


def outcome(fn):
    """None, or (exception type, message) of a failing op."""
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - compared across backends
        return type(e), str(e)
    return None


class Pair:
    """The same problem on the backend under test and on the reference; every op runs on both and must agree."""

    def __init__(self, name: str, L: int, offsets, states: dict, p_dtype, threads: int = 1):
        self.threads = threads
        self.ref = Sim(REFERENCE, L, offsets, states, p_dtype)
        self.sut = Sim(name, L, offsets, states, p_dtype)
        self.start = self.ref.snapshot()
        self.check()

    def check(self):
        a, b = self.ref.snapshot(), self.sut.snapshot()
        for k in a:
            assert a[k] == b[k], f"{self.sut.name}: {k} differs from the reference"

    def run(self, op: str, *args, **kw):
        """Run ``op`` on both; returns True when it succeeded (both), else checks the failure and that nothing
        changed on either side."""
        before = self.ref.snapshot()
        r = outcome(lambda: getattr(self.ref, op)(*args, **kw))
        revsgd.set_num_threads(self.threads)
        try:
            s = outcome(lambda: getattr(self.sut, op)(*args, **kw))
        finally:
            revsgd.set_num_threads(1)
        assert r == s, f"{self.sut.name}: {op} gave {s}, the reference {r}"
        self.check()
        if r is not None:
            assert self.ref.snapshot() == before
        return r is None


# --- random problems --------------------------------------------------------------------------------------------
def random_offsets(rng, L: int, kind: str) -> np.ndarray:
    if kind == "one":
        return np.array([0, L], dtype=np.int64)
    if kind == "lane":
        return np.arange(L + 1, dtype=np.int64)
    k = int(rng.integers(1, min(L, 6) + 1))
    cuts = np.sort(rng.choice(np.arange(1, L), size=k - 1, replace=False)) if k > 1 else np.array([], np.int64)
    return np.concatenate([[0], cuts, [L]]).astype(np.int64)


def random_h(rng, G: int) -> np.ndarray:
    """Shifts 0..16 per group, zeros common (sometimes all zero, sometimes all non-zero)."""
    mode = rng.integers(4)
    if mode == 0:
        return frozen(rng, np.zeros(G, dtype=np.int64))
    h = rng.integers(1, 17, size=G).astype(np.int64)
    if mode == 3:
        return frozen(rng, h)
    return frozen(rng, np.where(rng.random(G) < 0.5, 0, h).astype(np.int64))


def coef(rng, G: int, lo: float, hi: float, signed: bool = True, broadcast_ok: bool = True) -> np.ndarray:
    """Per-group float64 values of magnitudes 10^[lo, hi], mixed signs; sometimes one value for all (shape (1,))."""
    n = 1 if (broadcast_ok and G > 1 and rng.random() < 0.25) else G
    v = 10.0 ** rng.uniform(lo, hi, size=n)
    if signed:
        v = np.where(rng.random(n) < 0.5, -v, v)
    return frozen(rng, v.astype(np.float64))


def frozen(rng, a: np.ndarray) -> np.ndarray:
    """Sometimes read-only (parameters often are views of frozen schedule grids)."""
    if rng.random() < 0.3:
        a.flags.writeable = False
    return a


def lam_of(rng, G: int) -> np.ndarray:
    """Coupled weight decay: ±0 for all groups (the compiled kernels skip the term), non-zero, or both by group."""
    u = rng.random()
    if u < 0.4:
        return np.array([0.0 if rng.random() < 0.5 else -0.0])
    v = np.array(coef(rng, G, -4, -1))
    if u < 0.6 and v.shape[0] > 1:
        v[rng.random(v.shape[0]) < 0.5] = rng.choice([0.0, -0.0])
    return frozen(rng, v)


def momentum_params(rng, G: int, fv: int, fw: int) -> MomentumParams:
    return MomentumParams(random_h(rng, G), coef(rng, G, -4, -0.5), coef(rng, G, -3, 0), lam_of(rng, G), fv, fw)


def adam_params(rng, G: int, fm: int, fs: int, fw: int) -> AdamParams:
    e = lambda: 0.5 + 0.5 * rng.random(G)  # noqa: E731 - group scales in (1/2, 1]
    return AdamParams(
        h1=random_h(rng, G), h2=random_h(rng, G), hw=random_h(rng, G),
        c1=coef(rng, G, -1.5, -0.5, signed=False), c2=coef(rng, G, -3.5, -2.5, signed=False), lam=lam_of(rng, G),
        am=e() * 2.0**-fm, as_=e() * 2.0**-fs, sb=np.sqrt(0.05 + 0.95 * rng.random(G)),
        eps=coef(rng, G, -9, -6, signed=False), cu=coef(rng, G, -4, -1.5), ws=e() * 2.0**-fw, ps=e() * 2.0**-fw,
        frac_m=fm, frac_s=fs, frac_w=fw)


def random_fixed(rng, L: int, frac: int, scale: float) -> np.ndarray:
    return np.rint(rng.uniform(-scale, scale, L) * 2.0**frac).astype(np.int64)


def random_grad(rng, L: int, dtype) -> np.ndarray:
    g = rng.standard_normal(L) * 10.0 ** rng.uniform(-3, 0.5, L)
    g[rng.random(L) < 0.05] = 0.0
    g[rng.random(L) < 0.05] = -0.0
    return g.astype(dtype)


def make_pair(name, rng, L, groups, p_dtype, threads, op):
    offsets = random_offsets(rng, L, groups)
    fr = lambda: int(rng.integers(24, 63))  # noqa: E731
    if op == "momentum":
        fv, fw = fr(), fr()
        states = {"a": random_fixed(rng, L, fv, 0.3) if rng.random() < 0.5 else np.zeros(L, np.int64),
                  "w": random_fixed(rng, L, fw, 1.0)}
        fracs = (fv, fw)
    elif op == "adam":
        fm, fs, fw = fr(), int(rng.integers(40, 121)), fr()   # S has two limbs: up to ~124 fractional bits
        states = {"a": np.zeros(L, np.int64), "b": np.zeros(L, np.int64), "c": np.zeros(L, np.int64),
                  "w": random_fixed(rng, L, fw, 1.0)}
        fracs = (fm, fs, fw)
    else:
        states = {"a": rng.integers(-2**63, 2**63 - 1, size=L, dtype=np.int64, endpoint=True)}
        fracs = ()
    return Pair(name, L, offsets, states, p_dtype, threads), offsets.shape[0] - 1, fracs


def run_round_trip(name, seed, L, groups, threads, op, steps=5):
    """Forward steps (state and position fused or split), then the full reverse; identical after every op."""
    rng = np.random.default_rng(seed)
    g_dtype = [np.float32, np.float64][rng.integers(2)]
    p_dtype = [np.float32, np.float64, None][rng.integers(3)]
    pair, G, fracs = make_pair(name, rng, L, groups, p_dtype, threads, op)
    done = []
    w_tape = bool(rng.integers(2))
    for _ in range(steps):
        if op == "shift":
            h = random_h(rng, G)
            assert pair.run("shift", h, True)
            done.append(h)
            continue
        g = random_grad(rng, L, g_dtype)
        prm = momentum_params(rng, G, *fracs) if op == "momentum" else adam_params(rng, G, *fracs)
        kw = {} if op == "momentum" else {"w_tape": w_tape}
        fused = bool(rng.integers(2))
        if fused:
            ok = pair.run(op, g, prm, True, True, True, **kw)
        else:
            ok = pair.run(op, g, prm, True, True, False, **kw)
            if ok and not pair.run(op, None, prm, True, False, True, **kw):
                pair.run(op, g, prm, False, True, False, **kw)  # take the half step back
                ok = False
        if not ok:
            break
        done.append((g, prm, kw))
    assert pair.sut.tapes["a"].depth == pair.ref.tapes["a"].depth == len(done)   # h = 0 steps count too
    for item in reversed(done):
        if op == "shift":
            assert pair.run("shift", item, False)
            continue
        g, prm, kw = item
        if rng.integers(2):
            assert pair.run(op, g, prm, False, True, True, **kw)
        else:
            assert pair.run(op, None, prm, False, False, True, **kw)
            assert pair.run(op, g, prm, False, True, False, **kw)
    end = pair.sut.snapshot()
    assert {k: v for k, v in end.items() if k != "P"} == {k: v for k, v in pair.start.items() if k != "P"}
    assert pair.sut.at_start() and pair.ref.at_start()
    return len(done)


# --- round trips: random lanes, groups and parameters ---------------------------------------------------------
@pytest.mark.parametrize("op", ["shift", "momentum", "adam"])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("groups", ["one", "some", "lane"])
@pytest.mark.parametrize("L", [1, 7, BIG])
def test_round_trip_matches_reference(backend, L, groups, threads, op):
    if backend == "torch" and (threads > 1 or (L == BIG and groups != "some")):
        pytest.skip("torch: the kernels' thread count does not apply; large cases: one grouping is enough")
    seed = zlib.crc32(repr((backend, L, groups, threads, op)).encode())
    for k in range(3 if L < 100 else 1):
        run_round_trip(backend, seed + k, L, groups, threads, op)


@HYP
@given(seed=hst.integers(0, 2**32 - 1), L=hst.integers(1, 40), groups=hst.sampled_from(["one", "some", "lane"]),
       op=hst.sampled_from(["shift", "momentum", "adam"]), threads=hst.sampled_from([1, 2]))
def test_property_matches_reference(backend, seed, L, groups, op, threads):
    run_round_trip(backend, seed, L, groups, threads, op, steps=6)


# --- errors: planted at late lanes of later chunks --------------------------------------------------------------
LANE1 = 2 * CHUNK - 20          # late in chunk 1: the lowest failing lane
LANE2 = 2 * CHUNK + 50          # chunk 2 fails too (another error), at a higher lane
ERR_OFFSETS = np.array([0, 5000, CHUNK + 100, 2 * CHUNK - 10, BIG], dtype=np.int64)
ERROR_CASES = [("shift", "unshift"), ("momentum", "nan"), ("momentum", "term"), ("momentum", "add"),
               ("momentum", "add_position"), ("momentum", "unshift"), ("adam", "inf"), ("adam", "term"),
               ("adam", "term_s"), ("adam", "add"), ("adam", "unshift_m"), ("adam", "unshift_s"),
               ("adam", "unshift_w")]


def set_lane(sim: Sim, key: str, lane: int, value: int) -> None:
    a = sim.get(sim.x[key])
    a[lane] = value          # a view: NumPy arrays, or the torch tensor's memory


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("op,kind", ERROR_CASES)
def test_errors_match_reference_and_change_nothing(backend, op, kind, threads):
    if backend == "torch" and threads > 1:
        pytest.skip("the kernels' thread count does not apply to torch")
    rng = np.random.default_rng(zlib.crc32(repr((op, kind)).encode()))
    L, G = BIG, ERR_OFFSETS.shape[0] - 1
    fracs = (40, 40) if op == "momentum" else (40, 110, 40)
    if op == "shift":
        states = {"a": rng.integers(-2**40, 2**40, size=L, dtype=np.int64)}
    elif op == "momentum":
        states = {"a": random_fixed(rng, L, 40, 0.3), "w": random_fixed(rng, L, 40, 1.0)}
    else:
        states = {"a": np.zeros(L, np.int64), "b": np.zeros(L, np.int64), "c": np.zeros(L, np.int64),
                  "w": random_fixed(rng, L, 40, 1.0)}
    pair = Pair(backend, L, ERR_OFFSETS, states, np.float32, threads)

    def prm_of(h):
        if op == "momentum":
            p = momentum_params(rng, G, *fracs)
            p.h = h
            p.cv, p.cp = np.abs(p.cv), np.abs(p.cp)
            return p
        p = adam_params(rng, G, *fracs)
        p.h1, p.h2, p.hw = h, h.copy(), h.copy()
        p.cu = np.abs(p.cu)
        return p

    # forward steps that fill the tapes (rows and pending bits in every group)
    done = []
    for _ in range(3):
        h = rng.integers(3, 17, size=G).astype(np.int64)
        if op == "shift":
            assert pair.run("shift", h, True)
            done.append(h)
            continue
        g = random_grad(rng, L, np.float64)
        prm = prm_of(h)
        assert pair.run(op, g, prm, True, True, True)
        done.append((g, prm))
    g = random_grad(rng, L, np.float64)
    h = rng.integers(3, 17, size=G).astype(np.int64)
    prm = None if op == "shift" else prm_of(h)
    g[LANE2] = np.nan                      # a second failure, at a higher lane: never the one reported
    expect = OverflowError
    if kind in ("nan", "inf"):
        g[LANE1] = np.nan if kind == "nan" else -np.inf
        expect = revsgd.NonFiniteError
        call = (op, g, prm, True, True, True)
    elif kind in ("term", "term_s"):
        g[LANE1] = 1e300 if kind == "term" else 1e6   # term_s: c1·g fits, c2·g² does not
        call = (op, g, prm, True, True, True)
    elif kind == "add":
        if op == "momentum":
            prm.h = np.zeros(G, np.int64)
        else:
            prm.h1 = np.zeros(G, np.int64)
        for sim in (pair.ref, pair.sut):
            set_lane(sim, "a", LANE1, I64_MAX - 5)
        g[LANE1] = 1.0
        call = (op, g, prm, True, True, False)
    elif kind == "add_position":
        for sim in (pair.ref, pair.sut):
            set_lane(sim, "a", LANE1, 2**50)
            set_lane(sim, "w", LANE1, I64_MAX - 5)
        call = (op, None, prm, True, False, True)
    else:   # unshift: corrupt a state, then undo the last step (the half that unshifts it)
        key = {"unshift": "a", "unshift_m": "a", "unshift_s": "b", "unshift_w": "w"}[kind]
        if op == "shift":
            call = ("shift", done[-1], False)
        else:
            g, prm = done[-1]
            if key == "w":
                call = (op, None, prm, False, False, True)
            else:
                assert pair.run(op, None, prm, False, False, True)
                call = (op, g, prm, False, True, False)
        for sim in (pair.ref, pair.sut):
            set_lane(sim, key, LANE1, 2**62 + 12345)
            set_lane(sim, key, LANE2, -(2**62) - 999)
    before = pair.sut.snapshot()
    ok = pair.run(*call)
    assert not ok
    assert pair.sut.snapshot() == before
    err = outcome(lambda: getattr(pair.sut, call[0])(*call[1:]))
    names = {"momentum": ("velocity", "params"), "adam": ("exp_avg", "exp_avg_sq", "params"), "shift": ("X",)}[op]
    state = {"add_position": 1, "term_s": 1, "unshift_s": 1, "unshift_w": 2}.get(kind, 0)
    where = f"{names[state]} at lane {LANE1}"
    if kind in ("nan", "inf"):
        where = f"gradient holds NaN or inf at lane {LANE1}"
    assert err[0] is expect and where in err[1], err
    assert pair.sut.snapshot() == before


@pytest.mark.parametrize("name", ["cpp", "numba"])
def test_compiled_refuse_silent_conversion(name):
    be = _backend_or_skip(name)
    L = 5
    st = TapeStorage(L, None, be.arrays)
    V, W, P = np.zeros(L, np.int64), np.ones(L, np.int64), np.zeros(L, np.float32)
    prm = MomentumParams(np.ones(1, np.int64), np.ones(1), np.ones(1), np.zeros(1), 40, 40)
    snap = (V.tobytes(), W.tobytes(), P.tobytes(), st.to_bytes())
    with pytest.raises(TypeError):
        K.momentum(be, st, V, W, np.zeros(L, np.int32), P, prm, forward=True, state=True, position=True)
    with pytest.raises(TypeError):
        K.momentum(be, st, V, W, np.zeros(L), P.astype(np.float16), prm, forward=True, state=False, position=True)
    assert (V.tobytes(), W.tobytes(), P.tobytes(), st.to_bytes()) == snap
