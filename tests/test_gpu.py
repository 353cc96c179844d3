"""The CUDA paths of the rollout engines and the trainer, with the same code on CPU.

Each test takes a ``device``: "cpu" runs in the normal suite (so these tests cannot rot without a GPU),
"cuda" is marked ``gpu`` and skipped without CUDA (``pytest -m gpu``; scripts/gpu_check.sh runs them, through
its built-in runner when the machine has no pytest, which is why pytest is optional here).
"""

from __future__ import annotations

import contextlib
import math
import unittest

import torch

from gvpo.modeling import build_sequences, token_logps
from gvpo.rollout import FastEngine, HFEngine
from gvpo.types import SamplingParams

try:
    import pytest
except ImportError:  # scripts/gpu_check_tests.py runs this file on machines without pytest
    pytest = None


def on_devices(func):
    """Parametrise over "cpu" and "cuda" (the latter marked gpu); without pytest, leave the runner to choose."""
    if pytest is None:
        return func
    return pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])(func)


def need(device: str) -> None:
    if device == "cuda" and not torch.cuda.is_available():
        raise unittest.SkipTest("no CUDA device")  # pytest reports it as a skip too


def embedded_tokenizer():
    from transformers import AutoTokenizer

    from gvpo.assets import default_model_path

    return AutoTokenizer.from_pretrained(default_model_path())  # byte-level, 258 ids, EOS 256, pad 257


PROMPTS = ["12+7=", "81+99+34=", "3=", "5+5+5+5+5=", "40+2="]  # mixed lengths: left padding


def random_qwen2(tokenizer, device, dtype=torch.float32, init=0.3, eos_bias=0.0, seed=0):
    """A random Qwen2 with head_dim 32 and grouped KV heads. A large `init` makes the next-token distributions
    peaked (no near-ties for greedy); EOS gets a constant logit `eos_bias`, so some rows end early."""
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=False, initializer_range=init, eos_token_id=eos, pad_token_id=pad,
                         bos_token_id=None)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight[eos] = 0
    if eos_bias:
        bias = torch.zeros(len(tokenizer))
        bias[eos] = eos_bias
        model.lm_head.bias = torch.nn.Parameter(bias)
    model.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=pad)
    return model.to(device=device, dtype=dtype).eval()


