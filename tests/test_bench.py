"""The benchmark package: the peers' mapping of the momentum form, the peers themselves (where installed), plain
training with torch.optim, the unroll benchmark's plan / ratios / table, the kernel-benchmark protocol and the load
generator. Fast: tiny T."""
import json
import time

import numpy as np
import pytest
import torch

import revsgd
from revsgd.bench import kernels as bk
from revsgd.bench import unroll as bu
from revsgd.bench import peers as bench_peers
from revsgd.bench.peers import ParamHolder, peer_missing, peer_unsupported, run_higher, run_torchopt, \
    torch_sgd_schedule
from revsgd.bench.timing import BusyLoad, CpuMeter, ContentionPolicy, RepeatPolicy, kernel_threads_info, \
    process_cpu_seconds
from revsgd.problems import digits_mlp

GAMMA = 0.9          # used as given: no quantisation


def _revsgd_form(w0, grads_of, alpha, gamma):
    """v <- γ v − (1 − γ) g;  w <- w + α v  (Maclaurin 2015), float64; returns [w_1, ..., w_T]."""
    w, v, out = w0.clone(), torch.zeros_like(w0), []
    for t in range(len(alpha)):
        g = grads_of(w, t)
        v = gamma[t] * v - (1 - gamma[t]) * g
        w = w + alpha[t] * v
        out.append(w.clone())
    return out


def _quadratic(seed=0, n=6):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, n, generator=g, dtype=torch.float64)
    A = A @ A.T / n + torch.eye(n, dtype=torch.float64)
    b = torch.randn(8, n, generator=g, dtype=torch.float64)
    return lambda w, t: A @ w - b[t % 8]


def test_constant_momentum_is_torch_sgd_with_lr_alpha_times_one_minus_gamma():
    grad = _quadratic()
    T, alpha = 8, 0.3
    w0 = torch.linspace(-1, 1, 6, dtype=torch.float64)
    ref = _revsgd_form(w0, grad, [alpha] * T, [GAMMA] * T)
    p = torch.nn.Parameter(w0.clone())
    opt = torch.optim.SGD([p], lr=alpha * (1 - GAMMA), momentum=GAMMA, dampening=0.0)
    for t in range(T):
        p.grad = grad(p.detach(), t)
        opt.step()
        assert torch.allclose(p.detach(), ref[t], rtol=0, atol=1e-14), (t, p.detach() - ref[t])
        # torch's buffer is b = −v / (1 − γ)
        v = (ref[t] - (ref[t - 1] if t else w0)) / alpha
        assert torch.allclose(opt.state[p]["momentum_buffer"], -v / (1 - GAMMA), rtol=1e-10, atol=1e-12)


def test_per_step_schedules_map_onto_torch_sgd_overrides():
    grad = _quadratic(1)
    T = 9
    alpha = torch.linspace(0.05, 0.4, T, dtype=torch.float64)
    gamma = torch.linspace(0.5, 0.95, T, dtype=torch.float64)
    w0 = torch.ones(6, dtype=torch.float64)
    ref = _revsgd_form(w0, grad, alpha, gamma)
    lam, mu = torch_sgd_schedule(alpha, gamma)
    p = torch.nn.Parameter(w0.clone())
    opt = torch.optim.SGD([p], lr=1.0, momentum=0.5, dampening=0.0)
    for t in range(T):
        opt.param_groups[0].update(lr=float(lam[t]), momentum=float(mu[t]))
        p.grad = grad(p.detach(), t)
        opt.step()
        assert torch.allclose(p.detach(), ref[t], rtol=0, atol=1e-13)
    with pytest.raises(ValueError, match="γ = 1"):
        torch_sgd_schedule(alpha, torch.ones(T, dtype=torch.float64))


def _exact_flat(pb, T, optimizer="heavyball"):
    sched = bu.schedules(optimizer, T)
    r = revsgd.hypergrad(pb.train_loss, pb.val_loss, pb.params0, optimizer=optimizer, hypers=pb.hypers, threads=1,
                         **sched)
    return sched, r, bu._flat_grads(r)


def test_schedules_are_used_as_given():
    s = bu.schedules("adam", 4)
    assert set(s) == {"lr", "beta1", "beta2", "eps", "weight_decay"}
    assert all(v.shape == (4,) and v.dtype == torch.float32 for v in s.values())
    assert float(s["beta2"][0]) == float(torch.tensor(0.999, dtype=torch.float32))   # not rounded to a grid
    assert set(bu.schedules("heavyball", 3)) == {"lr", "momentum"}


