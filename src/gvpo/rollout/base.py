"""Helpers shared by the rollout engines: the sampling distribution, padding, stop strings, the Rollout record.

Every engine samples from the distribution defined by ``processed_logps`` (temperature, top-k, top-p) and
reports ``behavior_logps``: the sampled token's log-prob under the *temperature-scaled, untruncated* policy
(``policy_logps``), the same distribution whose log-probs the trainer computes by teacher forcing
(``modeling.token_logps``). Why not the truncated one: the loss differentiates log pi_theta over the whole
vocabulary, so a ratio pi_theta / pi_behaviour (GRPO's clip, GVPO's ``old_policy=behaviour``) must compare two
log-probs of one distribution; it is then exactly 1 on fresh samples, as in TRL, which also computes its
old log-probs by teacher forcing without top-k / top-p. Truncation only decides which tokens get sampled.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence

import torch

from gvpo.types import Rollout, SamplingParams, left_pad  # noqa: F401 (left_pad: the engines' padding)


def processed_logps(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Log-probs of the distribution sampled from: temperature, then top-k, then top-p (HF generate's order).

    logits (N, V) -> (N, V) float32. Filtered tokens get -inf. At temperature 0 (greedy) the raw log-softmax
    is returned: greedy decoding samples from no distribution, and the raw model log-prob is the useful number.
    Ties follow transformers' TopK/TopP warpers: top-k keeps every token tied with the k-th; top-p keeps the
    smallest set of most likely tokens whose mass reaches top_p (the token that crosses it included).
    """
    logits = logits.float()
    if params.temperature == 0:
        return torch.log_softmax(logits, dim=-1)
    if params.temperature != 1.0:
        logits = logits / params.temperature
    if 0 < params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1)  # ascending
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = cum <= 1 - params.top_p
        drop_sorted[..., -1] = False  # always keep the most likely token
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return torch.log_softmax(logits, dim=-1)


