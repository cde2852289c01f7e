"""revsgd.distributed on CPU with gloo: processes on 127.0.0.1 (free ports, one thread each, hard timeouts).

This file is also the worker: ``python tests/test_distributed.py SCENARIO OUTDIR`` under torchrun's environment
(:func:`revsgd.distributed.run_local`). Workers write one result file per rank and scenario (torch.save) — only on
success; a failing scenario writes what it raised.
"""
from __future__ import annotations

import concurrent.futures
import os
import sys
import time

import torch

import revsgd
import revsgd.distributed as rd

# --- the problem (shared by the workers and the single-process reference) -------------------------------------------

T = 25
BATCH = 12          # global minibatch: divisible by 1, 2, 3 (the "mean" convention is then exact)
F64 = torch.float64


def data():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(48, 4, generator=g, dtype=F64)
    Y = torch.randn(48, 2, generator=g, dtype=F64)
    # W 4x7 (28), b (7), V 7x2 (14): 49 lanes; group boundaries 28 and 35 fall inside ranks' ranges for W = 2, 3
    p0 = {"W": torch.randn(4, 7, generator=g, dtype=F64) * 0.5, "b": torch.zeros(7, dtype=F64),
          "V": torch.randn(7, 2, generator=g, dtype=F64) * 0.5}
    return X, Y, p0


def losses(shard_fn, fail=None):
    X, Y, p0 = data()
    f = lambda p, x: torch.tanh(x @ p["W"] + p["b"]) @ p["V"]  # noqa: E731
    calls = {}

    def train_loss(p, h, t):
        calls[t] = calls.get(t, 0) + 1
        if fail is not None:
            fail(t, calls[t])
        i = shard_fn(torch.arange(BATCH) + BATCH * (t % 4))
        return ((f(p, X[i]) - Y[i]) ** 2).mean() + h["l2"] * (p["W"] ** 2).sum()

    def val_loss(p, h):
        return ((f(p, X) - Y) ** 2).mean()
    return train_loss, val_loss, p0


HYPERS = {"l2": torch.tensor(1e-3, dtype=F64)}


def schedules(opt):
    if opt == "sgd":
        return dict(lr=torch.linspace(0.05, 0.2, T, dtype=F64), momentum=torch.full((T,), 0.9, dtype=F64),
                    dampening=0.1, weight_decay=1e-3)
    return dict(lr=torch.full((T, 3), 0.01, dtype=F64), betas=(0.9, 0.99), eps=1e-6, weight_decay=1e-3)


def flat(grads: dict) -> torch.Tensor:
    return torch.cat([v.reshape(-1).to(F64) for k, v in sorted(grads.items()) if k != "params0"] +
                     [v.reshape(-1).to(F64) for v in grads["params0"].values()])


# --- workers -------------------------------------------------------------------------------------------------------

def _save(out, name, obj):
    torch.save(obj, os.path.join(out, f"{name}.rank{torch.distributed.get_rank()}.pt"))


def _error_record(e: BaseException) -> dict:
    return {"type": type(e).__name__, "message": str(e), "mro": [c.__name__ for c in type(e).__mro__],
            "rank": getattr(e, "rank", None), "step": getattr(e, "step", None), "phase": getattr(e, "phase", None)}


def _run(out, name, fn):
    """Run a scenario; save its result or the error it raised (never both)."""
    t0 = time.perf_counter()
    try:
        res = fn()
    except Exception as e:
        _save(out, name + ".error", _error_record(e))
        return
    _save(out, name, {"grads": res.grads, "stats": res.stats, "val_loss": res.val_loss,
                      "seconds": time.perf_counter() - t0})


