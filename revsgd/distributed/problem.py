"""Data parallelism for the engine: a :class:`~revsgd.engine.problem.Problem` whose gradient is the exact sum over
ranks of every rank's gradient on its shard of the minibatch (docs/distributed.md).

Forward (and the reverse pass's recomputation of g_t): each rank quantises its local gradient to int64 fixed point,
``q_r = rint(g_r · 2^F)``, and the integers are all-reduced (SUM). Integer addition is associative, so the sum — and
``g = flt(Σ_r q_r) · 2^-F`` (divided by the world size for ``reduce="mean"``) — is the same bits on every rank, for
every reduction order and topology; every rank applies the identical integer update and can reverse it bit for bit,
and the exact method's per-step fingerprint sees the same g in both passes.

Range: ``|g_r| < 2^(62 − F − ⌈log2 W⌉)`` on every rank (so that the sum of W values cannot leave int64); a value
outside raises OverflowError on every rank, a NaN/inf NonFiniteError, before anything changes. ``grad_frac_bits="auto"``
picks F per step from the largest |g| over ranks (one int in the error check that precedes the sum), so the sum
never overflows and keeps ~62 − log2 W significant bits of the largest entry.

Reverse: the Hessian-vector product and θ-part of the global gradient are the sums of the ranks' (times 1/W for
``"mean"``), all-reduced in float64 — float sums whose last bits may depend on the world size (the adjoint is a
float computation anyway; the reversal itself stays exact).
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch

from ..core.fixed import NonFiniteError, check_frac_bits
from ..engine.problem import Problem
from .comm import Comm

#: Fractional bits of the gradient sum by default: 48 leaves |g| < 2^14 = 16384 on one rank (2^13 on 2, 2^12 on
#: 3–4, …) with a grid of 2^-48 ≈ 3.6e-15 — exact for every float32 gradient entry above 2^-25 ≈ 3e-8.
DEFAULT_GRAD_FRAC_BITS = 48
REDUCTIONS = ("mean", "sum")
_AUTO_MAX = 1000          # largest F chosen by "auto" (keeps 2^F finite)
_NO_VALUE = -(2**20)      # "auto": the exponent of an all-zero gradient


def headroom(world: int) -> int:
    """⌈log2 W⌉: bits the sum of W per-rank values may need above one value."""
    return max(0, int(world - 1).bit_length())


def grad_range(frac_bits: int, world: int) -> float:
    """The per-rank gradient bound: |g_r| < 2^(62 − frac_bits − ⌈log2 W⌉)."""
    return math.ldexp(1.0, 62 - frac_bits - headroom(world))


def quantise(g: torch.Tensor, frac_bits: int, world: int, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``rint(g · 2^F)`` as int64 (ties to even), after checking the range (see :func:`grad_range`); raises
    NonFiniteError / OverflowError naming the first bad lane (and writes nothing). ``out``: an int64 tensor of g's
    length to write into."""
    g = g.detach().reshape(-1)
    y = g.to(torch.float64) * math.ldexp(1.0, frac_bits)
    lim = math.ldexp(1.0, 62 - headroom(world))
    if not bool((y.abs() < lim).all()):       # NaN and ±inf fail too
        i = int(torch.nonzero(~(y.abs() < lim))[0, 0])
        if not math.isfinite(float(g[i])):
            raise NonFiniteError(f"the gradient holds a non-finite value at lane {i}; nothing was changed")
        hi = grad_range(frac_bits, world)
        raise OverflowError(f"gradient[{i}] = {float(g[i])!r} leaves the range (-{hi:g}, {hi:g}) of the exact "
                            f"gradient sum over {world} rank(s) with grad_frac_bits={frac_bits}; nothing was changed "
                            f"(use fewer grad_frac_bits, or grad_frac_bits='auto')")
    y.round_()                                # ties to even; integral values below 2^62 convert exactly
    if out is None:
        return y.to(torch.int64)
    out.copy_(y)
    return out


def auto_frac_bits(exponent: int, world: int) -> int:
    """F for "auto": the largest F with max|g| · 2^F < 2^(62 − ⌈log2 W⌉), given max|g| < 2^exponent."""
    return min(_AUTO_MAX, 62 - headroom(world) - exponent)


def _exponent(g: torch.Tensor) -> int:
    """The smallest e with max|g| < 2^e (frexp's exponent); _NO_VALUE for an all-zero or empty g."""
    if g.numel() == 0:
        return _NO_VALUE
    m = float(g.detach().abs().max())
    if m == 0.0:
        return _NO_VALUE
    if not math.isfinite(m):
        raise NonFiniteError("the gradient holds a non-finite value; nothing was changed")
    return math.frexp(m)[1]


