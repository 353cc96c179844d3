"""Generation under bf16 autocast (``bf16=true``): the hand-written decoder multiplies in bf16 with weights cast once
per call (not per step), and its samples' log-probs are the trainer's teacher-forced ones up to bf16 rounding."""

import pytest
import torch

from gvpo.modeling import build_sequences, token_logps
from gvpo.rollout import FastEngine
from gvpo.rollout.kv_decoder import DecoderWeights
from gvpo.types import SamplingParams
from test_rollout import PROMPTS, one_thread, tiny_model, tokenizer  # noqa: F401  (fixtures)

BF16 = dict(device_type="cpu", dtype=torch.bfloat16)


def _matmul_weights(w: DecoderWeights) -> list[torch.Tensor]:
    return [w.w_lm] + [t for layer in w.layers for t in (layer.w_qkv, layer.w_o, layer.w_gate_up, layer.w_down)]


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16"])
def test_decoder_weights_and_cache_take_autocasts_dtype_once(autocast, tokenizer):
    model = tiny_model("llama", len(tokenizer))
    with torch.autocast(**BF16, enabled=autocast):
        w = DecoderWeights(model)
    want = torch.bfloat16 if autocast else torch.float32
    assert all(t.dtype == want for t in _matmul_weights(w)) and w.cache_dtype == want
    assert w.embed.dtype == torch.float32  # the residual stream stays float32, as HF's forward under autocast
    assert model.lm_head.weight.dtype == torch.float32  # the model itself is untouched


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_bf16_samples_carry_the_teacher_forced_bf16_logps(arch, tokenizer):
    """Sampled under autocast, the behaviour log-probs are the trainer's (also under autocast) to bf16 rounding,
    and far from a float32 model's where bf16 changes the numbers: the decode really ran in bf16."""
    model = tiny_model(arch, len(tokenizer), eos_bias=1.0)
    params = SamplingParams(max_new_tokens=10, temperature=1.0)
    engine = FastEngine(model, tokenizer, backend="layers")
    with torch.autocast(**BF16):
        rollout = engine.generate(PROMPTS, 4, params, torch.Generator().manual_seed(3))
        seq = build_sequences(PROMPTS, rollout.completion_ids, rollout.completion_mask, rollout.prompt_index,
                              tokenizer.pad_token_id)
        with torch.no_grad():
            bf16 = token_logps(model, *seq, rollout.completion_ids.shape[1])
    with torch.no_grad():
        fp32 = token_logps(model, *seq, rollout.completion_ids.shape[1])
    mask = rollout.completion_mask.bool()
    assert int(mask.sum()) > 20
    gap = (rollout.behavior_logps - bf16)[mask].abs()
    assert float(gap.mean()) < 0.03 and float(gap.max()) < 0.25, (float(gap.mean()), float(gap.max()))
    assert float((rollout.behavior_logps - fp32)[mask].abs().max()) > 1e-3  # not float32 arithmetic


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_a_training_runs_rollouts_are_generated_under_autocast_when_bf16_and_only_then(tmp_path, tiny_model_dir,
                                                                                      monkeypatch, bf16):
    """training.bf16 covers generation too: the engine samples under bf16 autocast (so the hand-written decoder
    casts its weights and cache), as the training forward runs; with bf16=false in float32."""
    from test_trainer import ROWS, config_for, sevens

    from gvpo.trainer import train

    seen, real = [], FastEngine._sample

    def sample(self, *args):
        seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        return real(self, *args)

    monkeypatch.setattr(FastEngine, "_sample", sample)
    train(config_for(tmp_path, tiny_model_dir, max_steps=1, bf16=bf16, engine="fast"), reward_funcs=[sevens],
          train_rows=ROWS, eval_rows=ROWS[:4])
    assert seen and all(on == bf16 for on, _ in seen), seen
    assert not bf16 or all(dtype == torch.bfloat16 for _, dtype in seen)


def test_rollout_workers_generate_in_bf16_when_asked(tmp_path, tiny_model_dir):
    from test_trainer import config_for

    from gvpo.rollout_worker import RolloutWorker

    for bf16 in (False, True):
        worker = RolloutWorker(config_for(tmp_path, tiny_model_dir, bf16=bf16), [], [], threads=torch.get_num_threads())
        assert worker.engine.autocast_dtype == (torch.bfloat16 if bf16 else None)
