"""How each method recovers, in the reverse sweep, the states around step t (docs/design.md §6).

A provider runs the forward pass and then, for t = T−1 … lo, ``before(t)`` puts w_t into the problem's ``P`` and
``after(t, g)`` returns ``pre`` = (w_t, state_t) as float64 tensors (exact: after undoing step t's state update with
g_t). ``post`` — (w_{t+1}, state_{t+1}) — is the previous iteration's ``pre`` (or the final state). Methods:

- ``exact``: fixed point with the tape; training runs backwards bit for bit (gradients fingerprinted per step).
- ``trajectory``: every (w_t, state_t) stored.       ``truncated``: only the last K stored; the sweep stops there.
- ``checkpoint``: states every k steps, segments recomputed.
- ``replay``: REPLAY's lazy k-ary tree (Engstrom et al. 2025): O(k·log_k T) stored states, O(T·log_k T) steps.
- ``drmad``: w_t on the straight line from w_0 to w_T (Fu et al. 2016), states from the line; approximate.
"""
from __future__ import annotations

from array import array
from typing import Callable, Optional

import torch

from ..kernels import TapeExhaustedError
from ..optim.base import ExactState, Plan, ReversibleOptimizer
from .buffers import KEY

State = tuple  # (w: float64 tensor, {name: float64 tensor})


class ReversalError(RuntimeError):
    """The reverse pass did not retrace the forward pass bit for bit; no hypergradient is returned."""


REVERSAL_HINT = ("The training loss must be a deterministic, pure function of (params, hypers, t): the same "
                 "minibatch for step t in both passes (derive it from a seed and t, e.g. revsgd.StepSampler, not "
                 "from a global RNG or an iterator), randomness such as dropout seeded by t (revsgd seeds torch's "
                 "RNG per step unless seed=None), and the same thread count in both passes (revsgd pins "
                 "torch's thread count for the run; do not change it from the loss).")


class _Stepper:
    """Float64 steps of the optimiser at the problem's gradients (shared by the stored-state methods)."""

    def __init__(self, opt: ReversibleOptimizer, prob, hypers_at: Callable):
        self.opt, self.prob, self.hypers_at = opt, prob, hypers_at

    def step(self, t: int, s: State) -> State:
        w, st = s
        self.prob.set_params(w)
        g = self.prob.grad(t).to(torch.float64)
        w1, st1 = self.opt.float_step(w, st, g, self.hypers_at(t), t)
        if KEY in st:
            st1 = {**st1, KEY: self.prob.buffers.float_step(st[KEY], self.prob.aux)}
        return w1, st1


class Provider:
    lo = 0
    stats: dict

    def forward(self, T: int, tick) -> State:
        raise NotImplementedError

    def before(self, t: int) -> None:
        raise NotImplementedError

    def after(self, t: int, g: torch.Tensor) -> State:
        raise NotImplementedError

    def final(self) -> State:
        """(w_T, state_T) for the sweep's first step."""
        return self.sT

    def finish(self) -> None:
        pass