class DistributedProblem(Problem):
    """Wraps this rank's :class:`~revsgd.engine.problem.Problem` (its losses see this rank's shard of each minibatch;
    e.g. a :class:`~revsgd.frontend.problem.TorchProblem`) into the problem of the global minibatch.

    Args:
        inner: this rank's problem; its ``P`` (the full params, on every rank) is shared.
        comm: a :class:`~revsgd.distributed.comm.Comm` (or pass ``group=``).
        grad_frac_bits: fractional bits of the integer gradient sum (default 48; see the module docstring), or
            ``"auto"``.
        reduce: ``"mean"`` (default): g = (1/W)·Σ_r g_r — right when every rank's loss is a mean over an equal-sized
            shard (then the result is the gradient of the mean over the global minibatch; terms every rank adds, like
            a regulariser, count once). ``"sum"``: g = Σ_r g_r — for losses already scaled to the global minibatch
            (e.g. sum over the shard / global batch size, the way to handle unequal shards).
        val_reduce: None (default): every rank evaluates the same validation loss itself (no communication);
            ``"mean"`` / ``"sum"``: each rank's ``val`` is a part (e.g. its shard of the validation set) and f,
            ∂f/∂w, ∂f/∂θ are all-reduced (float).
        fuse_checks: fuse the error check into the sums (one collective instead of two). Safe with the exact method
            and :class:`~revsgd.distributed.DistributedExactState` (whose collectives check after every place a
            rank can fail on its own); pass False for other drivers.
    """

    def __init__(self, inner: Problem, comm: Optional[Comm] = None, *, group=None,
                 grad_frac_bits: Union[int, str] = DEFAULT_GRAD_FRAC_BITS, reduce: str = "mean",
                 val_reduce: Optional[str] = None, fuse_checks: bool = True):
        if comm is None:
            comm = Comm(group, inner.P.device if inner.P.device.type == "cuda" else None)
        elif group is not None:
            raise TypeError("give comm= or group=, not both")
        if isinstance(grad_frac_bits, str):
            if grad_frac_bits != "auto":
                raise ValueError(f"grad_frac_bits must be an int in [0, 62] or 'auto', got {grad_frac_bits!r}")
        else:
            grad_frac_bits = check_frac_bits(grad_frac_bits, name="grad_frac_bits")
        if reduce not in REDUCTIONS:
            raise ValueError(f"reduce must be one of {REDUCTIONS}, got {reduce!r}")
        if val_reduce is not None and val_reduce not in REDUCTIONS:
            raise ValueError(f"val_reduce must be None or one of {REDUCTIONS}, got {val_reduce!r}")
        self.inner, self.comm = inner, comm
        self.grad_frac_bits, self.reduce, self.val_reduce = grad_frac_bits, reduce, val_reduce
        self.fuse_checks = bool(fuse_checks)
        self.P = inner.P
        self.num_hypers = inner.num_hypers
        self._hz = inner.hyper_zeros()
        self.frac_used: dict = {}     # step → F of its gradient sum ("auto": varies per step)
        self._bufs: dict = {}

    # --- plumbing ----------------------------------------------------------------------------------------------
    def set_params(self, w: torch.Tensor) -> None:
        self.inner.set_params(w)

    def hyper_zeros(self) -> list:
        return self.inner.hyper_zeros()

    @property
    def world(self) -> int:
        return self.comm.world

    def _scale(self) -> float:
        return 1.0 / self.comm.world if self.reduce == "mean" else 1.0

    # --- the exact gradient sum --------------------------------------------------------------------------------
    def _buffer(self, n: int, dtype: torch.dtype) -> torch.Tensor:
        """A reusable send buffer of n + 1 values (the last one: the fused error flag)."""
        key = (n, dtype)
        b = self._bufs.get(key)
        if b is None:
            b = self._bufs[key] = torch.empty(n + 1, dtype=dtype, device=self.P.device)
        return b

    def _sum_checked(self, buf: torch.Tensor, err, what: str) -> torch.Tensor:
        if not self.fuse_checks:
            self.comm.check(err)
            err = None
        return self.comm.sum_checked(buf, err, what)

    def _sum(self, t: int, local) -> tuple:
        """Run ``local()`` (→ (g_r, extra)), quantise, and sum the integers over ranks (the error check fused in, or
        before it for "auto", whose check also finds the largest exponent). Returns (g, extra)."""
        err, g, extra = None, None, None
        L = self.num_lanes
        what = f"gradient sum (int64, {L} lanes)"
        buf = self._buffer(L, torch.int64)
        if self.grad_frac_bits == "auto":
            payload = 0
            try:
                g, extra = local()
                payload = _exponent(g)
            except Exception as e:
                err = e
            F = auto_frac_bits(self.comm.check(err, payload), self.comm.world)
            quantise(g, F, self.comm.world, out=buf[:L])      # cannot fail: max|g| < 2^e, no NaN (checked)
        else:
            F = self.grad_frac_bits
            try:
                g, extra = local()
                quantise(g, F, self.comm.world, out=buf[:L])
            except Exception as e:
                err = e
        S = self._sum_checked(buf, err, what)
        self.frac_used[t] = F
        g = S.to(torch.float64).mul_(math.ldexp(1.0, -F))
        if self.reduce == "mean" and self.comm.world > 1:
            g.div_(self.comm.world)
        return g, extra

    def grad(self, t: int) -> torch.Tensor:
        self.comm.at(t, "forward")
        g, _ = self._sum(t, lambda: (self.inner.grad(t), None))
        return g

    def grad_vjp(self, t: int):
        self.comm.at(t, "reverse")
        g, f = self._sum(t, lambda: self.inner.grad_vjp(t))
        c = self._scale()
        n = self._packed_size()

        def vjp(u: torch.Tensor, du: Optional[torch.Tensor] = None, acc: Optional[torch.Tensor] = None):
            err = None
            buf = self._buffer(n, torch.float64)
            try:
                if du is not None:
                    raise ValueError("running statistics (BatchNorm buffers) are not supported by revsgd.distributed")
                hu, th = f(u)
                self._pack(hu, th, out=buf[:n])
            except Exception as e:
                err = e
            S = self._sum_checked(buf, err, f"Hessian-vector product (float64, {n} values)").clone()
            if c != 1.0:
                S.mul_(c)
            hu, th = self._unpack(S)
            return (hu if acc is None else acc.add_(hu)), th
        return g, vjp

    # --- validation --------------------------------------------------------------------------------------------
    def val(self):
        self.comm.at(None, "validation")
        err, out, buf = None, None, None
        try:
            out = self.inner.val()
            if self.val_reduce is not None:
                f, dw, th = out
                buf = torch.empty(1 + self._packed_size(), dtype=torch.float64, device=self.P.device)
                buf[0] = float(f)
                self._pack(dw, th, out=buf[1:])
        except Exception as e:
            err = e
        self.comm.check(err)
        if self.val_reduce is None:
            return out
        self.comm.all_reduce(buf, "validation loss and gradient (float64)", checked=True)
        if self.val_reduce == "mean":
            buf = buf / self.comm.world
        dw, th = self._unpack(buf[1:])
        return float(buf[0]), dw, th

    # --- packing the float parts -------------------------------------------------------------------------------
    def _packed_size(self) -> int:
        return self.num_lanes + sum(z.numel() for z in self._hz if z is not None)

    def _pack(self, hu: torch.Tensor, th: list, out: torch.Tensor) -> torch.Tensor:
        """[hu, θ-parts of the float hypers (zeros where None)] into ``out`` (float64)."""
        if len(th) != len(self._hz):
            raise ValueError(f"the problem returned {len(th)} hyper parts, expected {len(self._hz)}")
        L = self.num_lanes
        out[:L].copy_(hu.detach().reshape(-1))
        off = L
        for z, x in zip(self._hz, th):
            if z is None:
                continue
            k = z.numel()
            if x is None:
                out[off:off + k].zero_()
            else:
                out[off:off + k].copy_(x.detach().reshape(-1))
            off += k
        return out

    def _unpack(self, buf: torch.Tensor) -> tuple:
        L = self.num_lanes
        hu, off, th = buf[:L], L, []
        for z in self._hz:
            if z is None:
                th.append(None)
                continue
            n = z.numel()
            th.append(buf[off:off + n].reshape(z.shape).to(z.device))
            off += n
        return hu, th


def shard(x, rank: Optional[int] = None, world: Optional[int] = None, *, group=None, equal: bool = True):
    """This rank's contiguous part of ``x`` (a tensor, array or sequence of a global minibatch, along its first
    dimension): rows [⌊r·n/W⌋, ⌊(r+1)·n/W⌋). With ``equal`` (default) n must be divisible by W, so that every
    rank's loss — a mean over its shard — makes ``reduce="mean"`` the mean over the global minibatch."""
    import torch.distributed as dist
    if rank is None or world is None:
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("shard() needs rank and world, or an initialised torch.distributed")
        rank = dist.get_rank(group) if rank is None else rank
        world = dist.get_world_size(group) if world is None else world
    n = len(x)
    if equal and n % world:
        raise ValueError(f"a global minibatch of {n} rows does not split equally over {world} ranks; make it "
                         f"divisible, or pass equal=False and use reduce='sum' with a loss scaled by 1/{n}")
    return x[rank * n // world:(rank + 1) * n // world]

