"""The GPU check (scripts/gpu_check.sh) on CPU: `--quick` runs every step, and its pieces compute what they say."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import gpu_check  # noqa: E402
import gpu_check_run  # noqa: E402
import gpu_check_tests  # noqa: E402


def test_quick_check_runs_every_step_and_reports_numbers(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    env.pop("OUT", None)
    proc = subprocess.run(["bash", "scripts/gpu_check.sh", "--quick", "--out", str(tmp_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((tmp_path / "gpu_check.json").read_text())
    steps = {s["name"]: s for s in summary["steps"]}
    assert list(steps) == list(gpu_check.STEPS) and summary["ok"] and summary["mode"] == "quick"
    assert all(s["status"] == "ok" and (tmp_path / s["log"]).exists() for s in steps.values())
    # Every gpu-marked test was collected; on CPU they all skip.
    tests = steps["pytest_gpu"]["results"]
    assert tests["failed"] == tests["errors"] == tests["passed"] == 0 and tests["skipped"] >= 3
    shape = gpu_check_run.SHAPES["tiny"]
    for name in ("gvpo_bf16", "gvpo_lora_ckpt", "gvpo_fsdp"):
        res = steps[name]["results"]
        assert res["steps_done"] == 3 and res["skipped_updates"] == 0, name
        assert res["generation_tokens_per_s"] > 0 and res["train_tokens_per_s"] > 0, name
        assert res["matmul_params"] == tiny_matmul_params(shape) and res["mfu"] is None, name  # no peak on CPU
    bench = steps["gvpo_bf16"]["results"]
    assert bench["fast_tokens_per_s"] > 0 and bench["hf_tokens_per_s"] > 0
    assert bench["fast_over_hf"] == pytest.approx(bench["fast_tokens_per_s"] / bench["hf_tokens_per_s"])
    demo = steps["demo"]["results"]
    assert demo["steps"] == 2 and 0 <= demo["initial_accuracy"] <= 1 and 0 <= demo["final_accuracy"] <= 1
    assert "| gvpo_fsdp | ok |" in proc.stdout and "accelerate.commands.launch" in steps["gvpo_fsdp"]["command"]


@pytest.mark.parametrize("mode", [gpu_check.GPU, gpu_check.QUICK], ids=["gpu", "quick"])
def test_every_run_of_both_modes_is_a_valid_config(mode):
    """A misspelt override would fail the real check's runs in its first second; load_config names it here."""
    from gvpo.config import load_config

    for name in ("gvpo_bf16", "gvpo_lora_ckpt", "gvpo_fsdp"):
        config = load_config(None, {k: str(v) for k, v in {**mode.train, **mode.per_run[name]}.items()})
        assert config.training.bf16 and config.model.dtype == "bfloat16"
        assert config.rollout.engine == ("hf" if name == "gvpo_fsdp" else "fast")
        assert config.peft.use_peft == config.model.gradient_checkpointing == (name == "gvpo_lora_ckpt")
    load_config(None, {k: str(v) for k, v in mode.demo.items()})
    assert sum(mode.step_budget_s.values()) <= mode.budget_s and set(mode.step_budget_s) == set(gpu_check.STEPS)
    assert mode is gpu_check.QUICK or mode.budget_s <= 8 * 60  # the limit for one GPU


