"""Tiny end-to-end runs of the trainer on a random 2-layer Qwen2 (seconds each)."""

import json
import math

import pytest
import torch

from gvpo.config import load_config
from gvpo.scoring import RewardError
from gvpo.trainer import train

TIMING = ("step_seconds", "generation_seconds", "update_seconds")


def sevens(prompts, completions, **kwargs):
    """A reward the random model can learn in a few steps: the share of '7' characters."""
    return [c.count("7") / max(len(c), 1) for c in completions]


ROWS = [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a in range(10, 30) for b in range(10, 20)]


def config_for(tmp_path, model_dir, name="run", **overrides):
    base = {
        "model_name_or_path": model_dir, "output_dir": str(tmp_path / name), "max_steps": 12,
        "prompts_per_step": 8, "num_generations": 8, "max_completion_length": 8, "learning_rate": 1e-2,
        "eval_steps": 0, "save_steps": 0, "progress_bar": False, "seed": 0,
    }
    base.update(overrides)
    return load_config(None, base)


def read(path):
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("algorithm", ["gvpo", "grpo", "dr_grpo", "astar_po"])
def test_reward_goes_up(tmp_path, tiny_model_dir, algorithm):
    cfg = config_for(tmp_path, tiny_model_dir, algorithm=algorithm)
    summary = train(cfg, reward_funcs=[sevens], train_rows=ROWS, eval_rows=ROWS[:16])
    rows = [r for r in read(tmp_path / "run") if "reward_mean" in r]
    first = sum(r["reward_mean"] for r in rows[:3]) / 3
    last = sum(r["reward_mean"] for r in rows[-3:]) / 3
    assert last > first + 0.1, f"{algorithm}: reward {first:.3f} -> {last:.3f}"
    assert summary["steps"] == 12 and summary["skipped_updates"] == 0
    assert all(math.isfinite(r["loss"]) for r in rows)
    assert (tmp_path / "run" / "training.png").stat().st_size > 1000
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert set(saved) >= {"initial_accuracy", "final_accuracy", "steps", "wall_seconds"}


def test_several_updates_per_batch_use_old_logps_once(tmp_path, tiny_model_dir):
    """num_iterations = 2 and 2 mini-batches: 4 updates per step, implicit rewards move away from 0."""
    cfg = config_for(tmp_path, tiny_model_dir, max_steps=3, num_iterations=2, num_mini_batches=2,
                     micro_batch_prompts=2)
    train(cfg, reward_funcs=[sevens], train_rows=ROWS, eval_rows=ROWS[:8])
    rows = [r for r in read(tmp_path / "run") if "loss" in r]
    # With one update per batch R_theta is exactly 0; with later updates on the same batch it is not.
    # (implicit_reward_mse would not show it: it includes the centred rewards' own spread.)
    assert all(abs(r["implicit_reward_mean"]) > 1e-7 for r in rows)
    assert all(r["grad_norm"] > 0 for r in rows)


def test_old_policy_modes_train(tmp_path, tiny_model_dir):
    for mode in ("initial", "ema"):
        cfg = config_for(tmp_path, tiny_model_dir, name=mode, max_steps=2, old_policy=mode)
        summary = train(cfg, reward_funcs=[sevens], train_rows=ROWS, eval_rows=ROWS[:8])
        assert summary["steps"] == 2 and summary["skipped_updates"] == 0


class CrashAfter:
    """A reward that raises on its n-th call (to simulate a crash mid-run)."""

    __name__ = "sevens"  # same metric name as the uninterrupted run

    def __init__(self, n):
        self.calls, self.n = 0, n

    def __call__(self, prompts, completions, **kw):
        self.calls += 1
        if self.calls == self.n:
            raise RuntimeError("grader fell over")
        return sevens(prompts, completions)


