"""Rollout engines against tiny random models built here (no hub): greedy equality with HF generate,
behavior_logps against teacher forcing, sampled frequencies against the model's distribution (chi-square),
determinism under a seed, stop strings, and the vLLM engine's import error."""

from __future__ import annotations

import sys

import pytest
import torch

from gvpo.rollout import FastEngine, HFEngine, make_engine, processed_logps
from gvpo.rollout.base import left_pad, stop_string_cut
from gvpo.rollout import kv_decoder
from gvpo.rollout.kv_decoder import unsupported_reason
from gvpo.types import SamplingParams

EOS, PAD = 1, 0
PROMPTS = [[5, 6, 7], [3, 4, 5, 6, 7, 8, 9, 10, 11], [2], [9, 9, 4, 12, 30]]  # mixed lengths: left padding


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine OpenMP's barrier makes
    each small op wait for a descheduled thread (measured: a 16-row generate 1.3 s with 2 threads, 9 ms with 1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True, params=["prompt-copied", "prompt-shared"])
def prompt_cache(request, monkeypatch):
    """Every test runs with the prompt copied into each row's cache (what short prompts get) and with one
    shared prompt cache per prompt (what long prompts get)."""
    monkeypatch.setattr(kv_decoder, "SHARE_MIN_SAVED_SLOTS", 0 if request.param == "prompt-shared" else 10**9)
    return request.param


@pytest.fixture(scope="module")
def tokenizer():
    """Character-level tokenizer: <pad>=0, <eos>=1, then one id per character."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = list("0123456789+-=*#, abcdefghijklmnopqrstuvwxyz.")
    vocab = {"<pad>": PAD, "<eos>": EOS, **{c: i + 2 for i, c in enumerate(chars)}}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", padding_side="left")


def tiny_model(arch: str, vocab: int, eos_bias: float = 0.0, seed: int = 0):
    """2-layer random model; a large init range makes the distributions peaked (no near-ties for argmax),
    `eos_bias` makes EOS likely enough to end some rows early."""
    import transformers as tf
    from transformers import GenerationConfig

    common = dict(vocab_size=vocab, eos_token_id=EOS, pad_token_id=PAD, bos_token_id=None, initializer_range=0.3)
    llama_like = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=128, **common)
    config = {
        "qwen2": lambda: tf.Qwen2Config(tie_word_embeddings=True, **llama_like),
        "llama": lambda: tf.LlamaConfig(tie_word_embeddings=False, **llama_like),
        "qwen3": lambda: tf.Qwen3Config(head_dim=8, tie_word_embeddings=True, **llama_like),
        "mistral": lambda: tf.MistralConfig(sliding_window=None, **llama_like),
        "gpt2": lambda: tf.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=128, **common),
    }[arch]()
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        model.get_output_embeddings().weight[EOS] *= 0  # tied or not: a constant EOS logit, set by the bias below
        bias = torch.zeros(vocab)
        bias[EOS] = eos_bias
        head = model.get_output_embeddings()
        if head.bias is None:
            head.bias = torch.nn.Parameter(bias)
        else:
            head.bias.copy_(bias)
    model.generation_config = GenerationConfig(eos_token_id=EOS, pad_token_id=PAD)
    return model


def engines(model, tokenizer, **kwargs):
    """The engines under test: both fast backends and HF generate."""
    return {
        "fast-layers": FastEngine(model, tokenizer, backend="layers", **kwargs),
        "fast-hf": FastEngine(model, tokenizer, backend="hf", **kwargs),
        "hf": HFEngine(model, tokenizer, **kwargs),
    }


def completions(rollout) -> list[list[int]]:
    return [row[mask.bool()].tolist() for row, mask in zip(rollout.completion_ids, rollout.completion_mask)]


def teacher_forced_logits(model, prompt: list[int], completion: list[int]) -> torch.Tensor:
    """(len(completion), V) logits that predicted each completion token, from one unpadded forward pass."""
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float()
    return logits[len(prompt) - 1 : len(prompt) - 1 + len(completion)]


def chi_square_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson chi-square goodness of fit; cells expecting < 5 counts are pooled into one cell."""
    counts, expected = counts.double(), probs.double() * counts.sum()
    small = expected < 5
    if small.any():
        counts = torch.cat([counts[~small], counts[small].sum()[None]])
        expected = torch.cat([expected[~small], expected[small].sum()[None]])
    stat = ((counts - expected) ** 2 / expected).sum()
    dof = counts.numel() - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), stat / 2))


