"""Resuming never executes code from a checkpoint folder; the predecessor format still resumes bit-exactly."""

import numpy as np
import pytest
import torch

from gvpo.checkpoint import STATE_FILE, CheckpointError, latest_checkpoint, load_trainer_state
from gvpo.scoring import RewardError
from gvpo.trainer import train
from test_trainer import ROWS, TIMING, CrashAfter, config_for, read, sevens


class Payload:
    """Unpickling this object opens (creates) a file: what a malicious trainer_state.pt would do, harmlessly."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


def test_a_tampered_trainer_state_is_refused_without_running_it(tmp_path, tiny_model_dir):
    cfg = config_for(tmp_path, tiny_model_dir, max_steps=1, save_steps=1)
    train(cfg, reward_funcs=[sevens], train_rows=ROWS, eval_rows=ROWS[:4])
    file = latest_checkpoint(tmp_path / "run") / STATE_FILE
    state = torch.load(file, weights_only=True)
    marker = tmp_path / "pwned"
    torch.save({**state, "totals": Payload(str(marker))}, file)
    with pytest.raises(CheckpointError, match=r"trainer_state.pt: refusing to load it: .*altered"):
        train(cfg.replace(**{"checkpoint.resume": True, "max_steps": 2}), reward_funcs=[sevens], train_rows=ROWS,
              eval_rows=ROWS[:4])
    assert not marker.exists()


def test_the_state_holds_no_numpy_objects(tmp_path, tiny_model_dir):
    cfg = config_for(tmp_path, tiny_model_dir, max_steps=1, save_steps=1)
    train(cfg, reward_funcs=[sevens], train_rows=ROWS, eval_rows=ROWS[:4])
    file = latest_checkpoint(tmp_path / "run") / STATE_FILE
    assert torch.serialization.get_unsafe_globals_in_checkpoint(file) == []
    state = torch.load(file, weights_only=True)  # plain weights_only, no allow-list at all
    assert state["format"] == 2 and state["step"] == 1


def _as_predecessor_format(file):
    """Rewrite a state file as the previous gvpo wrote it: numpy's RNG state as an ndarray, no "format" key."""
    state = load_trainer_state(file.parent)
    del state["format"]
    for rng in state["rng"]:
        name, keys, pos, has_gauss, cached = rng["numpy"]
        rng["numpy"] = (name, keys.numpy().astype(np.uint32), pos, has_gauss, cached)
    torch.save(state, file)
    assert "numpy.ndarray" in torch.serialization.get_unsafe_globals_in_checkpoint(file)


def test_a_predecessor_checkpoint_resumes_bit_exactly(tmp_path, tiny_model_dir):
    full = config_for(tmp_path, tiny_model_dir, name="full", max_steps=4, save_steps=2)
    train(full, reward_funcs=[sevens], train_rows=ROWS, eval_rows=ROWS[:8])
    part = config_for(tmp_path, tiny_model_dir, name="part", max_steps=4, save_steps=2)
    with pytest.raises(RewardError):
        train(part, reward_funcs=[CrashAfter(4)], train_rows=ROWS, eval_rows=ROWS[:8])
    _as_predecessor_format(latest_checkpoint(tmp_path / "part") / STATE_FILE)
    train(part.replace(**{"checkpoint.resume": True}), reward_funcs=[sevens], train_rows=ROWS, eval_rows=ROWS[:8])
    a, b = read(tmp_path / "full"), read(tmp_path / "part")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [0, 1, 2, 3, 4]
    for ra, rb in zip(a, b):
        assert {k: v for k, v in ra.items() if k not in TIMING} == {k: v for k, v in rb.items() if k not in TIMING}


def test_a_state_that_is_not_ours_fails_clearly(tmp_path):
    (tmp_path / STATE_FILE).write_bytes(b"")
    torch.save({"weights": torch.zeros(2)}, tmp_path / STATE_FILE)
    with pytest.raises(CheckpointError, match="not a gvpo trainer state"):
        load_trainer_state(tmp_path)
