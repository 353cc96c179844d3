"""Build the tiny default model shipped in src/gvpo/assets/default (used by `gvpo train` with no arguments).

Pretrains a 0.47M-parameter Qwen2ForCausalLM from scratch, with a byte-level tokenizer (one token per
character of the task), on worked solutions of train-split problems of the arithmetic tasks (gvpo.tasks;
2 to 5 addends). Some demonstrations are wrong on purpose: on a step whose units digits carry, the carry is
dropped with probability ``--drop-carry`` (> 0.5). The model learns both answers, the wrong one more likely,
so that

- greedy decoding gets a problem right only when no step carries (0.55^2 ~ 30% of 3-addend problems; the
  shipped model: 41.5% of 200 held-out problems);
- sampling at temperature 1 still writes the carry often (40%), so groups of 8 samples have mixed rewards;
- RL has to shift one systematic, learnable preference, not teach arithmetic: centred-reward policy
  gradient (16 prompts x 8 samples, lr 1e-4) lifts greedy accuracy to ~0.85 in 20 steps, then more slowly
  to ~0.9 as it unlearns the carries it now adds where none is due.

Deterministic given --seed and --threads on one machine (CPU; other CPUs may round differently). Run from
the repo root:

    .venv/bin/python scripts/build_default_model.py   # ~5 minutes on 2 idle cores, ~12 on a busy machine
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from gvpo.tasks import TASKS, arithmetic_reward, make_dataset, prompt_text, split_of, worked_solution

ASSET_DIR = Path(__file__).resolve().parents[1] / "src" / "gvpo" / "assets" / "default"
EOS, PAD = "<|endoftext|>", "<|pad|>"
# Qwen2's pre-tokenizer: it splits every digit apart, and transformers 5 rebuilds exactly this pipeline
# (Qwen2Tokenizer) around our vocabulary whatever tokenizer.json says, so we build the same one.
QWEN2_SPLIT = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"""
    r"""|\s+(?!\S)|\s+"""
)
# Pretraining mix of operand counts: mostly the default task (3), some longer chains so that the harder
# task (5 addends) starts above zero, and some 2-addend problems so single steps are seen in isolation.
OPERAND_MIX = {2: 0.1, 3: 0.6, 4: 0.15, 5: 0.15}