def test_resume_gives_the_same_run_and_a_raising_reward_keeps_the_checkpoint(tmp_path, tiny_model_dir):
    full = config_for(tmp_path, tiny_model_dir, name="full", max_steps=4, save_steps=2)
    train(full, reward_funcs=[sevens], train_rows=ROWS, eval_rows=ROWS[:8])

    part = config_for(tmp_path, tiny_model_dir, name="part", max_steps=4, save_steps=2)
    # Calls: initial eval, steps 1 and 2, then step 3 raises.
    with pytest.raises(RewardError, match="'sevens' raised RuntimeError: grader fell over"):
        train(part, reward_funcs=[CrashAfter(4)], train_rows=ROWS, eval_rows=ROWS[:8])
    ckpt = tmp_path / "part" / "checkpoints"
    assert (ckpt / "latest").read_text() == "step-000002" and (ckpt / "step-000002" / "model.safetensors").exists()

    resumed = part.replace(**{"checkpoint.resume": True})
    train(resumed, reward_funcs=[sevens], train_rows=ROWS, eval_rows=ROWS[:8])
    a, b = read(tmp_path / "full"), read(tmp_path / "part")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [0, 1, 2, 3, 4]
    for ra, rb in zip(a, b):
        for k in ra:
            if k not in TIMING:
                assert ra[k] == pytest.approx(rb[k], rel=1e-6, abs=1e-9), (ra["step"], k)
    from safetensors.torch import load_file

    fa = load_file(str(tmp_path / "full" / "checkpoints" / "step-000004" / "model.safetensors"))
    fb = load_file(str(tmp_path / "part" / "checkpoints" / "step-000004" / "model.safetensors"))
    for k in fa:
        torch.testing.assert_close(fa[k], fb[k], rtol=1e-6, atol=1e-7)


def test_interrupted_save_leaves_the_previous_checkpoint(tmp_path, tiny_model_dir):
    from gvpo.checkpoint import latest_checkpoint

    cfg = config_for(tmp_path, tiny_model_dir, max_steps=2, save_steps=1)
    train(cfg, reward_funcs=[sevens], train_rows=ROWS, eval_rows=ROWS[:8])
    root = tmp_path / "run" / "checkpoints"
    (root / ".step-000003.tmp-999").mkdir()  # what a crash during the next save leaves behind
    assert latest_checkpoint(tmp_path / "run").name == "step-000002"
    assert len([p for p in root.iterdir() if p.name.startswith("step-")]) == 2  # save_total_limit


