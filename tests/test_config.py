"""Config: YAML + overrides, validation errors that name the field and say how to fix it."""

import pytest

from gvpo.config import Config, load_config, save_config
from gvpo.cli import _overrides


def test_defaults_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("algorithm:\n  beta: 0.2\nrollout:\n  num_generations: 4\n  stop_strings: [\"\\n\"]\n")
    c = load_config(path, ["learning_rate=3e-5", "rollout.temperature=0.7", "reward_funcs=arithmetic,boxed_format"])
    assert c.algorithm.beta == 0.2 and c.rollout.num_generations == 4 and c.rollout.stop_strings == ("\n",)
    assert c.optimizer.learning_rate == 3e-5 and c.rollout.temperature == 0.7
    assert c.algorithm.reward_funcs == ("arithmetic", "boxed_format")
    assert Config().algorithm.beta is None and Config().gvpo_beta() == 0.1  # auto: the paper's on fresh groups


def test_round_trip(tmp_path):
    c = load_config(None, ["beta=0.3", "epsilon_high=0.28", "report_to=tensorboard"])
    save_config(c, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == c


@pytest.mark.parametrize("override, match", [
    (["betta=0.2"], "unknown config field 'betta'.*did you mean 'beta'"),
    (["rollout.beta=0.2"], "belongs to section 'algorithm'"),
    (["beta=-1"], r"beta=-1.0: GVPO needs beta > 0"),
    (["num_generations=1"], "num_generations=1: .* >= 2"),
    (["num_generations=2.5"], "num_generations=2.5: expected an integer"),
    (["algorithm=ppo"], "algorithm='ppo': use gvpo, grpo, dr_grpo, astar_po or oapl"),
    (["learning_rate=abc"], "learning_rate='abc': expected float"),
    (["gradient_checkpointing=maybe"], "expected true or false"),
    (["reward_weights=1,2"], "one weight per reward function"),
    (["beta"], "key=value"),
    (["rollout_workers=-1"], "rollout_workers=-1: use 0"),
    (["max_policy_lag=-1"], "max_policy_lag=-1: must be >= 0"),
    (["weight_sync=nccl"], r"weight_sync=.nccl.: use object_store \(default\) or collective"),
])
def test_bad_values_are_named(override, match):
    with pytest.raises(ValueError, match=match):
        load_config(None, override)


def test_unknown_section(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("rolout:\n  temperature: 1.0\n")
    with pytest.raises(ValueError, match="unknown config section 'rolout'.*did you mean 'rollout'"):
        load_config(path)


def test_cli_override_forms():
    assert _overrides(["--beta", "0.2", "--output_dir=runs/x", "max_steps=3"]) == [
        "beta=0.2", "output_dir=runs/x", "max_steps=3"]


def test_shipped_configs_are_valid():
    """Every YAML in configs/ (the paper's GPU setups included) loads and validates."""
    from pathlib import Path

    files = sorted(Path(__file__).parents[1].glob("configs/*.yaml"))
    assert len(files) >= 4
    loaded = {f.stem: load_config(f) for f in files}
    assert loaded["math_qwen2.5_7b"].model.model_name_or_path == "Qwen/Qwen2.5-Math-7B"
    assert loaded["math_qwen2.5_7b"].algorithm.beta == 0.1 and loaded["math_qwen2.5_7b"].optimizer.learning_rate == 1e-6
    assert loaded["default"] == Config().replace(**{"logging.output_dir": "runs/default"})
