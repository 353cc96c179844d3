"""The training pass's activation budget (CPU): the count is of the bytes autograd really keeps, and a pass that
would pass the budget is redone in halved micro-batches before memory runs short, giving exactly the run that
asked for the smaller micro-batch."""

import pytest
import torch
from safetensors.torch import load_file

import gvpo.update
from gvpo.activation_budget import ActivationBudget, ActivationBudgetExceeded, budget_bytes
from gvpo.trainer import train
from test_micro_batch_oom import ALL_GROUPS, K, PROMPTS, STEPS, lengths
from test_trainer import ROWS, config_for


def _mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))


def test_the_count_is_each_saved_storage_once_without_the_weights():
    """Linear(8, 16) keeps its input (10 x 8 floats); ReLU keeps its output (10 x 16), which the second Linear keeps
    too (one storage); the weights are kept but are not activations: 320 + 640 bytes."""
    model = _mlp()
    budget = ActivationBudget(model, limit=10**9)
    with budget.watch():
        model(torch.randn(10, 8)).sum().backward()
    assert budget.last == 10 * 8 * 4 + 10 * 16 * 4


def test_past_the_budget_the_forward_stops_before_keeping_more():
    model = _mlp()
    budget = ActivationBudget(model, limit=10 * 8 * 4)  # the first Linear's input fits, ReLU's output does not
    with pytest.raises(ActivationBudgetExceeded, match="out of memory.*training.activation_memory_gb"):
        with budget.watch():
            model(torch.randn(10, 8))
    assert budget.last == 10 * 8 * 4 + 10 * 16 * 4


def test_no_grad_passes_and_no_limit_count_nothing():
    model = _mlp()
    budget = ActivationBudget(model, limit=1)
    with budget.watch(), torch.no_grad():
        model(torch.randn(10, 8))
    assert budget.last == 0
    off = ActivationBudget(model, limit=0)
    with off.watch():
        model(torch.randn(10, 8)).sum().backward()
    assert off.last == 0


def test_the_automatic_budget_keeps_room_for_gradients_and_adam(monkeypatch):
    model = _mlp()
    weights = sum(p.numel() * 4 for p in model.parameters())
    monkeypatch.setattr(gvpo.activation_budget, "free_bytes", lambda: 10 * weights)
    assert budget_bytes(model, 0.0) == int(gvpo.activation_budget.SHARE * 7 * weights)
    assert budget_bytes(model, 0.5) == 2**29  # configured: taken as it is


def _passes(monkeypatch):
    """Record the bytes of every watched training pass."""
    seen, real = [], ActivationBudget.watch

    def watch(self):
        with real(self):
            yield
        seen.append(self.last)

    import contextlib
    monkeypatch.setattr(ActivationBudget, "watch", contextlib.contextmanager(watch))
    return seen


def _run(tmp_path, model_dir, name, **overrides):
    config = config_for(tmp_path, model_dir, name, max_steps=STEPS, prompts_per_step=PROMPTS, num_generations=K,
                        save_steps=STEPS, **ALL_GROUPS, **overrides)
    train(config, reward_funcs=[lengths], train_rows=ROWS, eval_rows=ROWS[:4])
    return load_file(str(tmp_path / name / "checkpoints" / f"step-{STEPS:06d}" / "model.safetensors"))


def test_a_pass_over_the_budget_is_halved_until_it_fits_and_equals_that_run(tmp_path, tiny_model_dir, monkeypatch):
    seen = _passes(monkeypatch)
    wanted = _run(tmp_path, tiny_model_dir, "asked", micro_batch_prompts=2, activation_memory_gb=100.0)
    two = max(seen)
    seen.clear()
    _run(tmp_path, tiny_model_dir, "four", micro_batch_prompts=4, activation_memory_gb=100.0)
    four = min(seen)
    assert four > two > 0  # the budget below can tell them apart
    limit_gb = (two + four) / 2 / 2**30
    with pytest.warns(UserWarning, match="micro_batch_prompts=8; retrying the mini-batch with 4") as warned:
        got = _run(tmp_path, tiny_model_dir, "budget", micro_batch_prompts=0, activation_memory_gb=limit_gb)
    assert any("micro_batch_prompts=4; retrying the mini-batch with 2" in str(w.message) for w in warned)
    for name in wanted:
        assert torch.equal(got[name], wanted[name]), name


def test_a_budget_one_prompt_cannot_meet_stops_with_the_settings_to_change(tmp_path, tiny_model_dir):
    with pytest.warns(UserWarning), pytest.raises(RuntimeError, match="micro_batch_prompts=1 on 1 process.*"
                                                                      "gradient_checkpointing=true"):
        _run(tmp_path, tiny_model_dir, "never", activation_memory_gb=1e-9)
