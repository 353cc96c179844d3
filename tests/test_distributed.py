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


def _torchrun(nproc: int, args: list[str], folder: Path) -> tuple[list[str], dict]:
    """The command and environment of ``torchrun --nproc_per_node nproc args``: the package under test first on
    the path (a checkout's src/, not whatever copy is installed), then ``folder`` (what the processes import)."""
    src = Path(__file__).parents[1] / "src"
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(src), str(folder), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
           "127.0.0.1", "--master_port", str(_free_port()), *args]
    return cmd, env


def assert_group_ended(out: Path, nproc: int, stderr: str) -> None:
    """Every rank destroyed its process group before interpreter shutdown, and no DDP model kept it alive past
    that (gvpo.process_group): a gloo group left to finalization aborts a rank now and then, after the work."""
    exits = [json.loads((out / f"exit_rank{r}.json").read_text()) for r in range(nproc)]
    assert exits == [{"group_alive": False, "ddp_models_holding_the_group": 0}] * nproc, exits
    assert "terminate called" not in stderr, stderr[-3000:]


def _launch(nproc: int, model_dir: str, out: Path, steps: int = 3, replay: int = 0, extra: list[str] = (),
            crash: bool = False):
    """``extra``: more key=value config overrides (the async tests, resume); ``crash``: the run stops at its
    third step (tests/distributed_worker.py's crash_at) and leaves the step-2 checkpoint."""
    extra = [*extra, "crash_at=4", "save_steps=2"] if crash else list(extra)
    cmd, env = _torchrun(nproc, [str(WORKER), model_dir, str(out), str(steps), str(replay), *extra], Path(__file__).parent)
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    if crash:
        assert done.returncode != 0 and (out / "checkpoints" / "latest").read_text() == "step-000002", done.stderr[-3000:]
        return None
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((out / "summary.json").read_text())["num_processes"] == nproc
    assert_group_ended(out, nproc, done.stderr)
    return load_file(str(out / "checkpoints" / f"step-{steps:06d}" / "model.safetensors"))


@pytest.mark.parametrize("replay,demos", [(0, 0), (2, 1)], ids=["fresh", "replay+demos"])
def test_two_processes_equal_one(tmp_path, tiny_model_dir, replay, demos):
    """With replay too: every rank stores every rank's responses, and the history pick is seeded per prompt;
    with demonstrations: each rank adds its own prompts' (whole groups), the pick among several seeded per prompt.
    (Replay alone is the second case without its demonstrations; one launch pair fewer keeps the suite short.)"""
    extra = ["demonstration_column=solution", f"demonstrations_per_group={demos}"] if demos else []
    one = _launch(1, tiny_model_dir, tmp_path / "one", replay=replay, extra=extra)
    two = _launch(2, tiny_model_dir, tmp_path / "two", replay=replay, extra=extra)
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


def test_two_processes_resume_every_ranks_state(tmp_path, tiny_model_dir):
    """Two processes stop after step 2 and resume from the checkpoint: the same weights as the uninterrupted
    two-process run. engine=hf samples from each rank's own generator (rank-dependent seeds), so restoring one
    rank's RNG state on every rank would change the samples; replay state is restored per rank too."""
    hf = ["engine=hf", "save_steps=2"]
    whole = _launch(2, tiny_model_dir, tmp_path / "whole", steps=4, replay=2, extra=hf)
    _launch(2, tiny_model_dir, tmp_path / "part", steps=4, replay=2, extra=["engine=hf"], crash=True)
    part = _launch(2, tiny_model_dir, tmp_path / "part", steps=4, replay=2, extra=[*hf, "resume=true"])
    for k in whole:
        assert torch.equal(part[k], whole[k]), k


def test_reward_timeout_on_one_rank_ends_every_rank(tmp_path, tiny_model_dir):
    """A reward that hangs on rank 1 only: rank 1 stops after reward_timeout naming the function, and the job ends
    (rank 0, blocked in a collective, sees its peer gone; torchrun stops it) instead of waiting on rank 1."""
    (tmp_path / "hang_reward.py").write_text(
        "import os, time\n"
        "def hang_on_rank1(prompts, completions, **kwargs):\n"
        "    if os.environ.get('RANK') == '1':\n"
        "        time.sleep(3600)\n"
        "    return [0.0] * len(completions)\n")
    cmd, env = _torchrun(2, ["-m", "gvpo.cli", "train", f"model_name_or_path={tiny_model_dir}", "max_steps=3",
                             "reward_funcs=[hang_reward:hang_on_rank1]", "reward_timeout=3", "prompts_per_step=4",
                             "num_generations=2", "eval_steps=0", "num_eval=4", f"output_dir={tmp_path / 'run'}"],
                         tmp_path)
    # A hang here (the bug) raises TimeoutExpired and fails the test. torchrun's workers run in sessions of their
    # own: SIGTERM lets torchrun stop them before it exits, SIGKILL only if it does not.
    proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        output, _ = proc.communicate(timeout=150)
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
    assert proc.returncode != 0
    assert "reward function 'hang_on_rank1' did not return within reward_timeout=3 s" in output
