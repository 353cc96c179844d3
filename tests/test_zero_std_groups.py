"""Groups whose rewards are all equal: where their gradient is exactly zero their training pass is skipped
(training.skip_zero_std_groups), and the run is the one that computed them, to float rounding."""

import json

import pytest
import torch
from safetensors.torch import load_file

import gvpo.update
from gvpo.batch import Batch
from gvpo.trainer import train
from test_trainer import ROWS, config_for

STEPS = 2


def half_flat(prompts, completions, **kwargs):
    """Every response to an even first addend gets 1 (a group of equal rewards); others their length (spread)."""
    return [1.0 if int(p.split("+")[0]) % 2 == 0 else float(len(c)) for p, c in zip(prompts, completions)]


def _counting(monkeypatch):
    rows, real = [], gvpo.update.token_logps

    def counted(model, input_ids, *args, **kwargs):
        if torch.is_grad_enabled():
            rows.append(input_ids.shape[0])
        return real(model, input_ids, *args, **kwargs)

    monkeypatch.setattr(gvpo.update, "token_logps", counted)
    return rows


def _run(tmp_path, model_dir, name, **overrides):
    config = config_for(tmp_path, model_dir, name, max_steps=STEPS, prompts_per_step=8, num_generations=4,
                        save_steps=STEPS, **overrides)
    train(config, reward_funcs=[half_flat], train_rows=ROWS, eval_rows=ROWS[:4])
    log = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    weights = load_file(str(tmp_path / name / "checkpoints" / f"step-{STEPS:06d}" / "model.safetensors"))
    return weights, [r for r in log if "loss" in r]


def _same(a, b):
    """Equal to 1e-5 after two AdamW steps at lr 1e-2 (a wrong gradient moves weights by ~lr): the micro-batches'
    shapes differ, so do float sums, and Adam scales even a rounding-only gradient (k_proj's bias, whose exact
    gradient is 0 under softmax's shift invariance) up to ~1e-6."""
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-5, msg=name)


@pytest.mark.parametrize("algorithm", ["gvpo", "grpo", "dr_grpo"])
def test_skipping_equal_reward_groups_gives_the_same_run(tmp_path, tiny_model_dir, monkeypatch, algorithm):
    rows = _counting(monkeypatch)
    full, full_log = _run(tmp_path, tiny_model_dir, "full", algorithm=algorithm, skip_zero_std_groups=False)
    computed = sum(rows)
    rows.clear()
    skipped, log = _run(tmp_path, tiny_model_dir, "skip", algorithm=algorithm, micro_batch_prompts=2)
    assert sum(rows) < computed, "no group was skipped"  # the rows are only those of groups with spread
    assert all(r["frac_equal_reward_groups"] == f["frac_equal_reward_groups"] > 0 for r, f in zip(log, full_log))
    assert sum(r["zero_std_groups_skipped"] for r in log) * 4 == computed - sum(rows)
    # the gradient itself (before clipping), which AdamW's scale invariance would hide: same normalisation
    assert [r["grad_norm"] for r in log] == pytest.approx([r["grad_norm"] for r in full_log], rel=1e-5)
    _same(full, skipped)


def test_gvpo_computes_them_once_the_weights_move_within_the_step(tmp_path, tiny_model_dir, monkeypatch):
    """After a step's first update R_theta is no longer 0: an equal-reward group's weights are -(R_theta,i - mean),
    not zero, and it must be trained on."""
    rows = _counting(monkeypatch)
    full, _ = _run(tmp_path, tiny_model_dir, "full", algorithm="gvpo", num_mini_batches=2, skip_zero_std_groups=False)
    rows.clear()
    got, _ = _run(tmp_path, tiny_model_dir, "two", algorithm="gvpo", num_mini_batches=2)
    assert sum(rows) == STEPS * 8 * 4
    for name in full:
        assert torch.equal(got[name], full[name]), name


def test_zero_std_rows_marks_whole_groups_and_singletons():
    batch = Batch(input_ids=torch.zeros(6, 2, dtype=torch.long), attention_mask=torch.ones(6, 2),
                  position_ids=torch.zeros(6, 2, dtype=torch.long), completion_mask=torch.ones(6, 1),
                  rewards=torch.tensor([1.0, 1.0, 0.5, 0.0, 0.0, 3.0]), group_ids=torch.tensor([7, 7, 2, 2, 9, 4]),
                  behavior_logps=torch.zeros(6, 1))
    assert batch.zero_std_rows().tolist() == [True, True, False, False, True, True]


@pytest.mark.parametrize("algorithm,reuse_detached,kl_coef,processes,inert", [
    ("gvpo", True, 0.0, 1, True), ("gvpo", False, 0.0, 1, False), ("grpo", False, 0.0, 1, True),
    ("dr_grpo", True, 0.0, 1, True), ("grpo", True, 0.1, 1, False), ("astar_po", True, 0.0, 1, False),
    ("oapl", True, 0.0, 1, False),
    # several processes: each rank would skip its own groups and make its own number of forward calls (hang)
    ("gvpo", True, 0.0, 2, False), ("grpo", True, 0.0, 2, False)])
def test_which_updates_skip_equal_reward_groups(algorithm, reuse_detached, kl_coef, processes, inert):
    from types import SimpleNamespace

    run = SimpleNamespace(loss_config=SimpleNamespace(algorithm=algorithm, kl_coef=kl_coef),
                          config=SimpleNamespace(training=SimpleNamespace(skip_zero_std_groups=True)),
                          accelerator=SimpleNamespace(num_processes=processes))
    assert gvpo.update._zero_std_groups_are_inert(run, reuse_detached) is inert
    run.config.training.skip_zero_std_groups = False
    assert gvpo.update._zero_std_groups_are_inert(run, reuse_detached) is False


def test_an_out_of_memory_halving_starts_from_the_groups_the_pass_held():
    """4 groups, 2 of them with equal rewards (skipped): the pass held 2 prompts, so halving goes to 1, not to 2
    (which would redo the same pass and run out again)."""
    from types import SimpleNamespace

    rewards = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 2.0, 1.0])
    batch = Batch(input_ids=torch.zeros(8, 2, dtype=torch.long), attention_mask=torch.ones(8, 2),
                  position_ids=torch.zeros(8, 2, dtype=torch.long), completion_mask=torch.ones(8, 1), rewards=rewards,
                  group_ids=torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]), behavior_logps=torch.zeros(8, 1))
    run = SimpleNamespace(loss_config=SimpleNamespace(algorithm="gvpo", kl_coef=0.0), totals={},
                          config=SimpleNamespace(training=SimpleNamespace(skip_zero_std_groups=True,
                                                                          micro_batch_prompts=0)),
                          accelerator=SimpleNamespace(num_processes=1),
                          optimizer=SimpleNamespace(zero_grad=lambda set_to_none: None))
    with pytest.warns(UserWarning, match="micro_batch_prompts=2; retrying the mini-batch with 1"):
        gvpo.update._shrink_micro_batches(run, batch, torch.OutOfMemoryError("out of memory"), reuse_detached=True)
    assert run.totals["micro_batch_prompts"] == 1
