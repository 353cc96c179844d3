"""Peak memory of one GVPO training step on a ~25M-parameter Qwen2 (random weights): fp32, bf16 and LoRA.

Each setting runs in a fresh subprocess. On CUDA the figure is torch.cuda.max_memory_allocated; on CPU it is
the process's peak resident set (ru_maxrss), reported whole and as the increase over the resident set just
before the step (model and inputs already in memory).

Usage: python benchmarks/memory.py [--prompts 8] [--k 8] [--tokens 64] [--device cpu|cuda]
"""

import argparse
import json
import resource
import subprocess
import sys

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

    from gvpo.losses import gvpo_loss
    from gvpo.modeling import token_logps

    model = build_model(setting, device)
    n_params = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
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
            "step_increase_mb": (peak - before) / 2**20}


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
    a = p.parse_args()
    import torch

    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
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
    print(f"{'setting':<12}{'params':>12}{'trainable':>12}{'peak MB':>10}{'step +MB':>10}")
    for r in rows:
        print(f"{r['setting']:<12}{r['params']:>12,}{r['trainable']:>12,}{r['peak_mb']:>10.0f}{r['step_increase_mb']:>10.0f}")
    print(json.dumps({r["setting"]: round(r["peak_mb"], 1) for r in rows}))


if __name__ == "__main__":
    main()
