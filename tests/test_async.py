"""Async mode on Ray: lag 0 reproduces the synchronous run, the staleness bound holds, nothing is lost or
trained twice when a worker dies, reward errors name the function, torchrun learners, clean shutdown.

One Ray cluster for the whole session, started as users start one (`ray start --head`, 2 CPUs): the
in-process runs and the torchrun learners join it through ``ray_address``."""

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gvpo.config import load_config
from gvpo.rollout_worker import RolloutWorker
from gvpo.scoring import RewardError
from gvpo.trainer import train
from test_trainer import ROWS, read, sevens

# A driver joining a `ray start` cluster (Ray >= 2.60 token auth) sends the token only when this is set
# before ray is imported.
os.environ.setdefault("RAY_AUTH_MODE", "token")
ray = pytest.importorskip("ray")
SRC, TESTS = Path(__file__).parents[1] / "src", Path(__file__).parent
STEPS = 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def ray_address(tmp_path_factory):
    """`ray start --head --block` with 2 CPUs (workers import this checkout and the test helpers); SIGTERM ends
    it and every process it started."""
    port, log = _free_port(), tmp_path_factory.mktemp("ray") / "head.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(SRC), str(TESTS), os.environ.get("PYTHONPATH", "")])}
    ray_cli = str(Path(sys.executable).with_name("ray"))
    # As the README tells a user on a new machine (conftest gives the suite a fresh HOME): make the token first.
    subprocess.run([ray_cli, "get-auth-token", "--generate"], env=env, check=True, capture_output=True)
    cmd = [ray_cli, "start", "--head", "--block", f"--port={port}",
           "--num-cpus=2", "--include-dashboard=false", "--disable-usage-stats"]
    head = subprocess.Popen(cmd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 120
        while "Ray runtime started" not in log.read_text():
            assert head.poll() is None and time.time() < deadline, log.read_text()[-2000:]
            time.sleep(0.2)
        address = f"127.0.0.1:{port}"
        ray.init(address=address, log_to_driver=False)
        yield address
    finally:
        ray.shutdown()
        head.send_signal(signal.SIGTERM)
        head.wait(60)


def config_for(tmp_path, model_dir, name, **overrides):
    base = {"model_name_or_path": model_dir, "output_dir": str(tmp_path / name), "max_steps": STEPS,
            "prompts_per_step": 8, "num_generations": 4, "max_completion_length": 8, "learning_rate": 1e-2,
            "eval_steps": 0, "save_steps": 0, "progress_bar": False, "seed": 0}
    return load_config(None, {**base, **overrides})


def _train(tmp_path, model_dir, name, reward_funcs=(sevens,), **overrides):
    summary = train(config_for(tmp_path, model_dir, name, **overrides), reward_funcs=list(reward_funcs),
                    train_rows=ROWS, eval_rows=ROWS[:8])
    steps = [r for r in read(tmp_path / name) if "loss" in r]
    return summary, steps, _weights(tmp_path / name)


def _weights(out):
    return load_file(str(out / "checkpoints" / f"step-{STEPS:06d}" / "model.safetensors"))


def _assert_same_weights(a, b):
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-5)


class KillOnce:
    """``sevens``, except that it kills the rollout worker process it runs in, the first time only. With
    ``hold``, a surviving worker's next call waits until a third process (the restarted worker) has scored a
    task: the run cannot end before Ray brought the worker back."""

    __name__ = "kill_once"

    def __init__(self, marker, hold=False):
        self.marker, self.learner, self.hold = str(marker), os.getpid(), hold

    def __call__(self, prompts, completions, **kwargs):
        if os.getpid() != self.learner:
            Path(f"{self.marker}.called.{os.getpid()}").touch()
            if not os.path.exists(self.marker):
                Path(self.marker).write_text(str(os.getpid()))
                os.kill(os.getpid(), signal.SIGKILL)
            deadline, marker = time.time() + 120, Path(self.marker)
            while self.hold and len(list(marker.parent.glob(marker.name + ".called.*"))) < 3:
                assert time.time() < deadline, "the killed worker was not restarted"
                time.sleep(0.1)
        return sevens(prompts, completions)


@pytest.mark.parametrize("algorithm, weight_sync", [("gvpo", "object_store"), ("grpo", "object_store"),
                                                     ("gvpo", "collective")])
