"""Peak memory of one GVPO training step on a ~25M-parameter Qwen2 (random weights): fp32, bf16 and LoRA.

Each setting runs in a fresh subprocess. On CUDA the figure is torch.cuda.max_memory_allocated; on CPU it is
the process's peak resident set (ru_maxrss), reported whole and as the increase over the resident set just
before the step (model and inputs already in memory).

Usage: python benchmarks/memory.py [--prompts 8] [--k 8] [--tokens 64] [--device cpu|cuda]

``--logps`` measures instead the log-prob term at Qwen's vocabulary (V = 151,936; a random 2-layer Qwen2 with
hidden 64, so the transformer is negligible): the log-prob forward + backward and a whole GVPO step (AdamW),
plain path (full logits) vs fused (gvpo.fused_logps), for 4 sequences at each of ``--lengths``, each row in a
fresh subprocess, with the median time of ``--repeats`` runs. A row whose estimated peak exceeds the memory
available now is skipped and its estimate printed. ``--bf16`` runs the same rows under bf16 autocast.

Usage: python benchmarks/memory.py --logps [--lengths 1024 4096] [--repeats 3] [--bf16] [--device cpu|cuda]
       [--what logps step] [--paths plain fused]
"""

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

SETTINGS = ("fp32", "bf16", "lora", "fp32+ckpt")


def build_model(setting, device):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=4096, hidden_size=512, intermediate_size=1408, num_hidden_layers=7,
                         num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512,
                         tie_word_embeddings=True)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config)
    if setting == "bf16":
        model = model.to(torch.bfloat16)
    if setting == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"],
                                                 task_type="CAUSAL_LM"))
    if setting == "fp32+ckpt":
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model.train()
    return model.to(device)


def one_step(setting, prompts, k, tokens, device):
    import torch

    from gvpo.activation_budget import ActivationBudget
    from gvpo.losses import gvpo_loss
    from gvpo.modeling import token_logps

    model = build_model(setting, device)
    n_params = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    train_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    N, P = prompts * k, 32
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 4096, (N, P + tokens), generator=g).to(device)
    attn = torch.ones_like(ids)
    pos = (attn.cumsum(-1) - 1)
    mask = torch.ones(N, tokens, dtype=torch.long, device=device)
    rewards = torch.randint(0, 2, (N,), generator=g).float().to(device)
    groups = torch.arange(prompts).repeat_interleave(k).to(device)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = _rss_now()
    counted = ActivationBudget(model, limit=2**62)  # what gvpo.activation_budget counts of this pass
    with counted.watch():
        logps = token_logps(model, ids, attn, pos, tokens)
    loss, _ = gvpo_loss(logps, logps.detach(), mask, rewards, groups)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"setting": setting, "params": n_params, "trainable": n_train, "peak_mb": peak / 2**20,
            "step_increase_mb": (peak - before) / 2**20, "counted_activations_mb": counted.last / 2**20,
            # the increase over what the budget reserves for: counted activations + gradients and AdamW moments
            "increase_over_accounted": (peak - before) / (counted.last + 3 * train_bytes)}


VOCAB, LOGPS_ROWS = 151_936, 4
PLAIN_LOGITS_COPIES = 4


