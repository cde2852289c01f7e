"""The :class:`~revsgd.meta.MetaTrainer` checkpoint format: sealed with a checksum, validated before use, written
atomically.

A checkpoint is a ``torch.save`` file (readable with ``torch.load(path, weights_only=True)``) holding one dict::

    {"version": 2, "sha256": <64 hex digits>, "iteration": int, "seed0": int,
     "free": {name: Tensor}, "optimizer": <torch optimizer state_dict>, "records": [dict, ...]}

Invariants a checkpoint must satisfy to be loaded (anything else raises :class:`CheckpointError`, whose message
names the file and the offending field):

- ``sha256`` is :func:`digest` of every other field: every tensor's dtype, shape and bytes, every scalar, every
  key, in a canonical order, so one flipped bit anywhere in the content is detected;
- ``version == CHECKPOINT_VERSION`` (version 1 predates the checksum and cannot be verified);
- ``free`` has exactly the trainer's names, each a finite tensor of the trainer's dtype and shape;
- ``optimizer`` has the trainer optimiser's parameter groups (same parameter indices, same hyperparameter names
  and kinds, finite numbers) and per-parameter state of the structure that optimiser creates (same entry names,
  tensor dtypes and shapes), with finite tensors, non-negative integral ``step`` counts and non-negative
  second-moment averages; and a deep copy of the optimiser, given this state, can take a step (both probed on
  copies, stepped once with zero gradients; skipped for optimisers that cannot be stepped so, e.g. LBFGS);
- ``iteration`` is an int ``>= 0`` equal to ``len(records)``; ``seed0`` is an int;
- ``records[i]`` is what :meth:`MetaTrainer.step` writes: ``iteration == i``, ``seed == seed0 + i``, int
  ``tape_bytes >= 0``, float ``val_loss`` / ``train_loss`` (NaN/inf allowed: a diverged run records them), float
  ``seconds`` / ``seconds_hypergrad >= 0``, ``hypergrad_norms`` a float per free name, extra metrics floats.

API: :func:`digest`, :func:`seal` (add the checksum), :func:`read` (load + version + checksum), :func:`validate`
(against a trainer's free tensors and optimiser), :func:`write` (atomic, leaves no temporary file behind on an
exception), :func:`temp_path` and :func:`remove_stale_temps` (temporary files ``{path}.tmp{pid}`` of dead
processes).
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import math
import os
import re
import struct
from typing import Any, Mapping, Optional

import torch

CHECKPOINT_VERSION = 2
FIELDS = frozenset({"version", "sha256", "iteration", "seed0", "free", "optimizer", "records"})
RECORD_INTS = ("iteration", "seed", "tape_bytes")
RECORD_FLOATS = ("val_loss", "train_loss", "seconds_hypergrad", "seconds")
RECORD_RESERVED = frozenset(RECORD_INTS) | {"hypergrad_norms", "seconds_hypergrad", "seconds"}
_GROUP_NONNEGATIVE = frozenset({"lr", "eps", "weight_decay", "momentum"})
_STATE_NONNEGATIVE = frozenset({"exp_avg_sq", "max_exp_avg_sq"})
_SHA = re.compile(r"[0-9a-f]{64}")


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read, fails its checksum, or does not fit this run; nothing was loaded."""


# --- checksum ----------------------------------------------------------------------------------------------------
def digest(state: Mapping) -> str:
    """SHA-256 (hex) of a canonical serialisation of ``state`` without its ``"sha256"`` entry.

    Dict entries in sorted key order (int keys before str keys); each value type-tagged and length-prefixed;
    tensors by dtype, shape and raw bytes (any dtype, any device); floats by their 8 IEEE bytes (so NaN payloads
    count), ints by their decimal digits. Raises :class:`CheckpointError` on a type a checkpoint never holds.
    """
    if not isinstance(state, Mapping):
        raise CheckpointError(f"a checkpoint is a dict, got {type(state).__name__}")
    h = hashlib.sha256(b"revsgd-checkpoint\0")
    _feed(h, {k: v for k, v in state.items() if k != "sha256"}, "checkpoint")
    return h.hexdigest()


def seal(state: dict) -> dict:
    """``state`` with ``"sha256"`` set to its :func:`digest` (in place; returned for convenience)."""
    state["sha256"] = digest(state)
    return state


def _blob(h, tag: bytes, data: bytes) -> None:
    h.update(tag + struct.pack("<Q", len(data)))
    h.update(data)


