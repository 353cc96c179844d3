"""The shared-prompt pass (gvpo.shared_prompt) against the plain one: per-token log-probs and parameter gradients
on batches shaped like real ones (left padding, several prompt lengths, unequal and one-row groups), fused and
plain heads, temperature, LoRA, activation checkpointing, no_grad, bf16 autocast, the architectures it claims, its
fallbacks, and a whole training run."""

import contextlib
import logging

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from test_fused_logps import assert_grads_close, grads_of, sevens, tiny_config

from gvpo.modeling import build_sequences, load_model_and_tokenizer, token_logps
from gvpo.shared_prompt import SHARED_MODEL_TYPES, length_buckets, prompt_groups, shared_enabled

TIGHT = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(autouse=True)
def fresh_fallback_logs(monkeypatch):
    """Fallback reasons are logged once per process: each test here starts, and leaves, the record as it was."""
    import gvpo.fused_logps
    import gvpo.shared_prompt

    monkeypatch.setattr(gvpo.fused_logps, "_logged", set())
    monkeypatch.setattr(gvpo.shared_prompt, "_logged", set())


def tiny_llama(vocab=300, seed=0):
    """SmolLM2's shape in miniature: Llama, tied embeddings, grouped-query attention."""
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=True, pad_token_id=0, bos_token_id=None, eos_token_id=None)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def make_batch(vocab, prompt_lens=(3, 7, 5, 2), sizes=(3, 1, 4, 2), T=6, seed=1):
    """Rows of several groups (sizes may differ; 1 = a one-row group), shuffled so groups are not contiguous,
    prompts left-padded to the longest, completions right-padded at random lengths, as make_batch builds them."""
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(2, vocab, (n,), generator=g).tolist() for n in prompt_lens]
    index = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    index = index[torch.randperm(len(index), generator=g)]
    N = len(index)
    completions = torch.randint(2, vocab, (N, T), generator=g)
    lengths = torch.randint(1, T + 1, (N,), generator=g)
    lengths[0] = T
    cmask = (torch.arange(T) < lengths[:, None]).long()  # (N, T)
    ids, attn, pos = build_sequences(prompts, completions, cmask, index, pad_token_id=0)
    upstream = torch.randn(N, T, generator=g) * cmask  # what a loss sends back: nothing on padding
    return ids, attn, pos, T, upstream


@contextlib.contextmanager
def embedded_shapes(model):
    """The (rows, tokens) of every forward, read at the input embedding: the plain pass shows one (N, P + T),
    the shared one (U, P) then (N, T - 1)."""
    shapes = []
    hook = model.get_input_embeddings().register_forward_hook(lambda m, a, out: shapes.append(tuple(a[0].shape)))
    try:
        yield shapes
    finally:
        hook.remove()


def shared_vs_plain(model, ids, attn, pos, T, upstream, temperature=1.0, fused=True):
    """(shared, plain) as (log-probs on completion tokens, 0 on padding; parameter gradients)."""
    params = [p for p in model.parameters() if p.requires_grad]
    out = {}
    with embedded_shapes(model) as shapes:
        for shared in (False, True):
            logps, grads = grads_of(lambda: token_logps(model, ids, attn, pos, T, temperature, fused=fused,
                                                        shared=shared), params, upstream)
            out[shared] = logps * attn[:, -T:], grads
    assert shapes == expected_shapes(ids, attn, pos, T), "the shared pass ran (and the plain one did not share)"
    return out[True], out[False]


def expected_shapes(ids, attn, pos, T):
    """The plain pass (N, P + T), then the shared one: the prompts (U, P), each length bucket's completions."""
    N, P = ids.shape[0], ids.shape[1] - T
    U = prompt_groups(ids, attn, pos, P)[0].shape[0]
    return [(N, P + T), (U, P)] + [(len(rows), w - 1) for rows, w in length_buckets(attn[:, P:]) if w > 1]


def assert_same(got, want, tol=TIGHT):
    (logps, grads), (want_logps, want_grads) = got, want
    torch.testing.assert_close(logps, want_logps, **tol)
    assert_grads_close(grads, want_grads)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_llama_equals_the_plain_pass(fused, temperature):
    model = tiny_llama()
    batch = make_batch(300)
    assert_same(*shared_vs_plain(model, *batch, temperature=temperature, fused=fused))