class Exact(Provider):
    """Fixed point with the tape; the reverse pass runs training backwards bit for bit."""

    def __init__(self, opt: ReversibleOptimizer, prob, plan: Plan, w0, state0, backend,
                 make_state: Optional[Callable] = None, storage: Optional[dict] = None):
        self.opt, self.prob, self.plan = opt, prob, plan
        self.ex: ExactState = (make_state(opt, w0, prob.P.detach(), plan, backend, state0) if make_state is not None
                               else opt.exact_init(w0, prob.P.detach(), plan, backend, state0, **(storage or {})))
        self.stats = {"backend": self.ex.be.name, "frac_bits": dict(opt.frac)}
        self._fp: Optional[array] = None      # step t's gradient fingerprint (int64 words, 8 bytes a step)
        self._bufs: Optional[list] = None
        self.exb = None if prob.buffers is None else prob.buffers.exact(backend)

    def _fingerprint(self, g) -> int:
        fp = self.prob.fingerprint(g)
        return int(fp if self.exb is None else fp + 3 * self.prob.fingerprint(self.prob.aux))

    def _floats(self, t: int, out: Optional[tuple] = None, reads: Optional[tuple] = None) -> State:
        w, st = self.opt.exact_floats(self.ex, t, self.plan, out, reads)
        if self.exb is not None:
            st[KEY] = self.exb.value(t)
        return w, st

    def _probe(self) -> None:
        """Step 0's gradient twice, through the forward's path and the reverse's (with graph): a loss that draws
        unseeded randomness fails here, in seconds, instead of after the whole forward pass."""
        g1 = self.prob.grad(0).clone()      # grad_vjp may write its gradient into the same buffer
        if not bool(torch.isfinite(g1).all()):
            from ..core.fixed import NonFiniteError
            raise NonFiniteError("at step 0: the gradient of the training loss holds NaN or inf")
        u1 = self.prob.aux
        g2, _ = self.prob.grad_vjp(0)
        same_u = u1 is None or torch.equal(u1, self.prob.aux)
        if not (torch.equal(g1.view(-1), g2.detach().view(-1)) and same_u):
            raise ReversalError("the training loss gave two different gradients for step 0 with the same params: it "
                                "is not deterministic (most likely unseeded randomness — dropout, torch.rand*, a "
                                "shuffling iterator — or a change of thread count). " + REVERSAL_HINT)

    def forward(self, T: int, tick) -> State:
        self.T = T
        self.prob.set_params(self.ex.float_params())
        self._probe()
        fp = array("q")
        for t in range(T):
            g = self.prob.grad(t)
            fp.append(self._fingerprint(g))
            try:
                if self.exb is not None:
                    self.exb.step(self.prob.aux, t)
                try:
                    self.opt.exact_step(self.ex, g, t, self.plan)
                except Exception:
                    if self.exb is not None:
                        self.exb.undo(self.prob.aux, t)
                    raise
            except Exception as e:
                _at_step(e, t)
                raise
            self.ex.after_position()
            tick()
        self._fp = fp
        self.stats.update(tape_bytes=self.ex.tape_bytes() + (self.exb.nbytes if self.exb else 0),
                          info_bits=self.ex.info_bits() + (self.exb.info_bits if self.exb else 0))
        return self._floats(T)

    def _undo(self, t: int, f, *args) -> None:
        try:
            f(*args)
        except (TapeExhaustedError, OverflowError, ValueError) as e:
            raise ReversalError(f"reversal failed at step {t}: {e}. {REVERSAL_HINT}") from e

    def before(self, t: int) -> None:
        self._undo(t, self.opt.exact_undo_position, self.ex, t, self.plan)
        self.ex.after_position()

    def after(self, t: int, g: torch.Tensor) -> State:
        if self._fingerprint(g) != self._fp[t]:
            raise ReversalError(f"step {t}'s gradient differs between the forward and the reverse pass (same "
                                f"params, different bits). " + REVERSAL_HINT)
        self._undo(t, self.opt.exact_undo_state, self.ex, g, t, self.plan)
        if self.exb is not None:
            self._undo(t, self.exb.undo, self.prob.aux, t)
        return self._floats(t, self._buffers(t), self.opt.adjoint_reads)

    def final(self) -> State:
        return self._floats(self.T, self._buffers(self.T), self.opt.adjoint_reads)

    def _buffers(self, t: int) -> tuple:
        """Float64 buffers for step t's (w, states): two sets, alternating by step, since the reverse sweep holds
        one step's values (post) while it reads the next (pre); nothing keeps them longer."""
        if self._bufs is None:
            L = self.ex.W.shape[0]
            mk = lambda: torch.empty(L, dtype=torch.float64, device=self.ex.device)  # noqa: E731
            reads = self.opt.adjoint_reads
            need = (lambda k: reads is None or k in reads)   # noqa: E731
            self._bufs = [(mk() if need("params") else None, {k: mk() for k in self.opt.state_names if need(k)})
                          for _ in range(2)]
        return self._bufs[t % 2]

    def finish(self) -> None:
        ok, bad = self.ex.at_start()
        if self.exb is not None and not self.exb.at_start():
            ok, bad = False, bad + ["running statistics"]
        if not ok:
            raise ReversalError(f"the reversed trajectory does not return to the start ({', '.join(bad)} differ). "
                                + REVERSAL_HINT)


def _at_step(e: Exception, t: int) -> None:
    if e.args and isinstance(e.args[0], str) and " at step " not in e.args[0]:
        e.args = (f"at step {t}: {e.args[0]}",) + e.args[1:]


class _Float(Provider):
    """Float64 forward pass; subclasses keep what they need of each (t, state_t), t = 0 … T."""

    def __init__(self, stepper: _Stepper, s0: State):
        self.stepper, self.s0 = stepper, s0
        self.stats = {}

    def keep(self, t: int, s: State) -> None:
        pass

    def forward(self, T: int, tick) -> State:
        self.T = T
        s = self.s0
        for t in range(T):
            self.keep(t, s)
            s = self.stepper.step(t, s)
            tick()
        self.keep(T, s)
        self.sT = s
        return s

    def _pre(self, t: int) -> State:
        raise NotImplementedError

    def before(self, t: int) -> None:
        self.stepper.prob.set_params(self._pre(t)[0])

    def after(self, t: int, g) -> State:
        return self._pre(t)


