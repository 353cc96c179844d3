"""Atomic checkpoints: a crash while saving leaves the previous checkpoint whole.

Layout: ``<output_dir>/checkpoints/step-000050/`` holds the model and tokenizer (safetensors, loadable with
``from_pretrained``) and ``trainer_state.pt`` (optimizer, scheduler, RNG states, data position, step).
``trainer_state.pt`` holds only tensors and plain Python data and is read with ``torch.load(weights_only=True)``:
opening a checkpoint folder never runs code from it (a crafted pickle is refused with an error).
A checkpoint is written into a temporary folder and renamed into place, then the ``latest`` file is
replaced atomically; readers only ever see complete checkpoints.
"""

from __future__ import annotations

import os
import pickle
import random
import shutil
from pathlib import Path

import numpy as np
import torch

STATE_FILE = "trainer_state.pt"
# 2: RNG states as tensors and plain data (no numpy objects), read with weights_only=True.
# 1 (no "format" key): numpy's RNG state as an ndarray; still read, through a numpy-only allow-list.
STATE_FORMAT = 2


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from; the message says which file and what to do."""


def checkpoint_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def rng_state(generator: torch.Generator | None = None) -> dict:
    return {
        "python": random.getstate(),
        "numpy": _numpy_state_plain(np.random.get_state()),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "generator": generator.get_state() if generator is not None else None,
    }


def set_rng_state(state: dict, generator: torch.Generator | None = None) -> None:
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if generator is not None and state.get("generator") is not None:
        generator.set_state(state["generator"])


def save_checkpoint(output_dir, step: int, model, tokenizer, trainer_state: dict, keep: int = 2) -> Path:
    """Write ``step-<step>`` atomically, point ``latest`` at it, then prune all but the newest ``keep``."""
    root = checkpoint_dir(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    tmp = root / f".step-{step:06d}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    from transformers.utils import logging as hf_logging

    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a "writing shards" bar inside the training bar is noise
    try:
        model.save_pretrained(tmp)
    finally:
        if shown:
            hf_logging.enable_progress_bar()
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    torch.save({**trainer_state, "format": STATE_FORMAT}, tmp / STATE_FILE)
    if final.exists():  # re-saving a step (e.g. after a resume): move the old one aside first
        shutil.rmtree(final)
    os.replace(tmp, final)
    _write_atomic(root / "latest", final.name)
    prune_checkpoints(output_dir, step, keep)
    return final


def prune_checkpoints(output_dir, step: int, keep: int) -> None:
    """Keep the newest ``keep`` checkpoints of the run that just saved ``step``: steps up to ``step``.

    A checkpoint numbered above ``step`` cannot come from this run (its later steps do not exist yet): it is
    left over from another timeline, and keeping it would let it outrank this run's newest checkpoint on the
    next resume, so it goes too. The checkpoint just written is never removed, so ``latest`` stays valid.
    """
    found = list_checkpoints(output_dir)
    ours = [p for p in found if _step_of(p) <= step]
    stale = [p for p in found if _step_of(p) > step] + ours[:-keep]
    for old in stale:
        shutil.rmtree(old, ignore_errors=True)


def list_checkpoints(output_dir) -> list[Path]:
    """Complete checkpoints, oldest first (temporary folders of an interrupted save are ignored)."""
    root = checkpoint_dir(output_dir)
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and (p / STATE_FILE).exists()]
    return sorted(done, key=_step_of)


def _step_of(path: Path) -> int:
    return int(path.name.split("-")[1])


def latest_checkpoint(output_dir) -> Path | None:
    root = checkpoint_dir(output_dir)
    pointer = root / "latest"
    if pointer.exists():
        path = root / pointer.read_text().strip()
        if (path / STATE_FILE).exists():
            return path
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def _numpy_state_plain(state: tuple) -> tuple:
    """numpy's legacy RNG state with its key array as a tensor (int64 holds every uint32 exactly)."""
    name, keys, pos, has_gauss, cached = state
    return name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)


def _numpy_allow_list() -> list:
    """What a predecessor (format 1) file needs besides plain data: numpy arrays and dtypes, nothing callable."""
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct
    return [_reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def load_trainer_state(path: Path) -> dict:
    """The trainer state of a checkpoint, unpickled with ``weights_only=True`` (tensors and plain data only)."""
    file = Path(path) / STATE_FILE
    try:
        if hasattr(torch.serialization, "safe_globals"):
            with torch.serialization.safe_globals(_numpy_allow_list()):
                state = torch.load(file, map_location="cpu", weights_only=True)
        else:  # torch 2.4: only the process-wide allow-list exists
            torch.serialization.add_safe_globals(_numpy_allow_list())
            state = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        detail = str(e).strip().splitlines()[-1][:300]
        raise CheckpointError(
            f"{file}: refusing to load it: it holds objects other than tensors and plain data ({detail}). gvpo "
            f"never writes such a file; it was written by other code or altered. Resume from another checkpoint "
            f"or delete this folder") from None
    if not isinstance(state, dict) or "step" not in state:
        raise CheckpointError(f"{file}: not a gvpo trainer state (no 'step'); resume from another checkpoint")
    if state.get("format", 1) > STATE_FORMAT:
        raise CheckpointError(f"{file}: written by a newer gvpo (format {state['format']}, this one reads up to "
                              f"{STATE_FORMAT}); upgrade gvpo to resume from it")
    return state


def load_model_weights(model, path: Path) -> None:
    """Load a checkpoint's safetensors into an existing model (keeps wrappers, devices and dtypes)."""
    from safetensors.torch import load_file

    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path}: no .safetensors weights in this checkpoint")
    state = {}
    for f in files:
        state.update(load_file(str(f)))
    if hasattr(model, "peft_config"):  # a LoRA checkpoint holds the adapter weights only
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(model, state)
        if result.unexpected_keys:
            raise RuntimeError(f"{path}: adapter does not match the model (unexpected {result.unexpected_keys[:3]})")
        return
    missing, unexpected = model.load_state_dict(state, strict=False)
    # Tied weights (lm_head = embed_tokens) are saved once; anything else missing is a real mismatch.
    missing = [m for m in missing if not m.endswith("lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"{path}: checkpoint does not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})")


# What a run writes into its output_dir (see the trainer and gvpo.tracking); a folder holding any of these
# holds a run, and a new run there would mix its files with the old ones.
RUN_FILES = ("config.yaml", "metrics.jsonl", "summary.json", "training.png", "checkpoints", "tensorboard", "wandb")


def previous_run(output_dir) -> list[str]:
    """The files of an earlier run in ``output_dir`` (empty when the folder is free for a new run)."""
    out = Path(output_dir)
    return [name for name in RUN_FILES if (out / name).exists()]


def check_output_dir(output_dir, resume: bool, overwrite: bool) -> list[str]:
    """Refuse to start a fresh run on top of an earlier one; returns the files ``overwrite`` must clear.

    Only our own run files are ever cleared, never the whole folder (output_dir may be a user's folder).
    """
    if resume:
        return []
    found = previous_run(output_dir)
    if found and not overwrite:
        raise ValueError(
            f"output_dir={str(output_dir)!r} already holds a run ({', '.join(found)}); a new run there would mix "
            f"with it. Choose another output_dir, continue it with --resume, or add overwrite_output_dir=true "
            f"to delete that run first")
    return found


def clear_run(output_dir, names) -> None:
    """Delete an earlier run's files (``names`` from :func:`check_output_dir`)."""
    for name in names:
        path = Path(output_dir) / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
