"""Model loading, the one way to prepare a policy for RL (checkpointing, LoRA, dropout off), and teacher-forced
token log-probs: where the trainer and the rollout workers touch transformers."""

from __future__ import annotations

from pathlib import Path

import torch

from gvpo.cpu_matmul import onednn_linears
from gvpo.fused_logps import fused_enabled, fused_head, fused_token_logps, set_fused_logps
from gvpo.hf_compat import cache_kwargs  # noqa: F401 (the engines import it from here)
from gvpo.shared_prompt import log_fallback, prompt_groups, set_shared_prompt, shared_enabled, shared_plan, \
    shared_token_logps
from gvpo.types import build_sequences  # noqa: F401 (its home is beside Rollout; imported from here too)


def resolve_model_path(name_or_path: str, gguf_cache_dir: str | None = None) -> str:
    """The folder or hub name transformers should load: "default" is the tiny model shipped in the package; an
    alias (gvpo.gguf_models.ALIASES, e.g. smollm2-135m-instruct) or a ``.gguf`` file becomes its converted
    checkpoint in the GGUF cache (``gguf_cache_dir``, default $GVPO_CACHE_DIR/gguf or ~/.cache/gvpo/gguf);
    anything else goes to transformers as is."""
    from gvpo import gguf_models

    if name_or_path == "default":
        from gvpo.assets import default_model_path

        return str(default_model_path())
    if name_or_path in gguf_models.ALIASES:
        return str(gguf_models.gguf_checkpoint(gguf_models.alias_file(name_or_path), gguf_cache_dir))
    if gguf_models.is_gguf(name_or_path):
        return str(gguf_models.gguf_checkpoint(name_or_path, gguf_cache_dir))
    return name_or_path


def load_model_and_tokenizer(name_or_path: str = "default", dtype: str = "float32", trust_remote_code: bool = False,
                             fused_logps: bool = True, shared_prompt: bool = True, gguf_cache_dir: str | None = None):
    """A causal LM and its tokenizer from a local path, a hub name, a GGUF file or alias (see
    :func:`resolve_model_path`; no hub access is needed for "default"). ``fused_logps`` and ``shared_prompt`` are
    ModelConfig's switches for :func:`token_logps`, recorded on the model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(name_or_path, gguf_cache_dir)
    try:
        tokenizer = AutoTokenizer.from_pretrained(_checked_source(path), trust_remote_code=trust_remote_code)
    except OSError as e:
        if Path(path).expanduser().is_dir():
            raise
        raise OSError(
            f"model_name_or_path={name_or_path!r}: no such local folder, and the Hugging Face hub could not provide "
            f"it ({str(e).strip().splitlines()[0]}). Offline? A local folder (with config.json) works (e.g. one "
            f"saved with save_pretrained), as do a .gguf file, smollm2-135m-instruct, or default (the embedded tiny "
            f"model)") from None
    if tokenizer.pad_token_id is None:  # decoder-only models often ship without one; EOS is the usual stand-in
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype), trust_remote_code=trust_remote_code)
    set_fused_logps(model, fused_logps)
    set_shared_prompt(model, shared_prompt)
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
                                f"(saved with save_pretrained), a .gguf file, a hub name, or default (the embedded tiny model)")
    return path


def token_logps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                num_completion_tokens: int, temperature: float = 1.0, fused: bool | None = None,
                shared: bool | None = None) -> torch.Tensor:
    """Log-probs of the last ``num_completion_tokens`` tokens of each row under ``model``, (N, T), float32.

    Logits are divided by the sampling temperature, as TRL does, so that at temperature != 1 the policy whose
    log-probs enter the loss is the one that was sampled. ``fused`` (default: the model's
    ``model.fused_logps`` setting, see :func:`set_fused_logps`; on if unset) computes them from the last
    hidden states tile by tile (:mod:`gvpo.fused_logps`) without the (N, T, V) logits; a model whose head is
    not exactly ``lm_head(hidden)`` takes the plain path, with its reason logged once. ``shared`` (default: the
    model's ``model.shared_prompt`` setting, see :func:`set_shared_prompt`) runs each distinct prompt once and its
    completions against its keys/values (:mod:`gvpo.shared_prompt`), where that is exact and saves work.
    """
    wanted = fused_enabled(model) if fused is None else fused
    plan = fused_head(model) if wanted else None
    T = num_completion_tokens
    with onednn_linears():  # float32 CPU linears through oneDNN where it is faster (gvpo.cpu_matmul)
        if (shared_enabled(model) if shared is None else shared) and T < input_ids.shape[1]:
            groups = prompt_groups(input_ids, attention_mask, position_ids, input_ids.shape[1] - T)
            if groups[0].shape[0] < input_ids.shape[0]:  # one row per prompt: nothing to share
                reason = shared_plan(model, input_ids.shape[1])
                if reason is None:
                    return shared_token_logps(model, plan, input_ids, attention_mask, position_ids, T, temperature,
                                              groups)
                log_fallback(reason)
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
