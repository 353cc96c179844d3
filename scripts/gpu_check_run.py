"""One measured training run of the GPU check (scripts/gpu_check.py starts it, alone or under accelerate launch).

It builds (once, atomically) a randomly initialised Qwen2 of a named shape from a config (no hub; the embedded
tokenizer, whose 258 ids all fit in the model's vocabulary), trains it with ``gvpo.trainer.train``, and
writes one JSON result: throughput read from the run's metrics.jsonl, model FLOPs utilisation against the
GPU's bf16 peak, peak GPU memory, and optionally the fast engine against HF generate on the same prompts.

    python scripts/gpu_check_run.py --result r.json --model-dir /tmp/m --shape qwen2-0.5b [--engines 32,8,128,2] \
        -- output_dir=/tmp/run max_steps=20 ...   # any gvpo config overrides
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

# Qwen2.5-0.5B's shape (hidden 896, 24 layers, 14 heads, 2 KV heads, MLP 4864, vocabulary 151,936, tied
# embeddings: 494M parameters); "tiny" is the same architecture at a size the CPU runs in seconds (--quick).
SHAPES = {
    "qwen2-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                       num_key_value_heads=2, vocab_size=151936, max_position_embeddings=4096),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, max_position_embeddings=512),
}

# Dense bf16 tensor-core peaks in TFLOP/s (no sparsity), matched against torch.cuda.get_device_name() in
# this order. Sources: NVIDIA's product datasheets, which quote the sparse figure; dense = half of it.
PEAK_BF16_TFLOPS = [
    (r"H200 NVL", 835.5, "NVIDIA H200 datasheet (H200 NVL: 1,671 TFLOPS BF16 with sparsity)"),
    (r"H200", 989.5, "NVIDIA H200 datasheet (H200 SXM: 1,979 TFLOPS BF16 with sparsity)"),
    (r"H100 NVL", 835.5, "NVIDIA H100 datasheet (H100 NVL: 1,671 TFLOPS BF16 with sparsity)"),
    (r"H100 PCIe", 756.5, "NVIDIA H100 datasheet (H100 PCIe: 1,513 TFLOPS BF16 with sparsity)"),
    (r"H100", 989.5, "NVIDIA H100 datasheet (H100 SXM: 1,979 TFLOPS BF16 with sparsity)"),
    (r"A100", 312.0, "NVIDIA A100 datasheet (BF16 Tensor Core: 312 TFLOPS dense, 624 with sparsity)"),
    (r"L40S", 362.05, "NVIDIA L40S datasheet (BF16 Tensor Core: 733 TFLOPS with sparsity)"),
    (r"\bL4\b", 121.0, "NVIDIA L4 datasheet (BF16 Tensor Core: 242 TFLOPS with sparsity)"),
    (r"\bA10\b", 125.0, "NVIDIA A10 datasheet (BF16 Tensor Core: 250 TFLOPS with sparsity)"),
]


def peak_bf16_tflops(device_name: str) -> tuple[float | None, str]:
    """(dense bf16 peak in TFLOP/s or None, where the number comes from). $GVPO_PEAK_TFLOPS overrides."""
    if os.environ.get("GVPO_PEAK_TFLOPS"):
        return float(os.environ["GVPO_PEAK_TFLOPS"]), "$GVPO_PEAK_TFLOPS"
    for pattern, tflops, source in PEAK_BF16_TFLOPS:
        if re.search(pattern, device_name):
            return tflops, source
    return None, f"unknown device {device_name!r}: MFU omitted (set GVPO_PEAK_TFLOPS to give its bf16 peak)"


def ensure_model(model_dir: Path, shape: str, device: str) -> None:
    """Save a random Qwen2 of `shape` (bf16, seed 0) and the embedded tokenizer to `model_dir`, unless there."""
    if (model_dir / "config.json").exists():
        return
    from transformers import AutoTokenizer, GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    from gvpo.assets import default_model_path

    tokenizer = AutoTokenizer.from_pretrained(default_model_path())
    config = Qwen2Config(**SHAPES[shape], tie_word_embeddings=True, rope_theta=1e6, rms_norm_eps=1e-6,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    torch.manual_seed(0)
    with torch.device(device):  # initialise where it will run: seconds on a GPU instead of a minute on CPU
        model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    tmp = model_dir.with_name(model_dir.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, model_dir)  # a crash while saving never leaves a half-written model for the next step


def decodable_chars(prompts, completions, **kwargs):
    """Reward: characters the completion decodes to. A random model over a 151,936-token vocabulary emits
    mostly ids the 258-token tokenizer drops, so this varies within groups and the gradient is not zero."""
    return [float(len(c)) for c in completions]


def model_flops_per_token(model_dir: Path, seq_len: float, lora: bool) -> tuple[float, int]:
    """(training FLOPs per token, matmul parameters N). PaLM's count (Chowdhery et al. 2022, app. B):
    6N + 12 L d S, with N the matmul parameters (a tied embedding counted once, as the output layer) and S
    the sequence length. With LoRA the frozen weights get no weight gradient: 4N instead of 6N (adapters
    ignored). Activation recomputation is not counted: this is MFU, not hardware FLOPs utilisation."""
    cfg = json.loads((model_dir / "config.json").read_text())
    d, L, f, V = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["intermediate_size"], cfg["vocab_size"]
    head_dim = cfg.get("head_dim") or d // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * head_dim
    n = L * (2 * d * d + 2 * d * kv + 3 * d * f) + V * d
    return (4 if lora else 6) * n + 12 * L * d * seq_len, n


def throughput(run_dir: Path, prompt_len: float, prompts: int, k: int, skip: int) -> dict:
    """Generation and update tokens per second over the logged steps after the first `skip` (warm-up)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    steps = [r for r in rows if r.get("step_seconds") is not None]
    timed = steps[skip:] or steps[-1:]
    if not timed:
        return {"steps_done": 0}
    gen, upd, completion = [], [], []
    for r in timed:
        n = prompts * k
        gen.append(n * r["completion_length"] / r["generation_seconds"])
        upd.append(n * (prompt_len + r["completion_length"]) / (r["step_seconds"] - r["generation_seconds"]))
        completion.append(r["completion_length"])
    rewards = [r["reward_mean"] for r in steps if r.get("reward_mean") is not None]
    return {
        "steps_done": len(steps), "steps_timed": len(timed),
        "step_seconds_median": statistics.median(r["step_seconds"] for r in timed),
        "generation_tokens_per_s": statistics.median(gen), "train_tokens_per_s": statistics.median(upd),
        "completion_length_mean": statistics.mean(completion), "prompt_length_mean": prompt_len,
        "reward_first": rewards[0] if rewards else None, "reward_last": rewards[-1] if rewards else None,
        "grad_norm_last": next((r["grad_norm"] for r in reversed(steps) if r.get("grad_norm") is not None), None),
        "skipped_updates": steps[-1].get("skipped_updates"),
    }


