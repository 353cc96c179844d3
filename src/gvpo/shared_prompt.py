"""The training pass with each distinct prompt computed once (Prefix Grouper, arXiv 2506.05433).

GVPO scores k responses to one prompt, and the plain pass runs prompt + completion for every row, so each
prompt goes through the model k times. Here the distinct prompts (U, P) run once, each layer keeps their keys and
values (inside the autograd graph), and the completions (N, T - 1) run against them, every row reading its
prompt's keys/values by index. A completion token sees the same keys, values, mask and position ids as in the
plain pass, so its log-prob is the same; the gradients of all k completions accumulate into the shared prompt's
activations, which is what the plain pass's k copies add up to (checked to 1e-5 in tests/test_shared_prompt.py).

Completion token 0 is predicted by the prompt's last position (the prompt pass's one kept position), tokens
1..T-1 by completion positions 0..T-2; the last completion token is never an input.

Activation checkpointing: transformers' checkpointed decoder layer drops the cache, because an appending cache
would be written a second time when the backward replays the layer. Both cache layers here are replay-safe (the
prompt's replaces instead of appending, the completions' only reads), so for these two calls the layers keep the
cache (``_can_checkpoint_with_cache``, transformers' own switch for caches that are only read). Reentrant
checkpointing differentiates only a layer's positional inputs, so the cache would get no gradient: plain pass.
"""

from __future__ import annotations

import contextlib
import logging

import torch
from transformers.cache_utils import Cache, DynamicLayer

from gvpo.fused_logps import FusedHead, _last_hidden, chunked_logps
from gvpo.hf_compat import _forward_parameters, cache_kwargs
from gvpo.hf_compat import unwrap as _unwrap