def test_non_finite_loss_skips_the_update(tmp_path, tiny_model_dir, monkeypatch):
    import gvpo.losses as trainer_module

    real = trainer_module.LOSSES["gvpo"]
    calls = {"n": 0}

    def sometimes_nan(*args, **kwargs):
        loss, m = real(*args, **kwargs)
        calls["n"] += 1
        return (loss * math.nan if calls["n"] == 2 else loss), m

    monkeypatch.setitem(trainer_module.LOSSES, "gvpo", sometimes_nan)
    cfg = config_for(tmp_path, tiny_model_dir, max_steps=3, save_steps=3)
    summary = train(cfg, reward_funcs=[sevens], train_rows=ROWS, eval_rows=ROWS[:8])
    assert summary["skipped_updates"] == 1
    from safetensors.torch import load_file

    weights = load_file(str(tmp_path / "run" / "checkpoints" / "step-000003" / "model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_unscorable_responses_leave_their_group(tmp_path, tiny_model_dir):
    def half_unscorable(prompts, completions, **kw):
        return [None if i % 2 else v for i, v in enumerate(sevens(prompts, completions))]

    cfg = config_for(tmp_path, tiny_model_dir, max_steps=2)
    train(cfg, reward_funcs=[half_unscorable], train_rows=ROWS, eval_rows=ROWS[:8])
    rows = [r for r in read(tmp_path / "run") if "loss" in r]
    assert all(r["unscored"] == 32 for r in rows)  # 64 completions, every second one unscorable
    assert all(r["groups_used"] == 8 for r in rows)  # groups of 4 remain: none dropped


@pytest.mark.parametrize("rows, match", [
    ([{"prompt": "1+1="}, {"question": "2+2="}], r"dataset: row 1: missing column 'prompt'"),
    ([{"prompt": "1+1="}, {"prompt": "  "}], r"dataset: row 1: column 'prompt' is empty"),
])
def test_bad_rows_name_row_and_column(tmp_path, tiny_model_dir, rows, match):
    cfg = config_for(tmp_path, tiny_model_dir, max_steps=1)
    with pytest.raises(ValueError, match=match):
        train(cfg, reward_funcs=[sevens], train_rows=rows, eval_rows=ROWS[:4])


def test_reward_returning_garbage_is_named(tmp_path, tiny_model_dir):
    def wrong_length(prompts, completions, **kw):
        return [1.0]

    cfg = config_for(tmp_path, tiny_model_dir, max_steps=1)
    with pytest.raises(RewardError, match="wrong_length.*returned 1 values for 64 completions"):
        train(cfg, reward_funcs=[sevens, wrong_length], train_rows=ROWS, eval_rows=ROWS[:4])


def test_a_step_with_no_scorable_response_does_not_crash(tmp_path, tiny_model_dir):
    def never(prompts, completions, **kw):
        return [None] * len(completions)

    cfg = config_for(tmp_path, tiny_model_dir, max_steps=2, num_mini_batches=2)
    summary = train(cfg, reward_funcs=[never], train_rows=ROWS, eval_rows=ROWS[:4])
    rows = [r for r in read(tmp_path / "run") if "unscored" in r]
    assert summary["steps"] == 2 and all(r["unscored"] == 64 for r in rows)
    assert summary["final_accuracy"] == 0.0


def test_hf_engine_trains(tmp_path, tiny_model_dir):
    cfg = config_for(tmp_path, tiny_model_dir, max_steps=2, engine="hf")
    summary = train(cfg, reward_funcs=[sevens], train_rows=ROWS, eval_rows=ROWS[:4])
    log = [r for r in read(tmp_path / "run") if "loss" in r]
    assert summary["steps"] == 2 and all(r["grad_norm"] > 0 for r in log)


def test_a_single_dataset_file_holds_out_a_fixed_random_sample_for_evaluation(tmp_path, tiny_model_dir):
    from gvpo.data import read_rows

    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps({"question": f"{i}+1=", "answer": str(i + 1)}) + "\n" for i in range(30)))
    cfg = config_for(tmp_path, tiny_model_dir, dataset=str(path), prompt_column="question", num_eval=5, num_train=0)
    train_rows, eval_rows = read_rows(cfg)
    held = [r["prompt"] for r in eval_rows]
    assert len(held) == 5 and len(train_rows) == 25 and not {r["prompt"] for r in train_rows} & set(held)
    assert held != [f"{i}+1=" for i in range(25, 30)], "a sorted file's tail is not a fair held-out set"
    # the same held-out set for every training seed, so runs with different seeds compare on the same rows
    assert [r["prompt"] for r in read_rows(cfg.replace(seed=1))[1]] == held
    capped, _ = read_rows(cfg.replace(num_train=5))
    kept = [r["prompt"] for r in capped]
    assert len(kept) == 5 and kept != [p for p in (f"{i}+1=" for i in range(30)) if p not in held][:5]
    with pytest.raises(ValueError, match="not enough to hold out num_eval=40"):
        read_rows(cfg.replace(num_eval=40))
    _, none = read_rows(cfg.replace(num_eval=0))
    assert none == []


def test_progress_bar_shows_seconds_per_step_split_and_clipped_share():
    from gvpo.tracking import step_postfix

    shown = step_postfix({"reward_mean": 0.25, "step_seconds": 26.0, "update_seconds": 21.5, "clipped_ratio": 0.625},
                         acc=0.13)
    assert shown == {"reward": "0.250", "acc": "0.130", "s/step": "26.0 (gen 4.5 + train 21.5)", "clipped": "0.62"}


def test_dr_grpo_divides_by_the_configured_budget_not_the_batch_width(tmp_path, tiny_model_dir, monkeypatch):
    """Dr. GRPO's constant is max_completion_length (the paper, TRL), even when every completion of a batch ends
    early and the batch is trimmed to a narrower width."""
    import gvpo.losses

    seen, real = [], gvpo.losses.LOSSES["dr_grpo"]

    def recording(logps, old_logps, mask, *args, **kwargs):
        seen.append((mask.shape[1], kwargs["max_completion_length"]))
        return real(logps, old_logps, mask, *args, **kwargs)

    monkeypatch.setitem(gvpo.losses.LOSSES, "dr_grpo", recording)
    # Nearly every character is a stop string, so every row ends within a few tokens of the budget of 12.
    stops = tuple("0123456789abcdefghijklmnopqrstuvwxyz")
    cfg = config_for(tmp_path, tiny_model_dir, algorithm="dr_grpo", max_steps=2, max_completion_length=12,
                     stop_strings=stops, skip_zero_std_groups=False)
    train(cfg, reward_funcs=[sevens], train_rows=ROWS, eval_rows=ROWS[:4])
    assert seen and all(const == 12 for _, const in seen), seen
    assert min(width for width, _ in seen) < 12, "the batches were not narrower than the budget: the test shows nothing"