def engine_bench(model_dir: Path, device: str, prompts: int, k: int, new_tokens: int, reps: int) -> dict:
    """The fast engine and HF generate on the same prompts, exactly `new_tokens` each (EOS off), bf16;
    repetitions alternate between the engines after one warm-up each; medians."""
    from transformers import AutoModelForCausalLM

    from gvpo.rollout import FastEngine, HFEngine
    from gvpo.tasks import make_dataset
    from gvpo.types import SamplingParams

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).to(device).eval()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = [tokenizer(r["prompt"])["input_ids"] for r in make_dataset("arithmetic", split="train", n=prompts, seed=1)]
    params = SamplingParams(max_new_tokens=new_tokens, temperature=1.0)
    engines = {"fast": FastEngine(model, tokenizer, eos_token_ids=()), "hf": HFEngine(model, tokenizer, eos_token_ids=())}
    times: dict[str, list[float]] = {name: [] for name in engines}
    backend = None
    for rep in range(reps + 1):
        for name, engine in engines.items():
            _sync(device)
            start = time.perf_counter()
            rollout = engine.generate(ids, k, params, torch.Generator(device=device).manual_seed(rep))
            _sync(device)
            elapsed = time.perf_counter() - start
            count = int(rollout.completion_mask.sum())
            if count != prompts * k * new_tokens:
                raise RuntimeError(f"{name} engine produced {count} tokens, not {prompts * k * new_tokens}")
            if rep:
                times[name].append(elapsed)
            backend = rollout.extra.get("backend", backend) if name == "fast" else backend
    rate = {name: prompts * k * new_tokens / statistics.median(t) for name, t in times.items()}
    return {"engine_workload": f"{prompts} prompts x k={k} x {new_tokens} tokens, median of {reps}",
            "fast_tokens_per_s": rate["fast"], "hf_tokens_per_s": rate["hf"],
            "fast_over_hf": rate["fast"] / rate["hf"], "fast_backend": backend}


