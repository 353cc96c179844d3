"""Multi-process training (gloo on CPU) gives the parameters of a single process with the same global batch."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

WORKER = Path(__file__).with_name("distributed_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(nproc: int, model_dir: str, out: Path, steps: int = 3, replay: int = 0, demos: int = 0):
    # The package under test first (a checkout's src/, not whatever copy is installed), then the worker's folder.
    src = Path(__file__).parents[1] / "src"
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(src), str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
           "127.0.0.1", "--master_port", str(_free_port()), str(WORKER), model_dir, str(out), str(steps), str(replay), str(demos)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((out / "summary.json").read_text())["num_processes"] == nproc
    return load_file(str(out / "checkpoints" / f"step-{steps:06d}" / "model.safetensors"))


@pytest.mark.parametrize("replay,demos", [(0, 0), (2, 0), (2, 1)], ids=["fresh", "replay", "replay+demos"])
def test_two_processes_equal_one(tmp_path, tiny_model_dir, replay, demos):
    """With replay too: every rank stores every rank's responses, and the history pick is seeded per prompt;
    with demonstrations: each rank adds its own prompts' (whole groups), the pick among several seeded per prompt."""
    one = _launch(1, tiny_model_dir, tmp_path / "one", replay=replay, demos=demos)
    two = _launch(2, tiny_model_dir, tmp_path / "two", replay=replay, demos=demos)
    if demos:
        for out in ("one", "two"):
            log = [json.loads(line) for line in (tmp_path / out / "metrics.jsonl").read_text().splitlines()]
            assert sum(r.get("demonstrations", 0) for r in log) > 0, "no demonstration joined: checks nothing"
    if replay:
        for out in ("one", "two"):
            log = [json.loads(line) for line in (tmp_path / out / "metrics.jsonl").read_text().splitlines()]
            assert sum(r.get("replayed", 0) for r in log) > 0, "no history was replayed: the test checks nothing"
    start = load_file(str(Path(tiny_model_dir) / "model.safetensors"))
    moved = max((one[k] - start[k]).abs().max().item() for k in one)
    assert moved > 1e-3  # training did change the weights
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-4, atol=1e-5)