@pytest.mark.parametrize("optimizer", bu.OPTIMIZERS)
def test_plain_is_the_same_training_as_exact(optimizer):
    """``plain`` (torch.optim, float32) trains the same run as revsgd's optimiser (heavyball: lr = α(1 − γ))."""
    pb = digits_mlp()
    T = 20
    _, r, _ = _exact_flat(pb, T, optimizer)
    f, st = bu._plain(pb, T, bu.schedules(optimizer, T), optimizer)
    assert abs(f - r.val_loss) < 1e-4 * abs(r.val_loss), (f, r.val_loss)
    assert st["plain"] == bu.PLAIN[optimizer] and st["seconds_forward"] > 0


@pytest.mark.parametrize("peer,optimizer", [("torchopt", "heavyball"), ("higher", "heavyball"), ("torchopt", "sgd"),
                                            ("higher", "sgd"), ("torchopt", "adam"), ("torchopt", "adamw")])
def test_peer_hypergradients_agree_with_exact(peer, optimizer):
    if peer_missing(peer):
        pytest.skip(peer_missing(peer))
    pb = digits_mlp()
    T = 15
    sched, r, ex = _exact_flat(pb, T, optimizer)
    f, g, st = {"torchopt": run_torchopt, "higher": run_higher}[peer](pb, sched, optimizer)
    assert abs(f - r.val_loss) < 1e-5 and st["seconds_forward"] > 0
    for k in ("lr", "params0", "log_l2"):
        assert g[k].shape == ex[k].shape
        assert np.linalg.norm(g[k] - ex[k]) <= 1e-4 * np.linalg.norm(ex[k]), k
    if optimizer in ("heavyball", "sgd"):
        if peer == "torchopt":     # one momentum value for the whole run: the tied gradient Σ_t ∂f/∂γ_t
            assert "momentum" not in g and g["momentum_tied"].shape == (1,)
            assert abs(g["momentum_tied"][0] - ex["momentum"].sum()) <= 1e-4 * abs(ex["momentum"].sum())
        else:
            assert np.linalg.norm(g["momentum"] - ex["momentum"]) <= 1e-4 * np.linalg.norm(ex["momentum"])
    else:                          # torchopt's betas are floats: no beta gradients
        assert not any(k.startswith("beta") for k in g)


def test_higher_adam_runs_its_own_formula():
    """higher's DifferentiableAdam is torch 1.x's formula: same loss to ~1e-5, tied betas, lr close."""
    if peer_missing("higher"):
        pytest.skip(peer_missing("higher"))
    pb = digits_mlp()
    sched, r, ex = _exact_flat(pb, 10, "adam")
    f, g, _ = run_higher(pb, sched, "adam")
    assert abs(f - r.val_loss) < 1e-4 * abs(r.val_loss)
    assert g["beta1_tied"].shape == (1,) and g["beta2_tied"].shape == (1,) and g["lr"].shape == (10,)
    assert np.linalg.norm(g["lr"] - ex["lr"]) <= 1e-2 * np.linalg.norm(ex["lr"])


def test_peer_support_and_refusals():
    assert peer_unsupported("torchopt", "adamw") is None and peer_unsupported("higher", "adam") is None
    assert "AdamW" in peer_unsupported("higher", "adamw")
    if peer_missing("torchopt"):
        pytest.skip(peer_missing("torchopt"))
    sched = {"lr": torch.full((4,), 0.1), "momentum": torch.tensor([0.9, 0.9, 0.5, 0.9])}
    with pytest.raises(ValueError, match="constant momentum"):
        run_torchopt(digits_mlp(), sched, "heavyball")
    with pytest.raises(ValueError, match="AdamW"):
        run_higher(digits_mlp(), bu.schedules("adamw", 3), "adamw")


def test_param_holder_keeps_order_and_values():
    ts = [torch.randn(3, 2), torch.zeros(4)]
    h = ParamHolder(ts)
    assert [tuple(p.shape) for p in h.parameters()] == [(3, 2), (4,)]
    assert all(torch.equal(p, t) for p, t in zip(h.parameters(), ts))