def test_one_worker_lag_zero_reproduces_the_synchronous_run(tmp_path, tiny_model_dir, ray_address, algorithm,
                                                            weight_sync):
    _, sync, w_sync = _train(tmp_path, tiny_model_dir, "sync", algorithm=algorithm)
    summary, steps, w_async = _train(tmp_path, tiny_model_dir, "async", algorithm=algorithm, rollout_workers=1,
                                     max_policy_lag=0, ray_address=ray_address, weight_sync=weight_sync)
    assert [r["reward_mean"] for r in steps] == [r["reward_mean"] for r in sync]
    assert [r["loss"] for r in steps] == [r["loss"] for r in sync]
    assert all(r["policy_lag_max"] == 0 for r in steps)
    _assert_same_weights(w_sync, w_async)
    start = load_file(str(Path(tiny_model_dir) / "model.safetensors"))
    assert max((w_sync[k] - start[k]).abs().max().item() for k in start) > 1e-3  # training moved the weights
    assert summary["groups_generated"] == summary["groups_trained"] == STEPS * 8
    assert summary["weight_sync_fallbacks"] == 0


def _until_restarted(worker, old_pid: int, seconds: float = 120) -> None:
    deadline = time.time() + seconds
    while True:
        try:
            if ray.get(worker.pid.remote()) != old_pid:
                return
        except ray.exceptions.RayActorError:  # calls fail until Ray has brought the process back
            pass
        assert time.time() < deadline, "Ray did not restart the worker"
        time.sleep(0.5)


class InspectableWorker(RolloutWorker):
    def held(self) -> dict:
        return {n: p.detach().clone() for n, p in self.model.named_parameters()}


@pytest.mark.parametrize("use_peft", [False, True])
def test_a_broadcast_gives_each_worker_the_learners_weights_bitwise(tmp_path, tiny_model_dir, ray_address, use_peft):
    """Two workers and the learner in one gloo group, outside torch.distributed's default group. Every trainable
    tensor arrives bitwise; frozen ones (LoRA's base model) are not sent; a task dispatched at version 2 after
    version 3 was broadcast runs with 3 (and says so); a version never broadcast is an error, not a silent reuse;
    a restarted worker is in no group and takes the object store fallback until the group is re-formed."""
    from gvpo.modeling import load_model_and_tokenizer
    from gvpo.modeling import prepare_model as _prepare_model
    from gvpo.weight_sync import COLLECTIVE, Publisher, actor_class

    config = config_for(tmp_path, tiny_model_dir, "bitwise", rollout_workers=2, weight_sync="collective",
                        use_peft=use_peft, lora_r=2)
    policy = _prepare_model(load_model_and_tokenizer(tiny_model_dir, config.model.dtype, False)[0], config)
    actor = actor_class(ray, COLLECTIVE, InspectableWorker).options(num_cpus=1, max_restarts=1)
    workers = [actor.remote(config, [sevens], [1.0]) for _ in range(2)]
    try:
        totals = {}
        sync = Publisher(ray, COLLECTIVE, workers, policy, totals)
        torch.manual_seed(0)

        def publish(version):
            with torch.no_grad():
                for p in policy.parameters():  # frozen ones too: they must not travel
                    p.add_(torch.randn_like(p))
            assert sync.publish(policy, version) is None  # None: the workers take their broadcast copy

        publish(1)
        assert ray.get([w.use_weights.remote(1, None) for w in workers]) == [1, 1]
        publish(2)
        publish(3)
        assert not torch.distributed.is_initialized()  # a group of its own: a torchrun learner keeps its own
        # A task dispatched at version 2 that starts after version 3 arrived runs with 3, and says so.
        assert ray.get([w.use_weights.remote(2, None) for w in workers]) == [3, 3]
        mine = dict(policy.named_parameters())
        fresh = _prepare_model(load_model_and_tokenizer(tiny_model_dir, config.model.dtype, False)[0], config)
        start = dict(fresh.named_parameters())
        trainable = {n for n, p in mine.items() if p.requires_grad}
        assert trainable and (len(trainable) < len(mine)) == use_peft
        for held in ray.get([w.held.remote() for w in workers]):
            assert held.keys() == mine.keys()
            for n, p in mine.items():
                assert torch.equal(held[n], (p if n in trainable else start[n]).detach()), n
        with pytest.raises(ray.exceptions.RayTaskError, match="version 4 was not received"):
            ray.get(workers[0].use_weights.remote(4, None))
        assert totals["weight_sync_fallbacks"] == 0
        # A worker restarted by Ray is in no group: it says so, and the learner falls back to the object store.
        old = ray.get(workers[1].pid.remote())
        os.kill(old, signal.SIGKILL)
        _until_restarted(workers[1], old)
        with pytest.raises(ray.exceptions.RayTaskError, match="not in the weight broadcast group"):
            ray.get(workers[1].use_weights.remote(3, None))
        payload = sync.lost_worker(3)
        assert isinstance(payload, list) and totals["weight_sync_fallbacks"] == 1
        assert ray.get(workers[1].use_weights.remote(3, payload)) == 3
        held = ray.get(workers[1].held.remote())
        assert all(torch.equal(held[n], (p if n in trainable else start[n]).detach()) for n, p in mine.items())
        # Every worker up again: a new group, version 3 broadcast to all, then broadcasts as before.
        assert sync.regroup(3) is None and totals["weight_sync_regroups"] == 1
        assert ray.get([w.use_weights.remote(3, None) for w in workers]) == [3, 3]
        publish(4)
        assert ray.get([w.use_weights.remote(4, None) for w in workers]) == [4, 4]
        for held in ray.get([w.held.remote() for w in workers]):
            assert all(torch.equal(held[n], (p if n in trainable else start[n]).detach()) for n, p in mine.items())
        assert totals["weight_sync_fallbacks"] == 1
    finally:
        for w in workers:
            ray.kill(w)