def byte_alphabet() -> list[str]:
    """GPT-2's byte-to-unicode table: entry b is the printable character that stands for byte b."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A Qwen2-style byte-level BPE with no merges: one token per byte (token id = byte value), so any
    text encodes losslessly and every digit, sign and space of the task is a token of its own."""
    vocab = {char: b for b, char in enumerate(byte_alphabet())}
    vocab[EOS], vocab[PAD] = 256, 257
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], fuse_unk=False, byte_fallback=False))
    core.normalizer = normalizers.NFC()
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens([AddedToken(EOS, special=True), AddedToken(PAD, special=True)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token=EOS,
        pad_token=PAD,  # distinct from EOS, so masks never confuse padding with a real end of text
        padding_side="left",  # decoder-only generation pads on the left
        model_max_length=256,
    )
    # Conversational prompts become their plain concatenated text: the model knows no roles.
    tokenizer.chat_template = "{% for message in messages %}{{ message['content'] }}{% endfor %}"
    return tokenizer


def build_model(tokenizer, args) -> Qwen2ForCausalLM:
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden,
        intermediate_size=4 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        max_position_embeddings=256,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return Qwen2ForCausalLM(config)


def sample_demos(
    rng: random.Random, n: int, drop_carry: float, threshold: int, mix: dict[int, float]
) -> list[tuple[str, str]]:
    """n (prompt, completion) pairs with one operand count per batch, so that rows need little padding."""
    k = rng.choices(list(mix), weights=list(mix.values()))[0]
    return [sample_demo(rng, k, drop_carry, threshold) for _ in range(n)]


def sample_demo(rng: random.Random, k: int, drop_carry: float, threshold: int) -> tuple[str, str]:
    """(prompt, completion) of a random k-addend train problem; each carrying step is botched w.p. drop_carry."""
    while True:
        operands = tuple(rng.randint(10, 99) for _ in range(k))
        prompt = prompt_text(operands)
        if split_of(prompt) == "train":
            break
    drops, total = [], operands[0]
    for x in operands[1:]:
        # Only "big" carries are botched, which sets how many problems greedy decoding gets wrong.
        big = total % 10 + x % 10 >= threshold
        drops.append(big and rng.random() < drop_carry)
        total = total + x - (10 if drops[-1] else 0)
    return prompt, worked_solution(operands, tuple(drops))


def make_batch(tokenizer, demos) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded input ids, attention mask and labels (-100 on prompt and padding)."""
    rows, labels = [], []
    for prompt, completion in demos:
        p = tokenizer.encode(prompt)
        c = tokenizer.encode(completion) + [tokenizer.eos_token_id]
        rows.append(p + c)
        labels.append([-100] * len(p) + c)
    width = max(map(len, rows))
    pad = tokenizer.pad_token_id
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])  # (B, T)
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])  # (B, T)
    lab = torch.tensor([l + [-100] * (width - len(l)) for l in labels])  # (B, T)
    return ids, mask, lab


@torch.no_grad()
def evaluate(model, tokenizer, rows, *, do_sample: bool, num_samples: int = 1, max_new_tokens: int = 64) -> float:
    """Mean reward over rows (and samples) with HF generate; prompts are left-padded."""
    model.eval()
    enc = tokenizer([r["prompt"] for r in rows], return_tensors="pt", padding=True)
    out = model.generate(
        **enc,
        do_sample=do_sample,
        temperature=1.0 if do_sample else None,
        top_k=0 if do_sample else None,
        num_return_sequences=num_samples,
        max_new_tokens=max_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    completions = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    answers = [r["answer"] for r in rows for _ in range(num_samples)]
    rewards = arithmetic_reward(None, completions, answers)
    model.train()
    return sum(rewards) / len(rewards)


def lr_at(step: int, args) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def pretrain(model, tokenizer, args) -> None:
    rng = random.Random(args.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    test_rows = make_dataset("arithmetic", "test", 200, seed=0)
    start = time.time()
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args)
        demos = sample_demos(rng, args.batch, args.drop_carry, args.drop_threshold, args.mix)
        ids, mask, labels = make_batch(tokenizer, demos)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            greedy = evaluate(model, tokenizer, test_rows, do_sample=False)
            print(f"step {step + 1:5d}  loss {loss.item():.4f}  greedy(test) {greedy:.3f}  "
                  f"{time.time() - start:6.0f}s", flush=True)


def save(model, tokenizer, out_dir: Path, args) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.iterdir():  # files of an earlier build that this one might not overwrite
        if stale.is_file():
            stale.unlink()
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        max_new_tokens=64,  # the longest 5-addend solution is 52 tokens with EOS
        do_sample=False,
    )
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    # Name the class every transformers version maps to this pipeline (5.x would write TokenizersBackend).
    config_file = out_dir / "tokenizer_config.json"
    tokenizer_config = json.loads(config_file.read_text())
    tokenizer_config["tokenizer_class"] = "Qwen2Tokenizer"
    config_file.write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    for f in out_dir.iterdir():
        f.chmod(0o644)  # safetensors writes 0600; installed package data must be world-readable
    recipe = {k: v for k, v in vars(args).items() if k != "out"}
    (out_dir / "build_recipe.json").write_text(json.dumps(recipe, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ASSET_DIR)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hidden", type=int, default=96)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--drop-carry", type=float, default=0.6)
    parser.add_argument("--drop-threshold", type=int, default=10,
                        help="botch a carry only when the units digits sum to at least this (10..18)")
    parser.add_argument("--log-every", type=int, default=250)
    parser.add_argument("--mix", type=json.loads, default=OPERAND_MIX,
                        help='operand-count weights as JSON, e.g. \'{"3": 1}\'')
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    args.mix = {int(k): float(v) for k, v in args.mix.items()}

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    tokenizer = build_tokenizer()
    model = build_model(tokenizer, args)
    print(f"parameters: {sum(p.numel() for p in model.parameters()):,}")
    start = time.time()
    pretrain(model, tokenizer, args)
    print(f"pretraining took {time.time() - start:.0f}s")
    save(model, tokenizer, args.out, args)

    torch.manual_seed(args.seed)
    for task in TASKS:
        rows = make_dataset(task, "test", 200, seed=0)
        greedy = evaluate(model, tokenizer, rows, do_sample=False)
        sampled = evaluate(model, tokenizer, rows, do_sample=True, num_samples=8)
        print(f"{task}: held-out greedy accuracy {greedy:.3f}, sampled (T=1) pass rate {sampled:.3f}")
    size = sum(f.stat().st_size for f in args.out.iterdir())
    print(f"wrote {args.out} ({size / 2**20:.2f} MiB)")


if __name__ == "__main__":
    main()