def test_missing_peer_is_skipped_with_a_note(tmp_path, monkeypatch, capsys):
    import revsgd.bench.peers as peers
    monkeypatch.setattr(peers, "peer_missing", lambda name: f"{name} not installed (test)")
    out = tmp_path / "b.json"
    assert bu.main(["--problem", "digits", "--steps", "10", "--methods", "exact", "torchopt", "higher",
                    "--exact-extra", "--out", str(out), "--no-progress"]) == 0
    assert (tmp_path / "b.png").is_file()             # the figure goes beside the JSON unless --png says otherwise
    doc = json.loads(out.read_text())
    res = {r["method"]: r for r in doc["results"]}
    assert res["exact"]["status"] == "ok" and res["exact"]["stats"]["optimizer"] == "heavyball"
    assert res["exact"]["stats"]["threads"] == 1
    for m in ("torchopt", "higher"):
        assert res[m]["status"] == "skipped" and "not installed" in res[m]["note"]
        assert doc["peers_missing"][m].startswith(m)
    text = capsys.readouterr().out
    assert "| torchopt | 10 | skipped |" in text and "torchopt: skipped" in text


def test_adamw_skips_what_does_not_support_it(tmp_path, monkeypatch, capsys):
    calls = []

    def fake_run_child(method, T, tmpdir, timeout, mem, rep=0, **kw):
        calls.append((method, kw["optimizer"]))
        return dict(_cell(kw["problem"], method, T, 0.1, 10.0), optimizer=kw["optimizer"])
    monkeypatch.setattr(bu, "run_child", fake_run_child)
    monkeypatch.setattr(bu, "plot", lambda *a, **k: None)
    monkeypatch.setattr(bench_peers, "peer_missing", lambda name: None)   # installed or not: AdamW decides
    out = tmp_path / "b.json"
    assert bu.main(["--problem", "digits", "--optimizer", "adamw", "--steps", "10", "--methods", "exact", "higher",
                    "drmad", "replay", "--exact-extra", "--out", str(out), "--png", str(tmp_path / "b.png"),
                    "--no-progress"]) == 0
    assert calls == [("exact", "adamw"), ("replay", "adamw")]
    res = {r["method"]: r for r in json.loads(out.read_text())["results"]}
    assert res["higher"]["status"] == "skipped" and "AdamW" in res["higher"]["note"]
    assert res["drmad"]["status"] == "skipped" and "heavyball and sgd" in res["drmad"]["note"]
    text = capsys.readouterr().out
    assert "rel.err beta1 | rel.err beta2" in text and "adamw (lr 0.001" in text


def test_default_plan_covers_the_brief():
    cells = bu.plan_cells(list(bu.PROBLEM_NAMES), None, None, None, False)
    digits = {(m, T) for p, m, T in cells if p == "digits"}
    for m in ("plain", "exact", "naive", "torchopt", "higher", "replay", "checkpoint"):
        assert (m, 1000) in digits and (m, 10000) in digits
    for m in ("trajectory", "drmad", "truncated"):
        assert (m, 1000) in digits and (m, 10000) not in digits
    assert ("exact", 100000) in digits and ("plain", 100000) in digits
    for p in ("mlp1m", "cnn1m"):
        mine = {(m, T) for q, m, T in cells if q == p}
        assert mine == {(m, T) for T in (100, 1000, 10000)
                        for m in ("plain", "exact", "naive", "torchopt", "higher", "replay")}
    adam = {(m, T) for p, m, T in bu.plan_cells(["digits"], None, None, None, False, "adam")}
    assert ("drmad", 1000) not in adam and ("truncated", 1000) not in adam and ("replay", 10000) in adam
    assert {m for m, T in adam if T == 1000} == {"plain", "exact", "naive", "torchopt", "higher", "trajectory",
                                                 "checkpoint", "replay"}
    # --steps / --methods / --exact-extra override the plan
    cells = bu.plan_cells(["mlp1m"], [7], ["exact", "naive"], [30], False)
    assert cells == [("mlp1m", "exact", 7), ("mlp1m", "naive", 7), ("mlp1m", "exact", 30)]


def _cell(problem, method, T, seconds, peak, tape=0, optimizer="heavyball"):
    return {"problem": problem, "optimizer": optimizer, "method": method, "T": T, "status": "ok",
            "seconds": seconds, "peak_rss_mb": peak, "rss_over_baseline_mb": 1.0, "tape_bytes": tape,
            "storage_bytes": 0, "seconds_forward": seconds, "seconds_reverse": 0.0, "info_bits": 0.0}