@pytest.mark.parametrize("weight_sync", ["object_store", "collective"])
def test_lag_bound_holds_and_a_killed_worker_loses_no_group(tmp_path, tiny_model_dir, ray_address, weight_sync):
    """eta = 2 with 2 workers; one worker process is killed (SIGKILL) in the middle of its first task. GRPO, so
    stale rows take their clipped ratio against the workers' behaviour log-probs. With the collective broadcast
    the group breaks: the object store serves until the worker is back, then the group is re-formed (the
    surviving worker is held until then, so that it happens within the run)."""
    marker = tmp_path / "killed"
    summary, steps, _ = _train(tmp_path, tiny_model_dir, "eta2",
                               reward_funcs=(KillOnce(marker, hold=weight_sync == "collective"),),
                               algorithm="grpo", rollout_workers=2, max_policy_lag=2, ray_address=ray_address,
                               weight_sync=weight_sync)
    assert marker.exists() and summary["worker_restarts"] == 1
    assert summary["weight_sync_fallbacks"] == summary["weight_sync_regroups"] == (weight_sync == "collective")
    assert summary["groups_regenerated"] == 4  # each step is split in two tasks of 4 groups
    assert summary["groups_generated"] == summary["groups_trained"] == STEPS * 8  # none lost, none twice
    assert all(r["policy_lag_max"] <= 2 for r in steps)
    # Step 2's groups start before step 1 is trained (the second worker is free): staleness did happen.
    assert max(r["policy_lag_max"] for r in steps) >= 1
    assert all(r["groups_used"] == 8 and math.isfinite(r["loss"]) for r in steps)
    # Rows of an older policy: the learner's weights moved away from the workers' behaviour log-probs.
    assert max(r["kl_behaviour_current"] for r in steps if r["policy_lag_max"] > 0) > 1e-4
    for key in ("learner_idle_seconds", "worker_idle_seconds", "groups_in_flight", "policy_lag_mean"):
        assert all(key in r for r in steps)