# -- greedy equality --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["qwen2", "llama", "qwen3", "mistral", "gpt2"])
def test_greedy_tokens_equal_hf_generate(arch, tokenizer):
    # EOS biases chosen so that greedy rows end both early and at max_new_tokens (asserted below).
    model = tiny_model(arch, len(tokenizer), eos_bias=2.0 if arch == "qwen3" else 2.5)
    max_new = 40  # > the fast decoder's cache chunk (16): the cache grows and compacts mid-run
    ids, mask = left_pad(PROMPTS, PAD)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new,
                             eos_token_id=EOS, pad_token_id=PAD)
    expected = []
    for row in out[:, ids.shape[1]:].tolist():
        expected.append(row[: row.index(EOS) + 1] if EOS in row else row)
    lengths = [len(e) for e in expected]
    assert min(lengths) < max_new and max(lengths) == max_new, f"want EOS inside and max length hit: {lengths}"

    params = SamplingParams(max_new_tokens=max_new, temperature=0)
    runs = engines(model, tokenizer)
    runs["fast-compact-every-row"] = FastEngine(model, tokenizer, compact_fraction=1e-6)
    for name, engine in runs.items():
        if arch == "gpt2" and name == "fast-layers":
            assert unsupported_reason(model, 64) is not None
            continue
        rollout = engine.generate(PROMPTS, 2, params)
        assert rollout.prompt_index.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
        assert completions(rollout) == [e for e in expected for _ in range(2)], name
        # Greedy behavior_logps are the raw log-softmax of the chosen token.
        for row, tokens in enumerate(completions(rollout)):
            logits = teacher_forced_logits(model, PROMPTS[row // 2], tokens)
            want = torch.log_softmax(logits, -1).gather(-1, torch.tensor(tokens)[:, None]).squeeze(-1)
            got = rollout.behavior_logps[row, : len(tokens)]
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_fast_path_is_used_for_llama_style_models(tokenizer):
    for arch in ("qwen2", "llama", "qwen3", "mistral"):
        model = tiny_model(arch, len(tokenizer))
        assert unsupported_reason(model, 64) is None, arch
        rollout = FastEngine(model, tokenizer).generate([[3, 4]], 2, SamplingParams(max_new_tokens=3))
        assert rollout.extra["backend"] == "LlamaStyleDecoder"


# -- behavior_logps ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(max_new_tokens=10, temperature=1.0),
        SamplingParams(max_new_tokens=10, temperature=0.7),
        SamplingParams(max_new_tokens=10, temperature=1.0, top_k=5),
        SamplingParams(max_new_tokens=10, temperature=0.7, top_p=0.8),
        SamplingParams(max_new_tokens=10, temperature=1.3, top_k=8, top_p=0.9),
    ],
    ids=["t1", "t0.7", "topk5", "t0.7-topp0.8", "t1.3-topk8-topp0.9"],
)
def test_behavior_logps_equal_the_trainers_teacher_forced_logps(params, tokenizer):
    """Sampled from the top-k / top-p distribution, but behavior_logps are the temperature-scaled policy's, the
    very numbers the trainer's ``token_logps`` computes: one distribution for both sides of every ratio."""
    from gvpo.modeling import build_sequences, token_logps

    model = tiny_model("qwen2", len(tokenizer), eos_bias=1.0)
    k = 3
    truncated = params.top_k > 0 or params.top_p < 1.0
    for name, engine in engines(model, tokenizer).items():
        rollout = engine.generate(PROMPTS, k, params, torch.Generator().manual_seed(1))
        assert rollout.completion_ids.shape[0] == len(PROMPTS) * k
        seq = build_sequences(PROMPTS, rollout.completion_ids, rollout.completion_mask, rollout.prompt_index,
                              tokenizer.pad_token_id)
        with torch.no_grad():
            trained = token_logps(model, *seq, rollout.completion_ids.shape[1], params.temperature)
        for row, tokens in enumerate(completions(rollout)):
            logits = teacher_forced_logits(model, PROMPTS[row // k], tokens)
            sampled_from = processed_logps(logits, params).gather(-1, torch.tensor(tokens)[:, None]).squeeze(-1)
            assert torch.isfinite(sampled_from).all(), f"{name} sampled a token outside the top-k/top-p set"
            want = torch.log_softmax(logits / params.temperature, -1).gather(-1, torch.tensor(tokens)[:, None])[:, 0]
            if truncated:  # the truncated distribution renormalises: its log-probs are larger
                assert (sampled_from > want + 1e-4).any()
            torch.testing.assert_close(rollout.behavior_logps[row, : len(tokens)], want, atol=1e-5, rtol=0)
            torch.testing.assert_close(trained[row, : len(tokens)], want, atol=1e-5, rtol=0)
            assert (rollout.behavior_logps[row, len(tokens):] == 0).all()
            # Nothing after EOS, and EOS itself is in the mask.
            assert EOS not in tokens[:-1]


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.7, 0, 1.0), (1.0, 5, 1.0), (1.0, 0, 0.8), (0.5, 7, 0.9)])
def test_processed_logps_match_transformers_warpers(temperature, top_k, top_p):
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    logits = torch.randn(16, 50, generator=torch.Generator().manual_seed(0)) * 3
    scores = logits.clone()
    if temperature != 1.0:
        scores = TemperatureLogitsWarper(temperature)(None, scores)
    if top_k:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p < 1.0:
        scores = TopPLogitsWarper(top_p)(None, scores)
    got = processed_logps(logits, SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p))
    want = torch.log_softmax(scores, -1)
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    torch.testing.assert_close(got[torch.isfinite(got)], want[torch.isfinite(want)])


