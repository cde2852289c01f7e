import json
import subprocess
import sys

import pytest

from revsgd.cli import main


def test_help_lists_the_commands():
    out = subprocess.run([sys.executable, "-m", "revsgd", "--help"], capture_output=True, text=True, check=True)
    for cmd in ("demo", "bench", "verify"):
        assert cmd in out.stdout


def test_tiny_demo_writes_png_and_json(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--steps", "30", "--iterations", "3", "--knots", "5",
                 "--threads", "1", "--no-progress"]) == 0
    rec = json.loads((tmp_path / "demo.json").read_text())
    assert len(rec["meta_iterations"]) == 3
    assert all("val_loss" in r and r["val_loss"] > 0 for r in rec["meta_iterations"])
    assert len(rec["schedules"]["lr_learned"]) == 30 and len(rec["schedules"]["lr_learned"][0]) == 4
    png = (tmp_path / "demo.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert "val loss" in capsys.readouterr().out


@pytest.mark.parametrize("argv,msg", [
    (["demo", "--steps", "0"], "positive integer"),
    (["demo", "--steps", "ten"], "positive integer"),
    (["demo", "--meta-lr", "-1"], "positive number"),
    (["nonsense"], "invalid choice"),
    ([], "required"),
])
def test_bad_arguments_exit_2_with_a_message(argv, msg, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert msg in capsys.readouterr().err


def test_knots_above_steps_is_refused(capsys, tmp_path):
    assert main(["demo", "--out", str(tmp_path), "--steps", "10", "--knots", "20"]) == 2
    assert "--knots" in capsys.readouterr().err


def test_verify_passes_here():
    out = subprocess.run([sys.executable, "-m", "revsgd", "verify"], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "0 failed" in out.stdout


def test_bench_runs_each_method_in_a_fresh_process(tmp_path, capsys):
    from revsgd.bench.unroll import main as bench_main
    out = tmp_path / "b.json"
    assert bench_main(["--steps", "20", "--methods", "plain", "exact", "naive", "drmad", "--exact-extra",
                       "--out", str(out), "--png", str(tmp_path / "b.png")]) == 0
    doc = json.loads(out.read_text())
    res = {r["method"]: r for r in doc["results"]}
    assert all(r["status"] == "ok" for r in res.values()), res
    assert res["exact"]["tape_bytes"] > 0 and res["exact"]["peak_rss_mb"] > 0
    assert res["naive"]["rel_error"]["lr"] < 1e-4          # float32 model: naive agrees with exact
    assert res["drmad"]["rel_error"]["lr"] > 1e-4          # the approximation is visibly approximate
    assert (tmp_path / "b.png").read_bytes()[:4] == b"\x89PNG"
    assert "| exact | 20 |" in capsys.readouterr().out
