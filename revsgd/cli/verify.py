"""``revsgd verify``: a self-test of exact reversal on this machine. Returns a list of (check, ok, detail)."""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from .. import kernels
from ..engine import ReversalError
from ..core.tape import ExactMomentum, Tape
from ..core.tapeformat import CHUNK
from ..frontend.functional import hypergrad


def _momentum_run(backend: str, threads: int, L: int, T: int, seed: int = 0):
    kernels.set_num_threads(threads)
    rng = np.random.default_rng(seed)
    w0 = rng.normal(size=L)
    m = ExactMomentum(w0, backend=backend)
    gs = [rng.normal(size=L) for _ in range(T)]
    ns = [int(rng.integers(1, 65537)) if t % 2 else rng.integers(1, 65537, L) for t in range(T)]
    al = [0.05 if t % 3 else rng.random(L) * 0.1 for t in range(T)]
    for t in range(T):
        m.step(gs[t], al[t], ns[t])
    snap = (m.fixed_params, m.fixed_velocity, m.tape.to_bytes())
    for t in reversed(range(T)):
        m.unstep_position(al[t])
        m.unstep_velocity(gs[t], ns[t])
    back = (np.array_equal(m.fixed_params, ExactMomentum(w0).fixed_params)
            and not m.fixed_velocity.any() and m.tape.at_start())
    return snap, back


def _tiny_problem():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(48, 4, generator=g, dtype=torch.float64)
    Y = torch.randn(48, 2, generator=g, dtype=torch.float64)
    p0 = {"W": torch.randn(4, 6, generator=g, dtype=torch.float64) * 0.5,
          "V": torch.randn(6, 2, generator=g, dtype=torch.float64) * 0.5}

    def f(p, x):
        return torch.tanh(x @ p["W"]) @ p["V"]

    def train_loss(p, h, t):
        i = torch.arange(12) + 12 * (t % 4)
        return ((f(p, X[i]) - Y[i]) ** 2).mean() + h["l2"] * (p["W"] ** 2).sum()

    def val_loss(p, h):
        return ((f(p, X) - Y) ** 2).mean()
    return train_loss, val_loss, p0, {"l2": torch.tensor(1e-3, dtype=torch.float64)}


def run_checks(log: Callable[[str], None] = print) -> list:
    results = []

    def check(name, fn):
        try:
            ok, detail = fn()
        except Exception as e:  # a check that crashes has failed
            ok, detail = False, f"{type(e).__name__}: {e}"
        results.append((name, ok, detail))
        log(f"[{'PASS' if ok else 'FAIL'}] {name}: {detail}")

    log(f"backends available: {', '.join(kernels.BACKENDS)}")
    L, T = 2 * CHUNK + 37, 12
    ref = None
    for be in kernels.BACKENDS:
        for th in (1, 2):
            def one(be=be, th=th):
                nonlocal ref
                snap, back = _momentum_run(be, th, L, T)
                if ref is None:
                    ref = snap
                same = all(np.array_equal(a, b) if isinstance(a, np.ndarray) else a == b for a, b in zip(snap, ref))
                return back and same, (f"{L} lanes, {T} steps: reversed to the start bit for bit: {back}; state and "
                                       f"tape bytes identical to the first backend: {same}")
            check(f"exact momentum round trip, backend={be}, kernel threads={th}", one)
    kernels.set_num_threads(2)

    def tape_limit():
        rng = np.random.default_rng(1)
        X = rng.integers(-2**40, 2**40, 5000)
        tp = Tape(X.size)
        ns = rng.integers(20000, 65537, 200)
        for n in ns:
            tp.scale(X, int(n))
        limit = X.size * float(np.sum(-np.log2(ns / 65536)))
        ratio = tp.info_bits / limit
        return abs(ratio - 1) < 1e-3, f"info_bits / information limit = {ratio:.6f}"
    check("tape stores the information limit", tape_limit)

    train_loss, val_loss, p0, hyp = _tiny_problem()
    Tm = 30
    lr = torch.linspace(0.05, 0.2, Tm, dtype=torch.float64)
    mom = torch.linspace(0.5, 0.95, Tm, dtype=torch.float64)

    def vs_naive():
        e = hypergrad(train_loss, val_loss, p0, lr=lr, momentum=mom, hypers=hyp, method="exact", threads=1)
        n = hypergrad(train_loss, val_loss, p0, lr=lr, momentum=mom, hypers=hyp, method="naive", threads=1)
        flat = lambda r: torch.cat([r.grads["lr"], r.grads["momentum"], r.grads["l2"].reshape(1)]  # noqa: E731
                                   + [v.reshape(-1) for v in r.grads["params0"].values()])
        rel = float((flat(e) - flat(n)).norm() / flat(n).norm())
        return rel <= 1e-8, f"relative difference exact vs naive autograd = {rel:.2e} (float64, T={Tm})"
    check("hypergradient equals naive autograd", vs_naive)

    def pinned():  # hypergrad raises ReversalError unless the reverse pass retraced the forward bit for bit
        outs = [hypergrad(train_loss, val_loss, p0, lr=lr, momentum=mom, hypers=hyp, threads=th).grads["lr"]
                for th in (1, 2)]
        before = torch.get_num_threads()
        ok = all(bool(torch.isfinite(o).all()) for o in outs) and torch.get_num_threads() == before
        return ok, (f"reversal exact with torch pinned to 1 and to 2 threads (lr hypergradients differ by at most "
                    f"{float((outs[0] - outs[1]).abs().max()):.1e} between them); thread count restored")
    check("thread pinning", pinned)

    def detects():
        def noisy(p, h, t):
            return train_loss(p, h, t) * (1 + 1e-6 * torch.rand((), dtype=torch.float64))
        try:
            hypergrad(noisy, val_loss, p0, lr=lr, momentum=mom, hypers=hyp, threads=1)
        except ReversalError:
            return True, "a non-deterministic loss raises ReversalError"
        return False, "a non-deterministic loss was NOT detected"
    check("non-determinism is detected", detects)
    return results


def main() -> int:
    res = run_checks()
    bad = [r for r in res if not r[1]]
    print(f"{len(res) - len(bad)} passed, {len(bad)} failed")
    return 1 if bad else 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
