"""The tiled log-prob path (gvpo.fused_logps) against the plain one: values, gradients, a training step, fallbacks."""

import logging

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

from gvpo.fused_logps import EXACT_MODEL_TYPES, chunked_logps, fused_enabled, fused_head
from gvpo.modeling import load_model_and_tokenizer, token_logps

TIGHT = dict(rtol=1e-5, atol=1e-6)


def plain_logps(h, w, y, b, temperature):
    z = torch.nn.functional.linear(h, w, b) / temperature
    return z.gather(-1, y.unsqueeze(-1)).squeeze(-1) - z.logsumexp(-1)


def grads_of(fn, inputs, upstream):
    for x in inputs:
        x.grad = None
    out = fn()
    (out * upstream).sum().backward()
    return out.detach(), [x.grad.clone() for x in inputs]


def assert_grads_close(got, want):
    for g, w in zip(got, want):  # relative to the largest entry: a few entries of a gradient are near 0
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5 * w.abs().max().item())


@pytest.mark.parametrize("V,T,chunk_tokens,chunk_vocab", [
    (50, 7, 3, 16), (1000, 33, 8, 100), (97, 5, 100, 1000), (4099, 64, 64, 1024), (10, 1, 1, 1)])
@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.6])
@pytest.mark.parametrize("bias", [False, True])
def test_chunked_logps_equals_full_logits(V, T, chunk_tokens, chunk_vocab, temperature, bias):
    g = torch.Generator().manual_seed(V + T)
    h = torch.randn(3, T, 16, generator=g, requires_grad=True)
    w = torch.randn(V, 16, generator=g).requires_grad_()
    b = torch.randn(V, generator=g).requires_grad_() if bias else None
    y = torch.randint(0, V, (3, T), generator=g)
    y[0, 0], y[-1, -1] = 0, V - 1  # the first and the last vocabulary row, where tiles start and end
    upstream = torch.randn(3, T, generator=g)
    upstream[1, T // 2:] = 0  # masked positions (padding): they must get exactly no gradient
    inputs = [x for x in (h, w, b) if x is not None]
    got, got_grads = grads_of(lambda: chunked_logps(h, w, y, b, temperature, chunk_tokens, chunk_vocab), inputs,
                              upstream)
    want, want_grads = grads_of(lambda: plain_logps(h, w, y, b, temperature), inputs, upstream)
    torch.testing.assert_close(got, want, **TIGHT)
    assert_grads_close(got_grads, want_grads)
    assert (got_grads[0][1, T // 2:] == 0).all()


def test_chunked_logps_rejects_empty_tiles():
    with pytest.raises(ValueError, match="chunk_tokens=-1"):
        chunked_logps(torch.zeros(1, 2), torch.zeros(3, 2), torch.zeros(1, dtype=torch.long), chunk_tokens=-1)


def tiny_qwen2(tied=True, vocab=300, bias=False, seed=0):
    config = Qwen2Config(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=tied)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    if bias:  # a head with a bias: still exactly lm_head(hidden)
        model.lm_head = torch.nn.Linear(32, vocab, bias=True)
    return model


def batch(vocab, n=4, prompt=6, T=9, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, vocab, (n, prompt + T), generator=g)
    attn = torch.ones_like(ids)
    attn[0, :3] = 0  # a left-padded prompt
    attn[1, prompt + 4:] = 0  # a completion that ended early (right padding)
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    upstream = torch.randn(n, T, generator=g) * attn[:, prompt:]
    return ids, attn, pos, T, upstream


def both_paths(model, ids, attn, pos, T, upstream, temperature=1.0):
    params = [p for p in model.parameters() if p.requires_grad]
    out = {}
    for fused in (False, True):
        out[fused] = grads_of(lambda: token_logps(model, ids, attn, pos, T, temperature, fused=fused), params,
                              upstream)
    return out[True], out[False]


@pytest.mark.parametrize("tied,bias,temperature", [(True, False, 1.0), (False, False, 0.7), (False, True, 1.3)])
def test_token_logps_fused_equals_plain_with_padding(tied, bias, temperature):
    model = tiny_qwen2(tied=tied, bias=bias)
    assert fused_head(model) is not None
    ids, attn, pos, T, upstream = batch(300)
    (got, got_grads), (want, want_grads) = both_paths(model, ids, attn, pos, T, upstream, temperature)
    torch.testing.assert_close(got, want, **TIGHT)
    assert_grads_close(got_grads, want_grads)
    if tied:  # one parameter, fed by both the embedding lookup and the head
        assert model.lm_head.weight is model.model.embed_tokens.weight


def test_the_head_never_sees_more_than_one_position():
    model = tiny_qwen2()
    shapes = []
    model.lm_head.register_forward_hook(lambda mod, args, out: shapes.append(tuple(out.shape)))
    ids, attn, pos, T, _ = batch(300)
    token_logps(model, ids, attn, pos, T)
    assert shapes == [(4, 1, 300)]
    token_logps(model, ids, attn, pos, T, fused=False)
    assert shapes[-1] == (4, T + 1, 300)


def test_no_grad_checkpointing_and_peft_give_the_plain_numbers():
    model = tiny_qwen2()
    ids, attn, pos, T, upstream = batch(300)
    with torch.no_grad():  # pi_theta' / reference log-probs
        torch.testing.assert_close(token_logps(model, ids, attn, pos, T, fused=True),
                                   token_logps(model, ids, attn, pos, T, fused=False), **TIGHT)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    (got, got_grads), (want, want_grads) = both_paths(model, ids, attn, pos, T, upstream)
    torch.testing.assert_close(got, want, **TIGHT)
    assert_grads_close(got_grads, want_grads)

    from peft import LoraConfig, get_peft_model

    lora = get_peft_model(tiny_qwen2(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    assert fused_head(lora) is not None
    (got, got_grads), (want, want_grads) = both_paths(lora, ids, attn, pos, T, upstream)
    torch.testing.assert_close(got, want, **TIGHT)
    assert_grads_close(got_grads, want_grads)
    with lora.disable_adapter():  # the peft reference model: adapters off inside the fused path too
        base = token_logps(lora, ids, attn, pos, T)
    torch.testing.assert_close(base, token_logps(tiny_qwen2(), ids, attn, pos, T, fused=False), **TIGHT)
    assert not torch.allclose(base, got)


def test_bf16_autocast_multiplies_like_lm_head():
    model = tiny_qwen2(vocab=2000)
    ids, attn, pos, T, upstream = batch(2000)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        (got, got_grads), (want, want_grads) = both_paths(model, ids, attn, pos, T, upstream)
    # Both round the logits to bf16 the same way (here bit for bit); computing the tiles in float32 instead
    # would move the values by ~1e-3 and the gradients by ~5e-3 (relative).
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-3 * w.abs().max().item())


def tiny_config(model_type):
    kw = dict(vocab_size=211, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=8, max_position_embeddings=64, pad_token_id=0, bos_token_id=None,
              eos_token_id=None)
    if model_type in ("mixtral", "qwen2_moe", "qwen3_moe"):
        kw.update(num_local_experts=4, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
    return AutoConfig.for_model(model_type, **kw)


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen3", "phi3", "gemma", "gemma2", "olmo2", "mixtral",
                                        "qwen3_moe"])
def test_known_architectures_compute_the_plain_numbers(model_type):
    """EXACT_MODEL_TYPES is a claim about each forward (lm_head(hidden), nothing else): checked here."""
    assert model_type in EXACT_MODEL_TYPES
    config = tiny_config(model_type)
    if model_type == "gemma2":
        config.final_logit_softcapping = None  # the soft-capped default is the fallback test's
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    assert fused_head(model) is not None
    ids, attn, pos, T, upstream = batch(211)
    (got, got_grads), (want, want_grads) = both_paths(model, ids, attn, pos, T, upstream)
    torch.testing.assert_close(got, want, **TIGHT)
    assert_grads_close(got_grads, want_grads)


def test_soft_capped_and_unknown_models_fall_back_with_a_reason(caplog):
    gemma2 = AutoModelForCausalLM.from_config(tiny_config("gemma2"))  # final_logit_softcapping = 30 by default
    ids, attn, pos, T, _ = batch(211)
    with caplog.at_level(logging.WARNING, logger="gvpo.fused_logps"):
        got = token_logps(gemma2, ids, attn, pos, T)
        token_logps(gemma2, ids, attn, pos, T)
    reasons = [r.getMessage() for r in caplog.records if "final_logit_softcapping=30.0" in r.getMessage()]
    assert len(reasons) == 1, "the reason is logged, once"
    torch.testing.assert_close(got, token_logps(gemma2, ids, attn, pos, T, fused=False), rtol=0, atol=0)

    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2, n_positions=32))
    with caplog.at_level(logging.WARNING, logger="gvpo.fused_logps"):
        assert fused_head(gpt2) is None
    assert "model_type='gpt2'" in caplog.records[-1].getMessage()

    from peft import LoraConfig, get_peft_model

    lora_head = get_peft_model(tiny_qwen2(tied=False), LoraConfig(r=4, target_modules=["q_proj", "lm_head"]))
    with caplog.at_level(logging.WARNING, logger="gvpo.fused_logps"):
        assert fused_head(lora_head) is None
    assert "not a plain torch.nn.Linear" in caplog.records[-1].getMessage()


def test_the_config_switch_reaches_the_model(tiny_model_dir):
    from gvpo.config import load_config

    assert load_config(None, {"fused_logps": "false"}).model.fused_logps is False
    assert load_config(None, {}).model.fused_logps is True
    model, _ = load_model_and_tokenizer(tiny_model_dir, fused_logps=False)
    assert not fused_enabled(model)
    shapes = []
    model.lm_head.register_forward_hook(lambda mod, args, out: shapes.append(out.shape[1]))
    ids, attn, pos, T, _ = batch(model.config.vocab_size)
    token_logps(model, ids, attn, pos, T)
    assert shapes == [T + 1], "model.fused_logps=false takes the plain path"
    assert fused_enabled(load_model_and_tokenizer(tiny_model_dir)[0])


def sevens(prompts, completions, **kwargs):
    return [c.count("7") / max(len(c), 1) for c in completions]


def test_a_training_step_is_the_same_either_way(tmp_path, tiny_model_dir):
    """Two steps of 2 mini-batches each (pi_theta' log-probs under no_grad, then 4 updates), fused vs plain."""
    from safetensors.torch import load_file

    from gvpo.config import load_config
    from gvpo.trainer import train

    weights = {}
    for fused in (True, False):
        out = tmp_path / str(fused)
        cfg = load_config(None, {
            "model_name_or_path": tiny_model_dir, "output_dir": str(out), "max_steps": 2, "prompts_per_step": 4,
            "num_generations": 4, "max_completion_length": 6, "learning_rate": 1e-2, "num_mini_batches": 2,
            "eval_steps": 0, "save_steps": 2, "progress_bar": False, "seed": 0, "fused_logps": fused,
            "shared_prompt": False})  # the fused head alone; tests/test_shared_prompt.py runs the two together
        rows = [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a in range(10, 20) for b in range(10, 14)]
        train(cfg, reward_funcs=[sevens], train_rows=rows, eval_rows=rows[:4])
        weights[fused] = load_file(str(out / "checkpoints" / "step-000002" / "model.safetensors"))
    start = load_file(f"{tiny_model_dir}/model.safetensors")
    assert max((weights[True][k] - start[k]).abs().max().item() for k in start) > 1e-3  # the step moved weights
    for k in weights[False]:
        torch.testing.assert_close(weights[True][k], weights[False][k], rtol=1e-5, atol=1e-6)