def _nbytes(s: State) -> int:
    return s[0].numel() * 8 * (1 + len(s[1]))


class Trajectory(_Float):
    """Every (w_t, state_t) stored; memory falls as the sweep goes back."""

    def keep(self, t, s):
        if t == 0:
            self.S = {}
        self.S[t] = s

    def forward(self, T, tick):
        out = super().forward(T, tick)
        self.stats["storage_bytes"] = len(self.S) * _nbytes(self.s0)
        return out

    def _pre(self, t):
        self.S.pop(t + 1, None)
        return self.S[t]


class Truncated(Trajectory):
    """Only the last K states kept; the sweep stops K steps before the end."""

    def __init__(self, stepper, s0, K: int):
        super().__init__(stepper, s0)
        self.K = K

    def keep(self, t, s):
        if t == 0:
            self.S = {}
        if t >= self.T - self.K:
            self.S[t] = s

    @property
    def lo(self) -> int:
        return max(self.T - self.K, 0)


class Checkpoint(_Float):
    """States every k steps; each segment recomputed (bit for bit) when the sweep reaches it."""

    def __init__(self, stepper, s0, k: int):
        super().__init__(stepper, s0)
        self.k = k

    def keep(self, t, s):
        if t == 0:
            self.ckpt, self.seg_lo, self.recompute_steps = {}, None, 0
        if t % self.k == 0 and t < self.T:
            self.ckpt[t] = s

    def forward(self, T, tick):
        out = super().forward(T, tick)
        self.stats["storage_bytes"] = (len(self.ckpt) + min(self.k, T) + 1) * _nbytes(self.s0)
        return out

    def _pre(self, t):
        lo = (t // self.k) * self.k
        if self.seg_lo != lo:
            s = self.ckpt[lo]
            self.seg = [s]
            for u in range(lo, min(lo + self.k, self.T) - 1):
                s = self.stepper.step(u, s)
                self.seg.append(s)
                self.recompute_steps += 1
            self.seg_lo = lo
        self.stats["recompute_steps"] = self.recompute_steps
        return self.seg[t - lo]


class Replay(_Float):
    """REPLAY's lazy k-ary tree: the states of [lo, hi) in reverse order from the state at lo, by splitting the range
    into k parts, stepping forward once to the parts' first states, and recursing into the parts last to first.
    At most k states per level are alive (O(k·log_k T)); every level re-runs its range once (O(T·log_k T) steps)."""

    def __init__(self, stepper, s0, k: int):
        super().__init__(stepper, s0)
        self.k = k

    def forward(self, T, tick):
        self.T = T
        s = self.s0
        for t in range(T):
            s = self.stepper.step(t, s)
            tick()
        self.sT = s
        self.recompute_steps, self.live, self.peak = 0, 0, 0
        self._gen = self._states(self.s0, 0, T)
        self._cur = (None, None)
        return s

    def _states(self, s: State, lo: int, hi: int):
        if hi - lo == 1:
            yield lo, s
            return
        cuts = sorted({lo + (hi - lo) * j // self.k for j in range(self.k)} | {hi})
        starts = [s]
        for a, b in zip(cuts[:-2], cuts[1:-1]):
            for u in range(a, b):
                s = self.stepper.step(u, s)
                self.recompute_steps += 1
            starts.append(s)
        self.live += len(starts)
        self.peak = max(self.peak, self.live)
        for j in range(len(starts) - 1, -1, -1):
            yield from self._states(starts[j], cuts[j], cuts[j + 1])
            starts.pop()
            self.live -= 1

    def _pre(self, t):
        if self._cur[0] != t:
            self._cur = next(self._gen)
            assert self._cur[0] == t, "the sweep visits steps in descending order"
            self.stats.update(recompute_steps=self.recompute_steps, peak_states=self.peak,
                              storage_bytes=self.peak * _nbytes(self.s0))
        return self._cur[1]


class DrMAD(_Float):
    """Fu et al. 2016: w_t = w_0 + (t/T)(w_T − w_0); the optimiser states from that line. Nothing stored."""

    def __init__(self, stepper, s0, drmad_state: Callable):
        super().__init__(stepper, s0)
        self.drmad_state = drmad_state

    def _w(self, t):
        w0, wT = self.s0[0], self.sT[0]
        return w0 + (t / self.T) * (wT - w0)

    def _pre(self, t):
        if t == 0:
            return self.s0
        return self._w(t), self.drmad_state(t - 1, self._w(t - 1), self._w(t))
