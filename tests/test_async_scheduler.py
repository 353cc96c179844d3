"""The async scheduler (``AsyncSource``) against a stand-in ``ray`` module, in one process (as test_vllm_engine.py
does for vLLM): the lag bound, a lost task queued again with its prompts and seeds, steps assembled in order
whatever order tasks finish in, and a worker's error handed to the learner. The real-Ray runs are in
test_async.py; these need no cluster and run in seconds.

The stand-in: an actor is the real ``RolloutWorker`` in this process; a call runs when the scheduler waits for
it, and ``ray.wait`` hands back the most recent call first, so tasks finish in another order than they started."""

from __future__ import annotations

import threading
import types
from types import SimpleNamespace as NS

import pytest
import torch
from safetensors.torch import load_file

from gvpo.config import load_config
from gvpo.scoring import RewardError
from gvpo.trainer import train
from test_trainer import ROWS, read, sevens

STEPS = 4


class RayActorError(Exception):
    """The actor's process died (Ray restarts it)."""


class RayTaskError(Exception):
    """The call raised inside the actor: ``cause`` is what it raised."""

    def __init__(self, cause):
        super().__init__(str(cause))
        self.cause = cause


class Ref:
    def __init__(self, call=None, value=None):
        self.call, self.value, self.error = call, value, None

    def result(self):
        if self.call is not None:
            call, self.call = self.call, None
            try:
                self.value = call()
            except (RayActorError, RayTaskError) as e:
                self.error = e
        if self.error is not None:
            raise self.error
        return self.value


class Actor:
    def __init__(self, fake, cls, args):
        self.fake, self.cls, self.args = fake, cls, args
        self.obj = self._start()

    def _start(self):  # keeps this process's thread count (the real worker sets its own process's)
        return self.cls(*self.args, threads=torch.get_num_threads())

    def __getattr__(self, name):
        return NS(remote=lambda *a, **k: Ref(call=lambda: self.fake.run(self, name, a, k)))


class FakeRay(types.ModuleType):
    """The Ray calls AsyncSource and the object-store weight sync make. ``die``: numbers (1, 2, ...) of the
    ``generate`` calls during which the worker's process dies (its next incarnation is a fresh worker)."""

    def __init__(self, die=()):
        super().__init__("ray")
        self.exceptions = NS(RayActorError=RayActorError, RayTaskError=RayTaskError, AuthenticationError=RuntimeError)
        self.die, self.tasks, self.finished, self.restarts, self.raised = set(die), [], [], 0, []

    def run(self, actor, name, args, kwargs):
        if name == "generate":
            task, version = args[0], args[1]
            self.tasks.append((task.step, tuple(task.positions), tuple(task.seeds), version))
            if len(self.tasks) in self.die:
                actor.obj, self.restarts = actor._start(), self.restarts + 1
                raise RayActorError("the worker's process died")
        try:
            out = getattr(actor.obj, name)(*args, **kwargs)
        except Exception as e:
            self.raised.append(e)
            raise RayTaskError(e) from e
        if name == "generate":
            self.finished.append((out.task.step, out.task.positions[0]))
        return out

    def remote(self, cls):
        fake = self
        return NS(options=lambda **_: NS(remote=lambda *args: Actor(fake, cls, args)))

    def put(self, value):
        return Ref(value=value)

    def get(self, refs):
        return [r.result() for r in refs] if isinstance(refs, list) else refs.result()

    def wait(self, refs, num_returns=1, timeout=None):
        return refs[-1:], refs[:-1]  # the newest call first; it runs when the scheduler gets it

    def is_initialized(self):
        return True

    def cluster_resources(self):
        return {"CPU": 8.0}

    def kill(self, actor, no_restart=True):
        pass

    def shutdown(self):
        pass


@pytest.fixture
def fake_ray(monkeypatch):
    def install(**kwargs):
        fake = FakeRay(**kwargs)
        monkeypatch.setitem(__import__("sys").modules, "ray", fake)
        return fake

    return install