# -- sampled frequencies ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["fast-layers", "fast-hf", "hf"])
def test_first_token_frequencies_match_model_distribution(name, tokenizer):
    """Pearson chi-square at a fixed seed; the test fails if p < 1e-3 (deterministic, so no flakiness)."""
    model = tiny_model("qwen2", len(tokenizer))
    prompt, n = [5, 6, 7], 3000
    engine = engines(model, tokenizer, eos_token_ids=())[name]
    rollout = engine.generate([prompt], n, SamplingParams(max_new_tokens=1), torch.Generator().manual_seed(0))
    counts = torch.bincount(rollout.completion_ids[:, 0], minlength=len(tokenizer))
    probs = torch.softmax(teacher_forced_logits(model, prompt, [0])[0], -1)
    assert chi_square_pvalue(counts, probs) > 1e-3


@pytest.mark.parametrize("name", ["fast-layers", "hf"])
def test_two_token_frequencies_match_processed_distribution(name, tokenizer):
    """Joint law of (y1, y2) at temperature 0.7 with top-k = 4: 16 cells, chi-square p > 1e-3 at a fixed seed."""
    model = tiny_model("llama", len(tokenizer))
    params, prompt, n = SamplingParams(max_new_tokens=2, temperature=0.7, top_k=4), [8, 3, 5], 3000
    engine = engines(model, tokenizer, eos_token_ids=())[name]
    rollout = engine.generate([prompt], n, params, torch.Generator().manual_seed(0))
    first = processed_logps(teacher_forced_logits(model, prompt, [0]), params)[0].exp()
    support = first.nonzero().squeeze(-1).tolist()
    assert len(support) == 4
    cells, probs = {}, []
    for a in support:
        second = processed_logps(teacher_forced_logits(model, prompt + [a], [0]), params)[0].exp()
        for b in second.nonzero().squeeze(-1).tolist():
            cells[(a, b)] = len(probs)
            probs.append(float(first[a] * second[b]))
    counts = torch.zeros(len(probs))
    for a, b in rollout.completion_ids.tolist():
        counts[cells[(a, b)]] += 1  # KeyError = a pair outside the processed support
    assert chi_square_pvalue(counts, torch.tensor(probs)) > 1e-3


