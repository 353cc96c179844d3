"""A hand-written decode step for Llama-style decoders (Llama, Qwen2, Qwen3, Mistral), reading the model's weights.

Why: on CPU with small models a decode step through HF's forward is dominated by Python and mask-building
overhead, and DynamicCache copies the whole cache at every step. Here one step is ~20 tensor ops per layer:
fused QKV and gate/up projections, RoPE from a precomputed table, the new key/value written in place into a
preallocated cache, and attention as two batched matmuls over the cache with an additive mask.

Cache layout: (rows, kv_heads, capacity, head_dim) per layer. Attention always spans the full capacity, so
each (row, head) block is one contiguous matrix for bmm (a strided slice runs 2x slower per byte); unwritten
slots are masked with -inf and hold zeros. The capacity grows by ``chunk`` slots at a time, and each
reallocation also drops rows that have finished, which is when compaction is free.

Prefill runs the model's own forward once per prompt (the k samples share it). A short prompt's keys/values
are copied k-fold into the rows' caches; a long one's are kept once, and its k rows attend to them as the
query rows of one matmul (as GQA's heads share a kv head), which saves reading k - 1 copies per step.
``split`` hands row blocks of the caches (views) to the fast engine's worker threads; the fused weights
(``DecoderWeights``) are shared. The decode math is checked against HF generate and teacher forcing in the
tests, with prompts copied and shared.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gvpo.cpu_matmul import packed_linear
from gvpo.modeling import cache_kwargs

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral")
_STATEFUL_ROPE = ("dynamic", "longrope")  # their inv_freq depends on the sequence length seen so far


def unsupported_reason(model, total_len: int) -> str | None:
    """Why the hand-written decoder cannot run `model` for sequences of `total_len` tokens; None if it can."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        return f"model_type {model_type!r} is not one of {SUPPORTED_MODEL_TYPES}"
    inner = getattr(model, "model", None)
    for name in ("embed_tokens", "layers", "norm", "rotary_emb"):
        if not hasattr(inner, name):
            return f"model.model has no {name}"
    if type(getattr(model, "lm_head", None)) is not nn.Linear:
        return "lm_head is not a plain nn.Linear"
    rope_type = (getattr(config, "rope_parameters", None) or {}).get("rope_type", "default")
    if rope_type in _STATEFUL_ROPE:
        return f"rope_type {rope_type!r} changes with the sequence length"
    # The decoder attends to the whole cache: fine while sequences fit in any sliding window.
    layer_types = getattr(config, "layer_types", None) or []
    windowed = model_type == "mistral" or any(t != "full_attention" for t in layer_types)
    window = getattr(config, "sliding_window", None)
    if windowed and window is not None and total_len > window:
        return f"{total_len} tokens exceed sliding_window={window}"
    for layer in inner.layers:
        attn, mlp = layer.self_attn, layer.mlp
        modules = [attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj]
        if any(type(m) is not nn.Linear for m in modules):  # LoRA / quantized layers: not plain weights
            return "projections are not plain nn.Linear (LoRA or quantized?)"
    return None


def _rms_weight_eps(norm: nn.Module) -> tuple[torch.Tensor, float]:
    return norm.weight, getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6))


def _cat_bias(modules: list[nn.Linear]) -> torch.Tensor | None:
    if all(m.bias is None for m in modules):
        return None
    return torch.cat([m.bias if m.bias is not None else m.weight.new_zeros(m.out_features) for m in modules])


