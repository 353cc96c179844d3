"""Assets shipped inside the package: the tiny default model that `gvpo train` uses with no arguments.

``default/`` holds a ~1M-parameter Qwen2ForCausalLM with a character-level tokenizer, pretrained on the
``arithmetic`` task of gvpo.tasks with deliberately imperfect demonstrations. It is rebuilt, bit for bit,
by ``scripts/build_default_model.py``; its recipe is in ``default/build_recipe.json``.
"""

from __future__ import annotations

from pathlib import Path


def default_model_path() -> Path:
    """Directory of the default model; pass it to ``from_pretrained`` (works offline)."""
    path = Path(__file__).resolve().parent / "default"
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(
            f"{path}: the default model is missing; rebuild it with `python scripts/build_default_model.py`"
        )
    return path