@pytest.mark.parametrize("fused", [True, False])
def test_qwen2_equals_the_plain_pass_with_other_layouts(tiny_model_dir, fused):
    model, _ = load_model_and_tokenizer(tiny_model_dir)
    V = model.config.vocab_size
    for prompt_lens, sizes, T in [((4, 4), (5, 3), 2), ((1, 9, 6), (2, 2, 7), 11), ((8,), (6,), 4)]:
        assert_same(*shared_vs_plain(model, *make_batch(V, prompt_lens, sizes, T), temperature=1.3, fused=fused))


def test_one_token_completions_need_no_completion_pass():
    model = tiny_llama()
    ids, attn, pos, T, upstream = make_batch(300, T=1)
    params = list(model.parameters())
    with embedded_shapes(model) as shapes:
        got = grads_of(lambda: token_logps(model, ids, attn, pos, T, shared=True), params, upstream)
        want = grads_of(lambda: token_logps(model, ids, attn, pos, T, shared=False), params, upstream)
    assert shapes[0][0] == 4 and len(shapes) == 2  # one prompt pass of U = 4 rows, then the plain pass
    assert_same(got, want)


def test_length_buckets_pad_no_row_to_twice_its_length_or_more():
    lengths = torch.tensor([1, 2, 3, 4, 5, 9, 16, 17, 33, 64, 7, 8])
    mask = (torch.arange(64) < lengths[:, None]).long()
    mask[3, 1] = 0  # a hole: the row's length is still its last real token's position
    buckets = length_buckets(mask)
    rows = torch.cat([b for b, _ in buckets])
    assert sorted(rows.tolist()) == list(range(len(lengths)))
    for bucket, width in buckets:
        assert all(lengths[r] <= width < 2 * lengths[r] or width == lengths[r] for r in bucket.tolist())
    assert len(buckets) == 7  # 1 | 2 | 3-4 | 5-8 | 9-16 | 17-32 | 33-64


def test_completions_run_in_length_buckets_cut_to_their_longest_row():
    """A batch whose completions end early: no completion pass is as wide as the batch, and the result is still
    the plain pass's (upstream gradients on padding are 0, as a loss's mask makes them)."""
    model = tiny_llama()
    ids, attn, pos, T, upstream = make_batch(300, sizes=(4, 4, 4, 4), T=16, seed=3)
    attn[:, -T:], upstream = attn[:, -T:] * 0, upstream * 0
    lengths = torch.tensor([1, 2, 3, 5, 9, 16, 4, 4, 2, 2, 3, 6, 7, 12, 1, 8])
    attn[:, -T:] = (torch.arange(T) < lengths[:, None]).long()
    upstream = torch.randn(upstream.shape, generator=torch.Generator().manual_seed(0)) * attn[:, -T:]
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    got, want = shared_vs_plain(model, ids, attn, pos, T, upstream)
    widths = [w for _, w in length_buckets(attn[:, -T:])]
    assert widths == [1, 2, 4, 8, 16]
    assert_same(got, want)


def test_one_row_per_prompt_takes_the_plain_pass():
    model = tiny_llama()
    ids, attn, pos, T, _ = make_batch(300, sizes=(1, 1, 1, 1))
    with embedded_shapes(model) as shapes:
        token_logps(model, ids, attn, pos, T)
    assert shapes == [tuple(ids.shape)]


def test_prompts_are_told_apart_by_tokens_mask_and_positions():
    # rows 0, 2: the same prompt; row 1: the same token ids but one of them is padding; row 3: another prompt
    ids = torch.tensor([[5, 6, 7, 1], [5, 6, 7, 1], [5, 6, 7, 1], [5, 6, 8, 1]])
    attn = torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 1]])
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    first, rows = prompt_groups(ids, attn, pos, 3)
    assert len(first) == 3
    assert rows[0] == rows[2] and len({int(rows[0]), int(rows[1]), int(rows[3])}) == 3
    assert (first[rows] <= torch.arange(4)).all() and torch.equal(ids[first[rows], :3], ids[:, :3])


