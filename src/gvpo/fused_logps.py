"""Log-probs of sampled tokens straight from the last hidden states, without the (N, T, V) logits.

GVPO needs only log pi(y_t | ...) of the sampled tokens. The plain path materialises the logits of every
completion position over the whole vocabulary (4 x 1,024 tokens x Qwen's 151,936 entries = 2.4 GB in float32),
and autograd keeps them, plus the softmax backward's temporaries, until the backward. Here the head is applied
tile by tile (``chunk_tokens`` positions x ``chunk_vocab`` vocabulary rows): the forward keeps only each
position's logsumexp, the backward recomputes each tile's logits and turns them into the gradients of the
hidden states, of the head weight (the shared embedding when the head is tied) and of its bias. The cost is one
extra head matmul in the backward; the memory is one tile instead of the whole (N, T, V).

Numerics follow the plain path: the matmul runs in the autocast dtype when autocast is on (as ``lm_head`` would),
the softmax statistics in float32, and the logits are divided by the sampling temperature.

This is the portable (CPU / CI) implementation, used on CUDA too. A maintained CUDA kernel computes the same
numbers (Apple's Cut Cross-Entropy: ``-linear_cross_entropy(h / temperature, W, y, reduction="none")``); it is
not wired in because it could not be tested on these machines (no GPU).
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import torch

from gvpo.cpu_matmul import linear, mm
from gvpo.hf_compat import unwrap as _unwrap

# A tile of 2**23 float32 logits is 32 MB: the tile, not the vocabulary, then sets the peak (a few tiles'
# worth of temporaries), and tiles are few enough that per-op overhead stays small (on the shared 2-core CPU,
# 256 x 2,048 tiles took ~4x as long as 1,024 x 8,192 ones for 1,024 positions at V = 151,936).
TILE_ELEMENTS = 2**23
MAX_CHUNK_TOKENS = 4096


def chunked_logps(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, bias: torch.Tensor | None = None,
                  temperature: float = 1.0, chunk_tokens: int | None = None,
                  chunk_vocab: int | None = None) -> torch.Tensor:
    """log softmax((hidden @ weight.T + bias) / temperature)[targets], shape ``hidden.shape[:-1]``, float32.

    ``hidden (..., H)``, ``weight (V, H)``, ``bias (V,)`` or None, ``targets (...)`` token ids in [0, V).
    Tiles are ``chunk_tokens x chunk_vocab``; by default up to 4,096 positions x as many vocabulary rows as
    fit in ``TILE_ELEMENTS``.
    """
    chunk_tokens = chunk_tokens or min(targets.numel(), MAX_CHUNK_TOKENS) or 1
    chunk_vocab = chunk_vocab or max(1, TILE_ELEMENTS // chunk_tokens)
    if chunk_tokens < 1 or chunk_vocab < 1:
        raise ValueError(f"chunk_tokens={chunk_tokens}, chunk_vocab={chunk_vocab}: both must be >= 1")
    shape = targets.shape
    dtype = _compute_dtype(hidden, weight)
    out = _ChunkedLogps.apply(hidden.reshape(-1, hidden.shape[-1]), weight, bias, targets.reshape(-1),
                              float(temperature), int(chunk_tokens), int(chunk_vocab), dtype)
    return out.view(shape)


def _compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype ``lm_head(hidden)`` would multiply in: autocast's when it is on, else the operands' common one."""
    if torch.is_autocast_enabled(hidden.device.type):
        return torch.get_autocast_dtype(hidden.device.type)
    return torch.promote_types(hidden.dtype, weight.dtype)


def _tile_logits(h, weight, bias, v0, v1, temperature, dtype):
    """float32 logits / temperature of rows ``h`` for vocabulary rows [v0, v1); bias added as F.linear does."""
    w = weight[v0:v1].to(dtype)
    b = None if bias is None else bias[v0:v1].to(dtype)
    z = linear(h, w, b).float()  # through oneDNN on CPUs where it is faster (gvpo.cpu_matmul)
    return z / temperature if temperature != 1.0 else z