def logps_row(what, path, tokens, repeats, bf16, device):
    """Peak memory and median time of ``what`` ("logps": forward + backward; "step": a GVPO step)."""
    import contextlib

    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from gvpo.losses import gvpo_loss
    from gvpo.modeling import token_logps

    config = Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=tokens + 64,
                         tie_word_embeddings=True)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (LOGPS_ROWS, 32 + tokens), generator=g).to(device)
    attn = torch.ones_like(ids)
    pos = attn.cumsum(-1) - 1
    mask = torch.ones(LOGPS_ROWS, tokens, device=device)
    mask[0, tokens // 2:] = 0  # one response ends early: padding as in a real batch
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0], device=device)
    groups = torch.zeros(LOGPS_ROWS, dtype=torch.long, device=device)
    autocast = torch.autocast(device, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    before = _reset_peak(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        with autocast:
            logps = token_logps(model, ids, attn, pos, tokens, fused=path == "fused")
        if what == "logps":
            (logps * mask).sum().backward()
        else:
            loss, _ = gvpo_loss(logps, logps.detach(), mask, rewards, groups)
            loss.backward()
            opt.step()
        opt.zero_grad(set_to_none=True)
        del logps
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else _rss_peak()
    return {"what": what, "path": path, "tokens": tokens, "peak_mb": peak / 2**20,
            "increase_mb": (peak - before) / 2**20, "seconds": statistics.median(times)}


def _reset_peak(device):
    import torch

    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    return _rss_now()


def _rss_peak():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _available_mb():
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("MemAvailable")) / 1024


def _estimate_mb(rows, what, path, tokens):
    """A row's peak from a shorter row of this run (linear in T), else, for the plain path, from the logits:
    at its peak it held PLAIN_LOGITS_COPIES times the float32 (N, T, V) logits (measured at T = 1,024)."""
    first = next((r for r in rows if r["what"] == what and r["path"] == path), None)
    if first:
        return first["peak_mb"] + first["increase_mb"] * (tokens / first["tokens"] - 1), f"from T={first['tokens']}"
    if path == "plain":
        return PLAIN_LOGITS_COPIES * LOGPS_ROWS * tokens * VOCAB * 4 / 2**20, f"{PLAIN_LOGITS_COPIES}x the logits"
    return None, ""


def logps_table(lengths, repeats, bf16, device, whats=("logps", "step"), paths=("plain", "fused")):
    """Rows alternate plain / fused; a row whose estimated peak does not fit in the memory available now (CPU)
    is skipped and its estimate printed."""
    rows, skipped = [], []
    for tokens in lengths:
        for what in whats:
            for path in paths:
                estimate, how = _estimate_mb(rows, what, path, tokens)
                if device == "cpu" and estimate and estimate > 0.9 * _available_mb():
                    skipped.append(f"{what} {path} T={tokens}: estimated peak {estimate / 1024:.1f} GB ({how}) > "
                                   f"90% of the {_available_mb() / 1024:.1f} GB available now")
                    continue
                cmd = [sys.executable, __file__, "--logps-worker", f"{what},{path},{tokens}", "--repeats",
                       str(repeats), "--device", device] + (["--bf16"] if bf16 else [])
                out = subprocess.run(cmd, capture_output=True, text=True, check=True)
                rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    what = "max_memory_allocated" if device == "cuda" else "peak RSS"
    print(f"# log-probs at V = {VOCAB:,}: {LOGPS_ROWS} sequences, 32 prompt + T completion tokens, random 2-layer "
          f"Qwen2 (hidden 64, tied head), {'bf16 autocast' if bf16 else 'float32'}, device {device} ({what}; "
          f"+MB = over the resident set before the first call; time = median of {repeats})")
    print(f"{'T':>6} {'what':<6}{'plain MB':>10}{'fused MB':>10}{'plain +MB':>10}{'fused +MB':>10}{'ratio +MB':>10}"
          f"{'plain s':>9}{'fused s':>9}{'time ratio':>11}")
    for tokens in lengths:
        for what in whats:
            p, f = (next((r for r in rows if (r["what"], r["path"], r["tokens"]) == (what, k, tokens)), None)
                    for k in ("plain", "fused"))
            cell = lambda r, key, fmt: format(r[key], fmt) if r else "skipped"  # noqa: E731
            ratio = f"{p['increase_mb'] / f['increase_mb']:.1f}x" if p and f else "-"
            speed = f"{f['seconds'] / p['seconds']:.2f}" if p and f else "-"
            print(f"{tokens:>6} {what:<6}{cell(p, 'peak_mb', '.0f'):>10}{cell(f, 'peak_mb', '.0f'):>10}"
                  f"{cell(p, 'increase_mb', '.0f'):>10}{cell(f, 'increase_mb', '.0f'):>10}{ratio:>10}"
                  f"{cell(p, 'seconds', '.2f'):>9}{cell(f, 'seconds', '.2f'):>9}{speed:>11}")
    for line in skipped:
        print(f"# skipped: {line}")
    print(json.dumps(rows))


def _rss_now():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--device", default=None)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--logps", action="store_true", help="the log-prob rows at V = 151,936 instead")
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--what", nargs="+", default=["logps", "step"], choices=["logps", "step"])
    p.add_argument("--paths", nargs="+", default=["plain", "fused"], choices=["plain", "fused"])
    p.add_argument("--logps-worker", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    import torch

    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if a.logps_worker:
        what, path, tokens = a.logps_worker.split(",")
        print(json.dumps(logps_row(what, path, int(tokens), a.repeats, a.bf16, device)))
        return
    if a.logps:
        logps_table(a.lengths, a.repeats, a.bf16, device, a.what, a.paths)
        return
    if a.worker:
        print(json.dumps(one_step(a.worker, a.prompts, a.k, a.tokens, device)))
        return
    rows = []
    for setting in SETTINGS:
        out = subprocess.run([sys.executable, __file__, "--worker", setting, "--prompts", str(a.prompts), "--k",
                              str(a.k), "--tokens", str(a.tokens), "--device", device],
                             capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    what = "max_memory_allocated" if device == "cuda" else "peak RSS"
    print(f"# one GVPO step, {a.prompts} prompts x k={a.k}, 32 prompt + {a.tokens} completion tokens, "
          f"AdamW, device {device} ({what})")
    print(f"{'setting':<12}{'params':>12}{'trainable':>12}{'peak MB':>10}{'step +MB':>10}{'counted MB':>11}"
          f"{'+MB / (counted + 3x trainable)':>32}")
    for r in rows:
        print(f"{r['setting']:<12}{r['params']:>12,}{r['trainable']:>12,}{r['peak_mb']:>10.0f}"
              f"{r['step_increase_mb']:>10.0f}{r['counted_activations_mb']:>11.0f}{r['increase_over_accounted']:>32.2f}")
    print(json.dumps({r["setting"]: round(r["peak_mb"], 1) for r in rows}))


if __name__ == "__main__":
    main()