def test_activation_checkpointing_recomputes_and_gives_the_plain_gradients():
    model = tiny_llama()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    calls = []
    model.model.layers[0].self_attn.q_proj.register_forward_hook(lambda m, a, out: calls.append(a[0].shape[:2]))
    ids, attn, pos, T, upstream = make_batch(300)
    params = list(model.parameters())
    calls.clear()
    got = grads_of(lambda: token_logps(model, ids, attn, pos, T, shared=True), params, upstream)
    # the prompt pass and each length bucket's pass, each replayed once by the backward (in reverse order):
    # checkpointing still recomputes
    passes = 1 + sum(w > 1 for _, w in length_buckets(attn[:, -T:]))
    assert len(calls) == 2 * passes and calls == calls[::-1], calls
    mask = attn[:, -T:]
    want = grads_of(lambda: token_logps(model, ids, attn, pos, T, shared=False), params, upstream)
    assert_same((got[0] * mask, got[1]), (want[0] * mask, want[1]))
    with torch.no_grad():  # pi_theta' in train mode: nothing is checkpointed, the cache is used as is
        torch.testing.assert_close(token_logps(model, ids, attn, pos, T, shared=True) * mask, want[0] * mask,
                                   **TIGHT)
    assert not any(hasattr(layer, "__dict__") and "_can_checkpoint_with_cache" in layer.__dict__
                   for layer in model.model.layers), "the layers are given back their own setting"


def test_reentrant_checkpointing_falls_back_with_its_reason(caplog):
    model = tiny_llama()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    model.train()
    ids, attn, pos, T, _ = make_batch(300)
    with caplog.at_level(logging.WARNING, logger="gvpo.shared_prompt"), embedded_shapes(model) as shapes:
        token_logps(model, ids, attn, pos, T)
        token_logps(model, ids, attn, pos, T)
    assert shapes == [tuple(ids.shape)] * 2
    assert sum("reentrant" in r.getMessage() for r in caplog.records) == 1, "the reason is logged, once"


@pytest.mark.parametrize("checkpointing", [False, True])
def test_lora_equals_the_plain_pass_and_its_reference_too(checkpointing):
    from peft import LoraConfig, get_peft_model

    lora = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj", "down_proj"],
                                                   init_lora_weights=False))
    if checkpointing:
        lora.base_model.model.activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": False})
        lora.train()
    batch = make_batch(300)
    assert_same(*shared_vs_plain(lora, *batch))
    ids, attn, pos, T, _ = batch
    with torch.no_grad(), lora.disable_adapter():  # the peft reference pass
        torch.testing.assert_close(token_logps(lora, ids, attn, pos, T, shared=True) * attn[:, -T:],
                                   token_logps(tiny_llama(), ids, attn, pos, T, shared=False) * attn[:, -T:],
                                   **TIGHT)


def test_bf16_autocast_stays_within_bf16_rounding():
    model = tiny_llama(vocab=2000)
    batch = make_batch(2000)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        (got, got_grads), (want, want_grads) = shared_vs_plain(model, *batch)
    # The attention matmuls have other shapes (T - 1 queries instead of P + T), so bf16 may round differently.
    # Measured: log-probs equal, gradients 0.9% apart (of the largest entry); a detached prompt cache: 89%.
    torch.testing.assert_close(got, want, rtol=0, atol=1e-2)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=0, atol=3e-2 * w.abs().max().item())


