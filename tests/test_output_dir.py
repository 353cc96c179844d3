"""A run's folder: a new run never mixes with an old one, pruning keeps this run's newest checkpoints, and
--resume says what it resumes (or that the run is finished and how to extend it)."""

import json

import pytest
import torch

from gvpo import checkpoint as ckpt
from gvpo.config import load_config
from gvpo.trainer import train


def sevens(prompts, completions, **kwargs):
    return [c.count("7") / max(len(c), 1) for c in completions]


ROWS = [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a in range(10, 20) for b in range(10, 14)]


def run(out, model_dir, **overrides):
    base = {"model_name_or_path": model_dir, "output_dir": str(out), "max_steps": 2, "prompts_per_step": 4,
            "num_generations": 4, "max_completion_length": 4, "eval_steps": 0, "save_steps": 1,
            "progress_bar": False}
    return train(load_config(None, {**base, **overrides}), reward_funcs=[sevens], train_rows=ROWS,
                 eval_rows=ROWS[:4])


def steps_of(out):
    return [p.name for p in ckpt.list_checkpoints(out)]


def test_a_new_run_into_a_folder_holding_a_run_stops_and_leaves_it_alone(tmp_path, tiny_model_dir):
    out = tmp_path / "x"
    run(out, tiny_model_dir, max_steps=3)
    before = (out / "metrics.jsonl").read_text()
    with pytest.raises(ValueError) as e:
        run(out, tiny_model_dir, max_steps=2)
    message = str(e.value)
    assert "\n" not in message and "already holds a run" in message
    assert "another output_dir" in message and "overwrite_output_dir=true" in message and "--resume" in message
    assert (out / "metrics.jsonl").read_text() == before  # nothing of the old run was touched
    assert steps_of(out) == ["step-000002", "step-000003"]


def test_overwrite_output_dir_clears_the_old_run_but_not_other_files(tmp_path, tiny_model_dir):
    out = tmp_path / "x"
    run(out, tiny_model_dir, max_steps=6, save_steps=3)
    (out / "notes.txt").write_text("mine")
    run(out, tiny_model_dir, max_steps=2, save_steps=1, overwrite_output_dir=True)
    # The old run's step-3 and step-6 are gone (pruning by step number used to delete the new step 2 instead).
    assert steps_of(out) == ["step-000001", "step-000002"]
    assert (out / "checkpoints" / "latest").read_text() == "step-000002"
    assert [r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())] == [0, 1, 2]
    assert json.loads((out / "summary.json").read_text())["steps"] == 2
    assert (out / "notes.txt").read_text() == "mine"


class FakeModel:
    def save_pretrained(self, path):
        path.mkdir(parents=True)
        torch.save({}, path / "weights.pt")


def test_pruning_keeps_the_newest_of_this_run_and_latest_exists(tmp_path):
    for step in (3, 6):  # an earlier timeline with higher step numbers
        ckpt.save_checkpoint(tmp_path, step, FakeModel(), None, {"step": step}, keep=2)
    ckpt.save_checkpoint(tmp_path, 1, FakeModel(), None, {"step": 1}, keep=2)
    assert steps_of(tmp_path) == ["step-000001"]
    ckpt.save_checkpoint(tmp_path, 2, FakeModel(), None, {"step": 2}, keep=2)
    ckpt.save_checkpoint(tmp_path, 4, FakeModel(), None, {"step": 4}, keep=2)
    assert steps_of(tmp_path) == ["step-000002", "step-000004"]
    latest = ckpt.latest_checkpoint(tmp_path)
    assert latest.name == "step-000004" and (latest / ckpt.STATE_FILE).exists()


def test_resume_names_its_checkpoint_and_a_finished_run_says_how_to_extend(tmp_path, tiny_model_dir, capsys):
    out = tmp_path / "x"
    first = run(out, tiny_model_dir, max_steps=2)
    metrics = (out / "metrics.jsonl").read_text()
    capsys.readouterr()
    again = run(out, tiny_model_dir, max_steps=2, resume=True)
    said = capsys.readouterr().out
    assert "finished" in said and "step-000002" in said and "max_steps=4" in said
    assert again["steps"] == 2 and again["final_accuracy"] == first["final_accuracy"]
    assert (out / "metrics.jsonl").read_text() == metrics  # nothing was trained or logged again
    more = run(out, tiny_model_dir, max_steps=3, resume=True)
    said = capsys.readouterr().out
    assert f"continuing from {out / 'checkpoints' / 'step-000002'} (step 2) to max_steps=3" in said
    assert more["steps"] == 3 and steps_of(out) == ["step-000002", "step-000003"]


def test_the_issue_scenario_resume_continues_the_new_run(tmp_path, tiny_model_dir, capsys):
    """6 steps saved every 3, then a new 2-step run over it, then --resume: it must be the new run's step 2."""
    out = tmp_path / "x"
    run(out, tiny_model_dir, max_steps=6, save_steps=3)
    run(out, tiny_model_dir, max_steps=2, save_steps=2, overwrite_output_dir=True)
    capsys.readouterr()
    run(out, tiny_model_dir, max_steps=3, save_steps=2, resume=True)
    assert "step-000002 (step 2)" in capsys.readouterr().out
    assert steps_of(out) == ["step-000002", "step-000003"]
