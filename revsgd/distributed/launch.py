"""Starting process groups: :func:`init_from_env` inside a worker (torchrun's environment), and :func:`run_local`, a
small torchrun for one machine with a hard timeout (used by the tests and the benchmark)."""
from __future__ import annotations

import datetime
import os
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.distributed as dist

#: Environment variables torchrun sets and :func:`init_from_env` reads.
ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def init_from_env(backend: Optional[str] = None, timeout_s: float = 600.0) -> tuple:
    """``init_process_group`` from torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT). Backend:
    ``"nccl"`` when CUDA is available (the device is ``cuda:LOCAL_RANK``), else ``"gloo"``. ``timeout_s`` bounds
    every collective: a rank that waits longer for a peer raises :class:`~revsgd.distributed.CollectiveError`
    naming the step. Returns (rank, world_size)."""
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(f"environment variable(s) {missing} not set: launch with torchrun (or set them)")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return dist.get_rank(), dist.get_world_size()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class RankResult:
    rank: int
    returncode: Optional[int]     # None: killed at the timeout
    stdout: str
    stderr: str


def run_local(cmd: Sequence[str], world_size: int, *, timeout_s: float, threads: int = 1,
              env: Optional[dict] = None, cwd: Optional[str] = None) -> list:
    """Run ``cmd`` as ``world_size`` processes on this machine with torchrun's environment (127.0.0.1, a free port,
    OMP/MKL threads = ``threads``). Waits at most ``timeout_s`` seconds for all of them, then kills what is left.
    Returns a :class:`RankResult` per rank."""
    port = free_port()
    base = dict(os.environ if env is None else env)
    base.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world_size),
                OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), LOCAL_WORLD_SIZE=str(world_size))
    procs, files = [], []
    for r in range(world_size):
        e = dict(base, RANK=str(r), LOCAL_RANK=str(r))
        fo, fe = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")   # files: no pipe can fill up
        files.append((fo, fe))
        procs.append(subprocess.Popen(list(cmd), env=e, cwd=cwd, stdout=fo, stderr=fe, text=True))
    deadline = time.monotonic() + timeout_s
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(timeout=max(0.1, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            codes.append(None)
    for p, c in zip(procs, codes):
        if c is None:
            p.kill()
            p.wait()
    out = []
    for r, (c, (fo, fe)) in enumerate(zip(codes, files)):
        fo.seek(0)
        fe.seek(0)
        out.append(RankResult(r, c, fo.read(), fe.read()))
        fo.close()
        fe.close()
    return out
