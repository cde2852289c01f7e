"""Measurement helpers shared by the benchmarks: repeated timing, a contention meter, allocator settling, process
memory, and a record of the environment a number was measured in. Only the standard library and NumPy (plus,
for :func:`environment`, whatever of torch / numba / the compiled kernels is importable)."""
from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from typing import Optional

MB = 2.0 ** 20


# ------------------------------------------------------------------------------------------------- repeats --

@dataclass
class RepeatPolicy:
    """How often a timed pair of segments (e.g. k scales then k unscales) is repeated.

    Short segments are noisy (one preemption on a shared 2-core machine ruins a 1 ms segment): the pair runs at
    least ``repeats`` times, then further while the best time of either segment has not been reproduced within
    ``agree`` by a second repeat, up to ``max_repeats`` repeats or until the pair has used ``budget_s`` seconds.
    The best (shortest) repeat is reported."""
    repeats: int = 3
    agree: float = 0.10
    max_repeats: int = 15
    budget_s: float = 5.0

    def reproduced(self, ts: list) -> bool:
        s = sorted(ts)
        return len(s) < 1 or (len(s) >= 2 and s[1] <= s[0] * (1 + self.agree))

    def more(self, rep: int, ta: list, tb: list) -> bool:
        """Whether to run repeat number ``rep`` (0-based) given the times ``ta``, ``tb`` of the two segments."""
        if rep < self.repeats:
            return True
        if rep >= self.max_repeats or sum(ta) + sum(tb) >= self.budget_s:
            return False
        return not (self.reproduced(ta) and self.reproduced(tb))


@dataclass
class ContentionPolicy:
    """A block timed while other processes kept more than ``threshold`` cores busy is run again after ``wait_s``,
    up to ``retries`` times, if one block takes at most ``max_block_s``."""
    retries: int = 2
    threshold: float = 0.25
    wait_s: float = 5.0
    max_block_s: float = 20.0

    def as_dict(self) -> dict:
        return asdict(self)


def emit_json(doc: dict, out: Optional[str]) -> None:
    """Print a benchmark's JSON document (indent 1) and, when ``out`` is given, write it there too."""
    text = json.dumps(doc, indent=1)
    if out:
        with open(out, "w") as f:
            f.write(text + "\n")
    print(text)


def loadavg() -> Optional[float]:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


class CpuMeter:
    """CPU seconds used by OTHER processes between start() and other_cores(), from /proc/stat minus this process's
    os.times() (children included once they have been waited for); reported as the average number of cores they
    kept busy (10 ms resolution; Linux only, None elsewhere)."""

    def __init__(self):
        self.start()

    @staticmethod
    def _snap():
        busy = None
        try:
            with open("/proc/stat") as f:
                v = [int(x) for x in f.readline().split()[1:9]]
            busy = (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")   # all but idle and iowait
        except (OSError, ValueError):
            pass
        t = os.times()
        return busy, t.user + t.system, time.perf_counter()

    def start(self) -> None:
        self.s0 = self._snap()

    def other_cores(self) -> Optional[float]:
        s1 = self._snap()
        if self.s0[0] is None or s1[0] is None or s1[2] <= self.s0[2]:
            return None
        other = (s1[0] - self.s0[0]) - (s1[1] - self.s0[1])
        return max(0.0, other / (s1[2] - self.s0[2]))

    def busy_cores(self) -> Optional[float]:
        """Cores kept busy by ALL processes (this one included) since start()."""
        s1 = self._snap()
        if self.s0[0] is None or s1[0] is None or s1[2] <= self.s0[2]:
            return None
        return max(0.0, (s1[0] - self.s0[0]) / (s1[2] - self.s0[2]))


def wait_for_quiet(max_s: float, threshold: float = 0.25, interval_s: float = 1.0) -> dict:
    """Wait, up to ``max_s`` seconds, until other processes keep fewer than ``threshold`` cores busy over an
    interval of ``interval_s``; returns the seconds waited and the last reading (``quiet``: below threshold)."""
    t0 = time.perf_counter()
    last = None
    while max_s > 0:
        m = CpuMeter()
        time.sleep(interval_s)
        last = m.other_cores()
        if last is None or last < threshold or time.perf_counter() - t0 >= max_s:
            break
    return {"waited_s": time.perf_counter() - t0, "other_processes_cores": last,
            "quiet": None if last is None else last < threshold, "threshold": threshold}


# ----------------------------------------------------------------------------------------------- allocator --

def settle_allocator() -> dict:
    """Fix glibc's malloc thresholds so timings do not depend on which buffers the process happened to free
    earlier: mmap only blocks >= 32 MB and never give freed heap memory back to the OS below 1 GB.

    With glibc's dynamic defaults the NumPy kernel reference's 1-8 MB per-call temporaries were mmapped or the
    heap trimmed and page-faulted afresh on every call until some live buffer happened to pin the heap top,
    which made it 2-3x slower at shallow depth than deep at 1e5-1e6 lanes: an allocator artefact, not a depth
    effect. Arrays of 1e7 int64 (80 MB) are always mmapped, as in any process. Falls back to allocating and
    freeing one 32 MB buffer (which raises the dynamic thresholds) where mallopt is not available."""
    import numpy as np
    a = np.ones(4_000_000, dtype=np.int64)   # 32 MB: raises glibc's dynamic thresholds where mallopt fails
    del a
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        ok = (libc.mallopt(m_mmap_threshold, 32 << 20) == 1) & (libc.mallopt(m_trim_threshold, 1 << 30) == 1)
        return {"method": "glibc mallopt", "M_MMAP_THRESHOLD": 32 << 20, "M_TRIM_THRESHOLD": 1 << 30, "ok": ok}
    except (OSError, AttributeError):
        return {"method": "32 MB allocate/free (no glibc mallopt)", "ok": None}


# -------------------------------------------------------------------------------------------------- memory --

def proc_status(pid="self") -> dict:
    """VmRSS / VmSize / VmHWM of a process in bytes (Linux /proc; empty elsewhere or once it has exited)."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in ("VmRSS", "VmSize", "VmHWM"):
                    out[k] = int(v.split()[0]) * 1024
    except OSError:
        pass
    return out


def maxrss_mb() -> float:
    """Peak resident set size of this process in MB (2^20 bytes)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / MB if sys.platform == "darwin" else r / 1024.0   # bytes on macOS, KiB on Linux


def memory_total_mb() -> Optional[float]:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


# --------------------------------------------------------------------------------------------- environment --

def cpu_model() -> Optional[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def git_state(root: Optional[str] = None) -> dict:
    """Commit and dirtiness of the git checkout at ``root`` (default: the one holding this package)."""
    root = root or os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = {}
    try:
        out["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                           timeout=10).stdout.strip() or None
        out["git_dirty"] = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                               capture_output=True, text=True, timeout=10).stdout.strip())
    except Exception:  # noqa: BLE001 - no git, not a checkout: nothing to record
        pass
    return out


def _version(module: str) -> Optional[str]:
    try:
        from importlib.metadata import version
        return version(module)
    except Exception:  # noqa: BLE001
        return None


def versions(extra: tuple = ()) -> dict:
    """Versions of python, revsgd, numpy, torch, numba and of the ``extra`` distributions (None if absent)."""
    import numpy as np
    out = {"python": sys.version.split()[0], "numpy": np.__version__}
    try:
        import revsgd
        out["revsgd"] = getattr(revsgd, "__version__", None)
        out["revsgd_backends"] = list(revsgd.BACKENDS)
    except Exception:  # noqa: BLE001
        out["revsgd"] = None
    out["torch"] = _version("torch")
    out["numba"] = _version("numba")
    for name in extra:
        out[name] = _version(name)
    return out


def machine() -> dict:
    """The machine: platform, CPU model, cores (all and usable), memory, load average now."""
    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "cpu_model": cpu_model(),
        "os_cpu_count": os.cpu_count(),
        "affinity_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "memory_total_mb": memory_total_mb(),
        "loadavg": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }


