"""Token sequences for the learner: pack prompt+response ids, score responses.

Responses are the exact token ids the sampler produced (no re-tokenizing), so
the learner scores what vLLM sampled. Sequences are right-padded; the
response mask is 1 on response tokens only, so the prompt and the padding
never count. The scorer may run the model on the same sequences packed
several to a row (`Packing`), so that padding costs no compute; what it
returns is the same. Imports torch only.
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


def response_logprobs(hidden: torch.Tensor, head, input_ids: torch.Tensor, response_mask: torch.Tensor,
                      average: bool = False) -> torch.Tensor:
    """`sequence_logprobs` from the last hidden states, with the LM head (`head`, a module: a LoRA
    head keeps its adapter) run on the positions that predict a response token only."""
    mask = response_mask[:, 1:].bool()
    rows = mask.nonzero()[:, 0]
    logits = head(hidden[:, :-1][mask]).float()
    picked = logits.gather(-1, input_ids[:, 1:][mask].unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, -1)
    total = torch.zeros(hidden.shape[0], dtype=torch.float32, device=hidden.device).index_add(0, rows, picked)
    if average:
        return total / mask.sum(-1).clamp(min=1).float()
    return total


def liger_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-row -log softmax(hidden @ weight.T)[target] through Liger's fused linear cross-entropy
    (Triton, CUDA only): the logits exist one chunk of rows at a time and are recomputed in backward."""
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    return LigerFusedLinearCrossEntropyLoss(reduction="none", accum_dtype=torch.float32)(weight, hidden, targets)


def fused_sequence_logprobs(hidden: torch.Tensor, head_weight: torch.Tensor, input_ids: torch.Tensor,
                            response_mask: torch.Tensor, average: bool = False,
                            cross_entropy=liger_cross_entropy) -> torch.Tensor:
    """`sequence_logprobs` from the last hidden states through a fused linear cross-entropy.

    Only response positions are scored (prompts and padding never reach the
    LM head); under autocast both operands go in the autocast dtype, as the
    LM head's matmul would. `cross_entropy(hidden [N, H], weight [V, H],
    targets [N]) -> [N]` is the per-row negative log-likelihood."""
    mask = response_mask[:, 1:].bool()
    rows = mask.nonzero()[:, 0]
    x, targets = hidden[:, :-1][mask], input_ids[:, 1:][mask]
    if torch.is_autocast_enabled(x.device.type):
        kind = torch.get_autocast_dtype(x.device.type)
        x, head_weight = x.to(kind), head_weight.to(kind)
    nll = cross_entropy(x, head_weight, targets).float()
    total = torch.zeros(hidden.shape[0], dtype=torch.float32, device=hidden.device).index_add(0, rows, -nll)
    if average:
        return total / mask.sum(-1).clamp(min=1).float()
    return total


def use_liger_kernels(lm) -> None:
    """Swap a causal LM's RMSNorm, SwiGLU MLP and rotary embedding for Liger's fused Triton kernels
    (CUDA only), in place; an error names the model type when Liger has no kernels for it."""
    try:
        from liger_kernel.transformers.monkey_patch import (MODEL_TYPE_TO_APPLY_LIGER_FN,
                                                            _apply_liger_kernel_to_instance)
    except ImportError as e:
        raise RuntimeError("train.liger_kernels is on but liger-kernel is not installed where the learner runs: "
                           "pip install -e '.[gpu]', or set train.liger_kernels: false") from e
    kind = getattr(lm.config, "model_type", None)
    if kind not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        raise ValueError(f"train.liger_kernels: Liger has no kernels for model type {kind!r}; "
                         f"set train.liger_kernels: false")
    _apply_liger_kernel_to_instance(lm, rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                    fused_linear_cross_entropy=False)


ROW_TOKENS = 128   # packed rows are at least this wide (measured on the default: 2-3x its ~45-token width)


