"""Collectives whose failures every rank agrees on (docs/distributed.md, "Failures").

Protocol. Every data collective of :mod:`revsgd.distributed` is preceded by an *error check*: a MAX all-reduce of
``[world − rank if this rank failed else 0, payload]``. Local work that can fail (the user's loss, quantisation,
a kernel on this rank's shard) runs *before* the check, never between a check and its data collective. A rank that
fails — or any exception that reaches :meth:`Comm.guard` — takes part in exactly one error check with its error, which
the other ranks, waiting in the check of their next collective, receive. The gradient sums and Hessian-vector
products fuse the check into their all-reduce (:meth:`Comm.sum_checked`: one more value, counting failed ranks): a
rank fails there inside the wrapper that knows the collective, and every place where a rank can fail outside such a
wrapper is followed by a generic check before the next fused collective.

Once a check saw a failure, every rank learns the failing ranks' exception type, message, step and phase (one
all-gather, on the failure path only) and raises the same :class:`DistributedError` — also an instance of the
original exception's type where that is one of the common ones, so ``except OverflowError`` and
``except revsgd.ReversalError`` keep working. Nobody hangs.

A collective that fails at the transport level — a peer crashed, or hung past the process group's timeout (the
``timeout`` of ``torch.distributed.init_process_group``) — raises :class:`CollectiveError` on this rank, naming this
rank, the collective, the step and the phase. The group is unusable afterwards.
"""
from __future__ import annotations

import contextlib
import traceback
from typing import Any, Optional

import torch
import torch.distributed as dist

from ..core.fixed import NonFiniteError
from ..core.tapeformat import TapeFormatError
from ..engine.methods import ReversalError
from ..kernels import TapeExhaustedError


_ALL_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class DistributedError(RuntimeError):
    """One rank failed; raised on every rank with the failing rank's error. ``rank`` (the lowest failing rank),
    ``failed_ranks`` (all ranks that failed at that point), ``step`` (None outside the steps), ``phase`` ("setup",
    "forward", "reverse", "validation", "finish"), ``kind`` (the original exception's class name) and ``detail``
    (its message)."""
    agreed = True
    failed_ranks: list = []

    def __init__(self, message: str = "", *, rank: Optional[int] = None, step: Optional[int] = None,
                 phase: Optional[str] = None, kind: Optional[str] = None, detail: Optional[str] = None):
        super().__init__(message)
        self.rank, self.step, self.phase, self.kind, self.detail = rank, step, phase, kind, detail


class CollectiveError(DistributedError):
    """A collective failed on this rank at the transport level (a peer crashed, hung past the timeout, or left).
    Not agreed (the other ranks may see their own CollectiveError); the process group cannot be used any more."""
    agreed = False


#: Exception types an agreed error also inherits from, most specific first (an error of another type is agreed as
#: a plain DistributedError; its type name is in the message and in ``kind``).
AGREED_TYPES = (ReversalError, TapeExhaustedError, NonFiniteError, TapeFormatError, OverflowError,
                ZeroDivisionError, ArithmeticError, KeyError, IndexError, ValueError, TypeError, NotImplementedError,
                AssertionError, RuntimeError)
_COMBINED: dict = {}
for _t in AGREED_TYPES:
    if _t is RuntimeError:   # DistributedError is one already
        _COMBINED[_t] = DistributedError
        continue
    _name = "Distributed" + _t.__name__
    _COMBINED[_t] = globals()[_name] = type(_name, (DistributedError, _t), {
        "__module__": __name__, "__qualname__": _name,
        "__doc__": f"A {_t.__name__} on one rank, raised on every rank (see :class:`DistributedError`)."})
del _t, _name


def _base_of(e: BaseException) -> Optional[type]:
    return next((t for t in AGREED_TYPES if isinstance(e, t)), None)


def _where(step: Optional[int], phase: str) -> str:
    return f"at step {step} ({phase})" if step is not None else f"({phase})"