@contextlib.contextmanager
def exact_fp32():
    """fp32 matmuls without TF32, which would round differently in the two implementations compared."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def completions(rollout) -> list[list[int]]:
    return [row[m.bool()].tolist() for row, m in zip(rollout.completion_ids.cpu(), rollout.completion_mask.cpu())]


@on_devices
def test_fast_engine_greedy_equals_hf_generate(device):
    """fp32: the fast engine (hand-written decoder and its HF-cache fallback) decodes exactly what
    model.generate decodes, rows ending at EOS and at max_new_tokens alike (so finished rows leave the batch)."""
    need(device)
    tokenizer = embedded_tokenizer()
    model = random_qwen2(tokenizer, device, eos_bias=7.5)  # lengths 3, 6, 28, 40, 9; top-2 margins >= 0.05
    ids = [tokenizer(p)["input_ids"] for p in PROMPTS]
    max_new = 40  # more than the decoder's cache chunk: the cache grows mid-run
    with exact_fp32():
        expected = completions(HFEngine(model, tokenizer).generate(ids, 1, SamplingParams(max_new_tokens=max_new,
                                                                                           temperature=0)))
        lengths = [len(e) for e in expected]
        assert min(lengths) < max_new and max(lengths) == max_new, f"want EOS inside and max length hit: {lengths}"
        assert top2_margin(model, ids, expected) > 1e-3, "near-tie on the greedy path: the test would be flaky"
        params = SamplingParams(max_new_tokens=max_new, temperature=0)
        for backend in ("layers", "hf"):
            rollout = FastEngine(model, tokenizer, backend=backend).generate(ids, 2, params)
            assert rollout.completion_ids.device.type == device
            assert completions(rollout) == [e for e in expected for _ in range(2)], backend


def top2_margin(model, prompts, completions) -> float:
    """The smallest gap between the two largest logits along the given greedy paths (teacher-forced)."""
    gaps = []
    with torch.no_grad():
        for p, c in zip(prompts, completions):
            device = next(model.parameters()).device
            logits = model(input_ids=torch.tensor([p + c], device=device)).logits[0, len(p) - 1: len(p) - 1 + len(c)]
            top = logits.float().topk(2).values
            gaps.append((top[:, 0] - top[:, 1]).min().item())
    return min(gaps)


# Stated tolerance for bf16: the sampler's log-probs (KV-cache decoding, one token at a time) and the trainer's
# teacher-forced ones (one forward over the whole sequence) round differently in bf16 (8-bit mantissa);
# per token they may differ by up to BF16_MAX_ABS nats, and by BF16_MEAN_ABS on average. Measured on CPU:
# max 0.067 and mean 0.014 (fast engine), 0.046 and 0.009 (HF generate); GPU kernels (flash attention rounds
# the attention weights to bf16) may add to it. A wrong temperature or attention mask gives a mean of 0.28-0.37.
# fp32: 1e-4 per token, 2e-5 on average (measured on CPU: 5e-6 and 1e-6).
BF16_MAX_ABS, BF16_MEAN_ABS = 0.5, 0.05


@on_devices
def test_behavior_logps_equal_teacher_forcing_in_bf16(device):
    """The log-probs each engine reports for the tokens it sampled (temperature 0.7) equal the trainer's
    teacher-forced log-probs of those tokens (gvpo.modeling.token_logps, what pi_theta' and the loss use),
    in bf16 within the stated tolerance and in fp32 to 1e-4."""
    need(device)
    tokenizer = embedded_tokenizer()
    ids = [tokenizer(p)["input_ids"] for p in PROMPTS]
    params, k = SamplingParams(max_new_tokens=24, temperature=0.7), 4
    for dtype, max_abs, mean_abs in ((torch.float32, 1e-4, 2e-5), (torch.bfloat16, BF16_MAX_ABS, BF16_MEAN_ABS)):
        model = random_qwen2(tokenizer, device, dtype=dtype, init=0.1, eos_bias=2.0)
        for engine in (FastEngine(model, tokenizer), HFEngine(model, tokenizer)):
            # A generator on the device, as the trainer's: HF generate must draw its seed there.
            with exact_fp32():
                rollout = engine.generate(ids, k, params, torch.Generator(device=device).manual_seed(1))
            mask = rollout.completion_mask.bool()
            assert mask.sum() > len(ids) * k, "completions too short to test anything"
            inputs, attention, positions = build_sequences(ids, rollout.completion_ids, rollout.completion_mask,
                                                           rollout.prompt_index, tokenizer.pad_token_id)
            with torch.no_grad(), exact_fp32():
                forced = token_logps(model, inputs, attention, positions, mask.shape[1], params.temperature)
            diff = (rollout.behavior_logps.float() - forced.float())[mask].abs()
            name = f"{type(engine).__name__} {dtype}"
            assert torch.isfinite(forced[mask]).all(), name
            assert diff.max() <= max_abs and diff.mean() <= mean_abs, \
                f"{name}: max |diff| {diff.max():.3g} (<= {max_abs}), mean {diff.mean():.3g} (<= {mean_abs})"
            # Not vacuous: the log-probs are far from uniform and vary along the sequence.
            assert forced[mask].std() > 0.3, name


def digits(prompts, completions, **kwargs):
    """A reward a random byte-level model varies on: the number of digits it writes."""
    return [float(sum(ch.isdigit() for ch in c)) for c in completions]


ROWS = [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a in range(10, 30) for b in range(10, 20)]


@on_devices
def test_one_training_step_with_bf16_autocast(device, tmp_path):
    """One GVPO step of the trainer on `device` with bf16 autocast (fp32 weights, as accelerate's mixed
    precision): the policy lives on the device, the forward runs in bf16, the update is finite and moves
    the weights."""
    need(device)
    if device == "cpu" and torch.cuda.is_available():
        raise unittest.SkipTest("the trainer takes the GPU when there is one; the cuda case covers it")
    from gvpo.config import load_config
    from gvpo.trainer import setup, train_step

    tokenizer = embedded_tokenizer()
    random_qwen2(tokenizer, "cpu", init=0.02).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    config = load_config(None, {
        "model_name_or_path": str(tmp_path / "model"), "output_dir": str(tmp_path / "run"), "bf16": True,
        "prompts_per_step": 4, "num_generations": 4, "max_completion_length": 16, "learning_rate": 1e-3,
        "max_steps": 1, "progress_bar": False, "seed": 0})
    run = setup(config, reward_funcs=[digits], train_rows=ROWS, eval_rows=ROWS[:4])
    assert next(run.policy.parameters()).device.type == device
    before = {n: p.detach().clone() for n, p in run.policy.named_parameters()}
    seen = []
    hook = run.policy.model.layers[0].self_attn.q_proj.register_forward_hook(
        lambda module, args, output: seen.append((torch.is_grad_enabled(), output.dtype)))
    try:
        metrics = train_step(run, 1)
    finally:
        hook.remove()
    assert (True, torch.bfloat16) in seen, f"no bf16 forward with gradients: {seen}"
    assert math.isfinite(metrics["loss"]) and metrics["skipped_updates"] == 0
    assert math.isfinite(metrics["grad_norm"]) and metrics["grad_norm"] > 0
    moved = [n for n, p in run.policy.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert moved and all(torch.isfinite(p).all() for p in run.policy.parameters())
    assert all(p.dtype == torch.float32 for p in run.policy.parameters())  # autocast, not bf16 weights