# Causal LMs checked (tests/test_shared_prompt.py) to write every layer's keys/values through ``cache.update``
# with the layer's index, and to build their masks from the cache's lengths. Anything else takes the plain pass.
SHARED_MODEL_TYPES = frozenset({
    "llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "gemma2", "olmo2", "mixtral", "qwen3_moe"})
# Attention kernels that read the 4D/2D mask the cache's lengths produce; flash-attention's varlen path also
# aligns queries bottom-right, but it could not be run here (no GPU), so it is not claimed.
_ATTENTION = frozenset({"eager", "sdpa"})
_FLAG = "_gvpo_shared_prompt"
_logged: set[str] = set()
logger = logging.getLogger(__name__)


def set_shared_prompt(model, enabled: bool) -> None:
    """Record ``model.shared_prompt`` on the model itself (as :func:`gvpo.fused_logps.set_fused_logps` does),
    so the policy, pi_theta' and reference passes all follow the configuration."""
    setattr(_unwrap(model), _FLAG, bool(enabled))


def shared_enabled(model) -> bool:
    return getattr(_unwrap(model), _FLAG, True)


def prompt_groups(input_ids, attention_mask, position_ids, prompt_width: int):
    """``(first (U,), rows (N,))``: the first row holding each distinct prompt, and each row's prompt among them.
    Prompts are compared with their mask and positions, so left padding never merges two different prompts."""
    P = prompt_width
    key = torch.cat([input_ids[:, :P], attention_mask[:, :P].to(input_ids.dtype),
                     position_ids[:, :P].to(input_ids.dtype)], dim=1)  # (N, 3P)
    _, rows = torch.unique(key, dim=0, return_inverse=True)  # (N,)
    N = rows.shape[0]
    first = torch.full((int(rows.max()) + 1,), N, dtype=torch.long, device=rows.device)
    first.scatter_reduce_(0, rows, torch.arange(N, device=rows.device), reduce="amin")  # (U,)
    return first, rows


def shared_plan(model, sequence_length: int) -> str | None:
    """None when the shared pass is exact for ``model``, else the reason it is not (logged once by the caller)."""
    lm = _unwrap(model)
    config = getattr(lm, "config", None)
    if config is None:
        return f"{type(lm).__name__} is not a transformers causal LM"
    model_type = getattr(config, "model_type", None)
    if model_type not in SHARED_MODEL_TYPES or not type(lm).__name__.endswith("ForCausalLM"):
        return (f"{type(lm).__name__} (model_type={model_type!r}) is not known to read its keys/values from the "
                f"cache only (known: {', '.join(sorted(SHARED_MODEL_TYPES))})")
    if not {"cache", "past_key_values"} & _forward_parameters(type(lm)):
        return f"{type(lm).__name__}.forward takes no KV cache"
    attn = getattr(config, "_attn_implementation", None)
    if attn not in _ATTENTION:
        return f"attention implementation {attn!r} is not verified (verified: eager, sdpa)"
    window = getattr(config, "sliding_window", None)
    if window is not None and window < sequence_length:
        return f"sliding_window={window} is shorter than a sequence; the windowed mask is not rebuilt here"
    if torch.is_grad_enabled() and any(_reentrant(m) for m in _checkpointed_layers(lm)):
        return "reentrant activation checkpointing gives the prompt's keys/values no gradient (use_reentrant=False)"
    return None


def log_fallback(reason: str) -> None:
    if reason not in _logged:
        _logged.add(reason)
        logger.warning("the shared-prompt pass is off for this model: %s; each row runs its own prompt "
                       "(model.shared_prompt=false silences this)", reason)


def _checkpointed_layers(lm):
    return [m for m in lm.modules() if getattr(m, "gradient_checkpointing", False) and m.training
            and hasattr(m, "_gradient_checkpointing_func")]


def _reentrant(module) -> bool:
    """torch's checkpoint reads a missing use_reentrant as True; a function that is not a partial is unknown."""
    kwargs = getattr(module._gradient_checkpointing_func, "keywords", None) or {}
    return bool(kwargs.get("use_reentrant", True))


class _PromptLayer(DynamicLayer):
    """Prompt pass: keeps the layer's keys/values (U, heads, P, d). Replaces rather than appends, and only on the
    first call: a checkpointed layer calls it again when the backward replays it."""

    calls = 0

    def update(self, key_states, value_states, *args, **kwargs):
        self.calls += 1
        if not self.is_initialized:
            self.keys, self.values, self.is_initialized = key_states, value_states, True
            self.device = key_states.device
        return key_states, value_states


class _CompletionLayer(DynamicLayer):
    """Completion pass: each row's prompt keys/values (selected from the U prompts on the fly, so that only the
    prompts' copy stays alive under checkpointing), followed by the completion's own. Never written."""

    def __init__(self, keys, values, rows):
        super().__init__()
        self.keys, self.values, self.rows, self.is_initialized = keys, values, rows, True
        self.device = keys.device

    calls = 0

    def update(self, key_states, value_states, *args, **kwargs):
        self.calls += 1
        keys = torch.cat([self.keys.index_select(0, self.rows), key_states], dim=-2)  # (N, heads, P + T', d)
        values = torch.cat([self.values.index_select(0, self.rows), value_states], dim=-2)
        return keys, values


@contextlib.contextmanager
def _keep_cache_under_checkpointing(lm):
    """Yields ``use_cache`` for the call. Checkpointed layers keep the (replay-safe) cache; transformers binds it
    into the replay at call time, so the switch need only be on during the forward. ``use_cache`` is False there,
    as transformers would set it (with a warning that the cache is dropped, which here it is not)."""
    layers = _checkpointed_layers(lm) if torch.is_grad_enabled() else []
    for layer in layers:
        layer._can_checkpoint_with_cache = True
    try:
        yield not layers
    finally:
        for layer in layers:
            del layer._can_checkpoint_with_cache  # back to the class's False


def _forward(model, plan: FusedHead | None, cache, logits_to_keep: int, **inputs):
    """(logits or None, last hidden states or None): hidden states from a hook on the decoder when ``plan``."""
    captured = []
    hook = plan.decoder.register_forward_hook(lambda m, a, out: captured.append(_last_hidden(out))) if plan else None
    try:
        with _keep_cache_under_checkpointing(_unwrap(model)) as use_cache:
            out = model(**inputs, logits_to_keep=logits_to_keep, use_cache=use_cache, **cache_kwargs(model, cache))
    finally:
        if hook is not None:
            hook.remove()
    n_layers = _unwrap(model).config.get_text_config(decoder=True).num_hidden_layers
    if len(cache.layers) != n_layers or not all(getattr(layer, "calls", 0) for layer in cache.layers):
        raise RuntimeError(f"the model went through the cache in {len(cache.layers)} of {n_layers} layers; set "
                           f"model.shared_prompt=false for it")
    if plan is None:
        return out.logits, None
    if len(captured) != 1:
        raise RuntimeError(f"expected one decoder call per forward, saw {len(captured)}")
    return None, captured[0]


def shared_token_logps(model, plan: FusedHead | None, input_ids, attention_mask, position_ids,
                       num_completion_tokens: int, temperature: float, groups) -> torch.Tensor:
    """``token_logps`` with each distinct prompt run once. ``groups = (first, rows)`` from :func:`prompt_groups`;
    ``plan`` picks the fused head (log-probs from hidden states) or, when None, the model's own logits.

    The completions run in buckets of similar length (:func:`length_buckets`), each cut to its longest row: RL
    completions end anywhere up to the budget (with 128 new tokens, chat completions here averaged 35-39 tokens),
    and one (N, T) pass would spend most of its work on padding. Positions after a row's last completion token
    influence no earlier one, so the kept log-probs are the same; the cut ones are returned as 0. One process only
    (below)."""
    T = num_completion_tokens
    P = input_ids.shape[1] - T
    first, rows = groups
    prompt_cache = Cache(layer_class_to_replicate=_PromptLayer)
    logits, hidden = _forward(model, plan, prompt_cache, 1, input_ids=input_ids[first, :P],
                              attention_mask=attention_mask[first, :P], position_ids=position_ids[first, :P])
    last = logits[:, -1:] if plan is None else hidden[:, -1:]  # (U, 1, V or H): predicts completion token 0
    # With several processes every rank must make the same forward calls (DDP broadcasts buffers in each, FSDP and
    # ZeRO-3 gather weights), and the number of buckets depends on the rank's data: one bucket of width T there.
    buckets = length_buckets(attention_mask[:, P:]) if not _several_processes() else \
        [(torch.arange(input_ids.shape[0], device=input_ids.device), T)]
    out = []
    for bucket, width in buckets:
        prompt_of = rows.index_select(0, bucket)
        first_out = last.index_select(0, prompt_of)  # (n, 1, V or H)
        if width > 1:
            cache = Cache(layers=[_CompletionLayer(layer.keys, layer.values, prompt_of)
                                  for layer in prompt_cache.layers])
            cut = P + width - 1  # the last kept completion token is never an input
            rest_logits, rest_hidden = _forward(model, plan, cache, 0 if plan is None else 1,
                                                input_ids=input_ids[bucket, P:cut],
                                                attention_mask=attention_mask[bucket, :cut],
                                                position_ids=position_ids[bucket, P:cut])
            first_out = torch.cat([first_out, rest_logits if plan is None else rest_hidden], dim=1)
        logps = _logps(first_out, plan, input_ids[bucket, P:P + width], temperature)  # (n, width)
        out.append(torch.nn.functional.pad(logps, (0, T - width)))
    order = torch.cat([bucket for bucket, _ in buckets])  # row i of the result is row order[i] of the batch
    return torch.cat(out).index_select(0, torch.argsort(order))


def _several_processes() -> bool:
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def length_buckets(completion_mask: torch.Tensor) -> list[tuple[torch.Tensor, int]]:
    """Rows grouped by the power of two at or above their length (the 1-based position of their last real token):
    ``[(rows, width)]``, width the bucket's longest row, at least 1. A row is padded to at most twice its length
    (one (N, T) pass pads every row to T), at the price of one more forward per bucket (at most log2(T) + 1)."""
    T = completion_mask.shape[1]
    positions = torch.arange(1, T + 1, device=completion_mask.device)
    lengths = (completion_mask.ne(0) * positions).amax(dim=1).clamp(min=1)  # (N,)
    keys = torch.ceil(torch.log2(lengths.double())).long()
    buckets = []
    for key in torch.unique(keys).tolist():
        bucket = torch.nonzero(keys == key).squeeze(1)
        buckets.append((bucket, int(lengths.index_select(0, bucket).max())))
    return buckets


def _logps(out: torch.Tensor, plan: FusedHead | None, targets: torch.Tensor, temperature: float) -> torch.Tensor:
    """Log-probs of ``targets`` (n, w) from the hidden states (fused head) or logits (n, w, *) predicting them."""
    if plan is not None:
        return chunked_logps(out, plan.head.weight, targets, plan.head.bias, temperature)
    logits = out.float()
    if temperature != 1.0:
        logits = logits / temperature
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