class _Layer:
    """One decoder layer's weights, fused where that saves kernel launches (QKV, gate/up), in ``dtype`` when given
    (autocast's: see DecoderWeights)."""

    def __init__(self, layer: nn.Module, dtype: torch.dtype | None = None):
        attn, mlp = layer.self_attn, layer.mlp
        qkv = [attn.q_proj, attn.k_proj, attn.v_proj]
        self.w_qkv, self.b_qkv = _as(torch.cat([m.weight for m in qkv]), dtype), _as(_cat_bias(qkv), dtype)
        self.w_o, self.b_o = _as(attn.o_proj.weight, dtype), _as(attn.o_proj.bias, dtype)
        self.w_gate_up = _as(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]), dtype)
        self.b_gate_up = _as(_cat_bias([mlp.gate_proj, mlp.up_proj]), dtype)
        self.w_down, self.b_down = _as(mlp.down_proj.weight, dtype), _as(mlp.down_proj.bias, dtype)
        # The products the decode step runs, with each weight reordered once for oneDNN where that is faster.
        self.qkv, self.o = packed_linear(self.w_qkv, self.b_qkv), packed_linear(self.w_o, self.b_o)
        self.gate_up, self.down = packed_linear(self.w_gate_up, self.b_gate_up), packed_linear(self.w_down, self.b_down)
        self.act = mlp.act_fn
        self.ln1 = _rms_weight_eps(layer.input_layernorm)
        self.ln2 = _rms_weight_eps(layer.post_attention_layernorm)
        # Qwen3 normalises each head's query and key before RoPE.
        self.q_norm = _rms_weight_eps(attn.q_norm) if hasattr(attn, "q_norm") else None
        self.k_norm = _rms_weight_eps(attn.k_norm) if hasattr(attn, "k_norm") else None
        self.scaling = attn.scaling


def _as(t: torch.Tensor | None, dtype: torch.dtype | None) -> torch.Tensor | None:
    return t if t is None or dtype is None else t.to(dtype)


def _rms(x: torch.Tensor, weight_eps) -> torch.Tensor:
    weight, eps = weight_eps
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class DecoderWeights:
    """A model's weights as the decode step reads them, fused once per generate call (the trainer updates the
    model in place between calls) and shared, read-only, by every part of a split decoder.

    Under autocast (``bf16=true``) the matmul weights and the KV cache are cast to autocast's dtype here, once per
    call, as autocast would cast the weights of every linear at every step; the residual stream, norms, RoPE and
    softmax stay float32 as in HF's forward under autocast. On a CPU with avx512_bf16 a bf16 matmul ran about 4x
    as fast as MKL's float32 one, 2x oneDNN's (gvpo.cpu_matmul, whose packed weights the float32 path uses)."""

    def __init__(self, model):
        config, inner = model.config, model.model
        device = inner.embed_tokens.weight.device.type
        low = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
        self.cache_dtype = low or inner.embed_tokens.weight.dtype
        self.model = model
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        self.groups = self.num_heads // self.num_kv_heads
        self.embed = inner.embed_tokens.weight
        self.final_norm = _rms_weight_eps(inner.norm)
        self.w_lm, self.b_lm = _as(model.lm_head.weight, low), _as(model.lm_head.bias, low)
        self.lm_head = packed_linear(self.w_lm, self.b_lm)
        self.layers = [_Layer(layer, low) for layer in inner.layers[: config.num_hidden_layers]]


# Sharing the prompt's keys/values among its k samples costs ~10 small ops per layer and step and saves
# reading (k - 1) copies of the prompt. Measured on 2 cores (default model, 64 prompts, k = 8, 64 new
# tokens), shared vs copied: 9-token prompts 0.535 vs 0.493 s, 16 tokens 0.500 vs 0.483, 32 tokens 0.537 vs
# 0.572, 64 tokens 0.587 vs 0.710; so prompts are shared from 128 saved slots (16 tokens x 7 copies) up.
# A heuristic from one model (hidden 96, head_dim 24, no GQA): wider heads favour sharing earlier.
SHARE_MIN_SAVED_SLOTS = 128


