"""``revsgd verify``: a self-test of exact reversal on this machine. Returns a list of (check, ok, detail)."""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from .. import kernels
from ..engine import ReversalError
from ..frontend.functional import hypergrad
from ..kernels.tape import Tape
from ..optim.exact_momentum import ExactMomentum


def _momentum_run(backend: str, threads: int, L: int, T: int, seed: int = 0):
    """A random heavy-ball run forward and back on ``backend``; (states and tape bytes at T, back at start)."""
    kernels.set_num_threads(threads)
    rng = np.random.default_rng(seed)
    w0 = rng.normal(size=L)
    groups = [0, L // 3, L]
    m = ExactMomentum(w0, groups=groups, backend=backend)
    gs = [rng.normal(size=L) for _ in range(T)]
    lrs = [rng.random(2) * 0.1 for _ in range(T)]
    moms = [rng.uniform(0.3, 1.0, 2) for _ in range(T)]
    for t in range(T):
        m.step(gs[t], lrs[t], moms[t])
    snap = (m.fixed_params, m.fixed_velocity, m._tape.to_bytes())
    for t in reversed(range(T)):
        m.unstep_position(lrs[t])
        m.unstep_velocity(gs[t], moms[t])
    back = (np.array_equal(m.fixed_params, ExactMomentum(w0).fixed_params) and not m.fixed_velocity.any()
            and m.at_start())
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
    L, T = 40_000, 12
    ref = None
    for be in kernels.BACKENDS:
        if be == "torch":
            continue
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
    kernels.set_num_threads(1)

    def tape_limit():
        rng = np.random.default_rng(1)
        X = rng.integers(-2**40, 2**40, 5000)
        tp = Tape(X.size)
        hs = rng.integers(0, 17, 200)
        for h in hs:
            tp.shift(X, int(h))
        return tp.info_bits == X.size * int(hs.sum()), f"bits held = {tp.info_bits} = lanes × Σ shifts"
    check("tape holds exactly the shifted-out bits", tape_limit)

    train_loss, val_loss, p0, hyp = _tiny_problem()
    Tm = 30
    lr = torch.linspace(0.02, 0.1, Tm, dtype=torch.float64)
    schedules = {"sgd": dict(lr=lr, momentum=0.9), "adam": dict(lr=lr * 0.1), "adamw": dict(lr=lr * 0.1),
                 "heavyball": dict(lr=lr, momentum=torch.linspace(0.5, 0.95, Tm, dtype=torch.float64))}

    def flat(r):
        return torch.cat([v.reshape(-1).double() for k, v in sorted(r.grads.items()) if k != "params0"]
                         + [v.reshape(-1) for v in r.grads["params0"].values()])

    for opt, kw in schedules.items():
        def vs_naive(opt=opt, kw=kw):
            e = hypergrad(train_loss, val_loss, p0, optimizer=opt, steps=Tm, hypers=hyp, threads=1, **kw)
            n = hypergrad(train_loss, val_loss, p0, optimizer=opt, steps=Tm, hypers=hyp, threads=1, method="naive",
                          **kw)
            rel = float((flat(e) - flat(n)).norm() / flat(n).norm())
            return rel <= 1e-8, f"relative difference exact vs naive autograd = {rel:.2e} (float64, T={Tm})"
        check(f"{opt}: hypergradient equals naive autograd", vs_naive)

    def pinned():  # hypergrad raises ReversalError unless the reverse pass retraced the forward bit for bit
        before = torch.get_num_threads()
        outs = [hypergrad(train_loss, val_loss, p0, lr=lr, momentum=0.9, hypers=hyp, threads=th).grads["lr"]
                for th in (1, 2)]
        ok = all(bool(torch.isfinite(o).all()) for o in outs) and torch.get_num_threads() == before
        return ok, (f"reversal exact with torch pinned to 1 and to 2 threads (lr hypergradients differ by at most "
                    f"{float((outs[0] - outs[1]).abs().max()):.1e} between them); thread count restored")
    check("thread pinning", pinned)

    def detects():
        def noisy(p, h, t):
            return train_loss(p, h, t) * (1 + 1e-6 * torch.rand((), dtype=torch.float64))
        try:
            hypergrad(noisy, val_loss, p0, lr=lr, momentum=1.0, hypers=hyp, seed=None)
        except ReversalError as e:
            return True, f"a non-deterministic loss raises ReversalError, even at momentum 1 ({str(e)[:60]}…)"
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