class Comm:
    """A process group (``group=None``: the default one) with the error-check protocol, the current step and phase
    (for messages), and the few collectives :mod:`revsgd.distributed` uses. Needs ``init_process_group`` first."""

    def __init__(self, group: Any = None, device: Optional[torch.device] = None):
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("torch.distributed is not initialised: call torch.distributed.init_process_group "
                               "first (under torchrun: revsgd.distributed.init_from_env())")
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        if self.rank < 0:
            raise ValueError("this process is not a member of the given process group")
        self.backend = str(dist.get_backend(group))
        if device is None:
            device = (torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl"
                      else torch.device("cpu"))
        self.device = torch.device(device)
        self.step: Optional[int] = None
        self.phase = "setup"
        self.calls = 0
        self.lanes: Optional[tuple] = None    # the lane range this rank's exact state owns (named by errors)

    def at(self, step: Optional[int], phase: str) -> None:
        """Record where the run is (named by error messages)."""
        self.step, self.phase = step, phase

    def where(self) -> str:
        return _where(self.step, self.phase)

    # --- transport ---------------------------------------------------------------------------------------------
    def _call(self, what: str, fn, *args, **kwargs):
        self.calls += 1
        try:
            return fn(*args, **kwargs)
        except DistributedError:
            raise
        except Exception as e:
            raise CollectiveError(
                f"rank {self.rank} of {self.world}: the collective '{what}' {self.where()} failed: {e} -- another "
                f"rank crashed, left, or did not reach this collective within the process group's timeout (a hang "
                f"or a very slow step on that rank)", rank=self.rank, step=self.step, phase=self.phase,
                kind=type(e).__name__, detail=str(e)) from e

    # --- agreement ---------------------------------------------------------------------------------------------
    def check(self, error: Optional[BaseException] = None, payload: int = 0) -> int:
        """The error check: returns the MAX over ranks of ``payload`` when no rank failed; otherwise raises, on every
        rank, the lowest failing rank's error (see the module docstring)."""
        if self.world == 1:     # nothing to agree with: no collective
            if error is not None:
                self.agree(error)
            return int(payload)
        code = self.world - self.rank if error is not None else 0
        buf = torch.tensor([code, int(payload)], dtype=torch.int64, device=self.device)
        self._call("error check", dist.all_reduce, buf, op=dist.ReduceOp.MAX, group=self.group)
        code, top = (int(v) for v in buf.tolist())
        if code == 0:
            return top
        self.agree(error)
        raise AssertionError("unreachable")   # pragma: no cover

    def sum_checked(self, buf: torch.Tensor, error: Optional[BaseException], what: str) -> torch.Tensor:
        """SUM over ranks of ``buf[:-1]`` (filled by the caller) with the error check fused in: one all-reduce, the
        last value counting the ranks that failed (``error`` set there; what ``buf`` holds is then ignored). Only for
        a collective that every rank reaches, failed or not, through the same wrapper (which knows the size): the
        generic :meth:`check` is for failures anywhere else. Returns a view of ``buf`` (valid until its reuse)."""
        n = buf.shape[0] - 1
        if self.world == 1:
            if error is not None:
                self.agree(error)
            return buf[:n]
        if error is None:
            buf[n] = 0
        else:
            buf.zero_()
            buf[n] = 1
        self._call(what, dist.all_reduce, buf, op=dist.ReduceOp.SUM, group=self.group)
        if buf[n] != 0:
            self.agree(error)
        return buf[:n]

    def agree(self, error: Optional[BaseException]) -> None:
        """The failure path of the checks (every rank calls it once a check saw a failure): one all-gather of every
        rank's error description; raises the lowest failing rank's error on every rank."""
        mine = None
        if error is not None:
            base = _base_of(error)
            mine = {"base": None if base is None else AGREED_TYPES.index(base), "type": type(error).__name__,
                    "message": str(error), "step": self.step, "phase": self.phase, "lanes": self.lanes}
        every = self.all_gather_object(mine, "error messages", checked=True)
        failed = [r for r, d in enumerate(every) if d is not None]
        src = failed[0]
        d = every[src]
        cls = DistributedError if d["base"] is None else _COMBINED[AGREED_TYPES[d["base"]]]
        who = f"rank {src}" if d["lanes"] is None else f"rank {src} (lanes [{d['lanes'][0]}, {d['lanes'][1]}))"
        also = ""
        if len(failed) > 1:
            also = (" [every rank failed]" if len(failed) == self.world else
                    f" [ranks {', '.join(map(str, failed))} failed]")
        msg = f"{who} failed {_where(d['step'], d['phase'])}: {d['type']}: {d['message']}{also}"
        exc = cls(msg, rank=src, step=d["step"], phase=d["phase"], kind=d["type"], detail=d["message"])
        exc.failed_ranks = failed
        if error is not None:
            raise exc from error
        raise exc

    def fail(self, error: BaseException) -> None:
        """Agree on ``error`` (raised here): every rank raises the lowest failing rank's error."""
        self.check(error)

    @contextlib.contextmanager
    def guard(self):
        """Turn an exception raised inside the block on some ranks into the same :class:`DistributedError` on every
        rank (the others receive it at their next collective). Errors that are already agreed, and collective
        failures, pass through unchanged."""
        try:
            yield self
        except DistributedError:
            raise
        except Exception as e:   # KeyboardInterrupt / SystemExit: leave at once
            self.check(e)
            raise   # pragma: no cover - check always raises with an error

    # --- data collectives (each preceded by the error check unless the caller just did it) ----------------------
    def all_reduce(self, x: torch.Tensor, what: str, *, checked: bool = False) -> torch.Tensor:
        """In-place SUM over ranks."""
        if not checked:
            self.check()
        if self.world > 1:
            self._call(what, dist.all_reduce, x, op=dist.ReduceOp.SUM, group=self.group)
        return x

    def all_reduce_max(self, x: torch.Tensor, what: str, *, checked: bool = False) -> torch.Tensor:
        """In-place MAX over ranks."""
        if not checked:
            self.check()
        if self.world > 1:
            self._call(what, dist.all_reduce, x, op=dist.ReduceOp.MAX, group=self.group)
        return x

    def all_gather(self, x: torch.Tensor, what: str, *, checked: bool = False) -> torch.Tensor:
        """(world · n,) from every rank's (n,), in rank order."""
        if not checked:
            self.check()
        if self.world == 1:
            return x.clone()
        out = torch.empty(self.world * x.shape[0], dtype=x.dtype, device=x.device)
        self._call(what, _ALL_GATHER, out, x.contiguous(), group=self.group)
        return out

    def all_gather_object(self, obj: Any, what: str, *, checked: bool = False) -> list:
        if not checked:
            self.check()
        if self.world == 1:
            return [obj]
        out: list = [None] * self.world
        self._call(what, dist.all_gather_object, out, obj, group=self.group)
        return out


def describe_exception(e: BaseException) -> str:
    """One line: type and message (for logs)."""
    return "".join(traceback.format_exception_only(type(e), e)).strip()