class Packing:
    """Right-padded sequences [B, T] laid end to end in as few rows of `width` (at least T) as fit
    (first fit, longest first), with position ids that restart at each sequence: transformers then
    masks attention within each sequence (its packed-sequence masks), so every token sees what it
    sees padded. `pack` builds the rows' ids, `unpack` takes per-position outputs back to [B, T, ...].

    On the default's pairs (prompts of ~10 tokens, responses of 5-48) padding is ~30% of the padded
    positions, and the learner's matmuls scale with positions.

    With `paired`, sequence b and sequence b + B/2 (a pair's chosen and rejected response after the
    same prompt) share their common prefix: it is laid out once, and the second sequence's own tokens
    follow the first's in the same row. `mask` is then the rows' attention (each token sees its own
    sequence's earlier tokens, the shared prefix included), which transformers takes as given; every
    token still sees what it sees padded, and the prompt is run once per pair instead of twice."""

    def __init__(self, attention_mask: torch.Tensor, width: int = 0, paired: torch.Tensor | None = None):
        n, device = attention_mask.shape[0], attention_mask.device
        lengths = attention_mask.sum(-1)
        groups = [[i] for i in range(n)] if paired is None else [[i, i + n // 2] for i in range(n // 2)]
        shared = torch.zeros(n, dtype=torch.long, device=device)   # the pair's common prefix, laid out once
        jump = torch.zeros(n, dtype=torch.long, device=device)     # a second's own tokens follow the first's
        if paired is not None:
            shared[:n // 2], shared[n // 2:], jump[n // 2:] = paired, paired, lengths[:n // 2] - paired
        span = (lengths[:n // 2] + lengths[n // 2:] - paired).tolist() if paired is not None else lengths.tolist()
        width = max(width, attention_mask.shape[1], max(span, default=0))
        used: list[int] = []   # tokens per row so far
        base = [0] * n
        for k in sorted(range(len(groups)), key=lambda k: -span[k]):
            r = next((r for r, m in enumerate(used) if m + span[k] <= width), len(used))
            if r == len(used):
                used.append(0)
            for i in groups[k]:
                base[i] = r * width + used[r]
            used[r] += span[k]
        t = torch.arange(attention_mask.shape[1], device=device)
        self.valid = t[None, :] < lengths[:, None]   # [B, T]
        own = t[None, :] >= shared[:, None]           # past the shared prefix: the sequence's own tokens
        where = torch.tensor(base, device=device)[:, None] + t[None, :] + own * jump[:, None]
        self.where = where.where(self.valid, torch.zeros_like(where))   # padding reads position 0 (masked later)
        self.rows, self.width, self.n = len(used), width, n
        positions = torch.zeros(self.rows * width, dtype=torch.long, device=device)
        positions[self.where[self.valid]] = t.expand(n, -1)[self.valid]
        self.positions = positions.view(self.rows, width)   # a padding position is a sequence of its own
        self.attention = None if paired is None else self._attention(own)

    def _attention(self, own: torch.Tensor) -> torch.Tensor:
        """[rows, 1, width, width] bool, True where a query position (row) may see a key position (column):
        the same pair, not later, and the shared prefix or its own sequence's tokens. A padding position
        sees itself only."""
        n, size, device = self.n, self.rows * self.width, self.valid.device
        pair = torch.full((size,), -1, dtype=torch.long, device=device)
        branch = torch.zeros(size, dtype=torch.long, device=device)   # 0: the shared prefix
        index = torch.arange(n, device=device)[:, None].expand_as(self.valid)   # [B, T]: each position's sequence
        pair[self.where[self.valid]] = (index % (n // 2))[self.valid]
        mine = self.valid & own
        branch[self.where[mine]] = (1 + index // (n // 2))[mine]   # 1: the pair's first, 2: its second
        pair, branch, pos = (x.view(self.rows, 1, self.width) for x in (pair, branch, self.positions))
        q = lambda x: x.transpose(1, 2)   # noqa: E731 (query along dim 1, key along dim 2)
        sees = (q(pair) == pair) & (q(pair) >= 0) & (pos <= q(pos)) & ((branch == 0) | (branch == q(branch)))
        sees |= torch.eye(self.width, dtype=torch.bool, device=device) & (q(pair) < 0)
        return sees.unsqueeze(1)

    @property
    def saves(self) -> bool:
        """Whether packing leaves fewer rows than sequences (or lays shared prefixes out once)."""
        return self.rows < self.valid.shape[0] or self.attention is not None

    def mask(self, kind: str, dtype: torch.dtype) -> torch.Tensor | None:
        """The rows' attention mask as `kind` of attention takes it: sdpa a bool mask, eager an additive one."""
        if self.attention is None or kind == "sdpa":
            return self.attention
        return torch.zeros(self.attention.shape, dtype=dtype, device=self.attention.device).masked_fill_(
            ~self.attention, torch.finfo(dtype).min)

    def pack(self, input_ids: torch.Tensor, pad_id: int = 0) -> torch.Tensor:
        ids = torch.full((self.rows * self.width,), pad_id, dtype=input_ids.dtype, device=input_ids.device)
        ids[self.where[self.valid]] = input_ids[self.valid]
        return ids.view(self.rows, self.width)

    def unpack(self, packed: torch.Tensor) -> torch.Tensor:
        """[rows, width, ...] -> [B, T, ...] (padding positions hold a copy of some real one)."""
        return packed.reshape(self.rows * self.width, *packed.shape[2:])[self.where]


def common_prefixes(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """[B/2]: how many leading tokens sequence b and sequence b + B/2 have in common (within both)."""
    half = input_ids.shape[0] // 2
    same = (input_ids[:half] == input_ids[half:]) & attention_mask[:half].bool() & attention_mask[half:].bool()
    return same.long().cumprod(-1).sum(-1)


SHARED_PREFIX_ATTENTION = ("eager", "sdpa")   # attention implementations that take Packing's own mask


def packing_agrees(lm, vocab: int, tolerance: float = 1e-3) -> bool:
    """Whether `lm` scores packed sequences as it scores them padded, pairs with a shared prefix
    included (transformers models with packed-sequence masks do; a model whose attention ignores
    position ids or a given mask does not)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, vocab, (4, 12), generator=g)
    ids[2, :4] = ids[0, :4]   # pairs (0, 2) and (1, 3): a shared prefix of 4 tokens, and of none
    attention = torch.tensor([[1] * 12, [1] * 5 + [0] * 7, [1] * 6 + [0] * 6, [1] * 9 + [0] * 3])
    response = attention.clone()
    response[:, :2] = 0
    device = next(lm.parameters()).device
    ids, attention, response = ids.to(device), attention.to(device), response.to(device)
    with torch.no_grad():
        padded = SequenceScorer(lm)(ids, attention, response).float()
        packed = SequenceScorer(lm, packed=True)(ids, attention, response).float()
        paired = SequenceScorer(lm, packed=True)(ids, attention, response, paired=True).float()
    return all(torch.allclose(padded, x, atol=tolerance, rtol=tolerance) for x in (packed, paired))


class SequenceScorer(torch.nn.Module):
    """A causal LM that returns each sequence's response log-prob (the learner's forward).

    DDP or FSDP wrap this module, so their hooks see the whole computation.
    `head` picks how the LM head and log-softmax run: "full" computes the
    [B, T, V] logits (`sequence_logprobs`), "chunked" runs them over `chunk`
    positions at a time (`chunked_sequence_logprobs`), "liger" through
    Liger's fused linear cross-entropy (`fused_sequence_logprobs`). With
    `packed`, the decoder runs on the sequences packed into rows (`Packing`)
    whenever that leaves fewer rows; the heads read its hidden states
    unpacked, and "full" runs the LM head on response positions only. With
    `paired` (sequence b and b + B/2 are a pair's two responses), a packed
    pair's common prefix runs once, under eager or sdpa attention (others
    take no given mask)."""

    def __init__(self, lm, chunk: int | None = None, head: str | None = None, packed: bool = False):
        super().__init__()
        self.lm, self.chunk, self.packed = lm, chunk, packed
        self.head = head or ("full" if chunk is None else "chunked")

    def forward(self, input_ids, attention_mask, response_mask, average: bool = False, paired: bool = False):
        packing = self.packing(input_ids, attention_mask, paired) if self.packed else None
        if packing is not None and packing.saves:
            mask = packing.mask(self.lm.config._attn_implementation, next(self.lm.parameters()).dtype)
            rows = self.lm.get_decoder()(input_ids=packing.pack(input_ids), position_ids=packing.positions,
                                         attention_mask=mask, use_cache=False)
            hidden = packing.unpack(rows.last_hidden_state)
            if self.head == "full":
                return response_logprobs(hidden, self.lm.get_output_embeddings(), input_ids, response_mask, average)
        elif self.head == "full":
            logits = self.lm(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
            return sequence_logprobs(logits, input_ids, response_mask, average=average)
        else:
            hidden = self.lm.get_decoder()(input_ids=input_ids, attention_mask=attention_mask,
                                           use_cache=False).last_hidden_state
        weight = self.lm.get_output_embeddings().weight
        if self.head == "liger":
            return fused_sequence_logprobs(hidden, weight, input_ids, response_mask, average)
        return chunked_sequence_logprobs(hidden, weight, input_ids, response_mask, self.chunk, average)

    def packing(self, input_ids, attention_mask, paired: bool) -> Packing:
        kind = self.lm.config._attn_implementation
        if paired and input_ids.shape[0] % 2 == 0 and kind in SHARED_PREFIX_ATTENTION:
            return Packing(attention_mask, ROW_TOKENS, common_prefixes(input_ids, attention_mask))
        return Packing(attention_mask, ROW_TOKENS)