def test_a_driver_without_the_clusters_token_gets_one_line_saying_what_to_run(tmp_path, tiny_model_dir, ray_address):
    """A new machine that joins the token-authenticated cluster with no token (empty HOME, no RAY_AUTH_*): `gvpo
    train` exits 1 with one error line naming ray_address and how to get the token, no traceback."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    env.update(HOME=str(tmp_path / "new_home"), PYTHONPATH=os.pathsep.join([str(SRC), str(TESTS)]))
    done = subprocess.run([sys.executable, "-m", "gvpo.cli", "train", f"model_name_or_path={tiny_model_dir}",
                           "rollout_workers=1", f"ray_address={ray_address}", f"output_dir={tmp_path / 'run'}"],
                          env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 1, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("gvpo train: error:")]
    assert len(errors) == 1 and f"ray_address={ray_address}" in errors[0], done.stderr[-2000:]
    assert "ray get-auth-token" in errors[0] and "RAY_AUTH_TOKEN" in errors[0], errors[0]
    assert "Traceback" not in done.stderr, done.stderr[-2000:]


def test_a_raising_reward_in_a_worker_stops_the_run_with_its_name(tmp_path, tiny_model_dir, ray_address):
    def flaky_grader(prompts, completions, **kwargs):
        if os.environ.get("GVPO_TEST_LEARNER") != str(os.getpid()):
            raise RuntimeError("grader fell over")
        return sevens(prompts, completions)

    os.environ["GVPO_TEST_LEARNER"] = str(os.getpid())  # evaluation (in the learner) scores fine
    with pytest.raises(RewardError, match="'flaky_grader' raised RuntimeError: grader fell over"):
        _train(tmp_path, tiny_model_dir, "raises", reward_funcs=(flaky_grader,), rollout_workers=1,
               ray_address=ray_address)


class FailAtThirdCall:
    """``sevens``, except that its third call in a rollout worker raises, once per marker file (step 3 of a
    one-worker, lag-0 run): a learner crash after the step-2 checkpoint."""

    __name__ = "fail_at_third_call"

    def __init__(self, marker):
        self.marker, self.learner, self.calls = str(marker), os.getpid(), 0

    def __call__(self, prompts, completions, **kwargs):
        if os.getpid() != self.learner:
            self.calls += 1
            if self.calls == 3 and not os.path.exists(self.marker):
                Path(self.marker).write_text("crashed")
                raise RuntimeError("learner crash drill")
        return sevens(prompts, completions)


def test_a_crashed_async_run_resumes_from_its_checkpoint_as_the_synchronous_run(tmp_path, tiny_model_dir, ray_address):
    """Crash at step 3, resume from the step-2 checkpoint with fresh workers: the synchronous run's weights."""
    _, _, w_sync = _train(tmp_path, tiny_model_dir, "sync")
    crash = FailAtThirdCall(tmp_path / "crashed")
    options = dict(reward_funcs=(crash,), rollout_workers=1, max_policy_lag=0, ray_address=ray_address,
                   save_steps=2)
    with pytest.raises(RewardError, match="learner crash drill"):
        _train(tmp_path, tiny_model_dir, "async", **options)
    assert not (tmp_path / "async" / "checkpoints" / f"step-{STEPS:06d}").exists()
    summary, steps, w_resumed = _train(tmp_path, tiny_model_dir, "async", resume=True, **options)
    assert [r["step"] for r in steps][-2:] == [3, 4] and summary["steps"] == STEPS
    _assert_same_weights(w_sync, w_resumed)


@pytest.mark.parametrize("weight_sync", ["object_store", "collective"])
def test_two_torchrun_learners_lag_zero_equal_one_synchronous_process(tmp_path, tiny_model_dir, ray_address,
                                                                      weight_sync):
    """The learner as 2 gloo processes (rank 0 joins the cluster, whole groups per rank) against the synchronous
    single-process run of tests/distributed_worker.py. Collective: rank 0's broadcast group lives beside the
    learners' default (torchrun) group."""
    from distributed_worker import run
    from test_distributed import _launch

    # The reference runs in this process with the learners' one torch thread (torchrun sets OMP_NUM_THREADS=1): a
    # matmul split over 2 threads rounds differently (1.8e-5 here), which is not what this test is about.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run(tiny_model_dir, str(tmp_path / "sync"), 3, 0)
    finally:
        torch.set_num_threads(threads)
    sync = load_file(str(tmp_path / "sync" / "checkpoints" / "step-000003" / "model.safetensors"))
    both = _launch(2, tiny_model_dir, tmp_path / "two", extra=["rollout_workers=1", "max_policy_lag=0",
                                                                   f"ray_address={ray_address}",
                                                                   f"weight_sync={weight_sync}"])
    log = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [r["policy_lag_max"] for r in log if "loss" in r] == [0, 0, 0]
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["weight_sync_fallbacks"] == 0
    for k in sync:
        torch.testing.assert_close(both[k], sync[k], rtol=1e-4, atol=1e-5)


def _session_processes(pid: int) -> list[int]:
    """Processes of the Ray session that process ``pid`` started (its session folder ends with the pid)."""
    import psutil

    found = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        if any(f"_{pid}/" in part for part in (p.info["cmdline"] or [])) and "session_" in " ".join(p.info["cmdline"]):
            found.append(p.info["pid"])
    return found


