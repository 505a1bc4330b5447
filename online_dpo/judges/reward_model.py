"""Reward-model judge: an AutoModelForSequenceClassification with one output.

Each prompt and response is formatted with the reward model's own chat
template (user turn, assistant turn) when it has one, else concatenated, and
scored in batches. The score is the model's single logit.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..specs import JudgeSpec
from ..types import Labels
from .base import compare_by_score, label_groups


class RewardModelJudge:
    def __init__(self, model: str, batch_size: int = 16, max_length: int = 1024,
                 device: str | None = None, margin: float = 0.0, dtype: str | None = None):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer = AutoTokenizer.from_pretrained(model)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        torch_dtype = getattr(torch, dtype) if dtype else (
            torch.bfloat16 if self.device.startswith("cuda") else torch.float32)
        self.model = AutoModelForSequenceClassification.from_pretrained(model, dtype=torch_dtype)
        if self.model.config.num_labels != 1:
            raise ValueError(f"judge.model {model} has {self.model.config.num_labels} outputs; "
                             "a reward model needs exactly one (num_labels=1)")
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.model.to(self.device).eval()
        self.batch_size, self.max_length, self.margin = batch_size, max_length, margin

    def format(self, prompt: str, response: str) -> str:
        if self.tokenizer.chat_template:
            return self.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}],
                tokenize=False)
        return prompt + response

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        import torch

        texts = [self.format(p, r) for p, r in zip(prompts, responses)]
        out: list[float] = []
        for i in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(texts[i:i + self.batch_size], return_tensors="pt", padding=True,
                                 truncation=True, max_length=self.max_length,
                                 add_special_tokens=not self.tokenizer.chat_template)
            with torch.no_grad():
                logits = self.model(**enc.to(self.device)).logits
            out.extend(logits[:, 0].float().cpu().tolist())
        return out

    def compare(self, prompts, a, b) -> list[float]:
        return compare_by_score(self, prompts, a, b, self.margin)

    def label(self, groups, margin: float) -> Labels:
        return label_groups(self, groups, margin)

    def objectives(self, prompts, responses) -> dict[str, float]:
        return {}


def build(spec: JudgeSpec) -> RewardModelJudge:
    from ..artifacts import local_model

    return RewardModelJudge(local_model(spec.model, spec.file_server), batch_size=spec.batch_size,
                            max_length=spec.max_length, margin=spec.margin)
