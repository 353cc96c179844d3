"""Out of memory in the training pass: the mini-batch is redone in halved micro-batches (its partial gradient dropped),
which gives exactly the run that asked for the smaller micro-batch; what halving cannot fix stops with the fix."""

import pytest
import torch
from safetensors.torch import load_file

import gvpo.update
from gvpo.trainer import train
from gvpo.scoring import RewardError
from test_trainer import ROWS, CrashAfter, config_for

K, PROMPTS, STEPS = 4, 8, 2
# These tests count the training pass's calls and rows: every group is computed, even one whose rewards are equal.
ALL_GROUPS = {"skip_zero_std_groups": False}


def lengths(prompts, completions, **kwargs):
    """A reward with spread in every group (sevens is often 0 for a whole group: no gradient to leave behind)."""
    return [float(len(c)) for c in completions]


class CrashAt(CrashAfter):
    def __call__(self, prompts, completions, **kw):
        super().__call__(prompts, completions, **kw)
        return lengths(prompts, completions)


def _fits(max_rows: int, error, from_call: int = 1):
    """token_logps that fails with ``error`` on a micro-batch of more than ``max_rows`` rows (a memory limit), from
    its ``from_call``-th call on."""
    real = gvpo.update.token_logps
    calls = []

    def limited(model, input_ids, *args, **kwargs):
        calls.append(input_ids.shape[0])
        if input_ids.shape[0] > max_rows and len(calls) >= from_call:
            raise error
        return real(model, input_ids, *args, **kwargs)

    return limited


def _run(tmp_path, model_dir, name, **overrides):
    config = config_for(tmp_path, model_dir, name, max_steps=STEPS, prompts_per_step=PROMPTS, num_generations=K,
                        save_steps=STEPS, **ALL_GROUPS, **overrides)
    summary = train(config, reward_funcs=[lengths], train_rows=ROWS, eval_rows=ROWS[:4])
    return summary, load_file(str(tmp_path / name / "checkpoints" / f"step-{STEPS:06d}" / "model.safetensors"))


@pytest.mark.parametrize("error", [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
                                   RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't "
                                                "allocate memory: you tried to allocate 1073741824 bytes")],
                         ids=["cuda", "cpu"])
def test_an_out_of_memory_micro_batch_is_halved_until_it_fits_and_equals_that_run(tmp_path, tiny_model_dir,
                                                                                   monkeypatch, error):
    _, wanted = _run(tmp_path, tiny_model_dir, "asked", micro_batch_prompts=2)
    monkeypatch.setattr(gvpo.update, "token_logps", _fits(2 * K, error))  # 2 prompts' rows fit, 4 do not
    with pytest.warns(UserWarning, match="out of memory in the training pass with micro_batch_prompts=8"):
        _, got = _run(tmp_path, tiny_model_dir, "shrunk", micro_batch_prompts=0)
    for name in wanted:
        assert torch.equal(got[name], wanted[name]), name


def test_a_redone_mini_batch_drops_the_gradient_of_the_micro_batches_that_fitted(tmp_path, tiny_model_dir,
                                                                                 monkeypatch):
    """At step 2 (Adam's first step only sees the gradient's signs), micro-batch 1 of 2 fits and micro-batch 2 does
    not: the redo starts from a zero gradient, so the run is step 1 at 4 prompts per micro-batch, then step 2 at 2
    (that run made by a crash after step 1 and a resume with micro_batch_prompts=2)."""
    base = config_for(tmp_path, tiny_model_dir, "expected", max_steps=STEPS, prompts_per_step=PROMPTS,
                      num_generations=K, save_steps=1, micro_batch_prompts=4, **ALL_GROUPS)
    with pytest.raises(RewardError):  # calls: initial evaluation, step 1, then step 2 raises
        train(base, reward_funcs=[CrashAt(3)], train_rows=ROWS, eval_rows=ROWS[:4])
    train(base.replace(**{"checkpoint.resume": True, "micro_batch_prompts": 2}), reward_funcs=[lengths],
          train_rows=ROWS, eval_rows=ROWS[:4])
    wanted = load_file(str(tmp_path / "expected" / "checkpoints" / f"step-{STEPS:06d}" / "model.safetensors"))
    monkeypatch.setattr(gvpo.update, "token_logps", _fits(2 * K, torch.OutOfMemoryError("out of memory"), 4))
    with pytest.warns(UserWarning, match="micro_batch_prompts=4; retrying the mini-batch with 2"):
        _, got = _run(tmp_path, tiny_model_dir, "partial", micro_batch_prompts=4)
    for name in wanted:
        assert torch.equal(got[name], wanted[name]), name


def test_what_halving_cannot_fix_stops_with_the_setting_to_change(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setattr(gvpo.update, "token_logps", _fits(0, torch.OutOfMemoryError("out of memory")))
    with pytest.warns(UserWarning), pytest.raises(RuntimeError, match="micro_batch_prompts=1 on 1 process"):
        _run(tmp_path, tiny_model_dir, "never", micro_batch_prompts=0)


def test_other_runtime_errors_are_not_taken_for_out_of_memory(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setattr(gvpo.update, "token_logps", _fits(0, RuntimeError("shape mismatch")))
    with pytest.raises(RuntimeError, match="^shape mismatch$"):
        _run(tmp_path, tiny_model_dir, "bug", micro_batch_prompts=0)
