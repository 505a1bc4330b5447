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


def _chunk_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                    mask: torch.Tensor) -> torch.Tensor:
    logits = (hidden @ weight.t()).float()
    picked = torch.gather(logits, -1, targets.unsqueeze(-1)).squeeze(-1)
    return ((picked - torch.logsumexp(logits, dim=-1)) * mask).sum(-1)


def chunked_sequence_logprobs(hidden: torch.Tensor, head_weight: torch.Tensor, input_ids: torch.Tensor,
                              response_mask: torch.Tensor, chunk: int = 64, average: bool = False) -> torch.Tensor:
    """`sequence_logprobs` from the last hidden states, without the [B, T, V] logits.

    The LM head and log-softmax run over `chunk` positions at a time under
    activation checkpointing, so no chunk's logits are kept for backward, and
    positions before the first response token (prompts) are skipped."""
    from torch.utils.checkpoint import checkpoint

    targets, mask = input_ids[:, 1:], response_mask[:, 1:].to(torch.float32)
    hidden = hidden[:, :-1]
    active = mask.any(0).nonzero()
    first = int(active[0]) if len(active) else mask.shape[1]
    total = torch.zeros(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    for t0 in range(first - first % chunk, mask.shape[1], chunk):
        sl = slice(t0, t0 + chunk)
        if torch.is_grad_enabled():
            total = total + checkpoint(_chunk_logprobs, hidden[:, sl], head_weight, targets[:, sl], mask[:, sl],
                                       use_reentrant=False)
        else:
            total = total + _chunk_logprobs(hidden[:, sl], head_weight, targets[:, sl], mask[:, sl])
    if average:
        return total / mask.sum(-1).clamp(min=1.0)
    return total


class SequenceScorer(torch.nn.Module):
    """A causal LM that returns each sequence's response log-prob (the learner's forward).

    DDP or FSDP wrap this module, so their hooks see the whole computation.
    `chunk` None computes full logits (`sequence_logprobs`); an int computes the
    LM head in chunks of that many positions (`chunked_sequence_logprobs`)."""

    def __init__(self, lm, chunk: int | None = None):
        super().__init__()
        self.lm, self.chunk = lm, chunk

    def forward(self, input_ids, attention_mask, response_mask, average: bool = False):
        if self.chunk is None:
            logits = self.lm(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
            return sequence_logprobs(logits, input_ids, response_mask, average=average)
        hidden = self.lm.get_decoder()(input_ids=input_ids, attention_mask=attention_mask,
                                       use_cache=False).last_hidden_state
        return chunked_sequence_logprobs(hidden, self.lm.get_output_embeddings().weight, input_ids, response_mask,
                                         self.chunk, average)
