"""vLLM engine: a separate vLLM copy of the policy, refreshed with ``sync_weights(model)`` after each update.

Colocated, in-process (one GPU shared with training), as TRL's colocate mode. The code follows vLLM's
and TRL's documented APIs:
- ``logprobs_mode="processed_logprobs"``: log-probs after temperature (and after top-k / top-p when set).
  behavior_logps are those of the temperature-scaled, untruncated policy (see ``rollout.base``): exactly
  vLLM's without top-k / top-p; with them, they are recomputed by teacher forcing on the live model.
- weights go through the model's own ``load_weights`` (it maps HF names to vLLM's fused layers), called
  in-process when the engine core lives in this process, else through ``LLM.apply_model`` (which pickles the
  weights to the worker: correct but slow, vLLM recommends a data-plane for large models). A LoRA (peft)
  policy is sent as merged base weights under the base model's names (``serving_weights``).
"""

from __future__ import annotations

import os

import torch

from gvpo.rollout.base import Engine, is_truncated


def _import_vllm():
    try:
        import vllm
    except ImportError as err:
        raise ImportError("the vLLM rollout engine needs vllm: `pip install gvpo[vllm]` (needs a CUDA GPU)") from err
    return vllm


class VLLMEngine(Engine):
    """Args:
        model: the live HF model; its weights are copied into vLLM now and at every ``sync_weights``.
        model_path: what vLLM loads the architecture/config from; default ``model.name_or_path``.
        **llm_kwargs: passed to ``vllm.LLM`` (e.g. gpu_memory_utilization, max_model_len, enable_sleep_mode).
    """

    name = "vllm"

    def __init__(self, model, tokenizer, *, model_path: str | None = None, eos_token_ids=None, autocast_dtype=None,
                 **llm_kwargs):
        vllm = _import_vllm()
        # autocast_dtype is not used: vLLM computes in its own dtype (``dtype=`` below, or in llm_kwargs).
        super().__init__(model, tokenizer, eos_token_ids)
        path = model_path or getattr(model, "name_or_path", None)
        if not path:
            raise ValueError("VLLMEngine needs model_path= (a local folder or hub id with the model's config)")
        # In-process engine core, so that sync_weights can reach the model without pickling tensors.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        settings = dict(
            model=path,
            dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
            gpu_memory_utilization=0.3,
            enable_prefix_caching=True,  # the k samples of a prompt share its prefill
            logprobs_mode="processed_logprobs",
            seed=0,
        )
        settings.update(llm_kwargs)
        self.llm = vllm.LLM(**settings)
        self._sampling_params_cls = vllm.SamplingParams
        self.sync_weights(model)

    def sync_weights(self, model) -> None:
        """Copy the live model's weights into vLLM and drop cached prefixes computed with the old weights."""
        weights = serving_weights(model)
        runner_model = self._local_model()
        if runner_model is not None:
            runner_model.load_weights(weights)
        else:
            cpu_weights = [(name, tensor.cpu()) for name, tensor in weights]
            self.llm.apply_model(lambda vllm_model: vllm_model.load_weights(cpu_weights))
        self.llm.reset_prefix_cache()

    def _local_model(self):
        """The vLLM model object when it lives in this process (paths differ across vLLM versions)."""
        executor = getattr(self.llm.llm_engine, "model_executor", None)
        worker = getattr(executor, "driver_worker", None)
        for path in (("worker", "model_runner", "model"), ("model_runner", "model")):
            obj = worker
            for attr in path:
                obj = getattr(obj, attr, None)
            if obj is not None and hasattr(obj, "load_weights"):
                return obj
        return None

    def _sample(self, prompt_ids, num_generations, params, generator, seeds):
        seed = None
        if generator is not None:  # drawn on the generator's device: the trainer's is a CUDA one on a GPU
            seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator, device=generator.device))
        if seeds is not None:  # vLLM seeds requests, not prompts; one seed per call keeps runs reproducible
            seed = int(seeds[0]) % (2**31 - 1)
        sampling = self._sampling_params_cls(
            n=num_generations,
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=params.top_k if params.top_k > 0 else -1,
            max_tokens=params.max_new_tokens,
            logprobs=0,  # only the sampled token's log-prob
            seed=seed,
            stop_token_ids=list(self.eos_token_ids),
            ignore_eos=not self.eos_token_ids,
            # Stop strings are applied by the base class on token ids, the same way for every engine.
        )
        outputs = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompt_ids], sampling, use_tqdm=False)
        rows = [sample for request in outputs for sample in sorted(request.outputs, key=lambda s: s.index)]
        width = max(1, max(len(s.token_ids) for s in rows))
        ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        logps = torch.zeros((len(rows), width), dtype=torch.float32)
        lengths = torch.zeros(len(rows), dtype=torch.long)
        for row, sample in enumerate(rows):
            tokens = list(sample.token_ids)
            ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
            logps[row, : len(tokens)] = torch.tensor(
                [step[token].logprob for step, token in zip(sample.logprobs, tokens)], dtype=torch.float32
            )
            lengths[row] = len(tokens)
        if is_truncated(params):  # vLLM's log-probs are of the truncated distribution: take the policy's
            logps = _teacher_forced_logps(self.model, prompt_ids, num_generations, ids, lengths, params.temperature,
                                          self.pad_token_id)
        return ids, logps, lengths, {}


@torch.no_grad()
def _teacher_forced_logps(model, prompt_ids, num_generations, ids, lengths, temperature, pad_token_id):
    """(N, T) log-probs of the sampled tokens under the live model at ``temperature`` (no top-k / top-p)."""
    from gvpo.modeling import build_sequences, token_logps

    device = next(model.parameters()).device
    mask = (torch.arange(ids.shape[1])[None, :] < lengths[:, None]).long()
    prompt_index = torch.arange(len(prompt_ids)).repeat_interleave(num_generations)
    seq = build_sequences(prompt_ids, ids.to(device), mask.to(device), prompt_index, pad_token_id)
    return token_logps(model, *seq, ids.shape[1], temperature).float().cpu() * mask


@torch.no_grad()
def serving_weights(model) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs for a serving engine, under the base model's names.

    A plain model: its state_dict. A peft LoRA model: every adapted weight merged, W + scaling * B @ A (peft's
    own ``get_delta_weight``, which handles fan-in/fan-out and scaling), the adapter tensors left out, and
    peft's ``base_layer`` / ``modules_to_save`` names mapped back, all without changing the training model
    (``merge_and_unload`` would modify it in place)."""
    from gvpo.old_policy import _is_peft  # one test of "is this a peft model" for the whole package

    model = getattr(model, "module", model)  # DDP / accelerate wrappers
    if not _is_peft(model):
        return [(name, tensor.detach()) for name, tensor in model.state_dict().items()]
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model()
    merged = {}
    for name, module in base.named_modules():
        if isinstance(module, LoraLayer):
            weight = module.get_base_layer().weight.detach()
            for adapter in module.active_adapters:
                if adapter in module.lora_A or adapter in getattr(module, "lora_embedding_A", {}):
                    weight = weight + module.get_delta_weight(adapter).to(weight.dtype)
            merged[f"{name}.weight"] = weight
    out = []
    for name, tensor in base.state_dict().items():
        if "lora_" in name or ".original_module." in name:
            continue
        name = name.replace(".base_layer.", ".")
        for adapter in model.peft_config:
            name = name.replace(f".modules_to_save.{adapter}.", ".")
        out.append((name, merged.get(name, tensor.detach())))
    return out