@pytest.mark.parametrize("model_type", sorted(SHARED_MODEL_TYPES))
def test_every_claimed_architecture_equals_the_plain_pass(model_type):
    """SHARED_MODEL_TYPES is a claim about each forward (keys/values through the cache, masks from its lengths)."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type))
    assert_same(*shared_vs_plain(model, *make_batch(211)))


def test_unverified_models_and_short_sliding_windows_fall_back(caplog):
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2, n_positions=32))
    ids, attn, pos, T, _ = make_batch(50)
    with caplog.at_level(logging.WARNING, logger="gvpo.shared_prompt"):
        token_logps(gpt2, ids, attn, pos, T)
    assert "model_type='gpt2'" in caplog.records[-1].getMessage()

    config = tiny_config("mistral")
    config.sliding_window = 5  # shorter than the sequences: the windowed mask of the plain pass stands
    torch.manual_seed(0)
    mistral = AutoModelForCausalLM.from_config(config)
    ids, attn, pos, T, _ = make_batch(211)
    with caplog.at_level(logging.WARNING, logger="gvpo.shared_prompt"), embedded_shapes(mistral) as shapes:
        token_logps(mistral, ids, attn, pos, T)
    assert shapes == [tuple(ids.shape)] and "sliding_window=5" in caplog.records[-1].getMessage()


def test_the_config_switch_reaches_the_model(tiny_model_dir):
    from gvpo.config import load_config

    assert load_config(None, {"shared_prompt": "false"}).model.shared_prompt is False
    assert load_config(None, {}).model.shared_prompt is True
    model, _ = load_model_and_tokenizer(tiny_model_dir, shared_prompt=False)
    assert not shared_enabled(model)
    ids, attn, pos, T, _ = make_batch(model.config.vocab_size)
    with embedded_shapes(model) as shapes:
        token_logps(model, ids, attn, pos, T)
    assert shapes == [tuple(ids.shape)], "model.shared_prompt=false takes the plain pass"
    assert shared_enabled(load_model_and_tokenizer(tiny_model_dir)[0])


def sevens_or_none(prompts, completions, **kwargs):
    """Leaves some responses unscored (None): their groups shrink, so group sizes differ."""
    return [None if c.startswith("1") else s for c, s in zip(completions, sevens(prompts, completions))]


@pytest.mark.parametrize("extra", [{"micro_batch_prompts": 2}, {"gradient_checkpointing": True, "use_peft": True,
                                                                 "lora_target_modules": ["q_proj", "v_proj"]}])
def test_a_training_run_is_the_same_either_way(tmp_path, tiny_model_dir, extra, monkeypatch):
    """Two steps of 2 mini-batches (pi_theta' under no_grad, then 4 updates of micro-batches of whole groups),
    prompts of several lengths, unequal groups: the weights end the same with the shared pass or without."""
    from safetensors.torch import load_file

    import gvpo.shared_prompt
    from gvpo.config import load_config
    from gvpo.trainer import train

    used = []
    real = gvpo.shared_prompt.shared_token_logps
    monkeypatch.setattr("gvpo.modeling.shared_token_logps", lambda *a, **k: used.append(1) or real(*a, **k))
    rows = [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a in (3, 45, 678, 9012) for b in (1, 23, 456)]
    weights = {}
    for shared in (True, False):
        used.clear()
        out = tmp_path / str(shared)
        cfg = load_config(None, {
            "model_name_or_path": tiny_model_dir, "output_dir": str(out), "max_steps": 2, "prompts_per_step": 4,
            "num_generations": 4, "max_completion_length": 6, "learning_rate": 1e-2, "num_mini_batches": 2,
            "eval_steps": 0, "save_steps": 2, "progress_bar": False, "seed": 0, "shared_prompt": shared, **extra})
        train(cfg, reward_funcs=[sevens_or_none], train_rows=rows, eval_rows=rows[:4])
        weights[shared] = load_file(str(next(out.glob("checkpoints/step-000002/*.safetensors"))))
        assert bool(used) == shared
    start = load_file(f"{tiny_model_dir}/model.safetensors")
    moved = [k for k, w in weights[False].items()
             if (w - start[k] if k in start else w * ("lora_B" in k)).abs().max() > 1e-3]
    assert moved, "the steps moved the weights (LoRA: its B matrices, which start at 0)"
    for k in weights[False]:  # float32 sums in another order, through 4 Adam steps of 1e-2: ~1e-6 apart
        torch.testing.assert_close(weights[True][k], weights[False][k], rtol=1e-5, atol=1e-5)


def test_with_several_processes_the_completions_run_in_one_pass(monkeypatch):
    """Every rank must make the same forward calls (DDP broadcasts buffers in each): no data-dependent buckets."""
    model = tiny_llama()
    ids, attn, pos, T, _ = make_batch(300)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)
    with embedded_shapes(model) as shapes:
        token_logps(model, ids, attn, pos, T, shared=True)
    assert len(length_buckets(attn[:, -T:])) > 1 and shapes[1:] == [(ids.shape[0], T - 1)]
