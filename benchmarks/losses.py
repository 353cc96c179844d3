"""gvpo_loss vs grpo_loss (and dr_grpo_loss): forward + backward on 1024 sequences x 1024 tokens, k = 8.

Usage: python benchmarks/losses.py [--batch 1024] [--tokens 1024] [--k 8] [--repeats 7] [--device cpu]
Prints a table, then one JSON line with the GVPO / GRPO time ratio (the issue's bound: <= 1.1).
"""

import argparse
import json
import platform
import statistics
import time

import torch

from gvpo.losses import dr_grpo_loss, grpo_loss, gvpo_loss


def make_inputs(batch, tokens, k, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits_like = -torch.rand(batch, tokens, generator=g) * 4
    old = (logits_like + 0.01 * torch.randn(batch, tokens, generator=g)).to(device)
    lengths = torch.randint(tokens // 4, tokens + 1, (batch,), generator=g)
    mask = (torch.arange(tokens)[None] < lengths[:, None]).long().to(device)
    rewards = torch.randint(0, 2, (batch,), generator=g).float().to(device)
    group_ids = torch.arange(batch // k).repeat_interleave(k).to(device)
    return logits_like.to(device), old, mask, rewards, group_ids


def time_once(loss_fn, inputs, device):
    logps0, old, mask, rewards, group_ids = inputs
    logps = logps0.clone().requires_grad_()
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    loss, metrics = loss_fn(logps, old, mask, rewards, group_ids)
    loss.backward()
    float(metrics["loss"])  # one host sync, as a training loop that logs would do
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args()
    inputs = make_inputs(a.batch, a.tokens, a.k, a.device)
    losses = {"gvpo": gvpo_loss, "grpo": grpo_loss, "dr_grpo": dr_grpo_loss}
    for fn in losses.values():  # warm-up
        time_once(fn, inputs, a.device)
    times = {name: [] for name in losses}
    for _ in range(a.repeats):  # alternate so that machine noise hits every loss alike
        for name, fn in losses.items():
            times[name].append(time_once(fn, inputs, a.device))
    med = {name: statistics.median(t) for name, t in times.items()}
    print(f"# {a.batch} sequences x {a.tokens} tokens, k = {a.k}, float32, forward + backward, "
          f"device {a.device}, torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    print(f"{'loss':<10}{'median ms':>12}{'min ms':>10}{'vs grpo':>10}")
    for name in losses:
        print(f"{name:<10}{1e3 * med[name]:>12.2f}{1e3 * min(times[name]):>10.2f}{med[name] / med['grpo']:>10.3f}")
    print(json.dumps({"gvpo_vs_grpo": round(med["gvpo"] / med["grpo"], 4),
                      "gvpo_ms": round(1e3 * med["gvpo"], 3), "grpo_ms": round(1e3 * med["grpo"], 3)}))


if __name__ == "__main__":
    main()