def _train(tmp_path, model_dir, name, reward_funcs=(sevens,), **overrides):
    base = {"model_name_or_path": model_dir, "output_dir": str(tmp_path / name), "max_steps": STEPS,
            "prompts_per_step": 8, "num_generations": 4, "max_completion_length": 8, "learning_rate": 1e-2,
            "eval_steps": 0, "save_steps": 0, "progress_bar": False, "seed": 0}
    summary = train(load_config(None, {**base, **overrides}), reward_funcs=list(reward_funcs), train_rows=ROWS,
                    eval_rows=ROWS[:8])
    weights = load_file(str(tmp_path / name / "checkpoints" / f"step-{STEPS:06d}" / "model.safetensors"))
    return summary, [r for r in read(tmp_path / name) if "loss" in r], weights


def _within(seconds, fn, *args, **kwargs):
    """fn's result, or a failure when it has not returned in ``seconds`` (a group that never arrives would
    leave the learner waiting for ever)."""
    out = {}

    def call():
        try:
            out["value"] = fn(*args, **kwargs)
        except BaseException as e:  # noqa: BLE001 (re-raised in the test's thread)
            out["error"] = e

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"the run did not finish in {seconds} s: a group was lost"
    if "error" in out:
        raise out["error"]
    return out["value"]


def test_admission_keeps_the_lag_bound_and_steps_are_assembled_in_order(tmp_path, tiny_model_dir, fake_ray):
    """eta = 2, 2 workers: a task of step s starts only with version >= s - 1 - eta, every trained row's lag is
    <= eta (and some are stale), each step trains on its own 8 prompts, in order, though tasks finish out of order."""
    ray = fake_ray()
    summary, steps, _ = _train(tmp_path, tiny_model_dir, "eta2", algorithm="grpo", rollout_workers=2,
                               max_policy_lag=2)
    assert all(version >= step - 1 - 2 for step, _, _, version in ray.tasks), ray.tasks
    assert all(r["policy_lag_max"] <= 2 for r in steps) and max(r["policy_lag_max"] for r in steps) >= 1
    assert ray.finished != sorted(ray.finished)  # tasks finished out of order; the learner still got each step whole
    assert [r["step"] for r in steps] == list(range(1, STEPS + 1))
    assert summary["groups_generated"] == summary["groups_trained"] == STEPS * 8
    assert all(r["groups_used"] == 8 for r in steps)


def test_a_lost_task_is_generated_again_with_its_prompts_and_seeds(tmp_path, tiny_model_dir, fake_ray):
    """One worker at lag 0 whose process dies in its second task: that task goes back to the queue, runs again on
    the restarted worker with the same prompts and seeds, and the run equals the synchronous one."""
    _, sync, w_sync = _train(tmp_path, tiny_model_dir, "sync")
    ray = fake_ray(die={2})
    summary, steps, w_async = _within(120, _train, tmp_path, tiny_model_dir, "async", rollout_workers=1,
                                      max_policy_lag=0)
    lost, again = ray.tasks[1], ray.tasks[2]
    assert lost == again and ray.restarts == summary["worker_restarts"] == 1
    assert summary["groups_regenerated"] == 8
    assert summary["groups_generated"] == summary["groups_trained"] == STEPS * 8  # none lost, none twice
    assert [r["loss"] for r in steps] == [r["loss"] for r in sync]
    for k in w_sync:
        torch.testing.assert_close(w_async[k], w_sync[k], rtol=0, atol=1e-5)


def test_a_workers_error_is_raised_in_the_learner_with_the_reward_functions_name(tmp_path, tiny_model_dir, fake_ray):
    """A reward function that raises in a worker stops the run: the scheduler thread hands the error to the learner,
    which raises it in the training loop with the function's name."""

    def flaky_grader(prompts, completions, **kwargs):
        if len(completions) == 8 * 4:  # a training task (8 prompts x k = 4); evaluation scores 8 x 1
            raise RuntimeError("grader fell over")
        return sevens(prompts, completions)

    ray = fake_ray()
    with pytest.raises(RewardError, match="'flaky_grader' raised RuntimeError: grader fell over"):
        _train(tmp_path, tiny_model_dir, "raises", reward_funcs=(flaky_grader,), rollout_workers=1)
    assert [type(e) for e in ray.raised] == [RewardError]  # raised in the worker, not in the learner