def worker_equiv(out):
    W = torch.distributed.get_world_size()
    tl, vl, p0 = losses(rd.shard)
    for opt in ("sgd", "adam"):
        _run(out, opt, lambda: rd.hypergrad(tl, vl, p0, optimizer=opt, hypers=HYPERS, **schedules(opt)))
    if W == 2:
        _run(out, "sgd-replicated", lambda: rd.hypergrad(tl, vl, p0, optimizer="sgd", hypers=HYPERS,
                                                         shard_state=False, **schedules("sgd")))
        fast = dict(schedules("adam"), betas=(0.25, 0.5))   # 2.4 bits per lane and step: rows on the stacks
        _run(out, "adam-fast", lambda: rd.hypergrad(tl, vl, p0, optimizer="adam", hypers=HYPERS, **fast))
        _run(out, "adam-fast-spill", lambda: rd.hypergrad(tl, vl, p0, optimizer="adam", hypers=HYPERS,
                                                          tape_dir=os.path.join(out, "tapes"), spill_block_bytes=16,
                                                          **fast))
        _run(out, "sgd-auto", lambda: rd.hypergrad(tl, vl, p0, optimizer="sgd", hypers=HYPERS,
                                                   grad_frac_bits="auto", **schedules("sgd")))
        _run(out, "sgd-checkpoint", lambda: rd.hypergrad(tl, vl, p0, optimizer="sgd", hypers=HYPERS,
                                                         method="checkpoint", **schedules("sgd")))
        X, Y, _ = data()
        f = lambda p, x: torch.tanh(x @ p["W"] + p["b"]) @ p["V"]  # noqa: E731

        def val_part(p, h):     # each rank: the mean over its half of the validation set; reduce="sum": /2 here
            i = rd.shard(torch.arange(48))
            return ((f(p, X[i]) - Y[i]) ** 2).mean() / 2

        def train_sum(p, h, t):  # reduce="sum": the loss scaled to the global minibatch by hand
            i = rd.shard(torch.arange(BATCH) + BATCH * (t % 4))
            return ((f(p, X[i]) - Y[i]) ** 2).sum() / (2 * BATCH) + h["l2"] * (p["W"] ** 2).sum() / 2
        _run(out, "sgd-sum", lambda: rd.hypergrad(train_sum, val_part, p0, optimizer="sgd", hypers=HYPERS,
                                                  reduce="sum", val_reduce="sum", **schedules("sgd")))


def worker_fail(out):
    """Failures on some ranks, one after another in the same process group (which stays usable)."""
    rank, W = torch.distributed.get_rank(), torch.distributed.get_world_size()
    kw = dict(optimizer="sgd", hypers=HYPERS, **schedules("sgd"))

    def raise_at(r, step, call):
        def fail(t, n):
            if rank == r and t == step and n == call:
                raise ValueError(f"injected failure on rank {r}")
        return fail

    tl, vl, p0 = losses(rd.shard, raise_at(1, 5, 1))               # forward, step 5, rank 1
    _run(out, "forward", lambda: rd.hypergrad(tl, vl, p0, **kw))
    tl, vl, p0 = losses(rd.shard, raise_at(0, 3, 2))               # reverse (second evaluation of step 3), rank 0
    _run(out, "reverse", lambda: rd.hypergrad(tl, vl, p0, tape_dir=os.path.join(out, "tapes"),   # spills
                                              spill_block_bytes=16, **dict(kw, momentum=0.25)))
    tl, vl, p0 = losses(rd.shard)
    p_big = {**p0, "z": torch.tensor([2047.9], dtype=F64)}          # the last lane, owned by the last rank, ...
    tl_push = lambda p, h, t: tl(p, h, t) - 100.0 * p["z"].sum()    # noqa: E731 ... is pushed out of range
    _run(out, "overflow", lambda: rd.hypergrad(tl_push, vl, p_big, **kw))
    lr = schedules("sgd")["lr"] * (1.0 if rank == 0 else 1.5)       # inputs that differ between ranks
    _run(out, "mismatch", lambda: rd.hypergrad(tl, vl, p0, optimizer="sgd", hypers=HYPERS, lr=lr, momentum=0.9))
    bad = "sgd" if rank != W - 1 else "no-such-optimizer"           # a bad argument on one rank
    _run(out, "badarg", lambda: rd.hypergrad(tl, vl, p0, optimizer=bad, lr=0.1, momentum=0.9, steps=T,
                                             hypers=HYPERS))
    def overflow(t, n):                                             # other exception types survive too
        if rank == 1 and t == 2 and n == 2:
            raise OverflowError("huge")
    tl3, vl3, p3 = losses(rd.shard, overflow)
    _run(out, "overflow-reverse", lambda: rd.hypergrad(tl3, vl3, p3, **kw))
    _run(out, "tampered", lambda: _tampered(rank))
    _run(out, "tampered-start", lambda: _tampered(rank, "start"))
    _run(out, "after", lambda: rd.hypergrad(tl, vl, p0, **kw))      # the group still works


def _tampered(rank, where="state"):
    """The lower-level API (DistributedProblem + Unroll + exact_state_factory); rank 1 corrupts one bit of its shard of
    the optimiser state between the passes (caught by the gradient fingerprints), or of its record of the start
    (caught by the end-of-run check on rank 1 alone): every rank must refuse the result."""
    from revsgd.engine import Unroll
    from revsgd.frontend.inputs import as_params, pinned_threads
    from revsgd.frontend.problem import TorchProblem
    from revsgd.optim import get_optimizer
    tl, vl, p0 = losses(rd.shard)
    params = as_params(p0)
    comm = rd.Comm()
    with pinned_threads(1) as k:
        prob = rd.DistributedProblem(TorchProblem(tl, vl, params, HYPERS, k, 0, T), comm)
        sch = {"lr": schedules("sgd")["lr"].numpy(), "momentum": schedules("sgd")["momentum"].numpy(),
               "dampening": torch.full((T,), 0.1, dtype=F64).numpy(), "weight_decay": torch.zeros(T, dtype=F64).numpy()}
        u = Unroll(prob, get_optimizer("sgd"), sch, params.flat(), exact_state=rd.exact_state_factory(comm))
        u.forward()
        if rank == 1 and where == "state":
            u.prov.ex.X["momentum_buffer"][3] ^= 1
        if rank == 1 and where == "start":
            d = u.prov.ex.start["momentum_buffer"]          # the start's SHA-256, one bit flipped
            u.prov.ex.start["momentum_buffer"] = bytes([d[0] ^ 1]) + d[1:]
        f, dw, dth = prob.val()
        with comm.guard():
            u.reverse(dw, dth)
    raise AssertionError("the tampered run was accepted")


