"""Float32 matrix products on this CPU: torch's F.linear (MKL) vs oneDNN (gvpo.cpu_matmul), in GFLOP/s.

Shapes are those of real passes, for two model shapes: SmolLM2-135M (hidden 576, MLP 1536, vocabulary 49,152) and a
second one (hidden 512, MLP 2048, vocabulary 32,768, grouped-query attention with 128-wide k/v): each projection's forward, grad-input and grad-weight product at a training pass's row count, and the decode
step's forward at a few row counts, oneDNN on a weight reordered once (as the fast engine does). One thread by
default (the GUIDE's figures). The CPU's name and flags come first: the gap depends on the CPU (MKL runs a slow
path on AMD CPUs), which is why gvpo measures it once per process (model.cpu_matmul=auto) instead of assuming it.

    python benchmarks/cpu_matmul.py
    python benchmarks/cpu_matmul.py --threads 2 --train-rows 4096
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics

import torch
import torch.nn.functional as F

from gvpo import cpu_matmul

MODELS = {  # name: (hidden, intermediate, vocabulary, q/k/v widths)
    "smollm2-135m": (576, 1536, 49152, 576 + 2 * 192),
    "qwen2-25m": (512, 2048, 32768, 512 + 2 * 128),
}


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def gflops(fn, flops: float, reps: int) -> float:
    return cpu_matmul.gflops(fn, flops, reps, pick=statistics.median)


def products(hidden: int, inter: int, vocab: int, qkv: int) -> dict:
    """(out, in) of every distinct weight of one layer, and the head."""
    return {"qkv": (qkv, hidden), "o": (hidden, hidden), "gate_up": (2 * inter, hidden), "down": (hidden, inter),
            "lm_head": (vocab, hidden)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--train-rows", type=int, default=1024, help="tokens of a training micro-batch")
    p.add_argument("--decode-rows", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("--reps", type=int, default=5)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    if not cpu_matmul._available():
        print("this torch has no oneDNN linear: nothing to compare")
        return 1
    onednn = cpu_matmul._onednn
    print(f"# {cpu_name()}; torch {torch.__version__}, {a.threads} thread(s); median of {a.reps}")
    print("| model | product | rows | torch GFLOP/s | oneDNN GFLOP/s | ratio |")
    print("|---|---|---|---|---|---|")
    rows_out = []
    g = torch.Generator().manual_seed(0)
    for model, shape in MODELS.items():
        for name, (n_out, n_in) in products(*shape).items():
            w = torch.randn(n_out, n_in, generator=g)
            m = a.train_rows if name != "lm_head" else a.train_rows // 4  # the head sees completion tokens only
            x, dy = torch.randn(m, n_in, generator=g), torch.randn(m, n_out, generator=g)
            flops = 2 * m * n_in * n_out
            cases = {
                "forward": (lambda: F.linear(x, w), lambda: onednn(x, w, None)),
                "grad input": (lambda: dy @ w, lambda: onednn(dy, w.t(), None)),
                "grad weight": (lambda: dy.t() @ x, lambda: onednn(dy.t(), x.t(), None)),
            }
            for case, (plain, fast) in cases.items():
                rows_out.append(dict(model=model, product=f"{name} {case}", rows=m,
                                     torch=gflops(plain, flops, a.reps), onednn=gflops(fast, flops, a.reps)))
            packed = torch.ops.mkldnn._reorder_linear_weight(w, cpu_matmul.PACK_ROWS_HINT)
            for r in a.decode_rows:
                xd = torch.randn(r, n_in, generator=g)
                flops = 2 * r * n_in * n_out
                rows_out.append(dict(model=model, product=f"{name} decode (packed)", rows=r,
                                     torch=gflops(lambda: F.linear(xd, w), flops, a.reps),
                                     onednn=gflops(lambda: onednn(xd, packed, None), flops, a.reps)))
    for r in rows_out:
        r["ratio"] = r["onednn"] / r["torch"]
        print(f"| {r['model']} | {r['product']} | {r['rows']} | {r['torch']:.0f} | {r['onednn']:.0f} | "
              f"{r['ratio']:.2f}x |")
    ratios = [r["ratio"] for r in rows_out]
    print(f"\noneDNN / torch: median {statistics.median(ratios):.2f}x, range {min(ratios):.2f}-{max(ratios):.2f}x")
    print(json.dumps({"cpu": cpu_name(), "threads": a.threads, "median_ratio": statistics.median(ratios),
                      "rows": rows_out}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
