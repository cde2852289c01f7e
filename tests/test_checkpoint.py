"""MetaTrainer checkpoints: checksum, full validation, all-or-nothing loads, temporary-file hygiene, and a fuzz test.

Every refused load must raise exactly :class:`revsgd.meta.CheckpointError` and leave the trainer's free tensors,
optimiser state, iteration, seed0 and records bit for bit as they were (compared with ``state_of`` below, which
is independent of the checksum code under test).
"""
from __future__ import annotations

import copy
import os
import random
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch

from revsgd.meta import CheckpointError, MetaSpec, MetaTrainer, checkpoint
from revsgd.meta.params import LogitSchedule, LogSchedule

T = 8


def make_trainer(ck=None, optimizer=None, **kw) -> MetaTrainer:
    """A tiny linear-regression meta-problem: 2 free (T, 2) schedules, float64."""
    lr_s, mom_s = LogSchedule(T, 2, 0.01), LogitSchedule(T, 2, 0.5)
    g = torch.Generator().manual_seed(0)
    X = torch.randn(40, 3, generator=g, dtype=torch.float64)
    Y = X @ torch.tensor([[1.0], [-2.0], [0.5]], dtype=torch.float64)

    def build(seed):
        perm = torch.from_numpy(np.random.default_rng(seed).permutation(30))

        def train_loss(p, h, t):
            i = perm[(t % 3) * 10:(t % 3) * 10 + 10]
            return (((X[i] @ p["w"] + p["b"]) - Y[i]) ** 2).mean()

        def val_loss(p, h):
            return (((X[30:] @ p["w"] + p["b"]) - Y[30:]) ** 2).mean()
        p0 = {"w": torch.zeros(3, 1, dtype=torch.float64), "b": torch.zeros(1, dtype=torch.float64)}
        return MetaSpec(train_loss, val_loss, p0, {"lr": lr_s(), "momentum": mom_s()}, "heavyball")
    return MetaTrainer(build, {"lr": lr_s.free, "mom": mom_s.free}, meta_lr=0.2, checkpoint=ck, progress=False,
                       threads=1, optimizer=optimizer, **kw)


def canon(obj):
    """Exact, hashable, NaN-safe image of a nested structure (tensors by dtype, shape and bytes)."""
    if isinstance(obj, torch.Tensor):
        return ("T", str(obj.dtype), tuple(obj.shape), obj.detach().contiguous().numpy().tobytes())
    if isinstance(obj, dict):
        return ("d", tuple(sorted((repr(k), canon(v)) for k, v in obj.items())))
    if isinstance(obj, (list, tuple)):
        return (type(obj).__name__, tuple(canon(v) for v in obj))
    if isinstance(obj, float):
        return ("f", struct.pack("<d", obj))
    return (type(obj).__name__, repr(obj))


def state_of(tr: MetaTrainer):
    return canon({"free": dict(tr.free), "optimizer": tr.opt.state_dict(), "iteration": tr.iteration,
                  "seed0": tr.seed0, "records": tr.records})