def worker_timeout(out):
    """Rank 1 stalls at step 2 longer than the process group's timeout: rank 0 must say which step and rank."""
    rank = torch.distributed.get_rank()

    def stall(t, n):
        if rank == 1 and t == 2 and n == 1:
            time.sleep(6)
    import datetime
    group = torch.distributed.new_group(backend="gloo", timeout=datetime.timedelta(seconds=3))
    tl, vl, p0 = losses(lambda i: rd.shard(i, group=group), stall)
    _run(out, "timeout", lambda: rd.hypergrad(tl, vl, p0, optimizer="sgd", hypers=HYPERS, group=group,
                                              **schedules("sgd")))


def worker_main(argv):
    scenario, out = argv
    rd.init_from_env("gloo", timeout_s=60.0)
    torch.set_num_threads(1)
    {"equiv": worker_equiv, "fail": worker_fail, "timeout": worker_timeout}[scenario](out)
    if scenario != "timeout":
        torch.distributed.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)      # a broken gloo group may abort in its destructor; the results are written


# --- the tests -----------------------------------------------------------------------------------------------------

def _launch(scenario, world, out, timeout_s):
    os.makedirs(out, exist_ok=True)
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(revsgd.__file__)))   # the revsgd under test
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONWARNINGS"] = "ignore"
    t0 = time.monotonic()
    res = rd.run_local([sys.executable, os.path.abspath(__file__), scenario, out], world, timeout_s=timeout_s,
                       env=env)
    wall = time.monotonic() - t0
    for r in res:
        assert r.returncode is not None, f"rank {r.rank} of {scenario} hung (killed after {timeout_s}s):\n{r.stderr}"
        assert r.returncode == 0, f"rank {r.rank} of {scenario} exited {r.returncode}:\n{r.stderr[-4000:]}"
    return wall


def _load(out, name, world):
    return [torch.load(os.path.join(out, f"{name}.rank{r}.pt"), weights_only=False) for r in range(world)]


def _reference(opt):
    tl, vl, p0 = losses(lambda i: i)
    return revsgd.hypergrad(tl, vl, p0, optimizer=opt, hypers=HYPERS, **schedules(opt))


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def test_world_sizes_match_single_process(tmp_path):
    worlds = (1, 2, 3)
    with concurrent.futures.ThreadPoolExecutor(len(worlds)) as pool:
        futs = {W: pool.submit(_launch, "equiv", W, str(tmp_path / f"w{W}"), 80) for W in worlds}
        refs = {opt: _reference(opt) for opt in ("sgd", "adam")}
        for f in futs.values():
            f.result()
    bound = 1e-10
    for W in worlds:
        out = str(tmp_path / f"w{W}")
        for opt in ("sgd", "adam"):
            res = _load(out, opt, W)
            ref = refs[opt]
            R = flat(ref.grads)
            for r in range(W):
                G = flat(res[r]["grads"])
                # every rank: the same hypergradient, bit for bit (the gradient sum is integer; gloo's float sums
                # give every rank the same bits), matching one process to float rounding of the gradient sums
                assert torch.equal(G, flat(res[0]["grads"])), (W, opt, r)
                assert _rel(G, R) <= bound, (W, opt, _rel(G, R))
                st = res[r]["stats"]
                assert st["world_size"] == W and st["rank"] == r and st["finite"]
                assert st["sharded"] == (W > 1)
            st = res[0]["stats"]
            # the shards' tapes hold exactly the single-process tape's information
            assert st["info_bits_total"] == ref.stats["info_bits"], (W, opt)
            assert len(st["tape_bytes_per_rank"]) == W
            assert abs(res[0]["val_loss"] - ref.val_loss) <= 1e-12 * abs(ref.val_loss)
    out = str(tmp_path / "w2")
    for name, ref in (("sgd-replicated", refs["sgd"]), ("sgd-auto", refs["sgd"]), ("sgd-checkpoint", refs["sgd"]),
                      ("sgd-sum", refs["sgd"])):
        res = _load(out, name, 2)
        assert torch.equal(flat(res[0]["grads"]), flat(res[1]["grads"]))
        assert _rel(flat(res[0]["grads"]), flat(ref.grads)) <= bound, name
    mem, spill = _load(out, "adam-fast", 2), _load(out, "adam-fast-spill", 2)
    for r in range(2):
        assert torch.equal(flat(spill[r]["grads"]), flat(mem[r]["grads"]))   # spilling changes nothing, bit for bit
    assert min(spill[0]["stats"]["spilled_bytes_per_rank"]) > 0     # and it did spill
    assert spill[0]["stats"]["info_bits_total"] == mem[0]["stats"]["info_bits_total"]
    assert os.listdir(os.path.join(out, "tapes")) == []             # its files are gone
    rep = _load(out, "sgd-replicated", 2)[0]["stats"]
    assert rep["tape_bytes_per_rank"][0] == _load(str(tmp_path / "w1"), "sgd", 1)[0]["stats"]["tape_bytes"]


