"""The GPU check: one command that proves the CUDA paths on one GPU in under 8 minutes (scripts/gpu_check.sh).

Steps, each in its own process with its own time budget inside a global one; a step that fails or runs out
of time is recorded and the next one still runs:
  pytest_gpu      every test marked `gpu` (pytest -m gpu; without pytest, tests/test_gpu.py through the
                  built-in runner scripts/gpu_check_tests.py)
  gvpo_bf16       GVPO on a random Qwen2 of Qwen2.5-0.5B's shape, bf16, fast engine: generation and training
                  tokens/s, MFU against the GPU's bf16 peak, peak memory; fast engine vs HF generate
  gvpo_lora_ckpt  the same with LoRA adapters and activation checkpointing
  gvpo_fsdp       the same under `accelerate launch --config_file configs/accelerate/fsdp.yaml
                  --num_processes 1`, generating with HF generate (the fast engine reads full weights)
  demo            `make demo`'s settings (`gvpo train` defaults, the embedded model): held-out accuracy must rise

`--quick` runs the same steps on CPU with tiny shapes in well under a minute (tests/test_gpu_check.py).
Writes gpu_check.json (to --out, else $OUT, else runs/gpu_check/) with per-step logs under logs/, prints a
table; exit status 0 only when every step is ok.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STEPS = ("pytest_gpu", "gvpo_bf16", "gvpo_lora_ckpt", "gvpo_fsdp", "demo")


@dataclass(frozen=True)
class Mode:
    """Sizes and budgets of one mode: the real check on a GPU, or --quick on CPU."""

    name: str
    budget_s: int  # the whole check
    step_budget_s: dict  # per step
    shape: str  # gpu_check_run.SHAPES
    train: dict  # gvpo config overrides shared by the three measured runs
    per_run: dict  # extra overrides per measured step
    engines: str  # PROMPTS,K,TOKENS,REPS for the fast-vs-HF comparison
    skip: int  # warm-up steps left out of throughput medians
    demo: dict = field(default_factory=dict)  # overrides of `gvpo train`'s defaults (none on a GPU)
    min_demo_gain: float | None = None  # held-out accuracy must rise by this much (None: not judged)


GPU = Mode(
    # 450 s of steps + at most 10 s to stop the last one + start-up: under the issue's 8 minutes.
    name="gpu", budget_s=450,
    step_budget_s={"pytest_gpu": 75, "gvpo_bf16": 130, "gvpo_lora_ckpt": 75, "gvpo_fsdp": 100, "demo": 70},
    shape="qwen2-0.5b",
    # 32 prompts x k = 8 x 128 tokens per step; micro-batches of 8 prompts keep the (64, 129, 151936) fp32
    # logits of a micro-batch at 5 GB, so an 80 GB GPU fits it as well.
    train=dict(dtype="bfloat16", bf16="true", prompts_per_step=32, num_generations=8, max_completion_length=128,
               micro_batch_prompts=8, learning_rate=1e-5, num_eval=32, eval_steps=0, save_steps=0,
               save_total_limit=1, progress_bar="false", seed=0),
    per_run={
        # max_time_seconds (from the start of train(), setup included) ends a slow run with figures, before
        # the step's time limit kills it.
        "gvpo_bf16": dict(engine="fast", max_steps=20, max_time_seconds=60),
        "gvpo_lora_ckpt": dict(engine="fast", use_peft="true", lora_r=16, learning_rate=1e-4,
                               lora_target_modules="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
                               gradient_checkpointing="true", max_steps=8, max_time_seconds=40),
        "gvpo_fsdp": dict(engine="hf", max_steps=8, max_time_seconds=45),
    },
    engines="32,8,128,2", skip=2, min_demo_gain=0.1,
    demo=dict(max_time_seconds=55),  # a safety net only: the demo's 60 steps take ~30 s on 2 CPU cores
)
QUICK = Mode(
    name="quick", budget_s=600,  # ~35 s of CPU time; generous limits: a busy CI machine must not time out
    step_budget_s={"pytest_gpu": 120, "gvpo_bf16": 120, "gvpo_lora_ckpt": 120, "gvpo_fsdp": 120, "demo": 120},
    shape="tiny",
    train=dict(dtype="bfloat16", bf16="true", prompts_per_step=4, num_generations=4, max_completion_length=12,
               micro_batch_prompts=2, learning_rate=1e-3, num_eval=4, eval_steps=0, save_steps=0,
               save_total_limit=1, progress_bar="false", seed=0, max_steps=3),
    per_run={
        "gvpo_bf16": dict(engine="fast"),
        "gvpo_lora_ckpt": dict(engine="fast", use_peft="true", lora_r=4, learning_rate=1e-2,
                               lora_target_modules="q_proj,v_proj", gradient_checkpointing="true"),
        "gvpo_fsdp": dict(engine="hf"),
    },
    engines="4,2,8,1", skip=1,
    demo=dict(max_steps=2, prompts_per_step=4, num_eval=8, eval_steps=0),
)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="CPU, tiny shapes, seconds (CI)")
    p.add_argument("--out", default=None, help="folder for gpu_check.json and logs/ (default: $OUT, else runs/gpu_check)")
    p.add_argument("--only", default="", help=f"comma-separated subset of {','.join(STEPS)}")
    p.add_argument("--budget", type=int, default=0, help="override the global time budget (seconds)")
    p.add_argument("--no-pytest", action="store_true", help="run tests/test_gpu.py with the built-in runner")
    p.add_argument("--keep", action="store_true", help="keep the runs' work folder (checkpoints) for inspection")
    a = p.parse_args(argv)
    mode = QUICK if a.quick else GPU
    env_info = environment()
    if not a.quick and not env_info.get("cuda_available"):
        print("gpu_check: no CUDA device is visible to torch; run `scripts/gpu_check.sh --quick` for the CPU "
              "version, or check the driver / CUDA_VISIBLE_DEVICES", file=sys.stderr)
        return 2
    steps = [s for s in (a.only.split(",") if a.only else STEPS) if s]
    unknown = [s for s in steps if s not in STEPS]
    if unknown:
        print(f"gpu_check: --only {','.join(unknown)}: unknown step; choose from {','.join(STEPS)}", file=sys.stderr)
        return 2
    out = Path(a.out or os.environ.get("OUT") or ROOT / "runs" / "gpu_check")
    (out / "logs").mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gvpo_gpu_check_"))  # checkpoints stay out of $OUT (it is copied back)
    budget = a.budget or mode.budget_s
    deadline = time.monotonic() + budget
    started = datetime.datetime.now(datetime.timezone.utc)
    print(f"gpu_check ({mode.name}): {env_info.get('device')}, torch {env_info.get('torch')}, budget {budget} s; "
          f"logs in {out / 'logs'}", flush=True)
    results = []
    for name in steps:
        left = deadline - time.monotonic()
        if left < 10:
            results.append({"name": name, "status": "skipped", "seconds": 0.0,
                            "error": f"global budget of {budget} s exhausted"})
        else:
            results.append(run_step(name, mode, work, out, min(mode.step_budget_s[name], left), a.no_pytest))
        r = results[-1]
        print(f"  {name:<15} {r['status']:<8} {r['seconds']:6.1f} s  {headline(r)}", flush=True)
        if r["status"] != "ok" and r.get("log"):  # the end of its log, where the traceback is
            tail = (out / r["log"]).read_text(errors="replace").splitlines()[-15:]
            print("\n".join(f"    | {line}" for line in tail), flush=True)
    summary = {
        "mode": mode.name, "ok": all(r["status"] == "ok" for r in results),
        "started": started.isoformat(timespec="seconds"),
        "wall_seconds": round((datetime.datetime.now(datetime.timezone.utc) - started).total_seconds(), 1),
        "budget_seconds": budget, "environment": env_info, "steps": results,
    }
    path = out / "gpu_check.json"
    path.write_text(json.dumps(summary, indent=2, default=str))
    print()
    print(table(summary))
    print(f"\nsummary: {path}")
    if a.keep:
        print(f"runs kept in {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if summary["ok"] else 1


# --------------------------------------------------------------------------------------------------
# Steps


def run_step(name: str, mode: Mode, work: Path, out: Path, timeout: float, no_pytest: bool) -> dict:
    start = time.monotonic()
    log = out / "logs" / f"{name}.log"
    record: dict = {"name": name, "budget_seconds": round(timeout)}
    try:
        if name == "pytest_gpu":
            record.update(pytest_step(mode, out, log, timeout, no_pytest))
        elif name == "demo":
            record.update(demo_step(mode, work, log, timeout))
        else:
            record.update(train_step(name, mode, work, log, timeout))
    except Exception as e:  # a bug in this driver must not hide the other steps either
        record.update(status="failed", error=f"driver: {type(e).__name__}: {e}")
    record["seconds"] = round(time.monotonic() - start, 1)
    record["log"] = str(log.relative_to(out)) if log.exists() else None
    return record


def pytest_step(mode: Mode, out: Path, log: Path, timeout: float, no_pytest: bool) -> dict:
    """Every gpu-marked test. On CPU (--quick) they all skip; on a GPU, a run where all of them skip fails."""
    files = sorted(str(f.relative_to(ROOT)) for f in (ROOT / "tests").glob("test_*.py") if "mark.gpu" in f.read_text())
    have_pytest = not no_pytest and subprocess.run([sys.executable, "-c", "import pytest"], capture_output=True).returncode == 0
    report = out / "logs" / "pytest_gpu.xml"
    if have_pytest:
        cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rs", "-p", "no:cacheprovider",
               f"--junitxml={report}", *files]
    else:  # bare GPU images may lack pytest: the tests written for this check run without it
        cmd = [sys.executable, "scripts/gpu_check_tests.py", "tests/test_gpu.py", "--device", "cuda",
               f"--junitxml={report}"]
    rc, timed_out = run(cmd, log, timeout)
    counts = junit_counts(report) if report.exists() else {}
    res = {"command": " ".join(cmd[1:]), "runner": "pytest" if have_pytest else "built-in (pytest not installed)",
           "files": files if have_pytest else ["tests/test_gpu.py"], "results": counts,
           "not_run": [] if have_pytest else [f for f in files if f != "tests/test_gpu.py"]}
    if timed_out:
        return {**res, "status": "timeout", "error": f"no result within {timeout:.0f} s"}
    if not counts:
        return {**res, "status": "failed", "error": f"no test report (exit status {rc})"}
    if counts["failed"] or counts["errors"]:
        return {**res, "status": "failed", "error": f"{counts['failed']} failed, {counts['errors']} errors: "
                                                   f"{', '.join(counts['failures'][:5])}"}
    if mode.name == "gpu" and not counts["passed"]:
        return {**res, "status": "failed", "error": "every GPU test skipped: is CUDA visible to the test process?"}
    return {**res, "status": "ok" if rc == 0 else "failed", "error": None if rc == 0 else f"exit status {rc}"}


def junit_counts(path: Path) -> dict:
    suites = ET.parse(path).getroot()
    cases = list(suites.iter("testcase"))
    failures, skipped = [], []
    n_fail = n_err = 0
    for case in cases:
        name = f"{case.get('classname', '')}.{case.get('name')}"
        if case.find("failure") is not None:
            n_fail += 1
            failures.append(name)
        elif case.find("error") is not None:
            n_err += 1
            failures.append(name)
        elif case.find("skipped") is not None:
            skipped.append(f"{name}: {case.find('skipped').get('message', '')}"[:200])
    passed = len(cases) - n_fail - n_err - len(skipped)
    return {"passed": passed, "failed": n_fail, "errors": n_err, "skipped": len(skipped),
            "failures": failures, "skip_reasons": skipped[:20]}


def train_step(name: str, mode: Mode, work: Path, log: Path, timeout: float) -> dict:
    """A measured GVPO run (scripts/gpu_check_run.py), alone or under accelerate launch (FSDP)."""
    result = work / f"{name}.json"
    overrides = {**mode.train, **mode.per_run[name], "output_dir": work / name}
    worker = ["scripts/gpu_check_run.py", "--result", str(result), "--model-dir", str(work / f"model-{mode.shape}"),
              "--shape", mode.shape, "--skip", str(mode.skip)]
    if name == "gvpo_bf16":
        worker += ["--engines", mode.engines]
    worker += [f"{k}={v}" for k, v in overrides.items()]
    if name == "gvpo_fsdp":
        launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "configs/accelerate/fsdp.yaml",
                  "--num_processes", "1", "--main_process_port", str(free_port())]
        cmd = launch + worker
    else:
        cmd = [sys.executable] + worker
    rc, timed_out = run(cmd, log, timeout)
    data = json.loads(result.read_text()) if result.exists() else {}  # written on SIGTERM too: partial figures
    res = {"command": " ".join(cmd[1:]).replace(str(work), "$WORK"),
           "results": {k: v for k, v in data.items() if k != "summary"}}
    problems = []
    if timed_out:
        return {**res, "status": "timeout", "error": f"stopped at the step's limit of {timeout:.0f} s"}
    if rc != 0 or not data:
        problems.append(data.get("error") or f"exit status {rc}, no result")
    if data and not data.get("steps_done"):
        problems.append("no training step was logged")
    if data.get("skipped_updates"):
        problems.append(f"{data['skipped_updates']} updates skipped on a non-finite gradient")
    if mode.name == "gpu":
        if data and data.get("device") == "cpu":
            problems.append("ran on CPU")
        if name == "gvpo_fsdp" and data and data.get("distributed_type") != "FSDP":
            problems.append(f"accelerate ran {data.get('distributed_type')}, not FSDP")
    return {**res, "status": "failed" if problems else "ok", "error": "; ".join(problems) or None}


def demo_step(mode: Mode, work: Path, log: Path, timeout: float) -> dict:
    """`make demo` = `gvpo train` with the defaults (the embedded model, 60 steps): the whole loop on this device."""
    run_dir = work / "demo"
    overrides = {**mode.demo, "output_dir": run_dir, "progress_bar": "false"}
    cmd = [sys.executable, "-m", "gvpo.cli", "train", *[f"{k}={v}" for k, v in overrides.items()]]
    rc, timed_out = run(cmd, log, timeout)
    summary_file = run_dir / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.exists() else {}
    res = {"command": " ".join(cmd[1:]).replace(str(work), "$WORK"),
           "results": {k: summary.get(k) for k in ("initial_accuracy", "final_accuracy", "improvement", "steps",
                                                   "wall_seconds", "train_seconds", "skipped_updates")}}
    if timed_out:
        return {**res, "status": "timeout", "error": f"no result within {timeout:.0f} s"}
    if rc != 0 or not summary:
        return {**res, "status": "failed", "error": f"exit status {rc}" + ("" if summary else ", no summary.json")}
    gain = summary.get("improvement")
    if mode.min_demo_gain is not None and (gain is None or gain < mode.min_demo_gain):
        return {**res, "status": "failed", "error": f"held-out accuracy rose by {gain}, less than {mode.min_demo_gain}"}
    return {**res, "status": "ok", "error": None}


# --------------------------------------------------------------------------------------------------
# Processes, environment, output


def run(cmd: list[str], log: Path, timeout: float) -> tuple[int | None, bool]:
    """Run `cmd` from the repo root with src/ importable, output to `log`; (exit status, timed out).
    On time-out the whole process group goes (accelerate launch's workers too)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("HF_HUB_OFFLINE", "1")  # no network on the GPU machines: never wait on the hub
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not _cuda_available():
        env.setdefault("OMP_NUM_THREADS", "1")  # tiny CPU models: threads only contend (tests/test_rollout.py)
    with open(log, "w") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            return proc.wait(timeout=timeout), False
        except subprocess.TimeoutExpired:
            for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):  # SIGTERM: the worker saves its figures
                try:
                    os.killpg(proc.pid, sig)
                    proc.wait(timeout=wait)
                    break
                except (subprocess.TimeoutExpired, ProcessLookupError):
                    continue
            return proc.returncode, True


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def environment() -> dict:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "cuda_available": torch.cuda.is_available(), "host_cpus": os.cpu_count()}
    info["device"] = torch.cuda.get_device_name() if info["cuda_available"] else "cpu"
    if info["cuda_available"]:
        info["device_count"] = torch.cuda.device_count()
        info["gpu_memory_gb"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
        info["bf16_supported"] = torch.cuda.is_bf16_supported()
    for pkg in ("transformers", "accelerate", "peft", "pytest"):
        try:
            info[pkg] = __import__(pkg).__version__
        except ImportError:
            info[pkg] = None
    try:
        info["git_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                            text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        info["git_commit"] = None
    return info


def headline(r: dict) -> str:
    """The step's key figures in one line."""
    res = r.get("results") or {}
    if r["status"] == "skipped" or (r["status"] != "ok" and not any(isinstance(v, (int, float)) for v in res.values())):
        return r.get("error") or ""  # nothing measured
    if r["name"] == "pytest_gpu":
        text = f"{res.get('passed', 0)} passed, {res.get('failed', 0)} failed, {res.get('skipped', 0)} skipped"
    elif r["name"] == "demo":
        text = (f"held-out accuracy {_num(res.get('initial_accuracy'), '.3f')} -> {_num(res.get('final_accuracy'), '.3f')}"
                f" in {res.get('steps')} steps, {_num(res.get('wall_seconds'), '.0f')} s")
    else:
        parts = []
        if res.get("fast_tokens_per_s"):
            parts.append(f"gen fast {res['fast_tokens_per_s']:,.0f} / HF {res['hf_tokens_per_s']:,.0f} tok/s "
                         f"({res['fast_over_hf']:.2f}x)")
        if res.get("generation_tokens_per_s"):
            parts.append(f"in-loop gen {res['generation_tokens_per_s']:,.0f} tok/s")
        if res.get("train_tokens_per_s"):
            parts.append(f"train {res['train_tokens_per_s']:,.0f} tok/s")
        mfu = res.get("mfu")
        parts.append(f"MFU {mfu:.1%}" if mfu is not None else "MFU n/a")
        if res.get("peak_gpu_memory_gb") is not None:
            parts.append(f"peak {res['peak_gpu_memory_gb']:.1f} GiB")
        if res.get("steps_done"):
            parts.append(f"{res['steps_done']} steps, {_num(res.get('step_seconds_median'), '.2f')} s/step")
        text = "; ".join(parts)
    return text + (f" [{r['error']}]" if r.get("error") else "")


def _num(v, fmt: str) -> str:
    return "n/a" if v is None else format(v, fmt)


def table(summary: dict) -> str:
    env = summary["environment"]
    lines = [f"GPU check ({summary['mode']}), {summary['started']}: {env.get('device')}, torch {env.get('torch')} "
             f"(CUDA {env.get('cuda')}), transformers {env.get('transformers')}, accelerate {env.get('accelerate')}, "
             f"peft {env.get('peft')}, commit {env.get('git_commit')}; {summary['wall_seconds']:.0f} s of "
             f"{summary['budget_seconds']} s",
             "", "| step | status | seconds | result |", "|---|---|---|---|"]
    for r in summary["steps"]:
        lines.append(f"| {r['name']} | {r['status']} | {r['seconds']:.0f} | {headline(r)} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
