"""Time of the training pass (forward + backward of ``token_logps``), plain vs shared prompt (gvpo.shared_prompt).

A random Llama (SmolLM2's vocabulary, 49,152), ``--prompts`` prompts of ``--prompt-tokens`` tokens, k completions
of ``--tokens`` tokens each; both passes on the same batch and weights, alternating, the fastest of ``--repeats``.
The shared pass runs U x P + N x (T - 1) tokens where the plain one runs N x (P + T); the ratio it can reach is
about (P + T) / (P / k + T) where the per-token work dominates (attention over the prompt is still paid per row).

Usage: python benchmarks/shared_prompt.py [--hidden 256] [--layers 4] [--prompts 4] [--k 8] [--prompt-tokens 47]
       [--tokens 16] [--repeats 5] [--checkpointing] [--device cpu|cuda]
"""

import argparse
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from gvpo.modeling import build_sequences, token_logps


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--prompt-tokens", type=int, default=47)
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--checkpointing", action="store_true")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3,
                         num_hidden_layers=args.layers, num_attention_heads=max(args.hidden // 64, 1),
                         num_key_value_heads=max(args.hidden // 192, 1), tie_word_embeddings=True,
                         max_position_embeddings=1024)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(args.device)
    if args.checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model.train()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, args.vocab, (args.prompt_tokens,), generator=g).tolist() for _ in range(args.prompts)]
    N, T = args.prompts * args.k, args.tokens
    index = torch.arange(args.prompts).repeat_interleave(args.k)
    completions = torch.randint(0, args.vocab, (N, T), generator=g)
    ids, attn, pos = (x.to(args.device) for x in build_sequences(prompts, completions, torch.ones(N, T), index, 0))

    def sync():
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    def step(shared):
        model.zero_grad(set_to_none=True)
        sync()
        start = time.perf_counter()
        logps = token_logps(model, ids, attn, pos, T, shared=shared)
        sync()
        middle = time.perf_counter()
        logps.sum().backward()
        sync()
        return middle - start, time.perf_counter() - middle

    times = {False: [], True: []}
    for _ in range(args.repeats + 1):  # the first round warms up
        for shared in (False, True):
            times[shared].append(step(shared))
    # the fastest round of each: on a shared machine the slower ones measure the neighbours
    fwd, bwd = ({s: min(t[i] for t in times[s][1:]) for s in times} for i in (0, 1))
    plain, shared = (fwd[s] + bwd[s] for s in (False, True))
    print(f"Llama hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}; {args.prompts} prompts x k={args.k}, "
          f"P={args.prompt_tokens}, T={T}; checkpointing={args.checkpointing}; {args.device}, "
          f"{torch.get_num_threads()} threads")
    for name, s in (("plain", False), ("shared", True)):
        print(f"{name:6s} {(fwd[s] + bwd[s]) * 1e3:8.1f} ms (forward {fwd[s] * 1e3:.1f}, backward {bwd[s] * 1e3:.1f})")
    print(f"ratio  {plain / shared:8.2f}x forward + backward, {fwd[False] / fwd[True]:.2f}x forward alone "
          f"(tokens through the decoder: {(args.prompt_tokens + T) / (args.prompt_tokens / args.k + T - 1):.2f}x "
          f"fewer; the head's work on the N x T completion positions is the same in both)")


if __name__ == "__main__":
    main()