def test_failing_rank_makes_every_rank_raise(tmp_path):
    out = str(tmp_path)
    W = 3
    wall = _launch("fail", W, out, 80)
    assert wall < 80

    def errors(name):
        assert not any(os.path.exists(os.path.join(out, f"{name}.rank{r}.pt")) for r in range(W)), \
            f"{name}: a rank returned a result"
        errs = _load(out, name + ".error", W)
        assert all(e["message"] == errs[0]["message"] and e["type"] == errs[0]["type"] for e in errs), errs
        return errs[0]

    e = errors("forward")
    assert e["rank"] == 1 and e["step"] == 5 and e["phase"] == "forward" and "ValueError" in e["mro"]
    assert "DistributedError" in e["mro"] and "injected failure on rank 1" in e["message"]
    e = errors("reverse")
    assert e["rank"] == 0 and e["step"] == 3 and e["phase"] == "reverse" and "ValueError" in e["mro"]
    assert os.listdir(os.path.join(out, "tapes")) == []            # spill files removed after the error
    e = errors("overflow")
    assert e["rank"] == W - 1 and "OverflowError" in e["mro"] and e["phase"] == "forward", e
    e = errors("mismatch")
    assert "differ between ranks" in e["message"] and "ValueError" in e["mro"]
    e = errors("badarg")
    assert e["rank"] == W - 1 and e["phase"] == "setup" and "ValueError" in e["mro"]
    e = errors("overflow-reverse")
    assert e["rank"] == 1 and e["step"] == 2 and "OverflowError" in e["mro"]
    e = errors("tampered")
    assert "ReversalError" in e["mro"], e
    e = errors("tampered-start")     # the end check, agreed: every rank names rank 1's shard
    assert "ReversalError" in e["mro"] and "momentum_buffer on rank 1" in e["message"], e
    res = _load(out, "after", W)
    assert all(torch.equal(flat(r["grads"]), flat(res[0]["grads"])) for r in res)


def test_collective_timeout_names_step_and_rank(tmp_path):
    out = str(tmp_path)
    wall = _launch("timeout", 2, out, 40)
    assert wall < 40
    e0 = _load(out, "timeout.error", 1)[0]
    assert "CollectiveError" in e0["mro"] and e0["rank"] == 0 and e0["step"] == 2, e0
    assert "rank 0 of 2" in e0["message"] and "at step 2 (forward)" in e0["message"]
    assert not os.path.exists(os.path.join(out, "timeout.rank0.pt"))
    e1 = torch.load(os.path.join(out, "timeout.error.rank1.pt"), weights_only=False)
    assert "CollectiveError" in e1["mro"] and e1["step"] == 2


def test_helpers():
    assert rd.lane_ranges(10, 3) == [(0, 3), (3, 6), (6, 10)]
    assert rd.lane_ranges(49, 2) == [(0, 24), (24, 49)]
    x = torch.arange(12)
    assert torch.equal(torch.cat([rd.shard(x, r, 3) for r in range(3)]), x)
    try:
        rd.shard(x, 0, 5)
    except ValueError as e:
        assert "equal=False" in str(e)
    else:
        raise AssertionError("unequal shards accepted")
    assert rd.grad_range(48, 1) == 2.0**14 and rd.grad_range(48, 3) == 2.0**12
    q = rd.quantise(torch.tensor([1.5, -2.0**-49, 2.0**-50]), 48, 2)
    assert q.tolist() == [3 * 2**47, 0, 0]   # ties to even
    for bad, exc in ((torch.tensor([2.0**13]), OverflowError), (torch.tensor([float("nan")]), ValueError)):
        try:
            rd.quantise(bad, 48, 2)
        except exc:
            pass
        else:
            raise AssertionError(f"{bad} accepted")


if __name__ == "__main__":
    worker_main(sys.argv[1:])