def test_headline_ratios():
    res = [_cell("digits", "exact", 1000, 2.0, 400), _cell("digits", "torchopt", 1000, 4.0, 900),
           _cell("digits", "naive", 1000, 1.0, 800), _cell("digits", "exact", 10000, 20.0, 410),
           _cell("digits", "torchopt", 10000, 10.0, 5000), _cell("digits", "plain", 10000, 2.0, 390),
           _cell("digits", "replay", 10000, 40.0, 395),
           _cell("mlp1m", "exact", 1000, 30.0, 600, tape=2 ** 20), _cell("mlp1m", "plain", 1000, 10.0, 500),
           _cell("mlp1m", "exact", 10000, 300.0, 800, tape=50 * 2 ** 20), _cell("mlp1m", "plain", 10000, 100.0, 500)]
    ra = bu.ratios(res)
    assert ra["digits"]["exact_over_torchopt_time_T1000"]["value"] == 0.5
    assert ra["digits"]["exact_over_torchopt_time_T10000"]["value"] == 2.0
    assert ra["digits"]["exact_over_naive_time_T1000"] == {"value": 2.0, "exact_s": 2.0, "naive_s": 1.0,
                                                           "target": "<= 1.5"}
    assert ra["digits"]["exact_minus_plain_peak_rss_mb_T10000"]["value"] == 20.0
    assert ra["digits"]["beside"][10000]["replay"]["minus_plain_peak_rss_mb"] == 5.0
    assert ra["digits"]["beside"][10000]["replay"]["over_plain_time"] == 20.0
    assert ra["mlp1m"]["exact_over_plain_time_T1000"]["value"] == 3.0
    assert ra["mlp1m"]["exact_peak_minus_plain_peak_plus_tape_mb_T10000"]["value"] == 250.0
    lines = bu.headline_lines(ra)
    assert any("exact time / torchopt time at T=10000: 2.000" in s for s in lines)
    assert any("mlp1m [heavyball]: exact peak RSS − (plain peak RSS + tape) at T=10000: +250.0 MB" in s
               for s in lines)
    assert any("at T=10000: exact 20.00 s" in s and "replay 40.00 s (×20.0 plain), peak 395 MB (+5.0 MB vs plain)"
               in s for s in lines)


def test_adam_headline_has_no_heavy_ball_targets():
    res = [_cell("digits", m, T, s, p, optimizer="adam") for m, T, s, p in
           (("exact", 1000, 3.0, 400), ("naive", 1000, 2.0, 900), ("checkpoint", 1000, 2.5, 420),
            ("exact", 10000, 30.0, 410), ("plain", 10000, 8.0, 385))]
    ra = bu.ratios(res)
    assert ra["digits"]["optimizer"] == "adam" and "target" not in ra["digits"]["exact_over_naive_time_T1000"]
    assert ra["digits"]["exact_minus_plain_peak_rss_mb_T10000"]["value"] == 25.0
    lines = bu.headline_lines(ra)
    assert any(s.startswith("- digits [adam]: exact time / naive time at T=1000: 1.500 (exact") for s in lines)
    assert any("checkpoint 2.50 s" in s for s in lines)


def test_table_marks_tied_values_and_failed_cells():
    ok = dict(_cell("digits", "torchopt", 50, 1.0, 100), rel_error={"lr": 1e-7, "momentum_tied": 2e-7,
                                                                    "params0": 3e-7, "log_l2": 0.0})
    oom = {"problem": "digits", "method": "naive", "T": 50, "status": "out of memory",
           "parent_max_rss_seen_mb": 12345.0, "error": "parent killed the child"}
    md = bu.markdown([ok, oom], "digits")
    assert "2.00e-07 (Σ_t)" in md and "momentum: tied" in md
    row = [line for line in md.splitlines() if line.startswith("| naive")][0]
    assert "out of memory" in row and "12345 (seen)" in row and row.count("|") == md.splitlines()[0].count("|")
    adam = dict(_cell("digits", "higher", 50, 1.0, 100, optimizer="adam"),
                rel_error={"lr": 1e-5, "beta1_tied": 1e-3, "beta2_tied": 5.0, "params0": 0.3, "log_l2": 0.01},
                peer_note="higher's DifferentiableAdam: eps ...")
    md = bu.markdown([adam], "digits")
    assert md.splitlines()[0].count("|") == md.splitlines()[2].count("|")
    assert "1.00e-03 (Σ_t)" in md and "beta1, beta2: tied" in md and "higher's DifferentiableAdam" in md


