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


def test_the_dropped_rows_are_whole_groups_of_equal_rewards_and_singletons():
    batch = Batch(input_ids=torch.zeros(6, 2, dtype=torch.long), attention_mask=torch.ones(6, 2),
                  position_ids=torch.zeros(6, 2, dtype=torch.long), completion_mask=torch.ones(6, 1),
                  rewards=torch.tensor([1.0, 1.0, 0.5, 0.0, 0.0, 3.0]), group_ids=torch.tensor([7, 7, 2, 2, 9, 4]),
                  behavior_logps=torch.zeros(6, 1))
    kept, stats = gvpo.update._drop_zero_std_groups(batch)
    assert kept.rewards.tolist() == [0.5, 0.0] and kept.group_ids.tolist() == [2, 2]
    # of the two groups with k >= 2 (7 and 2) one has equal rewards; 9 and 4 are singletons
    assert stats == {"frac_equal_reward_groups": [0.5], "groups_used": [2.0], "groups_skipped": [2.0],
                     "zero_std_groups_skipped": [1.0]}
    flat = batch.select(torch.tensor([True, True, False, False, True, True]))
    assert gvpo.update._drop_zero_std_groups(flat) == (None, {
        "frac_equal_reward_groups": [1.0], "groups_used": [1.0], "groups_skipped": [2.0],
        "zero_std_groups_skipped": [1.0], "loss": [0.0]})


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


def test_an_out_of_memory_halving_starts_from_the_groups_the_pass_held(tmp_path, tiny_model_dir, monkeypatch):
    """A pass over more than one group runs out of memory. With equal-reward groups skipped the first pass held
    fewer than the step's 8 prompts, so the first halving starts from that count, not from 8 (which could redo the
    same pass and run out again)."""
    real = gvpo.update.token_logps

    def one_group_fits(model, input_ids, *args, **kwargs):
        if torch.is_grad_enabled() and input_ids.shape[0] > 4:
            raise torch.OutOfMemoryError("out of memory")
        return real(model, input_ids, *args, **kwargs)

    monkeypatch.setattr(gvpo.update, "token_logps", one_group_fits)
    with pytest.warns(UserWarning) as warned:
        _, log = _run(tmp_path, tiny_model_dir, "oom", algorithm="gvpo")
    assert log[0]["zero_std_groups_skipped"] > 0  # the first step did skip groups: the test checks something
    first = next(str(w.message) for w in warned if "out of memory in the training pass" in str(w.message))
    held = 8 - int(log[0]["zero_std_groups_skipped"])
    assert f"micro_batch_prompts={held}; retrying" in first