def test_ctrl_c_leaves_no_ray_process(tmp_path, tiny_model_dir):
    """A CLI run with its own local Ray instance, interrupted after its first step: nothing survives it."""
    out = tmp_path / "cli"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
           "PYTHONFAULTHANDLER": "1"}  # a run that does not end gets SIGABRT below: every thread's stack is printed
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "-m", "gvpo.cli", "train", f"model_name_or_path={tiny_model_dir}", f"output_dir={out}",
           "max_steps=1000", "prompts_per_step=4", "num_generations=4", "max_completion_length=8", "eval_steps=0",
           "num_eval=4", "num_train=64",
           "save_steps=0", "progress_bar=false", "rollout_workers=1"]
    # As from a terminal: SIGINT at its default. A suite started in the background (`nohup ... &`, some CI runners)
    # passes SIG_IGN down to its children, and Python then never raises KeyboardInterrupt: the run would ignore
    # ctrl-c by inheritance, not by a fault of ours (seen in stress rounds: the run was still waiting for groups).
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.time() + 180
        while not (out / "metrics.jsonl").exists() or len((out / "metrics.jsonl").read_text().splitlines()) < 3:
            assert proc.poll() is None and time.time() < deadline, proc.stdout.read()[-3000:]
            time.sleep(0.5)
        started = _session_processes(proc.pid)
        assert started, "the run's Ray processes were not found: the test checks nothing"
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:  # say where it hangs, not only that it does
            proc.send_signal(signal.SIGABRT)
            tail = proc.communicate(timeout=30)[0][-6000:]
            raise AssertionError(f"the run did not end within 120 s of ctrl-c; its threads:\n{tail}") from None
    finally:
        if proc.poll() is None:
            proc.kill()
    import psutil

    def alive():
        out = []
        for pid in started:
            try:
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    out.append(pid)
            except psutil.NoSuchProcess:
                pass
        return out

    deadline = time.time() + 60  # polled, not a fixed wait: on a loaded machine Ray's processes take a while to end
    while alive() and time.time() < deadline:
        time.sleep(0.5)
    assert not alive(), f"Ray processes left behind: {alive()}"


def test_demonstrations_in_async_mode_reproduce_the_synchronous_run(tmp_path, tiny_model_dir, ray_address):
    """A worker samples k - d completions per prompt and the learner adds the d demonstrations (the same seeded
    pick): at lag 0 the run is the synchronous one with demonstrations, exactly."""
    rows = [{**r, "solution": [r["prompt"] + r["answer"], r["answer"]]} for r in ROWS]
    demos = dict(demonstration_column="solution", demonstrations_per_group=1)
    runs = {}
    for name, extra in (("sync", {}), ("async", dict(rollout_workers=1, max_policy_lag=0, ray_address=ray_address))):
        summary = train(config_for(tmp_path, tiny_model_dir, name, **demos, **extra), reward_funcs=[sevens],
                        train_rows=rows, eval_rows=rows[:8])
        runs[name] = summary, [r for r in read(tmp_path / name) if "loss" in r], _weights(tmp_path / name)
    (_, sync, w_sync), (summary, steps, w_async) = runs["sync"], runs["async"]
    assert all(r["demonstrations"] == 8 for r in steps)  # one per prompt, every step
    assert [r["loss"] for r in steps] == [r["loss"] for r in sync]
    assert [r["reward_mean"] for r in steps] == [r["reward_mean"] for r in sync]
    _assert_same_weights(w_sync, w_async)
    assert summary["groups_generated"] == summary["groups_trained"] == STEPS * 8


def test_replay_with_one_worker_at_lag_zero_reproduces_the_synchronous_run_with_replay(tmp_path, tiny_model_dir,
                                                                                     ray_address):
    """Replay wraps the Ray source as it wraps the local one: the worker samples k - h per prompt (h reserved when
    the step is planned), the learner fills the groups from its buffer. At lag 0 the run is the synchronous one
    with replay, exactly."""
    rows = ROWS[:8]  # 8 prompts, 8 per step: every prompt recurs, so history exists from step 2
    replay = dict(num_historical=2, max_staleness=4)
    runs = {}
    for name, extra in (("sync", {}), ("async", dict(rollout_workers=1, max_policy_lag=0, ray_address=ray_address))):
        summary = train(config_for(tmp_path, tiny_model_dir, name, **replay, **extra), reward_funcs=[sevens],
                        train_rows=rows, eval_rows=rows)
        runs[name] = summary, [r for r in read(tmp_path / name) if "loss" in r], _weights(tmp_path / name)
    (_, sync, w_sync), (summary, steps, w_async) = runs["sync"], runs["async"]
    assert [r["replayed"] for r in steps] == [0] + [16] * (STEPS - 1)  # 2 of 4 per group once history exists
    assert [r["loss"] for r in steps] == [r["loss"] for r in sync]
    assert [r["reward_mean"] for r in steps] == [r["reward_mean"] for r in sync]
    assert [r["replay_buffer_size"] for r in steps] == [r["replay_buffer_size"] for r in sync]
    _assert_same_weights(w_sync, w_async)
    assert summary["groups_generated"] == summary["groups_trained"] == STEPS * 8