def content_of(st: dict):
    """The trainer state a checkpoint dict describes, in the layout of ``state_of``."""
    return canon({"free": st["free"], "optimizer": st["optimizer"], "iteration": st["iteration"],
                  "seed0": st["seed0"], "records": st["records"]})


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A checkpoint after 2 meta-iterations: (path, file bytes, trainer state it holds)."""
    path = str(tmp_path_factory.mktemp("src") / "src.pt")
    tr = make_trainer(path)
    tr.run(2)
    with open(path, "rb") as f:
        data = f.read()
    return path, data, state_of(tr)


@pytest.fixture
def target():
    """A trainer in a different, non-trivial state (1 meta-iteration, seed0 7) that loads are tried on."""
    tr = make_trainer(seed0=7)
    tr.run(1)
    return tr


def write_dict(path, st, reseal: bool) -> str:
    if reseal:
        checkpoint.seal(st)
    torch.save(st, path)
    return str(path)


def assert_refused(tr: MetaTrainer, path: str, match: str | None = None):
    before = state_of(tr)
    with pytest.raises(CheckpointError, match=match) as ei:
        tr.load(path)
    assert str(ei.value).startswith(f"{path}: "), ei.value
    assert state_of(tr) == before
    return ei.value


# --- format and round trip ----------------------------------------------------------------------------------
def test_round_trip_is_exact_and_plain_torch_readable(source, target):
    path, _, state = source
    st = torch.load(path, weights_only=True)
    assert st["version"] == checkpoint.CHECKPOINT_VERSION == 2
    assert st["sha256"] == checkpoint.digest(st) and len(st["sha256"]) == 64
    assert content_of(st) == state
    target.load(path)
    assert state_of(target) == state


def test_state_dict_is_a_sealed_snapshot(target):
    sd = target.state_dict()
    frozen = canon(sd)
    target.step()  # later steps must not change a snapshot taken before them
    assert canon(sd) == frozen and checkpoint.digest(sd) == sd["sha256"]


def test_digest_covers_dtype_shape_and_every_bit():
    base = {"version": 2, "x": torch.zeros(4, dtype=torch.float64), "r": [{"a": 1.0}]}
    d = checkpoint.digest(base)
    variants = [
        {**base, "x": torch.zeros(4, dtype=torch.int64)},               # same bytes, other dtype
        {**base, "x": torch.zeros(2, 2, dtype=torch.float64)},          # same bytes, other shape
        {**base, "x": torch.tensor([0.0, 0.0, 0.0, -0.0], dtype=torch.float64)},  # one bit
        {**base, "r": [{"a": 1.0000000000000002}]},
        {**base, "r": [{"a": 1}]},                                       # int vs float
        {**base, "r": ({"a": 1.0},)},                                    # tuple vs list
        {**base, "version": 3},
    ]
    assert len({d, *(checkpoint.digest(v) for v in variants)}) == len(variants) + 1
    assert checkpoint.digest({**base, "sha256": "ignored"}) == d
    for dt in (torch.bfloat16, torch.bool, torch.complex64, torch.uint8):
        checkpoint.digest({"t": torch.ones(3, dtype=dt)})  # every dtype a tensor may have is covered


# --- one flipped bit -----------------------------------------------------------------------------------------
def _flip_at(data: bytes, needle: bytes, bit: int = 0) -> bytes:
    i = data.find(needle)
    assert i >= 0 and data.find(needle, i + 1) < 0, "needle must occur exactly once"
    pos = i + len(needle) // 2
    return data[:pos] + bytes([data[pos] ^ (1 << bit)]) + data[pos + 1:]


@pytest.mark.parametrize("where", ["free tensor", "optimizer state", "record value"])
def test_one_flipped_bit_is_refused(source, target, tmp_path, where):
    path, data, _ = source
    st = torch.load(path, weights_only=True)
    if where == "free tensor":
        needle = st["free"]["lr"].numpy().tobytes()
    elif where == "optimizer state":
        needle = st["optimizer"]["state"][1]["exp_avg_sq"].numpy().tobytes()
    else:  # pickle stores a float as opcode 'G' + 8 big-endian bytes; flip its lowest mantissa bit
        needle = b"G" + struct.pack(">d", st["records"][1]["val_loss"])
        i = data.find(needle)
        assert i >= 0
        flipped = data[:i + 8] + bytes([data[i + 8] ^ 1]) + data[i + 9:]
    if where != "record value":
        flipped = _flip_at(data, needle)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(flipped)
    assert_refused(target, str(bad), "checksum mismatch")


# --- valid checksum, invalid content ---------------------------------------------------------------------------
def _set(path_keys, value):
    def f(st):
        d = st
        for k in path_keys[:-1]:
            d = d[k]
        d[path_keys[-1]] = value(d[path_keys[-1]]) if callable(value) else value
    return f


def _delete(path_keys):
    def f(st):
        d = st
        for k in path_keys[:-1]:
            d = d[k]
        del d[path_keys[-1]]
    return f


def _element(path_keys, v):
    def f(st):
        d = st
        for k in path_keys:
            d = d[k]
        d.view(-1)[3] = v
    return f


MUTATIONS = {  # name: (mutation of the loaded dict, words the error must contain)
    "free nan": (_element(["free", "lr"], float("nan")), r"free\['lr'\]: holds NaN"),
    "free inf": (_element(["free", "mom"], float("-inf")), r"free\['mom'\]: holds NaN or inf"),
    "free shape": (_set(["free", "lr"], lambda t: t[:-1].clone()), r"free\['lr'\] has shape"),
    "free dtype": (_set(["free", "lr"], lambda t: t.float()), r"free\['lr'\] has dtype torch.float32"),
    "free not a tensor": (_set(["free", "lr"], lambda t: t.tolist()), r"free\['lr'\] must be a Tensor"),
    "free missing": (_delete(["free", "mom"]), "free tensors"),
    "free extra": (_set(["free", "extra"], torch.zeros(2)), "free tensors"),
    "iteration -5": (_set(["iteration"], -5), "'iteration' must be an int >= 0"),
    "iteration 1e9": (_set(["iteration"], 10**9), "holds 2 records"),
    "iteration mismatch": (_set(["iteration"], 1), "'iteration' is 1 but"),
    "iteration float": (_set(["iteration"], 2.0), "'iteration' must be an int"),
    "iteration bool": (_set(["iteration"], True), "'iteration' must be an int"),
    "seed0 str": (_set(["seed0"], "0"), "'seed0' must be an int"),
    "seed0 float": (_set(["seed0"], 0.5), "'seed0' must be an int"),
    "seed0 None": (_set(["seed0"], None), "'seed0' must be an int"),
    "seed0 shifted": (_set(["seed0"], 1), r"records\[0\]\['seed'\] is 0, expected"),
    "records dropped": (_set(["records"], lambda r: r[:1]), "holds 1 records"),
    "records tuple": (_set(["records"], tuple), "'records' must be a list"),
    "record key missing": (_delete(["records", 1, "val_loss"]), r"records\[1\] lacks \['val_loss'\]"),
    "record type": (_set(["records", 0, "val_loss"], "0.5"), r"records\[0\]\['val_loss'\] must be a float"),
    "record iteration": (_set(["records", 1, "iteration"], 0), r"records\[1\]\['iteration'\] is 0"),
    "record tape_bytes": (_set(["records", 0, "tape_bytes"], -1), "tape_bytes"),
    "record seconds nan": (_set(["records", 0, "seconds"], float("nan")), "seconds"),
    "record norms": (_delete(["records", 0, "hypergrad_norms", "lr"]), "hypergrad_norms"),
    "record not a dict": (_set(["records", 0], [1.0]), r"records\[0\] must be a dict"),
    "opt exp_avg nan": (_element(["optimizer", "state", 0, "exp_avg"], float("nan")), "exp_avg'.*NaN"),
    "opt exp_avg_sq negative": (_element(["optimizer", "state", 0, "exp_avg_sq"], -1.0), "negative"),
    "opt exp_avg shape": (_set(["optimizer", "state", 0, "exp_avg"], lambda t: t.reshape(-1).clone()),
                          r"exp_avg'\] is a torch.float64 tensor of shape \(16,\)"),
    "opt exp_avg dtype": (_set(["optimizer", "state", 1, "exp_avg"], lambda t: t.float()), "float32"),
    "opt entry missing": (_delete(["optimizer", "state", 0, "exp_avg_sq"]), "this optimiser keeps"),
    "opt entry extra": (_set(["optimizer", "state", 0, "junk"], torch.zeros(())), "this optimiser keeps"),
    "opt step negative": (_set(["optimizer", "state", 0, "step"], torch.tensor(-1.0)), "step"),
    "opt step fraction": (_set(["optimizer", "state", 0, "step"], torch.tensor(1.5)), "whole number"),
    "opt state index": (_set(["optimizer", "state", 5], {}), "not a parameter index"),
    "opt lr str": (_set(["optimizer", "param_groups", 0, "lr"], "0.2"), r"\['lr'\] is '0.2'"),
    "opt lr nan": (_set(["optimizer", "param_groups", 0, "lr"], float("nan")), r"\['lr'\] is nan"),
    "opt lr negative": (_set(["optimizer", "param_groups", 0, "lr"], -0.1), "must be finite and >= 0"),
    "opt betas": (_set(["optimizer", "param_groups", 0, "betas"], (0.9, 1.5)), "betas"),
    "opt betas short": (_set(["optimizer", "param_groups", 0, "betas"], (0.9,)), "betas"),
    "opt params": (_set(["optimizer", "param_groups", 0, "params"], [1, 0]), r"\['params'\]"),
    "opt group missing": (_set(["optimizer", "param_groups"], []), "list of 1 groups"),
    "opt capturable": (_set(["optimizer", "param_groups", 0, "capturable"], True), "cannot step"),
    "opt no state": (_delete(["optimizer", "state"]), "field 'optimizer' must be a dict"),
    "top extra": (_set(["extra"], 1), "unexpected fields"),
    "top missing": (_delete(["records"]), r"missing fields \['records'\]"),
}


@pytest.mark.parametrize("name", sorted(MUTATIONS))
def test_invalid_content_with_valid_checksum_is_refused(source, target, tmp_path, name):
    mutate, match = MUTATIONS[name]
    st = torch.load(source[0], weights_only=True)
    mutate(st)
    assert_refused(target, write_dict(tmp_path / "bad.pt", st, reseal=True), match)


@pytest.mark.parametrize("name", ["free inf", "seed0 shifted", "opt lr nan", "top extra"])
def test_invalid_content_with_stale_checksum_is_refused(source, target, tmp_path, name):
    st = torch.load(source[0], weights_only=True)
    MUTATIONS[name][0](st)
    assert_refused(target, write_dict(tmp_path / "bad.pt", st, reseal=False), "checksum mismatch")


@pytest.mark.parametrize("version, match", [(1, "version 1 predates the checksum"), (3, "unsupported checkpoint "
                                            "version 3"), ("2", "unsupported checkpoint version '2'"),
                                            (None, "unsupported checkpoint version None")])
def test_other_versions_are_refused(source, target, tmp_path, version, match):
    st = torch.load(source[0], weights_only=True)
    if version == 1:  # a checkpoint as revsgd 0.x wrote it: no checksum
        del st["sha256"]
    st["version"] = version
    assert_refused(target, write_dict(tmp_path / "old.pt", st, reseal=False), match)


@pytest.mark.parametrize("sha", [None, 12, "0" * 63, "A" * 64, "0" * 64])
def test_bad_or_missing_checksum_is_refused(source, target, tmp_path, sha):
    st = torch.load(source[0], weights_only=True)
    if sha is None:
        del st["sha256"]
    else:
        st["sha256"] = sha
    assert_refused(target, write_dict(tmp_path / "bad.pt", st, reseal=False), "sha256|checksum mismatch")


@pytest.mark.parametrize("content", [b"", b"not a checkpoint", b"PK\x03\x04" + bytes(100), "list", "tensor"])
def test_files_that_are_not_checkpoints_are_refused(target, tmp_path, content):
    bad = tmp_path / "bad.pt"
    if content == "list":
        torch.save([1, 2], bad)
    elif content == "tensor":
        torch.save(torch.zeros(3), bad)
    else:
        bad.write_bytes(content)
    assert_refused(target, str(bad))


def test_mismatching_run_is_refused_at_construction(source):
    lr_s = LogSchedule(T, 2, 0.01)
    with pytest.raises(CheckpointError, match="free tensors"):
        MetaTrainer(lambda s: None, {"other": lr_s.free}, checkpoint=source[0], progress=False)


# --- all or nothing ---------------------------------------------------------------------------------------------
class FlakyAdam(torch.optim.Adam):
    """Adam whose load_state_dict fails (before or after applying the state) for one chosen instance only: the
    validation probes, which work on copies of the optimiser, are not affected."""
    victim, after, error = None, True, RuntimeError

    def load_state_dict(self, state_dict):
        if self is FlakyAdam.victim and not FlakyAdam.after:
            raise FlakyAdam.error("refused before applying")
        super().load_state_dict(state_dict)
        if self is FlakyAdam.victim:
            raise FlakyAdam.error("refused after applying")


@pytest.mark.parametrize("after, error", [(True, RuntimeError), (False, RuntimeError), (True, KeyboardInterrupt)])
def test_failure_inside_optimizer_load_changes_nothing(source, after, error):
    make = lambda: make_trainer(seed0=7, optimizer=lambda ps: FlakyAdam(ps, lr=0.2))  # noqa: E731
    tr, twin = make(), make()
    tr.run(1)
    twin.run(1)
    before = state_of(tr)
    FlakyAdam.victim, FlakyAdam.after, FlakyAdam.error = tr.opt, after, error
    try:
        with pytest.raises(CheckpointError if error is RuntimeError else error) as ei:
            tr.load(source[0])
    finally:
        FlakyAdam.victim = None
    assert state_of(tr) == before
    if error is RuntimeError:  # a checkpoint the optimiser refuses is a bad checkpoint; Ctrl-C stays Ctrl-C
        assert str(ei.value).startswith(f"{source[0]}: committing the checkpoint to this trainer failed")
        assert isinstance(ei.value.__cause__, RuntimeError)
    tr.run(3)  # the trainer carries on exactly as one that never tried the load (timings aside)
    twin.run(3)
    untimed = lambda t: canon({"free": dict(t.free), "optimizer": t.opt.state_dict(),  # noqa: E731
                               "records": [{k: v for k, v in r.items() if not k.startswith("seconds")}
                                           for r in t.records]})
    assert untimed(tr) == untimed(twin)


def test_missing_file_is_an_os_error(target, tmp_path):
    with pytest.raises(FileNotFoundError):
        target.load(str(tmp_path / "nothing.pt"))


# --- temporary files --------------------------------------------------------------------------------------------
def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_temp_files_of_dead_processes_are_removed(tmp_path):
    ck = tmp_path / "run.pt"
    dead, live = _dead_pid(), os.getppid()
    stale = tmp_path / f"run.pt.tmp{dead}"
    mine = tmp_path / f"run.pt.tmp{os.getpid()}"  # this process's: not stale (the next save reuses the name)
    keep = [tmp_path / f"run.pt.tmp{live}", tmp_path / "run.pt.tmpx1", tmp_path / f"other.pt.tmp{dead}",
            tmp_path / f"run.pt.tmp0{dead}", tmp_path / f"run.pt.tmp{dead}.bak"]
    for p in [stale, mine, *keep]:
        p.write_bytes(b"x" * 100)
    tr = make_trainer(str(ck))  # opening the checkpoint path cleans up
    assert not stale.exists()
    assert mine.exists() and all(p.exists() for p in keep)
    stale.write_bytes(b"x")  # one left behind while the run goes on: the next save removes it
    tr.run(1)
    assert not stale.exists() and not mine.exists() and ck.exists()
    assert all(p.exists() for p in keep)
    assert torch.load(ck, weights_only=True)["iteration"] == 1


@pytest.mark.parametrize("failure", ["save", "replace", "interrupt"])
def test_failed_save_leaves_no_temp_file_and_the_previous_checkpoint(tmp_path, monkeypatch, failure):
    ck = tmp_path / "run.pt"
    tr = make_trainer(str(ck))
    tr.run(1)
    previous = ck.read_bytes()
    real_save = torch.save

    def partial_save(obj, f, *a, **k):  # writes a few bytes, then the disk "fills up" / the user hits Ctrl-C
        f.write(b"PK\x03\x04partial")
        raise KeyboardInterrupt if failure == "interrupt" else OSError(28, "No space left on device")

    if failure == "replace":
        monkeypatch.setattr(os, "replace", lambda a, b: (_ for _ in ()).throw(OSError(18, "cross-device")))
    else:
        monkeypatch.setattr(torch, "save", partial_save)
    with pytest.raises(KeyboardInterrupt if failure == "interrupt" else OSError):
        tr.save(str(ck))
    monkeypatch.setattr(torch, "save", real_save)
    assert sorted(os.listdir(tmp_path)) == ["run.pt"]
    assert ck.read_bytes() == previous
    make_trainer(str(ck)).load(str(ck))  # still a valid checkpoint


# --- the hostile user, at random ----------------------------------------------------------------------------------
def _nodes(obj, out, depth=0):
    """(container, key) for every value below obj (dicts and lists only: tuples are replaced whole)."""
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for k, v in items:
        out.append((obj, k))
        _nodes(v, out, depth + 1)
    return out


def _mutate(st: dict, rng: random.Random) -> None:
    box, k = rng.choice(_nodes(st, []))
    v = box[k]
    op = rng.choice(["replace", "delete", "nan", "perturb", "reshape", "add"])
    if op == "delete":
        del box[k]
    elif op == "nan" and isinstance(v, (torch.Tensor, float)):
        if isinstance(v, float):
            box[k] = rng.choice([float("nan"), float("inf")])
        elif v.is_floating_point() and v.numel():
            v.view(-1)[rng.randrange(v.numel())] = float("nan")
    elif op == "perturb":
        if isinstance(v, torch.Tensor) and v.is_floating_point() and v.numel():
            v.view(-1)[rng.randrange(v.numel())] += rng.choice([1e-12, 0.5, -3.0])
        elif isinstance(v, bool):
            box[k] = not v
        elif isinstance(v, int):
            box[k] = v + rng.choice([-1, 1, 10**9])
        elif isinstance(v, float):
            box[k] = v * rng.choice([0.5, -1.0, 1 + 1e-15]) + rng.choice([0.0, 1.0])
    elif op == "reshape" and isinstance(v, torch.Tensor):
        box[k] = rng.choice([lambda t: t.reshape(-1), lambda t: t.reshape(-1)[:-1] if t.numel() else t,
                             lambda t: t.float() if t.dtype != torch.float32 else t.double(),
                             lambda t: t.unsqueeze(0)])(v).clone()
    elif op == "add" and isinstance(v, (dict, list)):
        if isinstance(v, dict):
            v[rng.choice(["zz", 9, "val_loss2"])] = rng.choice([1.0, "s", None, torch.zeros(1)])
        else:
            v.append(copy.deepcopy(v[-1]) if v and rng.random() < 0.5 else 1.0)
    else:
        box[k] = rng.choice(["x", None, 1.5, -3, True, [], {}, (0.9, 0.999), torch.zeros(2), 2**70])


def test_fuzz_every_load_is_exact_or_refused(source, target, tmp_path):
    """Hundreds of random corruptions: each load either succeeds with exactly the file's content (the original's,
    unless the checksum was recomputed), or raises CheckpointError and changes nothing. Accepted content must also
    let the trainer continue."""
    path, data, original = source
    rng = random.Random(20240607)
    before = state_of(target)
    home = str(tmp_path / "home.pt")
    target.save(home)
    bad = tmp_path / "bad.pt"
    counts = {"refused": 0, "accepted": 0}

    def attempt(expected, resealed=False):
        try:
            target.load(str(bad))
        except CheckpointError as e:
            assert str(e).startswith(f"{bad}: ")
            assert state_of(target) == before
            counts["refused"] += 1
            return
        counts["accepted"] += 1
        assert state_of(target) == (expected() if callable(expected) else expected)
        if resealed:  # an accepted, re-sealed edit must leave a trainer that can go on
            target.run(target.iteration + 1)
        target.load(home)
        assert state_of(target) == before

    for _ in range(200):  # bit flips anywhere in the file
        pos, bit = rng.randrange(len(data)), rng.randrange(8)
        bad.write_bytes(data[:pos] + bytes([data[pos] ^ (1 << bit)]) + data[pos + 1:])
        attempt(original)
    for _ in range(30):  # truncations, appended bytes, overwritten runs
        bad.write_bytes(data[:rng.randrange(len(data))])
        attempt(original)
        bad.write_bytes(data + bytes(rng.randrange(256) for _ in range(rng.randrange(1, 300))))
        attempt(original)
        pos = rng.randrange(len(data))
        bad.write_bytes(data[:pos] + bytes(rng.randrange(256) for _ in range(16)) + data[pos + 16:])
        attempt(original)
    for i in range(160):  # structured edits of the dict, re-saved with a recomputed or a stale checksum
        st = torch.load(path, weights_only=True)
        for _ in range(rng.choice([1, 1, 2])):
            _mutate(st, rng)
        reseal = i % 2 == 0
        if reseal:
            try:
                checkpoint.seal(st)
            except CheckpointError:  # a type no checkpoint can hold: leave the old checksum
                reseal = False
        torch.save(st, bad)
        attempt((lambda: content_of(st)) if reseal else original, resealed=reseal)
    assert counts["refused"] > 300 and counts["accepted"] > 10


# --- the trainer writes only records a checkpoint accepts ----------------------------------------------------------
def test_evaluate_cannot_overwrite_reserved_record_fields():
    tr = make_trainer()
    build = tr.build

    def bad_build(seed):
        spec = build(seed)
        spec.evaluate = lambda p: {"iteration": 3.0}
        return spec
    tr.build = bad_build
    with pytest.raises(ValueError, match="evaluate must return"):
        tr.step()


@pytest.mark.parametrize("seed0", [1.5, "3", True])
def test_seed0_must_be_an_int(seed0):
    with pytest.raises(TypeError, match="seed0"):
        make_trainer(seed0=seed0)
