"""The learner: Ray Train TorchTrainer workers that take DPO steps on fresh pairs.

Each worker holds the policy (DDP: gloo on CPU, NCCL on GPU) and a frozen
reference copy. Per step, rank 0 takes `batch_size` pairs from the broker and
broadcasts them; each worker scores its shard (chosen and rejected in one
forward pass, in micro-batches with gradient accumulation) and DDP averages
the gradients. Every `sync_every` steps, and at the last step, rank 0
publishes the weights as the next policy version, pushes them to every
sampler (and serve replica) through the weight-sync transport, and tells the
broker, which releases the rollout loop. The final policy (and periodic
checkpoints) go through Ray Train's checkpoint storage.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch

from .loss import dpo_loss, reward_stats
from .sequences import pack, sequence_logprobs

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class LearnerSpec:
    """Plain arguments for the learner (built from the run config by the controller)."""
    policy: str
    reference: str
    dtype: str = "float32"
    loss: str = "sigmoid"
    beta: float = 0.1
    label_smoothing: float = 0.0
    lr: float = 1e-6
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    grad_clip: float | None = 1.0
    batch_size: int = 32
    micro_batch_size: int = 8
    max_steps: int = 100
    seed: int = 0
    sync_every: int = 1
    checkpoint_every: int = 0
    num_threads: int | None = None
    transport: str = "object_store"
    trust_remote_code: bool = False
    take_timeout_s: float = 1800.0
    file_server: Any = None   # fetches local model paths this node cannot see (artifacts.py)


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


def load_causal_lm(path: str, dtype: torch.dtype, trust_remote_code: bool = False):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code)


class DPOStep:
    """One optimizer step on a shard of pairs: forward, loss, backward, clip, step."""

    def __init__(self, model, reference, optimizer, scheduler, spec: LearnerSpec, pad_id: int,
                 device: torch.device):
        self.model, self.reference = model, reference
        self.optimizer, self.scheduler = optimizer, scheduler
        self.spec, self.pad_id, self.device = spec, pad_id, device
        self.autocast = DTYPES[spec.dtype] if spec.dtype != "float32" else None

    def _logps(self, model, pairs):
        prompts = [p.prompt_ids for p in pairs] * 2
        responses = [p.chosen.token_ids for p in pairs] + [p.rejected.token_ids for p in pairs]
        ids, attn, resp = (t.to(self.device) for t in pack(prompts, responses, self.pad_id))
        ctx = (torch.autocast(self.device.type, dtype=self.autocast) if self.autocast
               else contextlib.nullcontext())
        with ctx:
            logits = model(input_ids=ids, attention_mask=attn).logits
        lp = sequence_logprobs(logits, ids, resp, average=self.spec.loss == "ipo")
        return lp[:len(pairs)], lp[len(pairs):]

    def __call__(self, shard: list) -> dict[str, float]:
        spec = self.spec
        chunks = [shard[i:i + spec.micro_batch_size] for i in range(0, len(shard), spec.micro_batch_size)]
        totals: dict[str, float] = {}
        for k, chunk in enumerate(chunks):
            last = k == len(chunks) - 1
            sync_ctx = self.model.no_sync() if hasattr(self.model, "no_sync") and not last \
                else contextlib.nullcontext()
            with sync_ctx:
                pc, pr = self._logps(self.model, chunk)
                with torch.no_grad():
                    rc, rr = self._logps(self.reference, chunk)
                out = dpo_loss(pc, pr, rc, rr, beta=spec.beta, loss_type=spec.loss,
                               label_smoothing=spec.label_smoothing)
                (out.losses.mean() / len(chunks)).backward()
            stats = reward_stats(out)
            stats["loss"] = out.losses.mean().item()
            stats["kl"] = 0.5 * ((pc - rc).mean() + (pr - rr).mean()).item()
            stats["logps/chosen"] = pc.mean().item()
            stats["logps/rejected"] = pr.mean().item()
            for key, v in stats.items():
                totals[key] = totals.get(key, 0.0) + v / len(chunks)
        params = [p for p in self.model.parameters() if p.grad is not None]
        clip = spec.grad_clip if spec.grad_clip else float("inf")
        totals["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, clip))
        totals["lr"] = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return totals


def _broadcast(obj, world: int):
    if world == 1:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _mean_across(metrics: dict[str, float], world: int) -> dict[str, float]:
    if world == 1:
        return metrics
    import torch.distributed as dist

    keys = sorted(metrics)
    t = torch.tensor([metrics[k] for k in keys], dtype=torch.float64)
    dist.all_reduce(t)
    return {k: v / world for k, v in zip(keys, t.tolist())}


def _save(model, spec: LearnerSpec, folder: str, state: dict, optimizer=None) -> None:
    from transformers import AutoTokenizer

    model = getattr(model, "module", model)
    model.save_pretrained(os.path.join(folder, "policy"))
    AutoTokenizer.from_pretrained(spec.policy).save_pretrained(os.path.join(folder, "policy"))
    if optimizer is not None:
        torch.save(optimizer.state_dict(), os.path.join(folder, "optimizer.pt"))
    with open(os.path.join(folder, "trainer_state.json"), "w") as f:
        json.dump(state, f)


def _report(rank: int, metrics: dict, save=None) -> None:
    import ray.train

    if rank == 0 and save is not None:
        with tempfile.TemporaryDirectory() as tmp:
            save(tmp)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
    else:
        ray.train.report(metrics)


def train_loop(config: dict) -> None:
    """Ray Train's train_loop_per_worker."""
    import ray
    import ray.train
    import ray.train.torch

    from .weight_sync import export_state_dict, get_transport, push

    from .artifacts import local_model

    spec: LearnerSpec = config["spec"]
    spec = replace(spec, policy=local_model(spec.policy, spec.file_server),
                   reference=local_model(spec.reference, spec.file_server), file_server=None)
    broker, receivers, store = config["broker"], config["receivers"], config.get("store")
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if spec.num_threads:
        torch.set_num_threads(spec.num_threads)
    torch.manual_seed(spec.seed)
    device = ray.train.torch.get_device()

    policy = load_causal_lm(spec.policy, torch.float32, spec.trust_remote_code)
    reference = load_causal_lm(spec.reference, DTYPES[spec.dtype], spec.trust_remote_code)
    reference.to(device).eval().requires_grad_(False)
    pad_id = policy.config.pad_token_id
    pad_id = 0 if pad_id is None else pad_id
    model = ray.train.torch.prepare_model(policy)
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=spec.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(spec.lr_schedule, spec.warmup_steps, spec.max_steps))
    step_fn = DPOStep(model, reference, optimizer, scheduler, spec, pad_id, device)
    transport = get_transport(spec.transport)

    version, pairs_seen, start = 0, 0, time.time()
    for step in range(1, spec.max_steps + 1):
        t0 = time.time()
        batch = ray.get(broker.take.remote(spec.batch_size, spec.take_timeout_s)) if rank == 0 else None
        batch = _broadcast(batch, world)
        if batch is None:  # the controller closed the run
            return
        model.train()
        metrics = _mean_across(step_fn(batch[rank::world]), world)
        pairs_seen += len(batch)
        metrics.update(step=step, pairs=pairs_seen, policy_version=version,
                       batch_version_min=min(p.policy_version for p in batch),
                       step_seconds=time.time() - t0)
        if step % spec.sync_every == 0 or step == spec.max_steps:
            version += 1
            if rank == 0:
                handle = transport.publish(export_state_dict(model, DTYPES[spec.dtype]), version)
                report = push(handle, receivers)
                if store is not None:  # serve replicas pull it from here
                    ray.get(store.publish.remote(handle))
                ray.get(broker.publish_version.remote(version))
                metrics.update(policy_version=version, sync_seconds=report.seconds,
                               sync_bytes=report.nbytes)
                del handle
        if rank == 0:
            metrics["wall_seconds"] = time.time() - start
            broker.post.remote(metrics)
        last = step == spec.max_steps
        if last or (spec.checkpoint_every and step % spec.checkpoint_every == 0):
            state = {"step": step, "policy_version": version, "pairs": pairs_seen, "spec": asdict(spec)}
            _report(rank, {"step": step, "loss": metrics["loss"]},
                    lambda d: _save(model, spec, d, state, None if last else optimizer))
    if rank == 0:
        ray.get(broker.finish.remote())