class _ChunkedLogps(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, chunk_tokens, chunk_vocab, dtype):
        M, V = hidden.shape[0], weight.shape[0]
        logps = torch.empty(M, dtype=torch.float32, device=hidden.device)
        lse = torch.empty_like(logps)
        with torch.autocast(hidden.device.type, enabled=False):  # dtypes are chosen explicitly, as lm_head's
            for m0 in range(0, M, chunk_tokens):
                h, t = hidden[m0:m0 + chunk_tokens].to(dtype), targets[m0:m0 + chunk_tokens]
                picked = torch.zeros(h.shape[0], dtype=torch.float32, device=h.device)
                tile_lse = []
                for v0 in range(0, V, chunk_vocab):
                    v1 = min(v0 + chunk_vocab, V)
                    z = _tile_logits(h, weight, bias, v0, v1, temperature, dtype)  # (m, v)
                    tile_lse.append(torch.logsumexp(z, dim=-1))
                    # the target's logit is read from the same tile the logsumexp saw, so both agree bit for bit
                    inside = (t >= v0) & (t < v1)
                    got = z.gather(1, (t - v0).clamp(0, v1 - v0 - 1).unsqueeze(1)).squeeze(1)
                    picked = torch.where(inside, got, picked)
                lse[m0:m0 + chunk_tokens] = torch.logsumexp(torch.stack(tile_lse), dim=0)
                logps[m0:m0 + chunk_tokens] = picked
        logps -= lse
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.args = (temperature, chunk_tokens, chunk_vocab, dtype)
        return logps

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        temperature, chunk_tokens, chunk_vocab, dtype = ctx.args
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        # d logp_t / d raw logit_j = (1[j = y_t] - softmax_j) / temperature. Positions whose incoming gradient
        # is 0 (padding, masked tokens) contribute nothing: they are dropped before any tile is computed.
        rows = (grad_out != 0).nonzero().squeeze(1)
        h_all, g_all, t_all, lse_all = hidden[rows], grad_out[rows].float() / temperature, targets[rows], lse[rows]
        grad_h = torch.zeros(h_all.shape, dtype=torch.float32, device=hidden.device) if need_h else None
        grad_w = torch.zeros_like(weight) if need_w else None
        grad_b = torch.zeros_like(bias) if need_b and bias is not None else None
        V = weight.shape[0]
        with torch.autocast(hidden.device.type, enabled=False):
            # vocabulary outer, tokens inner: each vocabulary slice of grad_w is finished in one float32 buffer
            for v0 in range(0, V, chunk_vocab):
                v1 = min(v0 + chunk_vocab, V)
                w = weight[v0:v1].to(dtype)
                gw = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if need_w else None
                gb = torch.zeros(v1 - v0, dtype=torch.float32, device=w.device) if grad_b is not None else None
                for m0 in range(0, h_all.shape[0], chunk_tokens):
                    m1 = m0 + chunk_tokens
                    h, t, g = h_all[m0:m1].to(dtype), t_all[m0:m1], g_all[m0:m1]
                    z = _tile_logits(h, weight, bias, v0, v1, temperature, dtype)
                    dz = torch.exp_(z.sub_(lse_all[m0:m1, None])).mul_(-g[:, None])  # -g * softmax, (m, v)
                    inside = (t >= v0) & (t < v1)  # + g at the target, where the target is in this tile
                    dz.scatter_add_(1, (t - v0).clamp(0, v1 - v0 - 1).unsqueeze(1),
                                    torch.where(inside, g, 0.0).unsqueeze(1))  # no host sync (CUDA)
                    if need_h:
                        grad_h[m0:m1] += mm(dz.to(dtype), w)
                    if need_w:
                        gw += mm(dz.to(dtype).T, h).float()
                    if gb is not None:
                        gb += dz.sum(0)
                if need_w:
                    grad_w[v0:v1] = gw.to(weight.dtype)
                if gb is not None:
                    grad_b[v0:v1] = gb.to(bias.dtype)
        if need_h:
            full = torch.zeros(hidden.shape, dtype=hidden.dtype, device=hidden.device)
            full[rows] = grad_h.to(hidden.dtype)
            grad_h = full
        return grad_h, grad_w, grad_b, None, None, None, None, None


# --------------------------------------------------------------------------------------------------
# Models: where the last hidden states and the head are, and when the shortcut is exact