# -- determinism, stop strings, interface -----------------------------------------------------------------------

def test_seeded_runs_are_deterministic(tokenizer):
    model = tiny_model("qwen2", len(tokenizer), eos_bias=1.0)
    params = SamplingParams(max_new_tokens=8, temperature=0.9, top_p=0.95)
    for name, engine in engines(model, tokenizer).items():
        a = engine.generate(PROMPTS, 4, params, torch.Generator().manual_seed(7))
        b = engine.generate(PROMPTS, 4, params, torch.Generator().manual_seed(7))
        c = engine.generate(PROMPTS, 4, params, torch.Generator().manual_seed(8))
        assert torch.equal(a.completion_ids, b.completion_ids), name
        assert torch.equal(a.behavior_logps, b.behavior_logps), name
        assert not torch.equal(a.completion_ids, c.completion_ids), name
        # Samples of one prompt differ from each other (the cache expansion did not correlate them).
        assert len({tuple(t) for t in completions(a)[:4]}) > 1, name


def test_stop_strings_cut_right_after_the_first_occurrence(tokenizer):
    model = tiny_model("qwen2", len(tokenizer))
    greedy = SamplingParams(max_new_tokens=16, temperature=0)
    plain = completions(FastEngine(model, tokenizer, eos_token_ids=()).generate(PROMPTS, 1, greedy))
    stop = tokenizer.decode(plain[1])[5:7]  # a string that the greedy completion of prompt 1 contains

    def expected(tokens):  # brute force: the shortest prefix whose text contains the stop string
        cut = next((n for n in range(1, len(tokens) + 1) if stop in tokenizer.decode(tokens[:n])), len(tokens))
        return tokens[:cut]

    want = [expected(t) for t in plain]
    assert len(want[1]) < 16
    params = SamplingParams(max_new_tokens=16, temperature=0, stop_strings=(stop, "never-appears"))
    runs = engines(model, tokenizer, eos_token_ids=())
    # worker threads decode (and check stop strings) side by side
    runs["fast-2-workers"] = FastEngine(model, tokenizer, eos_token_ids=(), workers=2, stop_check_every=2)
    for name, engine in runs.items():
        rollout = engine.generate(PROMPTS, 1, params)
        assert completions(rollout) == want, name
        text = tokenizer.decode(want[1])
        assert text.endswith(stop) and text.count(stop) == 1
        n = len(want[1])
        assert (rollout.completion_mask[1, n:] == 0).all() and (rollout.behavior_logps[1, n:] == 0).all()
        assert (rollout.completion_ids[1, n:] == PAD).all()


def test_stop_string_cut_spans_tokens(tokenizer):
    ids = tokenizer("ab=cd=ef", add_special_tokens=False)["input_ids"]
    assert stop_string_cut(ids, tokenizer, ["d="]) == 6
    assert stop_string_cut(ids, tokenizer, ["zz"]) is None


def test_engine_follows_in_place_weight_updates(tokenizer):
    model = tiny_model("qwen2", len(tokenizer))
    engine = FastEngine(model, tokenizer, eos_token_ids=())
    params = SamplingParams(max_new_tokens=4, temperature=0)
    before = completions(engine.generate(PROMPTS, 1, params))
    with torch.no_grad():
        for p in model.model.layers[0].mlp.parameters():
            p.mul_(-3.0)
        model.lm_head.bias[20] += 50.0  # token 20 now wins everywhere
    after = completions(engine.generate(PROMPTS, 1, params))
    assert after != before and all(row == [20] * 4 for row in after)


