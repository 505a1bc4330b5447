"""One DPO optimizer step on a shard of pairs, and the learning-rate schedule.

Torch-level only (no Ray, no vLLM), so the GPU bench (bench/gpu_learner.py)
runs it on a bare GPU box.
"""

from __future__ import annotations

import contextlib
import math

import torch

from .loss import LENGTH_AVERAGED, dpo_loss, reward_tensors
from .model import DTYPES
from .sequences import pack
from .specs import LearnerSpec


def lr_lambda(schedule: str, warmup: int, total: int):
    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        if schedule == "linear":
            return max(0.0, 1.0 - progress)
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return 1.0
    return f


class DPOStep:
    """One optimizer step on a shard of pairs: forward, loss, backward, clip, step (skipped, and
    reported as `skipped`, when the gradient is not finite).

    `model` and `reference` are SequenceScorers (the model wrapped by the
    sharding strategy). A shard is split into micro-batches of
    `micro_batch_size` pairs, or, with `micro_batch_tokens`, into as many
    micro-batches as the largest rank's shard needs to stay under that many
    padded tokens, balanced by length; every rank runs the same number (FSDP
    gathers in every forward). Gradients are averaged over the shard's pairs."""

    def __init__(self, model, reference, optimizer, scheduler, spec: LearnerSpec, pad_id: int,
                 device: torch.device, strategy=None, agree=lambda n: n):
        from .sharding import DDP

        self.model, self.reference = model, reference
        self.optimizer, self.scheduler = optimizer, scheduler
        self.spec, self.pad_id, self.device = spec, pad_id, device
        self.strategy = strategy or DDP()
        self.agree = agree   # the largest of a number over all ranks
        self.autocast = DTYPES[spec.dtype] if spec.dtype != "float32" else None

    def _logps(self, scorer, pairs):
        prompts = [p.prompt_ids for p in pairs] * 2
        responses = [p.chosen.token_ids for p in pairs] + [p.rejected.token_ids for p in pairs]
        ids, attn, resp = (t.to(self.device) for t in pack(prompts, responses, self.pad_id))
        ctx = (torch.autocast(self.device.type, dtype=self.autocast) if self.autocast
               else contextlib.nullcontext())
        with ctx:
            lp = scorer(ids, attn, resp, average=self.spec.loss in LENGTH_AVERAGED, paired=True)
        return lp[:len(pairs)], lp[len(pairs):]

    def micro_batches(self, shard: list) -> list[list]:
        spec = self.spec
        if not spec.micro_batch_tokens:
            return [shard[i:i + spec.micro_batch_size] for i in range(0, len(shard), spec.micro_batch_size)]
        length = [len(p.prompt_ids) + max(len(p.chosen.token_ids), len(p.rejected.token_ids)) for p in shard]
        need = math.ceil(2 * sum(length) / spec.micro_batch_tokens)   # padding aside
        count = min(len(shard), max(1, self.agree(need)))
        bins: list[list] = [[] for _ in range(count)]
        cost, longest = [0] * count, [0] * count   # padded tokens (chosen + rejected rows) per bin
        for i in sorted(range(len(shard)), key=lambda i: -length[i]):   # longest first, to the lightest bin
            k = min(range(count), key=lambda k: cost[k])
            bins[k].append(shard[i])
            longest[k] = max(longest[k], length[i])
            cost[k] = 2 * len(bins[k]) * longest[k]
        return bins

    def __call__(self, shard: list) -> dict[str, float]:
        spec = self.spec
        batches = self.micro_batches(shard)
        totals: dict[str, torch.Tensor] = {}   # on the device, read once after the last micro-batch
        for k, batch in enumerate(batches):
            share = len(batch) / len(shard)
            with self.strategy.accumulate(self.model, last=k == len(batches) - 1):
                with torch.no_grad():   # first: a LoRA reference runs the policy's own (FSDP) module
                    rc, rr = self._logps(self.reference, batch)
                pc, pr = self._logps(self.model, batch)
                lengths = torch.tensor([len(p.chosen.token_ids) - len(p.rejected.token_ids) for p in batch],
                                       dtype=torch.float32, device=self.device)
                out = dpo_loss(pc, pr, rc, rr, beta=spec.beta, loss_type=spec.loss,
                               label_smoothing=spec.label_smoothing, gamma=spec.simpo_gamma,
                               length_margin=spec.length_penalty * lengths)
                (out.losses.mean() * share).backward()
            with torch.no_grad():
                stats = reward_tensors(out)
                stats["loss"] = out.losses.mean()
                stats["kl"] = 0.5 * ((pc - rc).mean() + (pr - rr).mean())
                stats["logps/chosen"] = pc.mean()
                stats["logps/rejected"] = pr.mean()
                for key, v in stats.items():
                    totals[key] = totals.get(key, 0.0) + v.float() * share
        params = [p for p in self.model.parameters() if p.grad is not None]
        clip = spec.grad_clip if spec.grad_clip else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(params, clip)
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm   # FSDP: a DTensor
        keys = sorted(totals)
        values = torch.stack([totals[k] for k in keys] + [norm.float()]).tolist()   # one device-to-host copy
        result = dict(zip(keys, values[:-1]), grad_norm=values[-1])
        result["length/chosen"] = sum(len(p.chosen.token_ids) for p in shard) / len(shard)
        result["length/rejected"] = sum(len(p.rejected.token_ids) for p in shard) / len(shard)
        result["micro_batches"] = len(batches)
        result["lr"] = self.scheduler.get_last_lr()[0]
        # The global gradient norm (every rank sees the same) decides: a NaN or infinite loss or gradient
        # skips the step, so the weights are never touched by it.
        result["skipped"] = float(not math.isfinite(result["grad_norm"]))
        if not result["skipped"]:
            self.optimizer.step()
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return result
