"""The release check's smoke script (tools/wheel_smoke.py) runs every public name once; here it runs
against the source tree, so a new public name without a smoke case fails in `make test`, not only in
`make wheel-check`."""
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "tools" / "wheel_smoke.py"


def test_smoke_script_runs_every_public_name():
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FASTALIGN_BACKEND")}
    env["FASTALIGN_SMOKE_SOURCE"] = "1"
    proc = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "public ops from" in proc.stdout
