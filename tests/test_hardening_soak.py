"""The soak script, short: one process, workflows switching LoRAs, embeddings and IP-Adapters on one
cached pipeline; memory stays within 5 % after the warm-up and every image equals a fresh run's."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_soak_script_short_run():
    env = {**os.environ, "DIFFUSERS_ADAPTERS_QUIET": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "soak.py"), "--workflows", "12", "--steps", "2"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "outputs equal to fresh runs: 12/12" in done.stdout
    growth = float(re.search(r"growth ([+-][0-9.]+) %", done.stdout).group(1))
    assert growth <= 5.0
    assert "PASS memory within 5 %; PASS outputs equal" in done.stdout
