"""Token sequences for the learner: pack prompt+response ids, score responses.

Responses are the exact token ids the sampler produced (no re-tokenizing), so
the learner scores what vLLM sampled. Sequences are right-padded; the
response mask is 1 on response tokens only, so the prompt and the padding
never count. Imports torch only.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def pack(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pad_id: int):
    """Right-pad prompt+response pairs.

    Returns input_ids [B, T], attention_mask [B, T] and response_mask [B, T].
    """
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    lengths = [len(p) + len(r) for p, r in zip(prompts, responses)]
    width = max(lengths)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(prompts), width), dtype=torch.long)
    response = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        input_ids[i, :len(p) + len(r)] = torch.tensor(list(p) + list(r), dtype=torch.long)
        attention[i, :len(p) + len(r)] = 1
        response[i, len(p):len(p) + len(r)] = 1
    return input_ids, attention, response


def token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Log-prob of each next token: [B, T-1], position t scores input_ids[:, t+1]."""
    logits = logits[:, :-1].float()
    targets = input_ids[:, 1:].unsqueeze(-1)
    picked = torch.gather(logits, -1, targets).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def sequence_logprobs(logits: torch.Tensor, input_ids: torch.Tensor, response_mask: torch.Tensor,
                      average: bool = False) -> torch.Tensor:
    """Sum (or mean) of response-token log-probs per sequence: [B]."""
    mask = response_mask[:, 1:].to(torch.float32)
    total = (token_logprobs(logits, input_ids) * mask).sum(-1)
    if average:
        return total / mask.sum(-1).clamp(min=1.0)
    return total
