"""Rollout throughput: the fast engine vs HF generate, in generated tokens per second.

Workload: 64 prompts x k = 8 samples x exactly 64 new tokens (EOS disabled in both engines, so both produce
the same number of tokens; `min_new_tokens` is not used: it makes HF generate 10-20x slower). Models: the
embedded default model (or, if it is not built yet, a random Qwen2 of the same shape) and a ~25M-parameter
Qwen2 of the same architecture with random weights. Repetitions alternate between engines; medians reported.

Also measures fp32 matmul throughput in the same run (the faster of torch's and oneDNN's) and prints each engine's fraction of that FLOP limit
(model FLOPs: 2 * params per token, prompts counted once, plus attention over the context).

    .venv/bin/python benchmarks/rollout.py            # torch default threads (2 on the dev machine)
    .venv/bin/python benchmarks/rollout.py --reps 3 --threads 1
    .venv/bin/python benchmarks/rollout.py --natural-eos --skip-25m   # RL workload: rows end at EOS
    .venv/bin/python benchmarks/rollout.py --prompt-len 150 --skip-25m  # long prompts (shared prompt cache)
    .venv/bin/python benchmarks/rollout.py --model smollm2-135m-instruct --chat --natural-eos --skip-25m
        # a chat model's RL rollout: addition_chat questions through its chat template, rows end at its end token

With --natural-eos the engines sample different completions (different RNG streams), so they differ a little
in token count; tokens/s and the speedup use each engine's own count, the FLOP fraction is approximate.

The last line is JSON with `speedup_vs_hf` per model.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from gvpo.rollout import FastEngine, HFEngine
from gvpo.types import SamplingParams


def load_default(path: str | None = None):
    """(name, model, tokenizer or None, note): `path`, else the embedded default model, else a stand-in."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        if path is None:
            from gvpo.assets import default_model_path

            path = default_model_path()
        else:  # an alias (smollm2-135m-instruct) or a .gguf file: its converted checkpoint
            from gvpo.modeling import resolve_model_path

            path = resolve_model_path(path)
        name = "default" if "assets" in str(path) else "model"
        return name, AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path), str(path)
    except (ImportError, OSError, AttributeError) as err:
        model = random_qwen2(vocab=40, hidden=128, layers=4, heads=4)
        return "default*", model, None, f"default model not available ({type(err).__name__}); random Qwen2 stand-in"


def random_qwen2(vocab: int, hidden: int, layers: int, heads: int):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=512,
        tie_word_embeddings=True, eos_token_id=1, pad_token_id=0,
    )
    return Qwen2ForCausalLM(config).eval()


def make_prompts(tokenizer, vocab: int, num: int, seed: int = 0, length: int = 0, chat: bool = False) -> list[list[int]]:
    """Task prompts through the real tokenizer when there is one, else random ids of similar lengths (8-14);
    `length` > 0: random ids of exactly that many tokens (long prompts, as in math RL); `chat`: the
    addition_chat questions through the tokenizer's chat template (a chat model's RL prompts)."""
    if chat:
        from gvpo.data import encode_rows
        from gvpo.tasks import make_dataset

        return [r["prompt_ids"] for r in encode_rows(make_dataset("addition_chat", n=num, seed=seed), tokenizer, "chat")]
    if length:
        g = torch.Generator().manual_seed(seed)
        return torch.randint(3, vocab, (num, length), generator=g).tolist()
    if tokenizer is not None:
        try:
            from gvpo.tasks import make_dataset

            rows = make_dataset(n=num, seed=seed)
            return [tokenizer(row["prompt"], add_special_tokens=False)["input_ids"] for row in rows]
        except ImportError:
            pass
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(8, 15, (num,), generator=g)
    return [torch.randint(3, vocab, (int(n),), generator=g).tolist() for n in lengths]


def matmul_gflops(size: int = 1024, reps: int = 10) -> float:
    """The CPU's float32 limit: the faster of torch's matmul (MKL) and oneDNN's on one size^3 product (on AMD
    CPUs MKL reaches about half of what oneDNN does; gvpo.cpu_matmul)."""
    from gvpo import cpu_matmul

    a, b = torch.randn(size, size), torch.randn(size, size)
    products = [lambda: a @ b]
    if cpu_matmul._available():
        products.append(lambda: cpu_matmul._onednn(a, b, None))
    return max(cpu_matmul.gflops(product, 2 * size**3, reps, pick=statistics.median) for product in products)


def job_flops(model, prompts, k: int, new_tokens: int) -> float:
    """Minimal FLOPs of the job: every prompt once, k * new_tokens decode tokens, attention over the context."""
    config = model.config
    params = sum(p.numel() for p in model.parameters())
    if not config.tie_word_embeddings:
        params -= model.get_input_embeddings().weight.numel()  # a lookup, not a matmul
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    width = config.num_attention_heads * head_dim
    prompt_tokens = sum(len(p) for p in prompts)
    flops = 2 * params * (prompt_tokens + len(prompts) * k * new_tokens)
    for prompt in prompts:
        n = len(prompt)
        prefill_ctx = n * (n + 1) / 2
        decode_ctx = k * sum(n + t for t in range(1, new_tokens + 1))
        flops += 4 * config.num_hidden_layers * width * (prefill_ctx + decode_ctx)  # QK^T and PV
    return flops