# Causal LMs whose forward is exactly ``logits = lm_head(decoder(...).last_hidden_state)`` (read from
# transformers 5.x; tests/test_fused_logps.py checks it on tiny random configs). Anything else takes the plain
# path: an unknown forward may scale, cap or post-process its logits.
EXACT_MODEL_TYPES = frozenset({
    "llama", "mistral", "ministral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "phi", "phi3",
    "gemma", "gemma2", "olmo", "olmo2", "smollm3", "starcoder2", "glm4", "deepseek_v3"})
# Config fields that make a forward do more than lm_head(hidden) (Gemma 2/3 soft-capping, Cohere, Granite).
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_softcapping", "logit_scale", "logits_scaling")
_FLAG = "_gvpo_fused_logps"
_logged: set[str] = set()
logger = logging.getLogger(__name__)


class FusedHead(NamedTuple):
    head: torch.nn.Linear  # the output projection (its weight is the embedding's when tied)
    decoder: torch.nn.Module  # the module whose output is the last hidden state, final norm included


def set_fused_logps(model, enabled: bool) -> None:
    """Record ``model.fused_logps`` on the model itself, so every log-prob call on it (policy, pi_theta',
    reference copies made with deepcopy) follows the configuration without passing it around."""
    setattr(_unwrap(model), _FLAG, bool(enabled))


def fused_enabled(model) -> bool:
    return getattr(_unwrap(model), _FLAG, True)


def fused_head(model) -> FusedHead | None:
    """The head and decoder of ``model`` when the tiled path is exact for it, else None (reason logged once)."""
    plan = _plan(model)
    if isinstance(plan, str):
        if plan not in _logged:
            _logged.add(plan)
            logger.warning("fused log-probs are off for this model: %s; using the plain path (which "
                           "materialises the (N, T, V) logits; model.fused_logps=false silences this)", plan)
        return None
    return plan


def fused_token_logps(model, plan: FusedHead, input_ids, attention_mask, position_ids, num_completion_tokens: int,
                      temperature: float = 1.0) -> torch.Tensor:
    """``token_logps`` from the last hidden states. The call goes through ``model`` itself (DDP's forward must
    run for its gradient hooks, peft's for its adapters, checkpointing and autocast as configured); a forward
    hook on the decoder keeps its output, and ``logits_to_keep=1`` leaves the head one position to compute."""
    T = num_completion_tokens
    captured = []
    hook = plan.decoder.register_forward_hook(lambda mod, args, out: captured.append(_last_hidden(out)))
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, logits_to_keep=1,
              use_cache=False)
    finally:
        hook.remove()
    if len(captured) != 1:
        raise RuntimeError(f"expected one decoder call per forward, saw {len(captured)}")
    hidden = captured[0][:, -(T + 1):-1]  # (N, T, H): position t predicts token t + 1
    return chunked_logps(hidden, plan.head.weight, input_ids[:, -T:], plan.head.bias, temperature)


def _last_hidden(out):
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def _plan(model) -> FusedHead | str:
    lm = _unwrap(model)
    config = getattr(lm, "config", None)
    if "FullyShard" in type(lm).__name__:
        return "FSDP shards the head weight outside its forward"
    if config is None or not hasattr(lm, "get_output_embeddings") or not hasattr(lm, "get_decoder"):
        return f"{type(lm).__name__} is not a transformers causal LM"
    for name in _LOGIT_TRANSFORMS:
        if getattr(config, name, None) is not None:
            return f"its forward transforms the logits ({name}={getattr(config, name)})"
    model_type = getattr(config, "model_type", None)
    if model_type not in EXACT_MODEL_TYPES or not type(lm).__name__.endswith("ForCausalLM"):
        return (f"{type(lm).__name__} (model_type={model_type!r}) is not known to compute lm_head(hidden) and "
                f"nothing else (known: {', '.join(sorted(EXACT_MODEL_TYPES))})")
    head, decoder = lm.get_output_embeddings(), lm.get_decoder()
    if type(head) is not torch.nn.Linear:  # e.g. peft's LoRA or modules_to_save wrapper on lm_head
        return f"its output head is a {type(head).__name__}, not a plain torch.nn.Linear"
    if decoder is None:
        return "it has no decoder module to read the last hidden states from"
    weight = head.weight
    if type(weight).__name__ == "DTensor" or hasattr(weight, "ds_id"):
        return "the head weight is sharded (FSDP2 / DeepSpeed ZeRO-3)"
    return FusedHead(head, decoder)