def policy_logps(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Log-probs of the policy behind ``behavior_logps``: the temperature-scaled softmax, no top-k / top-p.

    logits (N, V) -> (N, V) float32. At temperature 0 the raw log-softmax (greedy has no distribution)."""
    logits = logits.float()
    if params.temperature not in (0.0, 1.0):
        logits = logits / params.temperature
    return torch.log_softmax(logits, dim=-1)


def is_truncated(params: SamplingParams) -> bool:
    """Whether top-k / top-p make the sampled distribution differ from ``policy_logps``."""
    return params.temperature > 0 and (params.top_k > 0 or params.top_p < 1.0)


def sample_tokens(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None,
    uniforms: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row: (tokens (N,) long, behavior_logps (N,) float32), the token drawn from
    ``processed_logps`` and its log-prob under ``policy_logps`` (see the module docstring for why).

    Sampling is by inverse CDF from one uniform per row: the given ``uniforms`` (N,) in [0, 1) (then a row's
    token depends only on its own noise, not on which other rows share the batch), else drawn from
    ``generator``. Why not ``torch.multinomial``: on CPU it draws one exponential variate per vocabulary entry,
    which took a quarter of a whole rollout's time on the default model; this draws N numbers.
    """
    if params.temperature == 0:
        logps = torch.log_softmax(logits.float(), dim=-1)
        tokens = logps.argmax(dim=-1)
        return tokens, logps.gather(-1, tokens[:, None]).squeeze(-1)
    if uniforms is None:
        uniforms = torch.rand(logits.shape[0], generator=generator, device=generator.device if generator else None)
    if is_truncated(params):
        tokens, _ = inverse_cdf(processed_logps(logits, params).exp(), uniforms)
        return tokens, policy_logps(logits, params).gather(-1, tokens[:, None]).squeeze(-1)
    # Untruncated (the RL default): the weights exp(z - max z) are the softmax up to its sum, so one exp pass
    # replaces log_softmax + exp, and the token's log-prob is z - max z - log(sum) (what log_softmax computes).
    z = logits.float()
    top = z.amax(dim=-1, keepdim=True)
    scaled = (z - top).mul_(1.0 / params.temperature)  # (z - max z) / T: the max of z / T is max z / T
    tokens, total = inverse_cdf(scaled.exp(), uniforms)
    return tokens, scaled.gather(-1, tokens[:, None]).squeeze(-1) - total.log().float()


INVERSE_CDF_BLOCK = 256  # vocabulary entries per block of the two-level search (a power of two near sqrt(V))


def inverse_cdf(weights: torch.Tensor, uniforms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the first token whose cumulative weight exceeds u * (sum of weights): an exact draw from
    weights / sum. weights (N, V) >= 0, float32; uniforms (N,) in [0, 1). Returns (tokens (N,), sums (N,) float64).

    Two levels: block sums, a cumulative sum over the blocks to find the block, then one over that block's
    entries only. A cumulative sum over the whole vocabulary (written in float64: a float32 parallel scan on
    CUDA can step up by a rounding error at a zero-weight token) took 7% of a rollout on a 49k vocabulary.
    Zero-weight tokens are never drawn: "exceeds" skips them, and a rounding overshoot at the end of a block
    falls back to the block's last token of positive weight.
    """
    rows, vocab = weights.shape
    block = min(INVERSE_CDF_BLOCK, vocab)
    full = vocab // block
    # Block sums in float32 (a float64 sum converts the whole tensor first), accumulated in float64.
    sums = weights[:, : full * block].reshape(rows, full, block).sum(-1)
    if full * block < vocab:  # a last, shorter block
        sums = torch.cat([sums, weights[:, full * block:].sum(-1, keepdim=True)], dim=-1)
    block_cdf = sums.cumsum(dim=-1, dtype=torch.float64)
    total = block_cdf[:, -1]
    target = uniforms.to(device=weights.device, dtype=torch.float64) * total
    # right=True: the first block whose cumulative mass exceeds the target (never one of zero mass).
    b = torch.searchsorted(block_cdf, target[:, None], right=True).squeeze(-1)
    b = torch.minimum(b, _last_positive(sums))  # u * total rounded up to total
    start = b * block
    index = start[:, None] + torch.arange(block, device=weights.device)  # the block's tokens (past V: none)
    inside = weights.gather(1, index.clamp(max=vocab - 1)).masked_fill(index >= vocab, 0.0)
    before = torch.where(b > 0, block_cdf.gather(1, (b - 1).clamp(min=0)[:, None]).squeeze(-1), 0.0)
    local = torch.searchsorted(inside.cumsum(dim=-1, dtype=torch.float64), (target - before)[:, None],
                               right=True).squeeze(-1)
    local = torch.minimum(local, _last_positive(inside))  # block sums and in-block sums round differently
    return start + local, total


def _last_positive(weights: torch.Tensor) -> torch.Tensor:
    """(N,) index of each row's last entry > 0 (0 for a row of zeros)."""
    positions = torch.arange(weights.shape[-1], device=weights.device)
    return torch.where(weights > 0, positions, 0).amax(dim=-1)


def row_uniforms(seeds, num_generations: int, max_new_tokens: int, device) -> torch.Tensor:
    """(P * k, T) sampling noise: prompt p's k rows come from ``seeds[p]`` alone (batch-independent streams)."""
    noise = [torch.rand((num_generations, max_new_tokens), generator=torch.Generator().manual_seed(int(s)))
             for s in seeds]
    return torch.cat(noise).to(device)


def special_token_ids(model, tokenizer) -> tuple[tuple[int, ...], int]:
    """(eos_token_ids, pad_token_id). EOS ids are the union of the generation config's, the tokenizer's and the
    chat template's end-of-turn token (chat models often stop on several ids, e.g. Qwen's <|im_end|> and
    <|endoftext|>; a base model's tokenizer may name <|endoftext|> while its template ends turns with <|im_end|>)."""
    eos: list[int] = []
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (gen_eos, getattr(tokenizer, "eos_token_id", None), chat_end_token_id(tokenizer)):
        for token in [value] if isinstance(value, int) else (value or []):
            if token is not None and token not in eos:
                eos.append(int(token))
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        pad = eos[0] if eos else 0
    return tuple(eos), int(pad)


_MARKER = "GVPO_END_OF_TURN_PROBE"


def chat_end_token_id(tokenizer) -> int | None:
    """The special token the chat template writes right after an assistant message (SmolLM2's and Qwen's
    <|im_end|>), or None: no template, a template that puts plain text there, or one that cannot render a
    user/assistant exchange."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        return None
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "assistant",
                                              "content": _MARKER}], tokenize=False)
    except Exception:  # templates may insist on roles, tools, ...: then only the declared EOS ids stop generation
        return None
    if not isinstance(text, str) or _MARKER not in text:
        return None
    after = text.split(_MARKER, 1)[1]
    ids = tokenizer.encode(after, add_special_tokens=False) if after else []
    special = set(getattr(tokenizer, "all_special_ids", ()) or ()) | {
        i for i, t in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items() if getattr(t, "special", False)}
    return int(ids[0]) if ids and ids[0] in special else None


def clipped_rows(rollout, max_new_tokens: int, eos_token_ids, tokenizer=None, stop_strings=()) -> torch.Tensor:
    """(N,) bool: completions cut by the token budget, i.e. ``max_new_tokens`` long and not ended by an EOS id or a
    stop string (TRL's ``completions/clipped_ratio`` counts the same). A high share means the budget, not the
    model, ends the answers: their rewards then judge unfinished text."""
    lengths = rollout.completion_mask.sum(-1)  # (N,)
    last = rollout.completion_ids.gather(1, (lengths - 1).clamp(min=0)[:, None]).squeeze(1)
    eos = torch.tensor(list(eos_token_ids), dtype=torch.long, device=last.device)
    out = (lengths >= max_new_tokens) & ~torch.isin(last, eos)
    if stop_strings and tokenizer is not None:
        for row in out.nonzero().flatten().tolist():
            text = tokenizer.decode(rollout.completion_ids[row, : int(lengths[row])].tolist())
            out[row] = not any(text.endswith(s) for s in stop_strings)
    return out


def stop_string_cut(token_ids: Sequence[int], tokenizer, stop_strings: Sequence[str]) -> int | None:
    """Number of tokens to keep so that the completion ends right after its first stop string; None if none occurs.

    The cut is the shortest token prefix whose decoded text contains a stop string (binary search: decoding
    a longer prefix never removes text). A stop string split across tokens ends the completion at the token
    that completes it.
    """
    if not stop_strings or not token_ids:
        return None

    def hit(n: int) -> bool:
        text = tokenizer.decode(list(token_ids[:n]), skip_special_tokens=True)
        return any(s in text for s in stop_strings)

    if not hit(len(token_ids)):
        return None
    lo, hi = 1, len(token_ids)
    while lo < hi:
        mid = (lo + hi) // 2
        if hit(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo


def build_rollout(
    completion_ids: torch.Tensor,
    behavior_logps: torch.Tensor,
    lengths: torch.Tensor,
    num_generations: int,
    pad_token_id: int,
    tokenizer=None,
    stop_strings: Sequence[str] = (),
    extra: dict | None = None,
) -> Rollout:
    """Assemble a Rollout (on the device of the inputs) from raw engine output, applying stop strings and
    cleaning everything past each end.

    completion_ids (N, T) long and behavior_logps (N, T) may hold anything after ``lengths`` (N,) (tokens
    sampled after EOS by rows that had not left the batch yet); they become pad / 0 here.
    """
    lengths = lengths.clone().long()
    if stop_strings:
        if tokenizer is None:
            raise ValueError("stop_strings need a tokenizer: pass the tokenizer to the engine")
        for row in range(completion_ids.shape[0]):
            n = int(lengths[row])
            cut = stop_string_cut(completion_ids[row, :n].tolist(), tokenizer, stop_strings)
            if cut is not None:
                lengths[row] = cut
    width = max(int(lengths.max()), 1) if lengths.numel() else 1
    mask = (torch.arange(width, device=lengths.device)[None, :] < lengths[:, None]).long()  # (N, T)
    ids = completion_ids[:, :width].masked_fill(mask == 0, pad_token_id)
    logps = behavior_logps[:, :width].float().masked_fill(mask == 0, 0.0)
    num_prompts = completion_ids.shape[0] // num_generations
    prompt_index = torch.arange(num_prompts, device=lengths.device).repeat_interleave(num_generations)
    return Rollout(ids, mask, logps, prompt_index, extra=dict(extra or {}))


def validate_request(prompt_ids, num_generations: int, params: SamplingParams, tokenizer=None) -> None:
    """Fail early with a message that says how to fix the call."""
    if num_generations < 1:
        raise ValueError(f"num_generations={num_generations}: must be >= 1")
    if not isinstance(params, SamplingParams):
        raise TypeError(f"params must be a gvpo.types.SamplingParams, got {type(params).__name__}")
    if len(prompt_ids) == 0:
        raise ValueError("prompt_ids is empty: pass at least one prompt (a list of token ids)")
    if params.stop_strings and tokenizer is None:
        raise ValueError("params.stop_strings need a tokenizer: build the engine with the model's tokenizer")


class Engine:
    """What every rollout engine shares: the live model and tokenizer, its end-of-sequence and padding ids,
    ``generate`` (checks the request, switches dropout off, times the call, runs under autocast when asked and
    assembles the Rollout) and ``sync_weights`` (a no-op for engines that sample from the live model). An engine
    adds ``name`` and ``_sample``, its sampling alone.

    Args:
        eos_token_ids: ids that end a completion; default: the tokenizer's and generation config's EOS. Pass ()
            to always generate max_new_tokens.
        autocast_dtype: sample under ``torch.autocast(device, autocast_dtype)`` (``training.bf16``: generation in
            the training forward's precision, so behaviour log-probs match the trainer's to rounding); None: the
            caller's precision.
    """

    name = "engine"

    def __init__(self, model, tokenizer, eos_token_ids=None, autocast_dtype: torch.dtype | None = None):
        self.model, self.tokenizer, self.autocast_dtype = model, tokenizer, autocast_dtype
        default_eos, self.pad_token_id = special_token_ids(model, tokenizer)
        self.eos_token_ids = tuple(default_eos if eos_token_ids is None else eos_token_ids)

    def generate(
        self,
        prompt_ids: list[list[int]],
        num_generations: int,
        params: SamplingParams,
        generator: torch.Generator | None = None,
        seeds: list[int] | None = None,
    ) -> Rollout:
        """k = ``num_generations`` completions per prompt, rows prompt-major. ``seeds`` (one per prompt) make each
        prompt's samples independent of the rest of the batch where the engine can (the trainer uses them so
        that any number of processes samples the same completions); else ``generator``."""
        validate_request(prompt_ids, num_generations, params, self.tokenizer)
        if seeds is not None and len(seeds) != len(prompt_ids):
            raise ValueError(f"seeds: got {len(seeds)} for {len(prompt_ids)} prompts; pass one per prompt")
        start = time.perf_counter()
        was_training = self.model.training
        self.model.eval()  # dropout off: behavior_logps must describe the sampler exactly
        try:
            with self._precision():
                ids, logps, lengths, stats = self._sample(prompt_ids, num_generations, params, generator, seeds)
        finally:
            self.model.train(was_training)
        stats = {"engine": self.name, "num_tokens": int(lengths.sum()), **stats, "time_s": time.perf_counter() - start}
        return build_rollout(ids, logps, lengths, num_generations, self.pad_token_id, self.tokenizer,
                             params.stop_strings, stats)

    def _precision(self):
        """Autocast to ``autocast_dtype`` on the model's device; without one, the caller's (an autocast the caller
        has on stays on)."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(next(self.model.parameters()).device.type, dtype=self.autocast_dtype)

    def _sample(self, prompt_ids, num_generations: int, params: SamplingParams, generator, seeds):
        """(completion_ids (N, T), behavior_logps (N, T), lengths (N,), stats): N = prompts x k rows, anything
        past a row's length (``build_rollout`` blanks it and applies stop strings)."""
        raise NotImplementedError

    def sync_weights(self, model) -> None:
        """Nothing to copy: the engine samples from the live model, which the trainer updates in place."""