def bench_model(name, model, prompts, args):
    import contextlib
    import copy

    params = SamplingParams(max_new_tokens=args.new_tokens, temperature=1.0)
    eos = None if args.natural_eos else ()  # () = never stop early: both engines make the same token count
    engines = {"fast": FastEngine(model, None, eos_token_ids=eos), "hf": HFEngine(model, None, eos_token_ids=eos)}
    contexts = {key: contextlib.nullcontext for key in engines}
    if args.bf16:
        # Ours as `gvpo train bf16=true` runs it (float32 weights, bf16 autocast: the decoder casts them once per
        # call); HF generate as a user would run bf16 on CPU: the model loaded in bfloat16.
        engines["fast-bf16"] = engines["fast"]
        contexts["fast-bf16"] = lambda: torch.autocast("cpu", dtype=torch.bfloat16)
        engines["hf-bf16"] = HFEngine(copy.deepcopy(model).to(torch.bfloat16), None, eos_token_ids=eos)
        contexts["hf-bf16"] = contextlib.nullcontext
    forced = len(prompts) * args.k * args.new_tokens
    times, tokens = {key: [] for key in engines}, {key: [] for key in engines}
    for rep in range(args.reps + 1):  # rep 0 warms up
        for key, engine in engines.items():
            start = time.perf_counter()
            with contexts[key]():
                rollout = engine.generate(prompts, args.k, params, torch.Generator().manual_seed(rep))
            elapsed = time.perf_counter() - start
            count = int(rollout.completion_mask.sum())
            assert args.natural_eos or count == forced, f"{key} produced {count} tokens, not {forced}"
            if rep:
                times[key].append(elapsed)
                tokens[key].append(count)
    rows = []
    for key in engines:
        seconds, count = statistics.median(times[key]), statistics.median(tokens[key])
        flops = job_flops(model, prompts, args.k, round(count / (len(prompts) * args.k)))
        rows.append((name, key, seconds, count, flops))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=64, help="max_new_tokens")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0 keeps torch's default")
    parser.add_argument("--model", default=None,
                        help="a local model folder, .gguf file or alias (smollm2-135m-instruct) instead of the default")
    parser.add_argument("--skip-25m", action="store_true")
    parser.add_argument("--prompt-len", type=int, default=0,
                        help="random prompts of this many tokens instead of the task's (~9 tokens)")
    parser.add_argument("--bf16", action="store_true",
                        help="also time both engines in bf16 (ours under autocast, HF generate on a bfloat16 model)")
    parser.add_argument("--chat", action="store_true",
                        help="prompts: addition_chat questions through the model's chat template (needs --model)")
    parser.add_argument("--natural-eos", action="store_true",
                        help="let completions end at EOS (the RL workload; engines then differ in token count)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    name, model, tokenizer, note = load_default(args.model)
    if args.chat and (tokenizer is None or not getattr(tokenizer, "chat_template", None)):
        parser.error("--chat needs --model with a chat template (e.g. the converted smollm2-135m-instruct folder)")
    prompts = make_prompts(tokenizer, model.config.vocab_size, args.prompts, length=args.prompt_len, chat=args.chat)
    models = [(name, model, prompts, note)]
    if not args.skip_25m:
        big = random_qwen2(vocab=model.config.vocab_size, hidden=512, layers=6, heads=8)
        prompts = make_prompts(tokenizer, big.config.vocab_size, args.prompts, length=args.prompt_len, chat=args.chat)
        models.append(("25M", big, prompts, "random weights"))

    gflops_before = matmul_gflops()
    rows = []
    for name, model, prompts, note in models:
        count = sum(p.numel() for p in model.parameters())
        lengths = [len(p) for p in prompts]
        print(f"# {name}: {count / 1e6:.2f}M params, {note}, prompt lengths {min(lengths)}-{max(lengths)}")
        rows += bench_model(name, model, prompts, args)
    gflops = (gflops_before + matmul_gflops()) / 2

    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, fp32 matmul {gflops:.0f} GFLOP/s "
          f"(1024^3, mean of before/after), {args.prompts} prompts x k={args.k} x {args.new_tokens} new tokens, "
          f"median of {args.reps}")
    print(f"{'model':8} {'engine':6} {'seconds':>8} {'tokens/s':>10} {'of FLOP limit':>14}")
    for name, key, seconds, tokens, flops in rows:
        fraction = flops / (gflops * 1e9) / seconds
        print(f"{name:8} {key:6} {seconds:8.3f} {tokens / seconds:10.0f} {fraction:13.1%}")
    speedup = {}
    for name in dict.fromkeys(r[0] for r in rows):
        rate = {r[1]: r[3] / r[2] for r in rows if r[0] == name}  # tokens per second
        speedup[name] = round(rate["fast"] / rate["hf"], 2)
        if args.bf16:
            speedup[name + " bf16"] = round(rate["fast-bf16"] / rate["hf-bf16"], 2)
            speedup[name + " bf16 vs hf fp32"] = round(rate["fast-bf16"] / rate["hf"], 2)
    print(json.dumps({"speedup_vs_hf": speedup, "threads": torch.get_num_threads(), "matmul_gflops": round(gflops)}))


if __name__ == "__main__":
    main()