class TimeUp(Exception):
    """The driver stopped this run (SIGTERM at the step's time limit)."""


def _time_up(signum, frame):
    raise TimeUp("stopped by the GPU check at the step's time limit")


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--result", required=True, help="where to write this run's JSON result")
    p.add_argument("--model-dir", required=True, help="the random model's folder (built here if absent)")
    p.add_argument("--shape", default="qwen2-0.5b", choices=sorted(SHAPES))
    p.add_argument("--engines", default="", help="PROMPTS,K,TOKENS,REPS: also time fast engine vs HF generate")
    p.add_argument("--skip", type=int, default=2, help="warm-up steps left out of the throughput medians")
    p.add_argument("overrides", nargs="*", help="gvpo config overrides, key=value")
    a = p.parse_args(argv)
    from accelerate import PartialState
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # shard and weight-loading bars are noise in the step logs

    from gvpo.config import load_config
    from gvpo.trainer import train

    signal.signal(signal.SIGTERM, _time_up)  # the driver's time limit: report what was measured, then exit
    state = PartialState()  # the process group under accelerate launch; rank and device for everything below
    device = str(state.device) if torch.cuda.is_available() else "cpu"
    model_dir, result_path = Path(a.model_dir), Path(a.result)
    result: dict = {"device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"}
    status, config = 0, None
    try:
        if state.is_main_process:
            ensure_model(model_dir, a.shape, device)
        state.wait_for_everyone()
        config = load_config(None, dict(o.split("=", 1) for o in a.overrides) | {"model_name_or_path": str(model_dir)})
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        summary = train(config, reward_funcs=[decodable_chars])
        result.update(wall_seconds=time.perf_counter() - start, summary=summary)
    except Exception as e:  # report what was measured before the failure too
        result["error"] = f"{type(e).__name__}: {e}"
        result["traceback"] = traceback.format_exc()[-4000:]
        print(result["traceback"], file=sys.stderr, flush=True)  # into the step's log
        status = 1
    if not state.is_main_process:
        return status
    from accelerate.state import AcceleratorState

    try:
        try:
            dist = AcceleratorState().distributed_type
            result["distributed_type"] = str(getattr(dist, "value", dist))
        except Exception:  # noqa: BLE001 - only informative
            pass
        result.update(_measure(a, config, model_dir, device))
        if a.engines and status == 0:
            result.update(engine_bench(model_dir, device, *[int(x) for x in a.engines.split(",")]))
    except Exception as e:
        result["error"] = f"after training: {type(e).__name__}: {e}"
        result["traceback"] = traceback.format_exc()[-4000:]
        print(result["traceback"], file=sys.stderr, flush=True)
        status = 1
    finally:  # whatever happened, the driver gets what was measured
        result_path.parent.mkdir(parents=True, exist_ok=True)
        result_path.write_text(json.dumps(result, indent=2, default=str))
    return status


def _measure(a, config, model_dir: Path, device: str) -> dict:
    """Throughput, MFU and peak memory of the training run (whatever of it completed)."""
    out: dict = {}
    if device.startswith("cuda"):
        out["peak_gpu_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
        out["peak_gpu_reserved_gb"] = torch.cuda.max_memory_reserved() / 2**30
    if config is None or not (Path(config.logging.output_dir) / "metrics.jsonl").exists():
        return out
    from transformers import AutoTokenizer

    from gvpo.tasks import make_dataset

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = make_dataset(config.data.task, split="train", n=256, seed=config.training.seed)
    prompt_len = statistics.mean(len(tokenizer(r["prompt"])["input_ids"]) for r in rows)
    r = config.rollout
    out.update(throughput(Path(config.logging.output_dir), prompt_len, r.prompts_per_step, r.num_generations, a.skip))
    if "train_tokens_per_s" in out:
        seq = prompt_len + out["completion_length_mean"]
        flops, n = model_flops_per_token(model_dir, seq, config.peft.use_peft)
        out["matmul_params"] = n
        out["train_tflops"] = out["train_tokens_per_s"] * flops / 1e12
        if device.startswith("cuda"):
            peak, source = peak_bf16_tflops(torch.cuda.get_device_name())
        else:
            peak, source = None, "CPU run: no bf16 peak, MFU omitted"
        out["peak_bf16_tflops"], out["peak_source"] = peak, source
        out["mfu"] = out["train_tflops"] / peak if peak else None
    return out


if __name__ == "__main__":
    sys.exit(main())