def _key_order(k: Any, where: str) -> tuple:
    if isinstance(k, bool) or not isinstance(k, (int, str)):
        raise CheckpointError(f"{where}: key {k!r} is neither an int nor a str")
    return (0, k, "") if isinstance(k, int) else (1, 0, k)


def _feed(h, obj: Any, where: str) -> None:
    if isinstance(obj, torch.Tensor):
        try:
            t = obj.detach().resolve_conj().resolve_neg().to("cpu").contiguous()
            data = t.reshape(-1).view(torch.uint8).numpy()
        except (RuntimeError, TypeError, ValueError) as e:
            raise CheckpointError(f"{where}: tensor of dtype {obj.dtype} cannot be checksummed ({e})") from e
        _blob(h, b"T", f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(struct.pack("<Q", data.nbytes))
        h.update(data)
    elif isinstance(obj, Mapping):
        keys = sorted(obj, key=lambda k: _key_order(k, where))
        h.update(b"D" + struct.pack("<Q", len(keys)))
        for k in keys:
            _feed(h, k, where)
            _feed(h, obj[k], f"{where}[{k!r}]")
    elif isinstance(obj, (list, tuple)):
        h.update((b"L" if isinstance(obj, list) else b"U") + struct.pack("<Q", len(obj)))
        for i, v in enumerate(obj):
            _feed(h, v, f"{where}[{i}]")
    elif obj is None:
        h.update(b"N")
    elif isinstance(obj, bool):
        h.update(b"B1" if obj else b"B0")
    elif isinstance(obj, int):
        _blob(h, b"I", str(obj).encode())
    elif isinstance(obj, float):
        h.update(b"F" + struct.pack("<d", obj))
    elif isinstance(obj, str):
        _blob(h, b"S", obj.encode("utf-8", "surrogatepass"))
    else:
        raise CheckpointError(f"{where}: unsupported type {type(obj).__name__} in a checkpoint")


# --- reading -----------------------------------------------------------------------------------------------------
def read(path: str) -> dict:
    """Load the checkpoint dict at ``path`` (tensors on the CPU) and verify its version and checksum.

    Every problem with the content, including torch's own errors for a damaged zip or pickle, raises
    :class:`CheckpointError`; only opening the file can raise ``OSError`` (e.g. ``FileNotFoundError``).
    """
    with open(path, "rb") as f:  # a missing or unreadable path raises the usual OSError
        try:
            st = torch.load(f, weights_only=True, map_location="cpu")
        except Exception as e:  # damaged zip / pickle / disallowed global: all the same to the caller
            raise CheckpointError(f"{path}: not a readable checkpoint file ({type(e).__name__}: {e})") from e
    try:
        _verify(st)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from e
    except Exception as e:  # safety net: a malformed structure must not escape as another exception type
        raise CheckpointError(f"{path}: malformed checkpoint ({type(e).__name__}: {e})") from e
    return st


def _verify(st: Any) -> None:
    if not isinstance(st, dict):
        raise CheckpointError(f"a checkpoint holds a dict, this file holds {type(st).__name__}")
    version = st.get("version")
    if type(version) is int and version == 1:
        raise CheckpointError(f"checkpoint version 1 predates the checksum (version {CHECKPOINT_VERSION}) and "
                              f"cannot be verified; start a new run (or resume it with the revsgd release that "
                              f"wrote it)")
    if type(version) is not int or version != CHECKPOINT_VERSION:
        raise CheckpointError(f"unsupported checkpoint version {version!r} (this revsgd reads and writes version "
                              f"{CHECKPOINT_VERSION})")
    sha = st.get("sha256")
    if not isinstance(sha, str) or not _SHA.fullmatch(sha):
        raise CheckpointError(f"field 'sha256' must be 64 lowercase hex digits, got {sha!r}")
    actual = digest(st)
    if actual != sha:
        raise CheckpointError(f"checksum mismatch (stored sha256 {sha[:16]}..., content {actual[:16]}...): "
                              f"the file is corrupt")


def validate(state: Mapping, path: str, *, free: Mapping[str, torch.Tensor], optimizer: torch.optim.Optimizer
             ) -> None:
    """Check every field of a checkpoint dict (see the module docstring) against a trainer's ``free`` tensors and
    ``optimizer``; raises :class:`CheckpointError` naming ``path`` and the field. Changes nothing."""
    try:
        _validate(state, free, optimizer)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from e
    except Exception as e:  # safety net, as in read()
        raise CheckpointError(f"{path}: malformed checkpoint ({type(e).__name__}: {e})") from e


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_float(v: Any) -> bool:
    return isinstance(v, float)


def _finite_tensor(t: torch.Tensor, where: str) -> None:
    if t.layout != torch.strided:
        raise CheckpointError(f"{where}: {t.layout} tensors are not allowed")
    if (t.is_floating_point() or t.is_complex()) and t.numel() and not bool(torch.isfinite(t).all()):
        raise CheckpointError(f"{where}: holds NaN or inf")


def _validate(st: Mapping, free: Mapping[str, torch.Tensor], opt: torch.optim.Optimizer) -> None:
    if not isinstance(st, Mapping):
        raise CheckpointError(f"a checkpoint holds a dict, got {type(st).__name__}")
    keys = set(st)
    if keys != FIELDS:
        parts = []
        if FIELDS - keys:
            parts.append(f"missing fields {sorted(FIELDS - keys)}")
        if keys - FIELDS:
            parts.append(f"unexpected fields {sorted(map(repr, keys - FIELDS))}")
        raise CheckpointError("; ".join(parts))
    if type(st["version"]) is not int or st["version"] != CHECKPOINT_VERSION:
        raise CheckpointError(f"field 'version' is {st['version']!r}, expected {CHECKPOINT_VERSION}")
    # free tensors
    ck = st["free"]
    if not isinstance(ck, Mapping):
        raise CheckpointError(f"field 'free' must be a dict of tensors, got {type(ck).__name__}")
    if set(ck) != set(free):
        raise CheckpointError(f"checkpoint holds free tensors {sorted(map(str, ck))}, this run has {sorted(free)}")
    for k, v in ck.items():
        where, mine = f"free[{k!r}]", free[k]
        if not isinstance(v, torch.Tensor):
            raise CheckpointError(f"{where} must be a Tensor, got {type(v).__name__}")
        if v.dtype != mine.dtype:
            raise CheckpointError(f"{where} has dtype {v.dtype} in the checkpoint, {mine.dtype} here")
        if v.shape != mine.shape:
            raise CheckpointError(f"{where} has shape {tuple(v.shape)} in the checkpoint, {tuple(mine.shape)} here")
        _finite_tensor(v, where)
    # counters
    it, seed0, records = st["iteration"], st["seed0"], st["records"]
    if not _is_int(it) or it < 0:
        raise CheckpointError(f"field 'iteration' must be an int >= 0, got {it!r}")
    if not _is_int(seed0):
        raise CheckpointError(f"field 'seed0' must be an int, got {seed0!r}")
    if not isinstance(records, list):
        raise CheckpointError(f"field 'records' must be a list, got {type(records).__name__}")
    if len(records) != it:
        raise CheckpointError(f"field 'iteration' is {it} but the checkpoint holds {len(records)} records")
    for i, r in enumerate(records):
        _validate_record(r, i, seed0, free)
    _validate_optimizer(st["optimizer"], opt)


def _validate_record(r: Any, i: int, seed0: int, free: Mapping) -> None:
    where = f"records[{i}]"
    if not isinstance(r, dict):
        raise CheckpointError(f"{where} must be a dict, got {type(r).__name__}")
    missing = [k for k in (*RECORD_INTS, *RECORD_FLOATS, "hypergrad_norms") if k not in r]
    if missing:
        raise CheckpointError(f"{where} lacks {missing}")
    for k, v in r.items():
        w = f"{where}[{k!r}]"
        if not isinstance(k, str):
            raise CheckpointError(f"{where} has a non-str key {k!r}")
        if k in RECORD_INTS:
            if not _is_int(v):
                raise CheckpointError(f"{w} must be an int, got {v!r}")
        elif k == "hypergrad_norms":
            if not isinstance(v, dict) or set(v) != set(free):
                raise CheckpointError(f"{w} must map the free names {sorted(free)} to floats, got {v!r}")
            for name, x in v.items():
                if not _is_float(x) or x < 0:
                    raise CheckpointError(f"{w}[{name!r}] must be a float >= 0 (or NaN), got {x!r}")
        elif not _is_float(v):
            raise CheckpointError(f"{w} must be a float, got {v!r}")
    if r["iteration"] != i:
        raise CheckpointError(f"{where}['iteration'] is {r['iteration']}, expected {i}")
    if r["seed"] != seed0 + i:
        raise CheckpointError(f"{where}['seed'] is {r['seed']}, expected seed0 + {i} = {seed0 + i}")
    if r["tape_bytes"] < 0:
        raise CheckpointError(f"{where}['tape_bytes'] is {r['tape_bytes']}, must be >= 0")
    for k in ("seconds", "seconds_hypergrad"):
        if not (math.isfinite(r[k]) and r[k] >= 0):
            raise CheckpointError(f"{where}[{k!r}] is {r[k]!r}, must be finite and >= 0")


def _kind(v: Any) -> Any:
    """What must agree between a checkpoint's hyperparameter and the optimiser's own (value aside)."""
    if v is None or isinstance(v, bool):
        return "flag"                                # Optional[bool] options (foreach, fused) may be either
    if isinstance(v, (int, float)):
        return "number"
    if isinstance(v, str):
        return "str"
    if isinstance(v, torch.Tensor):
        return ("tensor", v.dtype, tuple(v.shape))
    if isinstance(v, (list, tuple)):
        return (type(v).__name__, tuple(_kind(x) for x in v))
    return type(v).__name__


def _check_numbers(v: Any, where: str, nonnegative: bool) -> None:
    if isinstance(v, bool) or v is None or isinstance(v, str):
        return
    if isinstance(v, (int, float)):
        if not math.isfinite(v) or (nonnegative and v < 0):
            raise CheckpointError(f"{where} is {v!r}, must be finite{' and >= 0' if nonnegative else ''}")
    elif isinstance(v, torch.Tensor):
        _finite_tensor(v, where)
        if nonnegative and not v.is_complex() and v.numel() and bool((v < 0).any()):
            raise CheckpointError(f"{where} holds negative values")
    elif isinstance(v, (list, tuple)):
        for j, x in enumerate(v):
            _check_numbers(x, f"{where}[{j}]", nonnegative)


def _validate_optimizer(sd: Any, opt: torch.optim.Optimizer) -> None:
    mine = opt.state_dict()
    if not isinstance(sd, dict) or set(sd) != set(mine):
        got = sorted(map(str, sd)) if isinstance(sd, dict) else type(sd).__name__
        raise CheckpointError(f"field 'optimizer' must be a dict with keys {sorted(mine)}, got {got}")
    groups, my_groups = sd["param_groups"], mine["param_groups"]
    if not isinstance(groups, list) or len(groups) != len(my_groups):
        raise CheckpointError(f"optimizer['param_groups'] must be a list of {len(my_groups)} groups, got {groups!r}")
    for j, (g, m) in enumerate(zip(groups, my_groups)):
        where = f"optimizer['param_groups'][{j}]"
        if not isinstance(g, dict) or set(g) != set(m):
            got = sorted(map(str, g)) if isinstance(g, dict) else type(g).__name__
            raise CheckpointError(f"{where} must have the entries {sorted(m)}, got {got}")
        if not isinstance(g["params"], list) or not all(_is_int(p) for p in g["params"]) \
                or g["params"] != m["params"]:
            raise CheckpointError(f"{where}['params'] is {g['params']!r}, this optimiser has {m['params']!r}")
        for k, v in g.items():
            if k in ("params", "param_names"):
                if k == "param_names" and v != m[k]:
                    raise CheckpointError(f"{where}['param_names'] is {v!r}, this optimiser has {m[k]!r}")
                continue
            if _kind(v) != _kind(m[k]):
                raise CheckpointError(f"{where}[{k!r}] is {v!r}, not of the kind of this optimiser's {m[k]!r}")
            if k == "betas":
                _check_numbers(v, f"{where}['betas']", True)
                if any(isinstance(b, (int, float)) and not isinstance(b, bool) and b >= 1 for b in v):
                    raise CheckpointError(f"{where}['betas'] is {v!r}, each must be in [0, 1)")
            else:
                _check_numbers(v, f"{where}[{k!r}]", k in _GROUP_NONNEGATIVE)
    params = [p for m in my_groups for p in m["params"]]
    by_index = dict(zip(params, (p for g in opt.param_groups for p in g["params"])))
    state = sd["state"]
    if not isinstance(state, dict):
        raise CheckpointError(f"optimizer['state'] must be a dict, got {type(state).__name__}")
    reference = _reference_state(opt)
    for i, entry in state.items():
        where = f"optimizer['state'][{i!r}]"
        if not _is_int(i) or i not in by_index:
            raise CheckpointError(f"optimizer['state'] has an entry for {i!r}, not a parameter index of this "
                                  f"optimiser ({params})")
        if not isinstance(entry, dict) or not all(isinstance(k, str) for k in entry):
            raise CheckpointError(f"{where} must be a dict with str keys, got {entry!r}")
        ref = None if reference is None else reference.get(i)
        if ref is not None and set(entry) != set(ref):
            raise CheckpointError(f"{where} has the entries {sorted(entry)}, this optimiser keeps {sorted(ref)}")
        param = by_index[i]
        for k, v in entry.items():
            w = f"{where}[{k!r}]"
            if ref is not None and _kind(v) != _kind(ref[k]):
                raise CheckpointError(f"{w} is {_describe(v)}, this optimiser keeps {_describe(ref[k])}")
            if ref is None and isinstance(v, torch.Tensor) and v.dim() and v.shape != param.shape:
                raise CheckpointError(f"{w} has shape {tuple(v.shape)}, the parameter {tuple(param.shape)}")
            _check_numbers(v, w, k in _STATE_NONNEGATIVE or k == "step")
            if k == "step":
                x = v.item() if isinstance(v, torch.Tensor) and v.numel() == 1 else v
                if not (_is_int(x) or _is_float(x)) or x != math.floor(x):
                    raise CheckpointError(f"{w} is {_describe(v)}, must be a whole number of steps")
    if reference is not None:  # the optimiser must accept the state and be able to step from it
        try:
            _probe(opt, sd)
        except Exception as e:
            raise CheckpointError(f"field 'optimizer': this optimiser cannot step from the checkpoint's state "
                                  f"({type(e).__name__}: {e})") from e


def _describe(v: Any) -> str:
    if isinstance(v, torch.Tensor):
        return f"a {v.dtype} tensor of shape {tuple(v.shape)}" + (f" = {v.item()!r}" if v.numel() == 1 else "")
    return repr(v)


def _probe(opt: torch.optim.Optimizer, state_dict: Optional[dict] = None) -> dict:
    """Step a deep copy of ``opt`` once with zero gradients (after loading a copy of ``state_dict`` into it, if
    given) and return its state_dict's per-parameter state. ``opt``, its parameters and the global RNG are left
    untouched."""
    with torch.random.fork_rng(devices=[]):
        probe = copy.deepcopy(opt)
        if state_dict is not None:
            probe.load_state_dict(copy.deepcopy(state_dict))
        for g in probe.param_groups:
            for p in g["params"]:
                p.grad = torch.zeros_like(p)
        with torch.no_grad():
            probe.step()
        return probe.state_dict()["state"]


def _reference_state(opt: torch.optim.Optimizer) -> Optional[dict]:
    """The per-parameter state ``opt`` keeps once it has stepped (entry names, kinds, dtypes, shapes), or ``None``
    where it cannot be probed (e.g. an optimiser whose step needs a closure)."""
    try:
        return _probe(opt)
    except Exception:
        return None


# --- writing -----------------------------------------------------------------------------------------------------
def temp_path(path: str, pid: Optional[int] = None) -> str:
    """The temporary file a process writes before renaming it to ``path``: ``{path}.tmp{pid}``."""
    return f"{path}.tmp{os.getpid() if pid is None else pid}"


def _alive(pid: int) -> bool:
    """Whether process ``pid`` may exist (signal 0 probes without signalling); unsure counts as alive."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):  # PermissionError: it exists (another user's); anything else: unknowable
        return True
    return True


def remove_stale_temps(path: str) -> list[str]:
    """Delete ``{path}.tmp{pid}`` files whose process no longer exists; returns the paths removed.

    Temp files of live processes (and of this one) are kept. Only POSIX: on Windows ``os.kill(pid, 0)`` would
    terminate the process, so nothing is removed there. Pids are those of this machine's (container's) processes.
    """
    if os.name == "nt":
        return []
    folder, base = os.path.split(os.path.abspath(path))
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    prefix, removed = base + ".tmp", []
    for name in names:
        tail = name[len(prefix):]
        if not name.startswith(prefix) or not tail.isascii() or not tail.isdigit() or tail.startswith("0"):
            continue
        pid = int(tail)
        full = os.path.join(folder, name)
        if pid == os.getpid() or _alive(pid) or os.path.isdir(full):
            continue
        with contextlib.suppress(OSError):  # gone meanwhile, or not ours to remove: leave it
            os.remove(full)
            removed.append(full)
    return removed


def write(state: Mapping, path: str) -> None:
    """Write ``state`` to ``path`` atomically: into :func:`temp_path`, flushed to disk, then ``os.replace``.

    A crash leaves either the previous file or the new one; an exception (``KeyboardInterrupt`` included) removes
    the temporary file and leaves the previous checkpoint as it was. Stale temporaries of dead processes go first.
    """
    remove_stale_temps(path)
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    if os.name != "nt":  # make the rename itself durable
        with contextlib.suppress(OSError):
            fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