def kernel_threads_info(with_numba: bool = True) -> dict:
    """Thread counts of the compiled kernel libraries, where they can be read (optional: guarded imports).
    ``with_numba=False`` leaves numba alone: starting its threading layer resets the process-wide OpenMP thread count
    (seen as torch's count jumping from 1 to 2 in a process that had pinned it)."""
    out = {}
    try:
        from revsgd import _cpp  # optional compiled extension; its internals may change
        out["cpp_openmp"] = bool(getattr(_cpp, "openmp", False))
        if hasattr(_cpp, "get_num_threads"):
            out["cpp_threads"] = _cpp.get_num_threads()
    except Exception:  # noqa: BLE001
        pass
    if not with_numba:
        return out
    try:
        import numba
        out["numba_threads"] = numba.get_num_threads()
        out["numba_threading_layer_config"] = numba.config.THREADING_LAYER
    except Exception:  # noqa: BLE001
        pass
    return out


# ---------------------------------------------------------------------------------------------------- load --

_LOAD_CODE = {
    # one core of pure-Python work: the interpreter loop holds the GIL, so this is exactly one busy thread
    "python": "while True:\n    pass\n",
    # one core of BLAS work: a 256x256 float64 matmul loop on one torch thread
    "matmul": ("import torch\ntorch.set_num_threads(1)\na = torch.randn(256, 256, dtype=torch.float64)\n"
               "while True:\n    b = a @ a\n"),
}


def cpu_seconds_children() -> float:
    """utime + stime of this process's waited-for children."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def cpu_seconds_self() -> float:
    """utime + stime of this process."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def process_cpu_seconds(pid: int) -> Optional[float]:
    """utime + stime of a live process (Linux /proc), None if unreadable."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            parts = f.read().rsplit(")", 1)[1].split()
        return (int(parts[11]) + int(parts[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


class BusyLoad:
    """``n`` CPU-bound child processes (``kind``: "python" loop or one-thread torch "matmul"), each one busy
    thread, started by :meth:`start` and stopped by :meth:`stop` (also as a context manager). :meth:`cpu_seconds`
    is the CPU time they have used so far, to show how much they actually competed."""

    def __init__(self, kind: str = "python", n: int = 1):
        if kind not in _LOAD_CODE:
            raise ValueError(f"unknown load {kind!r}; choose one of {sorted(_LOAD_CODE)}")
        if n < 0:
            raise ValueError(f"number of load processes must be >= 0, got {n}")
        self.kind, self.n = kind, n
        self.procs: list = []

    def start(self, settle_s: float = 0.5) -> "BusyLoad":
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
        for _ in range(self.n):
            self.procs.append(subprocess.Popen([sys.executable, "-c", _LOAD_CODE[self.kind]], env=env,
                                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        time.sleep(settle_s)             # let it import and start spinning before anything is timed
        for p in self.procs:
            if p.poll() is not None:
                raise RuntimeError(f"load process exited at once with code {p.returncode}")
        return self

    def cpu_seconds(self) -> float:
        return sum(process_cpu_seconds(p.pid) or 0.0 for p in self.procs)

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.procs = []

    def __enter__(self) -> "BusyLoad":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
