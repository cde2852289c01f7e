"""scripts/device_check.py (the prepared GPU check) runs its whole logic on the CPU and passes."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_device_check_on_cpu():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p),
               OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "device_check.py"), "--device", "cpu",
                          "--quick", "--lanes", "1e5"], capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    doc = json.loads(out.stdout)
    assert doc["ok"] and doc["identity"]["cases"] == 6 and not doc["identity"]["mismatches"]
    assert "torch:cpu" in doc["identity"]["backends"]
    assert all(v["ok"] for k, v in doc["cnn_reversal"].items() if k != "seconds")
    assert doc["kernel_rate"]["element_steps_per_s"]["step_no_shift"] > 0
    assert doc["exact_vs_naive_digits"]["exact"]["val_loss"] == doc["exact_vs_naive_digits"]["naive"]["val_loss"]
