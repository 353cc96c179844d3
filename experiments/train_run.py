"""One ``gvpo train`` run in a fresh process with one thread, as every sweep in experiments/ runs them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path


def train_run(settings: dict, out: Path) -> str:
    """Runs ``gvpo train`` with ``settings`` (output_dir included); returns one line for the sweep's log:
    the accuracy before and after and the seconds, or FAILED with the end of its error output."""
    cmd = [sys.executable, "-m", "gvpo.cli", "train", *[f"{k}={v}" for k, v in settings.items()]]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    start = time.time()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode:
        return f"FAILED {out}: {done.stderr[-800:]}"
    s = json.loads((out / "summary.json").read_text())
    return f"{out}: {s['initial_accuracy']:.3f} -> {s['final_accuracy']:.3f} ({time.time() - start:.0f} s)"