def test_compare_against_exact_sums_tied_gradients(tmp_path):
    ex, pe = tmp_path / "e.npz", tmp_path / "p.npz"
    np.savez(ex, lr=np.array([1.0, 2.0]), beta1=np.array([0.5, 0.25]), params0=np.ones(3))
    np.savez(pe, lr=np.array([1.0, 2.0]), beta1_tied=np.array([0.75]), params0=np.ones(3) * 1.1)
    res = [dict(_cell("digits", "exact", 2, 1.0, 1.0, optimizer="adam"), grads_file=str(ex)),
           dict(_cell("digits", "torchopt", 2, 1.0, 1.0, optimizer="adam"), grads_file=str(pe))]
    bu.compare(res)
    r = res[1]["rel_error"]
    assert r["lr"] == 0.0 and r["beta1_tied"] == 0.0 and abs(r["params0"] - 0.1) < 1e-12
    assert "beta1_tied" in res[1]["rel_error_note"]


def test_bad_bench_arguments_exit_2(capsys):
    for argv in (["--problem", "mnist"], ["--steps", "0"], ["--methods", "sgd"], ["--threads", "-1"],
                 ["--optimizer", "rmsprop"]):
        with pytest.raises(SystemExit) as e:
            bu.main(argv)
        assert e.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_cells_after_an_out_of_memory_are_not_started(tmp_path, monkeypatch):
    calls = []

    def fake_run_child(method, T, tmpdir, timeout, mem, rep=0, **kw):
        calls.append((method, T))
        if method == "naive" and T >= 20:
            return {"problem": kw["problem"], "method": method, "T": T, "status": "out of memory",
                    "error": "parent killed the child", "parent_max_rss_seen_mb": 99.0}
        return dict(_cell(kw["problem"], method, T, 0.1, 10.0))
    monkeypatch.setattr(bu, "run_child", fake_run_child)
    monkeypatch.setattr(bu, "plot", lambda *a, **k: None)
    out = tmp_path / "b.json"
    assert bu.main(["--problem", "mlp1m", "--steps", "10", "20", "40", "--methods", "plain", "naive",
                    "--out", str(out), "--png", str(tmp_path / "b.png"), "--no-progress"]) == 0
    assert ("naive", 40) not in calls and ("plain", 40) in calls
    res = {(r["method"], r["T"]): r for r in json.loads(out.read_text())["results"]}
    assert res[("naive", 20)]["status"] == "out of memory"
    assert res[("naive", 40)]["status"] == "skipped" and "out of memory at T=20" in res[("naive", 40)]["note"]


def test_child_env_puts_this_revsgd_first_and_drops_thread_variables(monkeypatch):
    import os
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    monkeypatch.setenv("PYTHONPATH", "/elsewhere")
    here = os.path.dirname(os.path.dirname(os.path.abspath(revsgd.__file__)))
    env = bu.child_env(None)
    assert "OMP_NUM_THREADS" not in env and env["PYTHONPATH"].split(os.pathsep) == [here, "/elsewhere"]
    assert bu.child_env(2)["OMP_NUM_THREADS"] == "2"


# --- shared measurement helpers -----------------------------------------------------------------------------------

def test_repeat_policy_stops_once_the_best_time_is_reproduced():
    p = RepeatPolicy(repeats=2, agree=0.1, max_repeats=5, budget_s=100)
    assert p.more(0, [], []) and p.more(1, [1.0], [1.0])
    assert not p.more(2, [1.0, 1.05], [2.0, 2.1])          # both reproduced within 10 %
    assert p.more(2, [1.0, 1.5], [2.0, 2.1])
    assert not p.more(5, [1.0, 1.5] * 3, [2.0] * 6)          # max_repeats
    assert not RepeatPolicy(repeats=1, budget_s=0.1).more(1, [1.0], [2.0])   # out of budget
    assert ContentionPolicy().as_dict() == {"retries": 2, "threshold": 0.25, "wait_s": 5.0, "max_block_s": 20.0}


def test_busy_load_competes_and_stops():
    with BusyLoad("python", 1) as load:
        pid = load.procs[0].pid
        m = CpuMeter()
        time.sleep(0.6)
        assert load.cpu_seconds() > 0.2
        other = m.other_cores()
        assert other is None or other > 0.3
    assert load.procs == [] and process_cpu_seconds(pid) is None     # stopped and reaped
    with pytest.raises(ValueError):
        BusyLoad("disk")


