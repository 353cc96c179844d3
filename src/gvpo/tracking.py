"""Where metrics go: metrics.jsonl (always), TensorBoard / wandb (optional), a PNG plot at the end, and the
progress bar."""

from __future__ import annotations

import json
import math
from pathlib import Path


class Tracker:
    """Appends one JSON object per logged step to ``metrics.jsonl`` and forwards to optional trackers."""

    def __init__(self, output_dir, report_to=(), config: dict | None = None, resume_step: int | None = None):
        self.dir = Path(output_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / "metrics.jsonl"
        if resume_step is not None:
            self._truncate_after(resume_step)
        elif self.path.exists():
            self.path.unlink()  # a fresh run does not append to an old run's curve
        self._tb = self._wandb = None
        if "tensorboard" in report_to:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise ImportError("report_to=tensorboard needs `pip install gvpo[tensorboard]`") from e
            self._tb = SummaryWriter(str(self.dir / "tensorboard"))
        if "wandb" in report_to:
            try:
                import wandb
            except ImportError as e:
                raise ImportError("report_to=wandb needs `pip install gvpo[wandb]`") from e
            self._wandb = wandb.init(config=config, dir=str(self.dir), resume="allow")

    def _truncate_after(self, step: int) -> None:
        """On resume, drop lines logged after the checkpoint so the file reads like one uninterrupted run."""
        if not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        self.path.write_text("".join(line + "\n" for line in kept))

    def log(self, step: int, metrics: dict) -> None:
        row = {"step": step, **{k: _clean(v) for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        numeric = {k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "step" and v is not None}
        if self._tb is not None:
            for k, v in numeric.items():
                self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(numeric, step=step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def _clean(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None  # JSON has no NaN
    return v


def read_metrics(run_dir) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def plot_run(run_dir, path=None) -> Path | None:
    """Reward mean per step and held-out accuracy over steps, one PNG; None without matplotlib."""
    try:
        import matplotlib
    except ImportError:  # a core dependency, yet bare GPU images often lack it: lose the plot, not the run
        import warnings

        warnings.warn("matplotlib is not installed: no training.png (pip install matplotlib)", stacklevel=2)
        return None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run_dir)
    path = Path(path or Path(run_dir) / "training.png")
    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [r["step"] for r in rows if r.get("reward_mean") is not None]
    ax.plot(steps, [r["reward_mean"] for r in rows if r.get("reward_mean") is not None], alpha=0.6,
            label="train reward (mean)")
    ev = [(r["step"], r["eval_accuracy"]) for r in rows if r.get("eval_accuracy") is not None]
    if ev:
        ax.plot(*zip(*ev), "o-", color="C3", label="held-out accuracy (greedy)")
    ax.set_xlabel("step")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    ax.set_title(Path(run_dir).name)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def progress_bar(config, accelerator, start_step):
    from tqdm.auto import tqdm

    disable = not (config.logging.progress_bar and accelerator.is_main_process)
    return tqdm(total=config.training.max_steps, initial=start_step, desc=config.algorithm.algorithm, disable=disable,
                dynamic_ncols=True)


def step_postfix(metrics: dict, acc: float) -> dict:
    """The bar's text: reward, accuracy, where the step's seconds went, and the share of completions cut at
    max_completion_length. gen = everything before the update (sampling and scoring, or with rollout workers the
    wait for their groups); train = log-probs, backward, optimizer step and weight publish."""
    step, train = metrics["step_seconds"], metrics["update_seconds"]
    return {"reward": f"{metrics['reward_mean']:.3f}", "acc": f"{acc:.3f}",
            "s/step": f"{step:.1f} (gen {step - train:.1f} + train {train:.1f})",
            "clipped": f"{metrics.get('clipped_ratio', 0.0):.2f}"}