def test_make_engine_errors():
    with pytest.raises(ValueError, match="fast"):
        make_engine("beam", None, None)
    with pytest.raises(ValueError, match="num_generations"):
        FastEngine(tiny_model("qwen2", 48), None).generate([[3]], 0, SamplingParams())


def test_vllm_engine_names_the_extra_when_vllm_is_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm -> ImportError
    with pytest.raises(ImportError, match=r"gvpo\[vllm\]"):
        make_engine("vllm", tiny_model("qwen2", 48), None)


def test_per_prompt_seeds_make_samples_batch_independent():
    """With seeds, a prompt's k samples do not depend on the other prompts of the batch (what lets any number
    of processes sample the same completions), and the same seed gives the same samples."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from gvpo.rollout import make_engine

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, eos_token_id=1,
                                         pad_token_id=0)).eval()

    class Tok:
        eos_token_id, pad_token_id = 1, 0

    engine = make_engine("fast", model, Tok())
    params = SamplingParams(max_new_tokens=12, temperature=1.0)
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13], [14]]
    together = engine.generate(prompts, 4, params, seeds=[11, 12, 13, 14])
    for p, seed in ((1, 12), (3, 14)):
        alone = engine.generate([prompts[p]], 4, params, seeds=[seed])
        rows = together.prompt_index == p
        width = alone.completion_ids.shape[1]
        assert torch.equal(together.completion_ids[rows][:, :width] * together.completion_mask[rows][:, :width],
                           alone.completion_ids * alone.completion_mask)
        torch.testing.assert_close(together.behavior_logps[rows][:, :width], alone.behavior_logps, atol=1e-5, rtol=0)
    other = engine.generate(prompts, 4, params, seeds=[21, 22, 23, 24])
    assert not torch.equal(other.completion_ids, together.completion_ids)


@pytest.mark.parametrize("params", [SamplingParams(temperature=0.8, top_k=8), SamplingParams(temperature=0.8)],
                         ids=["top-k", "untruncated"])
def test_inverse_cdf_sampling_matches_the_distribution(params):
    """The seeded path samples the processed distribution (chi-square over many draws, p > 1e-3, fixed seed) and
    reports the temperature-scaled policy's log-prob of the drawn token."""
    from gvpo.rollout.base import policy_logps, sample_tokens

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 12, generator=g).repeat(20000, 1)
    tokens, logps = sample_tokens(logits, params, None, torch.rand(20000, generator=g))
    probs = processed_logps(logits[:1], params).exp()[0]
    observed = torch.bincount(tokens, minlength=12).double()
    keep = probs > 0
    assert observed[~keep].sum() == 0  # filtered tokens are never drawn
    assert chi_square_pvalue(observed[keep], probs[keep].double()) > 1e-3
    torch.testing.assert_close(logps, policy_logps(logits, params)[0, tokens], atol=1e-6, rtol=0)


