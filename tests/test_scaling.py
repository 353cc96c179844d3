"""LoRA (peft), gradient checkpointing and bf16 autocast in the trainer, on the tiny model."""

import pytest
import torch
from safetensors.torch import load_file

from test_trainer import ROWS, config_for, read, sevens

from gvpo.trainer import train


def test_lora_trains_adapters_only_and_initial_is_the_base(tmp_path, tiny_model_dir):
    cfg = config_for(tmp_path, tiny_model_dir, max_steps=4, save_steps=2, use_peft=True, lora_r=4,
                     lora_target_modules="q_proj,v_proj", old_policy="initial", num_mini_batches=2)
    summary = train(cfg, reward_funcs=[sevens], train_rows=ROWS, eval_rows=ROWS[:8])
    adapter = load_file(str(tmp_path / "run" / "checkpoints" / "step-000004" / "adapter_model.safetensors"))
    assert adapter and all("lora_" in k for k in adapter)
    assert any(k.endswith("lora_B.weight") and v.abs().max() > 0 for k, v in adapter.items())  # B starts at 0
    log = [r for r in read(tmp_path / "run") if "loss" in r]
    # pi_theta' = the base model (adapters disabled): after the first update, implicit rewards are non-zero.
    assert abs(log[-1]["implicit_reward_mean"]) > 1e-7 and summary["skipped_updates"] == 0

    # Resume from step 2 reproduces steps 3-4 with adapters.
    resumed_dir = tmp_path / "run2"
    cfg2 = cfg.replace(**{"output_dir": str(resumed_dir), "max_steps": 2})
    train(cfg2, reward_funcs=[sevens], train_rows=ROWS, eval_rows=ROWS[:8])
    train(cfg2.replace(**{"max_steps": 4, "resume": True}), reward_funcs=[sevens], train_rows=ROWS,
          eval_rows=ROWS[:8])
    again = load_file(str(resumed_dir / "checkpoints" / "step-000004" / "adapter_model.safetensors"))
    for k in adapter:
        torch.testing.assert_close(again[k], adapter[k], rtol=1e-5, atol=1e-6)


def test_gradient_checkpointing_gives_the_same_update(tmp_path, tiny_model_dir):
    weights = []
    for name, ckpt in (("plain", False), ("ckpt", True)):
        cfg = config_for(tmp_path, tiny_model_dir, name=name, max_steps=2, save_steps=2, gradient_checkpointing=ckpt)
        train(cfg, reward_funcs=[sevens], train_rows=ROWS, eval_rows=ROWS[:4])
        weights.append(load_file(str(tmp_path / name / "checkpoints" / "step-000002" / "model.safetensors")))
    for k in weights[0]:
        torch.testing.assert_close(weights[1][k], weights[0][k], rtol=1e-5, atol=1e-6)


def test_bf16_autocast_trains(tmp_path, tiny_model_dir):
    cfg = config_for(tmp_path, tiny_model_dir, max_steps=2, bf16=True)
    summary = train(cfg, reward_funcs=[sevens], train_rows=ROWS, eval_rows=ROWS[:4])
    log = [r for r in read(tmp_path / "run") if "loss" in r]
    assert summary["skipped_updates"] == 0 and all(r["grad_norm"] > 0 for r in log)


@pytest.mark.gpu
def test_bf16_on_cuda(tmp_path, tiny_model_dir):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    cfg = config_for(tmp_path, tiny_model_dir, max_steps=3, bf16=True)
    summary = train(cfg, reward_funcs=[sevens], train_rows=ROWS, eval_rows=ROWS[:4])
    assert summary["skipped_updates"] == 0
