import json
import subprocess
import sys

import pytest

import revsgd
from revsgd.cli import build_parser, main, want_progress


def test_help_lists_the_commands():
    out = subprocess.run([sys.executable, "-m", "revsgd", "--help"], capture_output=True, text=True, check=True)
    for cmd in ("demo", "bench", "verify", "--version"):
        assert cmd in out.stdout


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"revsgd {revsgd.__version__}"


@pytest.mark.parametrize("cmd,defaults", [
    ("demo", ["(default: 1000)", "(default: 60)", "(default: 10)", "(default: 0.08)", "(default: .)",
              "default: torch's current count", "default: on when stderr is a terminal"]),
    ("bench", ["(default: ['digits'])", "(default: [100, 1000])", "(default: 1)", "(default: .)",
               "default: on when stderr is a terminal"]),
])
def test_help_shows_the_defaults(cmd, defaults, capsys):
    with pytest.raises(SystemExit):
        main([cmd, "--help"])
    text = " ".join(capsys.readouterr().out.split())       # argparse wraps lines
    for d in defaults:
        assert d in text, d
    assert "(default: None)" not in text


def test_progress_follows_the_terminal_unless_forced(monkeypatch):
    assert want_progress(True) is True and want_progress(False) is False
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    assert want_progress(None) is True
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    assert want_progress(None) is False
    p = build_parser()
    assert p.parse_args(["demo"]).progress is None
    assert p.parse_args(["demo", "--no-progress"]).progress is False
    assert p.parse_args(["bench", "--progress"]).progress is True


def test_tiny_demo_writes_png_and_json(tmp_path, capsys):
    out = tmp_path / "new" / "folder"                       # --out is a folder, created if missing
    assert main(["demo", "--out", str(out), "--steps", "30", "--iterations", "3", "--knots", "5",
                 "--threads", "1", "--no-progress"]) == 0
    rec = json.loads((out / "demo.json").read_text())
    assert len(rec["meta_iterations"]) == 3
    assert all("val_loss" in r and r["val_loss"] > 0 for r in rec["meta_iterations"])
    assert len(rec["schedules"]["lr_learned"]) == 30 and len(rec["schedules"]["lr_learned"][0]) == 4
    assert set(rec["versions"]) >= {"revsgd", "torch", "numpy", "python"}
    assert rec["versions"]["revsgd"] == revsgd.__version__
    assert rec["kernel_backend"] in revsgd.BACKENDS and rec["threads"] == 1
    png = (out / "demo.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert "val loss" in capsys.readouterr().out


@pytest.mark.parametrize("argv,msg", [
    (["demo", "--steps", "0"], "positive integer"),
    (["demo", "--steps", "ten"], "positive integer"),
    (["demo", "--meta-lr", "-1"], "positive number"),
    (["bench", "--threads", "0"], "positive integer"),
    (["bench", "--problem", "mnist"], "invalid choice"),
    (["bench", "--methods", "adam"], "invalid choice"),
    (["nonsense"], "invalid choice"),
    ([], "required"),
])
def test_bad_arguments_exit_2_with_a_message(argv, msg, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert msg in capsys.readouterr().err


@pytest.mark.parametrize("cmd", ["demo", "bench"])
def test_out_must_be_a_folder(cmd, tmp_path, capsys):
    f = tmp_path / "results.json"
    f.write_text("{}")
    with pytest.raises(SystemExit) as e:
        main([cmd, "--out", str(f), "--steps", "10"])
    assert e.value.code == 2
    assert "names a folder" in capsys.readouterr().err


def test_knots_above_steps_is_refused(capsys, tmp_path):
    assert main(["demo", "--out", str(tmp_path), "--steps", "10", "--knots", "20"]) == 2
    assert "--knots" in capsys.readouterr().err


def test_verify_passes_here():
    out = subprocess.run([sys.executable, "-m", "revsgd", "verify"], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "0 failed" in out.stdout


def test_bench_writes_json_and_png_into_the_out_folder(tmp_path, capsys):
    out = tmp_path / "bench"
    assert main(["bench", "--out", str(out), "--steps", "20", "--methods", "plain", "exact", "naive", "replay",
                 "drmad", "--threads", "1", "--no-progress"]) == 0
    doc = json.loads((out / "bench_unroll.json").read_text())
    assert (out / "bench_unroll.png").read_bytes()[:4] == b"\x89PNG"
    res = {r["method"]: r for r in doc["results"]}
    assert set(res) == {"plain", "exact", "naive", "replay", "drmad"}          # each in its own process
    assert all(r["status"] == "ok" and r["problem"] == "digits" for r in res.values()), res
    assert doc["optimizer"] == "heavyball" and res["exact"]["stats"]["optimizer"] == "heavyball"
    assert res["exact"]["tape_bytes"] > 0 and res["exact"]["peak_rss_mb"] > 0
    assert res["exact"]["torch_threads"] == 1 and res["exact"]["stats"]["threads"] == 1 and doc["threads"] == 1
    assert res["naive"]["rel_error"]["lr"] < 1e-4          # float32 model: naive agrees with exact
    assert res["replay"]["rel_error"]["lr"] < 1e-4 and res["replay"]["storage_bytes"] > 0
    assert res["drmad"]["rel_error"]["lr"] > 1e-4          # the approximation is visibly approximate
    assert doc["versions"]["torch"] and doc["machine"]["os_cpu_count"] and doc["argv"]
    assert "| exact | 20 |" in capsys.readouterr().out