def test_kernel_threads_info_can_leave_numba_alone():
    assert not any(k.startswith("numba") for k in kernel_threads_info(with_numba=False))


# --- kernel benchmark -----------------------------------------------------------------------------------------------

def test_schedule_and_packed_preload_have_the_real_layout():
    h = bk.schedule_shifts(0.9, 100)
    assert set(np.unique(h)) == {0, 1} and int(h.sum()) == 15      # 100·0.152 = 15.2 bits: limit minus < 1
    assert bk.h1_steps(10) == 16 and bk.h1_steps(20) == 32
    L = 300
    rng = np.random.default_rng(0)
    real, packed = revsgd.Tape(L, backend="numpy"), revsgd.Tape(L, backend="numpy")
    h = bk.schedule_shifts(0.9, 400)
    X, Y = bk.velocity_like(rng, L), bk.velocity_like(rng, L)
    for x in h.tolist():
        real.shift(X, x)
    plan = bk.packed_plan(int(h.sum()))
    assert len(plan) == int(h.sum()) // 16 + 1
    for x in plan:
        packed.shift(Y, x)
    assert real.info_bits == packed.info_bits == L * int(h.sum()) and real.nbytes == packed.nbytes


def test_torch_momentum_is_exact_momentum_on_tensors():
    rng = np.random.default_rng(3)
    L = 500
    w0, g = rng.uniform(-1, 1, L), rng.standard_normal(L) * 0.01
    em = revsgd.ExactMomentum(w0, backend="numpy")
    tm = bk.TorchMomentum(w0)
    for _ in range(12):
        em.step(g, 0.01, 0.9)
        tm.step(torch.from_numpy(g), 0.01, 0.9)
    assert np.array_equal(em.fixed_params, tm.fixed_params.numpy())
    assert np.array_equal(em.fixed_velocity, tm.fixed_velocity.numpy()) and em.info_bits == tm.info_bits
    for _ in range(12):
        tm.unstep_position(0.01)
        tm.unstep_velocity(torch.from_numpy(g), 0.9)
    assert tm.at_start() and np.array_equal(tm.fixed_params.numpy(), revsgd.to_fixed(w0))


@pytest.mark.parametrize("be", sorted({revsgd.BACKENDS[0], "torch"} & set(revsgd.BACKENDS)))
def test_kernel_bench_cell_reverses_and_reports_rates(be):
    assert bk.bigint_selfcheck(0)["ok"]
    bk.warm_up(be)
    cal = bk.calibrate(be, 2000)
    policy, cont = RepeatPolicy(repeats=1, budget_s=0.2), ContentionPolicy(retries=0)
    cell = bk.run_cell(be, 2000, 40, 5, 0.9, policy, "real", 30.0, cal, 0, cont)
    assert cell["reversed_to_start"] and cell["preload"]["method"] == "real" and cell["preload"]["shifts"] == 35
    assert set(cell["rates"]) == set(bk.OPS) and all(v > 0 for v in cell["rates"].values())
    tr = cell["tape_at_T"]
    assert tr["info_equals_sum_of_shifts"] and tr["deficit_below_one_bit_per_lane"] and tr["nbytes_within_bound"]
    assert tr["info_bits"] == 2000 * int(bk.schedule_shifts(0.9, 40).sum())
    assert cell["optimizer_at_T"]["steps_on_top_of_preload"] == 5 and "optimizer_skipped" not in cell
    packed = bk.run_cell(be, 2000, 40, 5, 0.9, policy, "packed", 30.0, cal, 0, cont)
    assert packed["preload"]["shifts"] == 1 and packed["tape_at_T"]["info_bits"] == tr["info_bits"]
    skipped = bk.run_cell(be, 2000, 40, 5, 0.9, policy, "auto", 0.0, cal, 0, cont)
    assert skipped["skipped"] and "exceeds --budget-s" in skipped["reason"]


def test_bigint_baseline_and_summary():
    n = bk.bigint_n(0.9)
    assert n == 58983 and abs(bk.bigint_bits_per_step(n) - 0.152) < 1e-3
    big = bk.bigint_bench(500, 100, n, 1, 1, 0)
    assert big["list"]["scale"] > 0 and big["store_bits_per_lane"] == round(100 * bk.bigint_bits_per_step(n))