def tiny_matmul_params(shape: dict) -> int:
    """Weights of the projections and the (tied) embedding of a real Qwen2 of this shape: norms excluded."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    model = Qwen2ForCausalLM(Qwen2Config(**shape, tie_word_embeddings=True))
    return sum(p.numel() for name, p in model.named_parameters() if "norm" not in name and not name.endswith(".bias"))


def test_flops_count_matmul_parameters_of_the_real_model(tmp_path):
    shape = gpu_check_run.SHAPES["tiny"]
    (tmp_path / "config.json").write_text(json.dumps(shape))
    per_token, n = gpu_check_run.model_flops_per_token(tmp_path, seq_len=100, lora=False)
    assert n == tiny_matmul_params(shape)  # 106,496 for the tiny shape
    attention = 12 * shape["num_hidden_layers"] * shape["hidden_size"] * 100
    assert per_token == 6 * n + attention
    assert gpu_check_run.model_flops_per_token(tmp_path, 100, lora=True)[0] == 4 * n + attention
    # Qwen2.5-0.5B's published size: 494M parameters (biases and norms are < 0.1% of it).
    (tmp_path / "config.json").write_text(json.dumps(gpu_check_run.SHAPES["qwen2-0.5b"]))
    assert 0.49e9 < gpu_check_run.model_flops_per_token(tmp_path, 1, False)[1] < 0.495e9


@pytest.mark.parametrize("name,peak", [("NVIDIA H200", 989.5), ("NVIDIA H100 80GB HBM3", 989.5),
                                       ("NVIDIA H100 PCIe", 756.5), ("NVIDIA H100 NVL", 835.5),
                                       ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA A100 80GB PCIe", 312.0),
                                       ("NVIDIA L40S", 362.05), ("NVIDIA L4", 121.0), ("Tesla T4", None),
                                       ("NVIDIA A10G", None)])
def test_bf16_peak_by_device_name(name, peak, monkeypatch):
    monkeypatch.delenv("GVPO_PEAK_TFLOPS", raising=False)
    got, source = gpu_check_run.peak_bf16_tflops(name)
    assert got == peak and source
    monkeypatch.setenv("GVPO_PEAK_TFLOPS", "100")
    assert gpu_check_run.peak_bf16_tflops(name) == (100.0, "$GVPO_PEAK_TFLOPS")


def test_throughput_from_metrics_by_hand(tmp_path):
    rows = [{"step": 0, "eval_accuracy": 0.1},
            {"step": 1, "step_seconds": 9.0, "generation_seconds": 8.0, "completion_length": 10.0, "reward_mean": 0.0,
             "grad_norm": 1.0, "skipped_updates": 0},  # warm-up: left out
            {"step": 2, "step_seconds": 3.0, "generation_seconds": 2.0, "completion_length": 10.0, "reward_mean": 0.5,
             "grad_norm": 2.0, "skipped_updates": 0},
            {"step": 3, "step_seconds": 5.0, "generation_seconds": 4.0, "completion_length": 30.0, "reward_mean": 1.0,
             "grad_norm": 3.0, "skipped_updates": 0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = gpu_check_run.throughput(tmp_path, prompt_len=10, prompts=2, k=4, skip=1)
    # step 2: 8 rows x 10 tokens in 2 s = 40/s, 8 x (10 + 10) in 1 s = 160/s; step 3: 8 x 30 / 4 = 60/s, 8 x 40 / 1.
    assert out["generation_tokens_per_s"] == pytest.approx((40 + 60) / 2)
    assert out["train_tokens_per_s"] == pytest.approx((160 + 320) / 2)
    assert (out["steps_done"], out["steps_timed"], out["reward_first"], out["reward_last"]) == (3, 2, 0.0, 1.0)
    assert out["grad_norm_last"] == 3.0 and out["step_seconds_median"] == 4.0


def test_builtin_runner_passes_fails_skips_and_reports_junit(tmp_path):
    (tmp_path / "test_sample.py").write_text(
        "import unittest\n"
        "def test_ok(device, tmp_path):\n    assert device == 'cuda' and tmp_path.is_dir()\n"
        "def test_bad(device):\n    assert 1 == 2\n"
        "def test_skip(device):\n    raise unittest.SkipTest('no CUDA device')\n"
        "def test_unknown_fixture(capsys):\n    pass\n"
        "def helper():\n    raise AssertionError('not a test')\n")
    results = gpu_check_tests.run_file(str(tmp_path / "test_sample.py"), "cuda")
    assert [(r["name"], r["outcome"]) for r in results] == [
        ("test_ok", "passed"), ("test_bad", "failed"), ("test_skip", "skipped"), ("test_unknown_fixture", "failed")]
    gpu_check_tests.write_junit(results, "test_sample", tmp_path / "report.xml")
    counts = gpu_check.junit_counts(tmp_path / "report.xml")
    assert (counts["passed"], counts["failed"], counts["errors"], counts["skipped"]) == (1, 2, 0, 1)
    assert counts["failures"] == ["test_sample.test_bad", "test_sample.test_unknown_fixture"]


def test_a_failing_step_is_recorded_and_the_rest_still_run(tmp_path, monkeypatch):
    calls = []

    def fake_step(name, mode, work, out, timeout, no_pytest):
        calls.append((name, timeout))
        if name == "pytest_gpu":
            raise AssertionError("must not escape: run_step catches")
        return {"name": name, "status": "failed" if name == "gvpo_bf16" else "ok", "seconds": 0.0, "error": None}

    def broken_pytest_step(*args):
        raise RuntimeError("boom")

    monkeypatch.setattr(gpu_check, "pytest_step", broken_pytest_step)
    real_run_step = gpu_check.run_step
    monkeypatch.setattr(gpu_check, "run_step",
                        lambda name, *a: real_run_step(name, *a) if name == "pytest_gpu" else fake_step(name, *a))
    status = gpu_check.main(["--quick", "--out", str(tmp_path)])
    summary = json.loads((tmp_path / "gpu_check.json").read_text())
    statuses = {s["name"]: s["status"] for s in summary["steps"]}
    assert status == 1 and not summary["ok"]
    assert statuses == {"pytest_gpu": "failed", "gvpo_bf16": "failed", "gvpo_lora_ckpt": "ok", "gvpo_fsdp": "ok",
                        "demo": "ok"}
    assert "driver: RuntimeError: boom" in summary["steps"][0]["error"]
    assert all(timeout <= gpu_check.QUICK.step_budget_s[name] for name, timeout in calls)


def test_a_step_out_of_time_is_killed_with_its_children(tmp_path):
    """As accelerate launch's workers must be: the whole process group goes. The child appends to a file
    every 0.1 s while it lives (its pid could be reused by then, its heartbeat cannot)."""
    beat = tmp_path / "beat"
    child = f"import time\nfor _ in range(600):\n    open({str(beat)!r}, 'a').write('.')\n    time.sleep(0.1)\n"
    code = f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {child!r}]); time.sleep(60)"
    start = time.monotonic()
    rc, timed_out = gpu_check.run([sys.executable, "-c", code], tmp_path / "log", timeout=5)
    assert timed_out and rc is not None and time.monotonic() - start < 30
    assert beat.exists(), "the child never started: raise the timeout"
    size = beat.stat().st_size
    time.sleep(2)
    assert beat.stat().st_size == size, "the child outlived the step"


def test_without_cuda_the_full_check_refuses_and_points_to_quick(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert gpu_check.main(["--out", str(tmp_path)]) == 2
    assert "--quick" in capsys.readouterr().err


def test_plot_is_skipped_without_matplotlib(tmp_path, monkeypatch):
    from gvpo.tracking import Tracker, plot_run

    tracker = Tracker(tmp_path)
    tracker.log(1, {"reward_mean": 0.5})
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    with pytest.warns(UserWarning, match="matplotlib is not installed"):
        assert plot_run(tmp_path) is None
    assert not (tmp_path / "training.png").exists()


def test_table_of_a_gpu_run_shows_the_figures():
    """The GPU-only fields (MFU, peak memory), formatted as the real check prints them; a failed step keeps
    its figures next to its error."""
    step = {"name": "gvpo_fsdp", "status": "failed", "seconds": 80.2, "error": "RuntimeError: save failed",
            "results": {"generation_tokens_per_s": 4321.0, "train_tokens_per_s": 98765.4, "mfu": 0.3123,
                        "peak_gpu_memory_gb": 45.06, "steps_done": 8, "step_seconds_median": 2.345}}
    bench = {"name": "gvpo_bf16", "status": "ok", "seconds": 100.0, "error": None,
             "results": {"fast_tokens_per_s": 30000.0, "hf_tokens_per_s": 10000.0, "fast_over_hf": 3.0,
                         "train_tokens_per_s": 1.0, "mfu": None, "steps_done": 20, "step_seconds_median": 1.0}}
    line = gpu_check.headline(step)
    for text in ("in-loop gen 4,321 tok/s", "train 98,765 tok/s", "MFU 31.2%", "peak 45.1 GiB", "8 steps, 2.35 s/step",
                 "[RuntimeError: save failed]"):
        assert text in line, (text, line)
    assert "gen fast 30,000 / HF 10,000 tok/s (3.00x)" in gpu_check.headline(bench)
    assert "MFU n/a" in gpu_check.headline(bench)
    late = {"name": "gvpo_lora_ckpt", "status": "timeout", "seconds": 80.0, "error": "stopped at the step's limit",
            "results": {"device": "NVIDIA H200", "error": "TimeUp", "steps_done": 3, "train_tokens_per_s": 5.0}}
    assert "train 5 tok/s" in gpu_check.headline(late) and "[stopped at the step's limit]" in gpu_check.headline(late)
    late["results"] = {"device": "NVIDIA H200", "error": "TimeUp"}  # nothing measured: the error alone
    assert gpu_check.headline(late) == "stopped at the step's limit"
    summary = {"mode": "gpu", "started": "2026-12-03T18:00:00+00:00", "wall_seconds": 400.0, "budget_seconds": 465,
               "environment": {"device": "NVIDIA H200"}, "steps": [step, bench]}
    table = gpu_check.table(summary)
    assert "NVIDIA H200" in table and "| gvpo_fsdp | failed | 80 |" in table and "| gvpo_bf16 | ok | 100 |" in table
