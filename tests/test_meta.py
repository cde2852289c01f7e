import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from revsgd.meta import MetaSpec, MetaTrainer
from revsgd.meta.params import LogitSchedule, LogSchedule

T = 25


def make_free():
    return LogSchedule(T, 2, 0.01), LogitSchedule(T, 2, 0.5)


def make_build(lr_s, mom_s, fail_at=None):
    g = torch.Generator().manual_seed(0)
    X = torch.randn(80, 3, generator=g, dtype=torch.float64)
    Y = X @ torch.tensor([[1.0], [-2.0], [0.5]], dtype=torch.float64) + 0.1 * torch.randn(80, 1, generator=g,
                                                                                         dtype=torch.float64)

    def build(seed):
        if fail_at is not None and seed == fail_at:
            raise KeyboardInterrupt("simulated kill")
        perm = torch.from_numpy(__import__("numpy").random.default_rng(seed).permutation(60))

        def train_loss(p, h, t):
            i = perm[(t % 6) * 10:(t % 6) * 10 + 10]
            return (((X[i] @ p["w"] + p["b"]) - Y[i]) ** 2).mean()

        def val_loss(p, h):
            return (((X[60:] @ p["w"] + p["b"]) - Y[60:]) ** 2).mean()
        p0 = {"w": torch.zeros(3, 1, dtype=torch.float64), "b": torch.zeros(1, dtype=torch.float64)}
        return MetaSpec(train_loss, val_loss, p0, {"lr": lr_s(), "momentum": mom_s()}, "heavyball")
    return build


def trainer(ckpt=None, fail_at=None, **kw):
    lr_s, mom_s = make_free()
    return MetaTrainer(make_build(lr_s, mom_s, fail_at), {"lr": lr_s.free, "mom": mom_s.free}, meta_lr=0.2,
                       checkpoint=ckpt, progress=False, threads=1, **kw)


def test_meta_loop_lowers_validation_loss():
    recs = trainer().run(10)
    assert len(recs) == 10
    assert recs[-1]["val_loss"] < 0.5 * recs[0]["val_loss"]
    assert all(r["hypergrad_norms"]["lr"] > 0 and r["tape_bytes"] > 0 for r in recs)
    assert all(r["train_loss"] > 0 and r["seconds"] > 0 for r in recs)
    assert [r["seed"] for r in recs] == list(range(10))


def test_resume_after_interruption_is_bit_identical(tmp_path):
    full = trainer()
    full.run(6)
    ck = str(tmp_path / "meta.pt")
    a = trainer(ck, fail_at=3)
    with pytest.raises(KeyboardInterrupt):
        a.run(6)
    st = torch.load(ck, weights_only=True)
    assert st["iteration"] == 3 and len(st["records"]) == 3
    b = trainer(ck)
    assert b.iteration == 3
    b.run(6)
    for k in full.free:
        assert torch.equal(full.free[k], b.free[k]), k
    assert [r["val_loss"] for r in full.records] == [r["val_loss"] for r in b.records]


def test_checkpoint_mismatch_is_refused(tmp_path):
    ck = str(tmp_path / "meta.pt")
    trainer(ck).run(1)
    lr_s, _ = make_free()
    with pytest.raises(ValueError, match="free tensors"):
        MetaTrainer(lambda s: None, {"other": lr_s.free}, checkpoint=ck, progress=False)


def test_free_tensors_must_be_leaves():
    with pytest.raises(TypeError, match="leaf"):
        MetaTrainer(lambda s: None, {"x": torch.zeros(3)}, progress=False)


def test_killed_process_resumes_exactly(tmp_path):
    """SIGKILL a demo run mid-way; resuming from its checkpoint gives the uninterrupted result bit for bit."""
    env = dict(os.environ, OMP_NUM_THREADS="1")

    def demo(out, ck, iterations, **kw):
        cmd = [sys.executable, "-m", "revsgd", "demo", "--out", str(tmp_path / out), "--checkpoint", str(ck),
               "--steps", "20", "--knots", "4", "--threads", "1", "--no-progress", "--iterations", str(iterations)]
        return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, **kw)

    ck = tmp_path / "killed.pt"
    p = demo("k", ck, 1000)
    deadline, done = time.time() + 120, 0
    while time.time() < deadline and done < 2:
        time.sleep(0.1)
        try:
            done = torch.load(ck, weights_only=True)["iteration"]
        except Exception:  # not written yet
            pass
    p.send_signal(signal.SIGKILL)
    p.wait()
    done = torch.load(ck, weights_only=True)["iteration"]
    assert done >= 2
    target = done + 3
    for out, path in (("k", ck), ("ref", tmp_path / "ref.pt")):
        q = demo(out, path, target)
        assert q.wait() == 0, q.stderr.read().decode()
    assert not list(tmp_path.glob("*.tmp*"))  # a temp file the kill may have left behind is gone after resuming
    a = torch.load(tmp_path / "ref.pt", weights_only=True)
    b = torch.load(ck, weights_only=True)
    assert a["iteration"] == b["iteration"] == target
    for k in a["free"]:
        assert torch.equal(a["free"][k], b["free"][k]), k
    assert torch.equal(a["optimizer"]["state"][0]["exp_avg"], b["optimizer"]["state"][0]["exp_avg"])
    assert [r["val_loss"] for r in a["records"]] == [r["val_loss"] for r in b["records"]]