class LlamaStyleDecoder:
    """Backend for fast.py's decode loop: prefill(...) -> logits, step(tokens) -> logits, select(rows),
    split(bounds). Rows are the (prompt, sample) pairs of the batch, in that order; finished rows leave.

    Each row has its own cache (``keys``/``values``, with an additive ``mask``). A long prompt is kept once
    (``prompt_keys``/``prompt_values``) and its k rows attend to it as one matmul; a short one is copied into
    every row's cache (see SHARE_MIN_SAVED_SLOTS).
    """

    def __init__(self, model, chunk: int = 16):
        self.weights = model if isinstance(model, DecoderWeights) else DecoderWeights(model)
        # torch runs a bmm whose rows x cols x contraction is under 400 with a slow scalar loop (2-3x slower
        # here): the cache grows by enough slots to stay above it.
        self.chunk = max(chunk, -(-400 // (self.weights.head_dim * self.weights.groups)))
        self.keys: list[torch.Tensor] = []  # per layer: (rows, kv_heads, capacity, head_dim)
        self.values: list[torch.Tensor] = []
        self.prompt_keys: list[torch.Tensor] = []  # per layer when shared: (prompts * kv_heads, width, head_dim)
        self.prompt_values: list[torch.Tensor] = []

    # -- prefill ------------------------------------------------------------------------------------------
    def prefill(self, input_ids, attention_mask, num_generations: int, max_new_tokens: int) -> torch.Tensor:
        from transformers import DynamicCache

        w, model = self.weights, self.weights.model
        prompts, width = input_ids.shape
        k, dtype, device, kv_heads = num_generations, w.cache_dtype, input_ids.device, w.num_kv_heads
        cache = DynamicCache(config=model.config)
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        out = model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            **cache_kwargs(model, cache), use_cache=True, logits_to_keep=1,
        )
        real = attention_mask.bool()
        share = width * (k - 1) >= SHARE_MIN_SAVED_SLOTS
        own = 0 if share else width  # prompt slots at the start of every row's own cache
        self.max_len, self.cur = own + max_new_tokens, own  # self.cur: next slot to write
        self.capacity = min(own + self.chunk, self.max_len)
        shape = (prompts, k, kv_heads, self.capacity, w.head_dim)
        stores = ((self.keys, self.prompt_keys), (self.values, self.prompt_values))
        for cache_layer in cache.layers[: len(w.layers)]:
            for (own_store, shared_store), kv in zip(stores, (cache_layer.keys, cache_layer.values)):
                kv = torch.where(real[:, None, :, None], kv, 0).to(dtype)  # HF may leave NaN in padded slots
                own_cache = torch.zeros(shape, dtype=dtype, device=device)
                if share:
                    shared_store.append(kv.reshape(prompts * kv_heads, width, w.head_dim))
                else:
                    own_cache[:, :, :, :width] = kv[:, None]  # k-fold copy
                own_store.append(own_cache.view(prompts * k, *shape[2:]))
        # Additive masks, per kv head so that they reshape to bmm's batch for free.
        mask = torch.full((prompts, self.capacity), float("-inf"), dtype=dtype, device=device)
        mask[:, :own].masked_fill_(real[:, :own], 0.0)
        self.mask = mask.repeat_interleave(k, 0)[:, None, None, :].repeat(1, kv_heads, 1, 1).contiguous()
        if share:
            pad = torch.zeros((prompts, 1, width), dtype=dtype, device=device)
            pad.masked_fill_(~real[:, None], float("-inf"))
            self.prompt_mask = pad.repeat_interleave(kv_heads, dim=0)  # (prompts * kv_heads, 1, width)
        self.k, self.num_prompts = k, prompts
        self.prompt_of = torch.arange(prompts, device=device).repeat_interleave(k)  # (N,) per row
        self.sample_of = torch.arange(k, device=device).repeat(prompts)
        self.positions = real.sum(-1).repeat_interleave(k)  # (N,) RoPE position of the next token
        rope_positions = torch.arange(width + max_new_tokens, device=device)[None]
        cos, sin = model.model.rotary_emb(w.embed[:1], rope_positions)  # (1, width + max_new, head_dim)
        self.cos, self.sin = cos[0], sin[0]
        return out.logits[:, -1].repeat_interleave(k, dim=0)

    def split(self, bounds: list[int]) -> list[LlamaStyleDecoder]:
        """Decoders for the row blocks [bounds[i], bounds[i + 1]) (whole prompts): views of this cache, so no
        copy; each writes only its own rows, and any reallocation gives it its own tensors. This decoder lets
        go of the cache, so that its memory is freed once every part has reallocated."""
        parts, heads = [], self.weights.num_kv_heads
        for start, end in zip(bounds[:-1], bounds[1:]):
            first, last = start // self.k, end // self.k
            part = LlamaStyleDecoder(self.weights, self.chunk)
            part.keys = [t[start:end] for t in self.keys]
            part.values = [t[start:end] for t in self.values]
            part.mask = self.mask[start:end]
            if self.prompt_keys:
                part.prompt_keys = [t[first * heads : last * heads] for t in self.prompt_keys]
                part.prompt_values = [t[first * heads : last * heads] for t in self.prompt_values]
                part.prompt_mask = self.prompt_mask[first * heads : last * heads]
            part.k, part.num_prompts = self.k, last - first
            part.prompt_of, part.sample_of = self.prompt_of[start:end] - first, self.sample_of[start:end]
            part.positions = self.positions[start:end]
            part.max_len, part.cur, part.capacity = self.max_len, self.cur, self.capacity
            part.cos, part.sin = self.cos, self.sin
            parts.append(part)
        self.prompt_keys, self.prompt_values, self.keys, self.values = [], [], [], []
        self.mask = self.positions = None
        return parts

    # -- cache management ---------------------------------------------------------------------------------
    def needs_growth(self) -> bool:
        return self.cur >= self.capacity

    def select(self, rows: torch.Tensor | None) -> None:
        """Reallocate the rows' caches with room for `chunk` more tokens, keeping only `rows` (None: all);
        prompts left without rows leave the shared prompt cache."""
        capacity = min(self.cur + self.chunk, self.max_len)

        def moved(old: torch.Tensor, dim: int, fill: float) -> torch.Tensor:
            """`old` with `rows` kept and its slot dimension `dim` resized to `capacity`."""
            old = old if rows is None else old.index_select(0, rows)
            shape = list(old.shape)
            shape[dim] = capacity
            new = old.new_empty(shape)  # filling all of it would double the memory traffic of a resize
            new.narrow(dim, 0, self.cur).copy_(old.narrow(dim, 0, self.cur))
            new.narrow(dim, self.cur, capacity - self.cur).fill_(fill)  # unwritten slots must not be NaN
            return new

        # keys/values: (n, kv_heads, capacity, head_dim)
        self.keys = [moved(t, 2, 0.0) for t in self.keys]
        self.values = [moved(t, 2, 0.0) for t in self.values]
        self.mask = moved(self.mask, 3, float("-inf"))  # (n, kv_heads, 1, capacity)
        self.capacity = capacity
        if rows is None:
            return
        self.positions, self.sample_of = self.positions[rows], self.sample_of[rows]
        self.prompt_of = self.prompt_of[rows]
        if not self.prompt_keys:
            return  # prompts copied into the rows: nothing per prompt to keep
        alive = torch.unique(self.prompt_of)  # sorted
        if alive.numel() < self.num_prompts:
            heads = self.weights.num_kv_heads
            kept = (alive[:, None] * heads + torch.arange(heads, device=alive.device)).flatten()
            self.prompt_keys = [t.index_select(0, kept) for t in self.prompt_keys]
            self.prompt_values = [t.index_select(0, kept) for t in self.prompt_values]
            self.prompt_mask = self.prompt_mask.index_select(0, kept)
            self.prompt_of = torch.searchsorted(alive, self.prompt_of)
            self.num_prompts = alive.numel()

    # -- shared prompt: the k rows of a prompt attend to its keys/values as one matmul ----------------------
    def _by_prompt(self, t: torch.Tensor, dense: bool) -> torch.Tensor:
        """(rows, kv_heads, g, X) -> (prompts * kv_heads, k * g, X): a prompt's rows become the query rows of
        one matmul over its cache, as GQA's heads do. Missing (finished) rows are zeros."""
        rows, heads, g, width = t.shape
        if dense:
            t = t.view(self.num_prompts, self.k, heads, g, width).transpose(1, 2)
            return t.reshape(self.num_prompts * heads, self.k * g, width)
        full = t.new_zeros((self.num_prompts, heads, self.k, g, width))
        full[self.prompt_of, :, self.sample_of] = t  # indices around a slice: rows index the leading dim
        return full.view(self.num_prompts * heads, self.k * g, width)

    def _by_row(self, t: torch.Tensor, dense: bool) -> torch.Tensor:
        """The inverse of _by_prompt: (prompts * kv_heads, k * g, X) -> (rows * kv_heads, g, X)."""
        heads, width = t.shape[0] // self.num_prompts, t.shape[-1]
        g = t.shape[1] // self.k
        t = t.view(self.num_prompts, heads, self.k, g, width)
        t = t.transpose(1, 2) if dense else t[self.prompt_of, :, self.sample_of]  # (rows, heads, g, X) either way
        return t.reshape(-1, g, width)

    # -- one decode step ----------------------------------------------------------------------------------
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.cur >= self.capacity:
            self.select(None)
        w = self.weights
        n, slot, capacity = tokens.shape[0], self.cur, self.capacity
        heads, kv_heads, dim, groups = w.num_heads, w.num_kv_heads, w.head_dim, w.groups
        q_width = heads * dim
        dense = n == self.num_prompts * self.k  # every (prompt, sample) row present, in order
        self.mask[..., slot] = 0.0
        mask = self.mask.view(n * kv_heads, 1, capacity)
        cos = self.cos.index_select(0, self.positions)[:, None, :]  # (n, 1, head_dim)
        sin = self.sin.index_select(0, self.positions)[:, None, :]
        x = F.embedding(tokens, w.embed)  # (n, hidden)
        shared = zip(self.prompt_keys, self.prompt_values) if self.prompt_keys else [(None, None)] * len(w.layers)
        for layer, keys, values, (prompt_keys, prompt_values) in zip(w.layers, self.keys, self.values, shared):
            qkv = layer.qkv(_rms(x, layer.ln1))
            qk = qkv[:, : q_width + kv_heads * dim].view(n, heads + kv_heads, dim)
            if layer.q_norm is not None:
                qk = torch.cat([_rms(qk[:, :heads], layer.q_norm), _rms(qk[:, heads:], layer.k_norm)], dim=1)
            qk = qk * cos + _rotate_half(qk) * sin
            keys[:, :, slot] = qk[:, heads:]
            values[:, :, slot] = qkv[:, q_width + kv_heads * dim :].view(n, kv_heads, dim)
            # Heads sharing a kv head become rows of one matmul (GQA without repeating the cache).
            q = qk[:, :heads].reshape(n * kv_heads, groups, dim)
            scores = torch.baddbmm(mask, q, keys.view(n * kv_heads, capacity, dim).transpose(1, 2),
                                   alpha=layer.scaling)
            width = 0 if prompt_keys is None else prompt_keys.shape[1]
            if width:
                by_prompt = self._by_prompt(q.view(n, kv_heads, groups, dim), dense)
                on_prompt = torch.baddbmm(self.prompt_mask, by_prompt, prompt_keys.transpose(1, 2),
                                          alpha=layer.scaling)
                scores = torch.cat([self._by_row(on_prompt, dense), scores], dim=-1)
            probs = scores.softmax(dim=-1, dtype=torch.float32).to(q.dtype)  # (n * kv_heads, g, width + capacity)
            attn = torch.bmm(probs[..., width:], values.view(n * kv_heads, capacity, dim))
            if width:
                on_prompt = self._by_prompt(probs[..., :width].reshape(n, kv_heads, groups, width), dense)
                attn = attn + self._by_row(torch.bmm(on_prompt, prompt_values), dense)
            x = x + layer.o(attn.view(n, q_width))
            gate_up = layer.gate_up(_rms(x, layer.ln2))
            gate, up = gate_up.chunk(2, dim=-1)
            x = x + layer.down(layer.act(gate) * up)
        self.cur += 1
        self.positions = self.positions + 1
        return w.lm_head(_rms(x, w.final_norm))