@pytest.mark.parametrize("vocab", [7, 256, 1000, 49152 + 37])
def test_inverse_cdf_equals_the_full_cumulative_search(vocab):
    """The two-level search draws the token a float64 cumulative sum over the whole vocabulary would: the first
    whose cumulative weight exceeds u * total (up to where the two sums round differently: the target within
    1e-5 of a boundary), never a zero-weight one (zero blocks at either end, u = 0 and u just below 1), and with
    the total it reports."""
    from gvpo.rollout.base import inverse_cdf

    g = torch.Generator().manual_seed(vocab)
    rows = 300
    weights = torch.rand(rows, vocab, generator=g) ** 8  # skewed, as a softmax is
    weights[weights < 1e-3] = 0.0  # zero-weight tokens here and there
    weights[:100, : vocab // 2] = 0.0  # leading zero blocks
    weights[100:200, vocab // 2 + 1:] = 0.0  # trailing zero blocks
    weights[:, vocab // 2] = 0.5  # every row keeps some weight
    u = torch.rand(rows, generator=g)
    u[::3] = 0.0
    u[1::3] = 1 - 2 ** -24  # the largest float32 below 1
    tokens, total = inverse_cdf(weights, u)
    assert (weights.gather(1, tokens[:, None]) > 0).all()
    cdf = weights.double().cumsum(-1)
    torch.testing.assert_close(total, cdf[:, -1], rtol=1e-6, atol=0)
    target = u.double() * cdf[:, -1]
    want = torch.searchsorted(cdf, target[:, None], right=True).squeeze(-1).clamp(max=vocab - 1)
    want = torch.where(weights.gather(1, want[:, None]).squeeze(-1) > 0, want, tokens)  # past the end: rounding
    differ = (tokens != want).nonzero().flatten()
    boundary = cdf[differ, torch.minimum(tokens, want)[differ]]
    assert ((boundary - target[differ]).abs() <= 1e-5 * cdf[differ, -1]).all(), differ
    assert len(differ) <= rows // 100


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_worker_threads_do_not_change_the_rollout(temperature, tokenizer):
    """Splitting prompts across worker threads is an execution detail: same tokens, same log-probs, and the
    caller's torch thread count is restored."""
    model = tiny_model("qwen2", len(tokenizer), eos_bias=2.5)
    prompts = [[3, 4, 5], [6], [7, 8, 9, 10, 11], [12, 13], [5, 5, 5, 5]]
    params = SamplingParams(max_new_tokens=12, temperature=temperature)
    threads = torch.get_num_threads()
    runs = {}
    for workers in (1, 2, 3):
        engine = FastEngine(model, tokenizer, workers=workers, compact_fraction=0.1)
        runs[workers] = engine.generate(prompts, 3, params, torch.Generator().manual_seed(7))
        assert runs[workers].extra["workers"] == workers
        assert torch.get_num_threads() == threads
    for workers in (2, 3):
        assert torch.equal(runs[workers].completion_ids, runs[1].completion_ids)
        assert torch.equal(runs[workers].completion_mask, runs[1].completion_mask)
        torch.testing.assert_close(runs[workers].behavior_logps, runs[1].behavior_logps, atol=1e-5, rtol=0)
    assert runs[1].completion_mask.sum(-1).min() < 12, "some row should end at EOS, so compaction ran"


def test_default_workers_follow_threads_and_batch_size(tokenizer):
    """One worker per torch thread, but never fewer than 64 rows each (below that, splitting was slower)."""
    model = tiny_model("qwen2", len(tokenizer))
    engine = FastEngine(model, tokenizer, eos_token_ids=())
    params = SamplingParams(max_new_tokens=2)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert engine.generate([[3, 4]] * 16, 8, params).extra["workers"] == 2  # 128 rows
        assert engine.generate([[3, 4]] * 2, 8, params).extra["workers"] == 1  # 16 rows
        torch.set_num_threads(1)
        assert engine.generate([[3, 4]] * 16, 8, params).extra["workers"] == 1
    finally:
        torch.set_num_threads(threads)


def test_worker_threads_keep_the_callers_autocast(tokenizer):
    """Autocast is per thread: the workers must compute in the caller's autocast dtype, as one worker does."""
    model = tiny_model("qwen2", len(tokenizer))
    params = SamplingParams(max_new_tokens=6)
    runs = {}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for workers in (1, 2):
            engine = FastEngine(model, tokenizer, eos_token_ids=(), workers=workers)
            runs[workers] = engine.generate([[3, 4, 5]] * 4, 3, params, torch.Generator().manual_seed(1))
    plain = FastEngine(model, tokenizer, eos_token_ids=(), workers=2).generate(
        [[3, 4, 5]] * 4, 3, params, torch.Generator().manual_seed(1))
    torch.testing.assert_close(runs[2].behavior_logps, runs[1].behavior_logps, atol=1e-6, rtol=0)
    assert not torch.allclose(plain.behavior_logps, runs[2].behavior_logps, atol=1e-6), "bf16 had no effect"
