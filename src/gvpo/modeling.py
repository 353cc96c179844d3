"""Model loading, the one way to prepare a policy for RL (checkpointing, LoRA, dropout off), and teacher-forced
token log-probs: where the trainer and the rollout workers touch transformers."""

from __future__ import annotations

import functools
import inspect
from pathlib import Path

import torch

from gvpo.fused_logps import fused_enabled, fused_head, fused_token_logps, set_fused_logps
from gvpo.types import build_sequences  # noqa: F401 (its home is beside Rollout; imported from here too)


def resolve_model_path(name_or_path: str) -> str:
    """"default" is the tiny model shipped in the package; anything else goes to transformers as is."""
    if name_or_path == "default":
        from gvpo.assets import default_model_path

        return str(default_model_path())
    return name_or_path


def load_model_and_tokenizer(name_or_path: str = "default", dtype: str = "float32", trust_remote_code: bool = False,
                             fused_logps: bool = True):
    """A causal LM and its tokenizer from a local path or a hub name (no hub access is needed for "default").
    ``fused_logps`` is ModelConfig's switch for :func:`token_logps`, recorded on the model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(_checked_source(path), trust_remote_code=trust_remote_code)
    except OSError as e:
        if Path(path).expanduser().is_dir():
            raise
        raise OSError(
            f"model_name_or_path={name_or_path!r}: no such local folder, and the Hugging Face hub could not provide "
            f"it ({str(e).strip().splitlines()[0]}). Offline? A local folder (with config.json) works, e.g. one "
            f"saved with save_pretrained; model_name_or_path=default is the embedded tiny model") from None
    if tokenizer.pad_token_id is None:  # decoder-only models often ship without one; EOS is the usual stand-in
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype), trust_remote_code=trust_remote_code)
    set_fused_logps(model, fused_logps)
    return model, tokenizer


def prepare_model(model, config):
    """The policy as the trainer and every rollout worker build it (so that trainable weights load by name):
    activation checkpointing, LoRA adapters (``peft``), dropout off, eval mode."""
    if config.model.gradient_checkpointing:
        # Non-reentrant checkpointing works with frozen embeddings (LoRA) without enable_input_require_grads.
        enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5.x name
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if config.peft.use_peft:
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError as e:
            raise ImportError("peft.use_peft=true needs `pip install gvpo[peft]`") from e
        p = config.peft
        model = get_peft_model(model, LoraConfig(
            r=p.lora_r, lora_alpha=p.lora_alpha, lora_dropout=0.0, task_type="CAUSAL_LM",
            target_modules=list(p.lora_target_modules) or None))
    # Dropout would make pi_theta' != pi_theta on the same weights; RL fine-tuning runs without it.
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0
    model.eval()
    return model


def cache_kwargs(model, cache) -> dict:
    """The keyword that hands ``model`` a KV cache: ``cache`` where the model's forward takes it (transformers 5.x,
    where ``past_key_values`` is deprecated and goes in 5.40), else ``past_key_values`` (older versions)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT forwards **kwargs
    name = "cache" if "cache" in _forward_parameters(type(base)) else "past_key_values"
    return {name: cache}


@functools.cache
def _forward_parameters(cls) -> frozenset:
    return frozenset(inspect.signature(cls.forward).parameters)


def _checked_source(path: str) -> str:
    """A local folder as is; a path that can only be local (absolute, ./, ~, several /) must exist. Anything
    else ("org/name") goes to the hub."""
    local = Path(path).expanduser()
    if local.is_dir():
        return str(local)
    if local.exists():
        raise FileNotFoundError(f"model_name_or_path={path!r} is a file; pass the folder that holds config.json")
    if path.startswith(("/", ".", "~")) or path.count("/") > 1 or "\\" in path:
        raise FileNotFoundError(f"model_name_or_path={path!r}: no such folder; pass a folder with config.json "
                                f"(saved with save_pretrained), a hub name, or default (the embedded tiny model)")
    return path


def token_logps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                num_completion_tokens: int, temperature: float = 1.0, fused: bool | None = None) -> torch.Tensor:
    """Log-probs of the last ``num_completion_tokens`` tokens of each row under ``model``, (N, T), float32.

    Logits are divided by the sampling temperature, as TRL does, so that at temperature != 1 the policy whose
    log-probs enter the loss is the one that was sampled. ``fused`` (default: the model's
    ``model.fused_logps`` setting, see :func:`set_fused_logps`; on if unset) computes them from the last
    hidden states tile by tile (:mod:`gvpo.fused_logps`) without the (N, T, V) logits; a model whose head is
    not exactly ``lm_head(hidden)`` takes the plain path, with its reason logged once.
    """
    wanted = fused_enabled(model) if fused is None else fused
    plan = fused_head(model) if wanted else None
    if plan is not None:
        return fused_token_logps(model, plan, input_ids, attention_mask, position_ids, num_completion_tokens,
                                 temperature)
    return _plain_token_logps(model, input_ids, attention_mask, position_ids, num_completion_tokens, temperature)


def _plain_token_logps(model, input_ids, attention_mask, position_ids, num_completion_tokens, temperature):
    """Only the completion positions' logits are materialised (``logits_to_keep``), and the log-softmax is taken
    through logsumexp to avoid a second (N, T, V) tensor."""
    T = num_completion_tokens
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                logits_to_keep=T + 1, use_cache=False)
    logits = out.logits[:, :-1].float()  # (N, T, V): position t predicts token t + 1
    if temperature != 1.0:
        logits = logits / temperature
    targets = input_ids[:, -T:]
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)
