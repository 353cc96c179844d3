"""A reward model as a reward function, scored the way TRL 1.16's GRPOTrainer scores one.

TRL loads a string in ``reward_funcs`` with ``AutoModelForSequenceClassification.from_pretrained(path,
num_labels=1)`` and its tokenizer, sets the model's pad token id to the tokenizer's (the model reads the score
at the last non-pad token), and scores ``prompt + completion`` (for conversational data: the chat template
applied to the prompt messages followed by the completion message) tokenized without special tokens, right
padded; the reward is ``logits[:, 0]``.
"""

from __future__ import annotations

from pathlib import Path

import torch


class RewardModel:
    """``RewardModel.load(path)(prompts=..., completions=...) -> list[float]``; ``__name__`` is the model's name."""

    def __init__(self, model, tokenizer, name: str | None = None, batch_size: int = 64):
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "right"
        config = model.config
        (config.get_text_config() if hasattr(config, "get_text_config") else config).pad_token_id = \
            tokenizer.pad_token_id
        self.model, self.tokenizer, self.batch_size = model.eval(), tokenizer, batch_size
        source = str(getattr(config, "_name_or_path", "") or type(model).__name__)
        self.__name__ = name or source.rstrip("/").split("/")[-1]

    @classmethod
    def load(cls, path: str, trust_remote_code: bool = False) -> "RewardModel":
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        local = Path(path).expanduser()
        source = str(local) if local.is_dir() else path
        try:
            tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
            model = AutoModelForSequenceClassification.from_pretrained(source, num_labels=1,
                                                                       trust_remote_code=trust_remote_code)
        except OSError as e:
            where = "this folder" if local.is_dir() else "no such local folder, and the Hugging Face hub"
            raise ValueError(f"reward_funcs: cannot load reward model {path!r} ({where}: "
                             f"{str(e).splitlines()[0]}); pass the folder of an AutoModelForSequenceClassification "
                             f"checkpoint") from e
        return cls(model, tokenizer, Path(path.rstrip("/")).name)

    @classmethod
    def from_model(cls, model) -> "RewardModel":
        """A loaded sequence-classification model, with the tokenizer of its checkpoint (as TRL does)."""
        from transformers import AutoTokenizer

        return cls(model, AutoTokenizer.from_pretrained(model.config._name_or_path))

    def to(self, device) -> "RewardModel":
        self.model.to(device)
        return self

    def texts(self, prompts: list, completions: list) -> list[str]:
        if prompts and isinstance(prompts[0], list):  # conversational: one chat of prompt + completion messages
            return [self.tokenizer.apply_chat_template(p + c, tokenize=False) for p, c in zip(prompts, completions)]
        return [p + c for p, c in zip(prompts, completions)]

    @torch.inference_mode()
    def __call__(self, prompts=None, completions=None, **kwargs) -> list[float]:
        texts = self.texts(list(prompts), list(completions))
        device = next(self.model.parameters()).device
        scores: list[float] = []
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(texts[start:start + self.batch_size], return_tensors="pt", padding=True,
                                   add_special_tokens=False)
            scores += self.model(input_ids=batch["input_ids"].to(device),
                                 attention_mask=batch["attention_mask"].to(device)).logits[:, 0].float().tolist()
        return scores
