"""The learner: Ray Train TorchTrainer workers that take DPO steps on fresh pairs.

Each worker holds the policy (DDP: gloo on CPU, NCCL on GPU) and a frozen
reference copy. The learner keeps no schedule of its own: rank 0 takes the
next `StepOrder` from the broker and broadcasts it; each worker scores its
shard of the order's pairs (chosen and rejected in one forward pass, in
micro-batches with gradient accumulation) and DDP averages the gradients.
When the order says so, rank 0 publishes the weights as the next policy
version (weight_sync.publish) and the gang writes a checkpoint through Ray
Train: policy, optimizer, scheduler, RNG states, step, version, and the
controller state the order carries, so one checkpoint restores the whole run.
On a (re)start the gang restores the latest checkpoint Ray Train knows and
says `hello` with where it stands.
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
    max_steps: int = 100          # the length of the learning-rate schedule
    seed: int = 0
    num_threads: int | None = None
    trust_remote_code: bool = False
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
    """A causal LM with dropout off: DPO's log-prob ratios must not carry dropout noise."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    for key in ("attention_dropout", "hidden_dropout", "dropout", "resid_pdrop", "attn_pdrop", "embd_pdrop"):
        if isinstance(getattr(model.config, key, None), float):
            setattr(model.config, key, 0.0)
    return model


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


def _mean_across(metrics: dict[str, float], world: int, device: torch.device) -> dict[str, float]:
    """Average step metrics over workers; the tensor lives on the worker's device (NCCL needs that)."""
    if world == 1:
        return metrics
    import torch.distributed as dist

    keys = sorted(metrics)
    t = torch.tensor([metrics[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return {k: v / world for k, v in zip(keys, t.tolist())}


# ---------------------------------------------------------------- checkpoints

def _rng_state() -> dict:
    import random

    import numpy as np

    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    import random

    import numpy as np

    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(folder: str, model, tokenizer, optimizer, scheduler, state: dict,
                    controller: bytes | None) -> None:
    """Everything a restart or `--resume` needs; the controller state rides along."""
    model = getattr(model, "module", model)
    model.save_pretrained(os.path.join(folder, "policy"))
    tokenizer.save_pretrained(os.path.join(folder, "policy"))
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": _rng_state()},
               os.path.join(folder, "learner.pt"))
    if controller is not None:
        with open(os.path.join(folder, "controller.pkl"), "wb") as f:
            f.write(controller)
    with open(os.path.join(folder, "trainer_state.json"), "w") as f:   # written last
        json.dump(state, f)


def read_checkpoint_state(folder: str) -> tuple[dict, bytes | None]:
    with open(os.path.join(folder, "trainer_state.json")) as f:
        state = json.load(f)
    path = os.path.join(folder, "controller.pkl")
    controller = open(path, "rb").read() if os.path.exists(path) else None
    return state, controller


def _report_checkpoint(rank: int, step: int, save) -> tuple[float, int]:
    """All ranks report (Ray Train's collective); rank 0 attaches the checkpoint. Returns seconds, bytes."""
    import ray.train

    start = time.time()
    if rank != 0:
        ray.train.report({"step": step})
        return time.time() - start, 0
    with tempfile.TemporaryDirectory() as tmp:
        save(tmp)
        nbytes = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(tmp) for f in fs)
        ray.train.report({"step": step}, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=f"step-{step:06d}")
    return time.time() - start, nbytes


# ---------------------------------------------------------------- the worker loop

def train_loop(config: dict) -> None:
    """Ray Train's train_loop_per_worker: restore, say hello, then run step orders until closed."""
    import ray
    import ray.train
    import ray.train.torch
    from transformers import AutoTokenizer

    from .artifacts import local_model
    from .types import LearnerStart
    from .weight_sync import publish

    began = time.time()
    spec: LearnerSpec = config["spec"]
    spec = replace(spec, policy=local_model(spec.policy, spec.file_server),
                   reference=local_model(spec.reference, spec.file_server), file_server=None)
    broker, store = config["broker"], config["store"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if spec.num_threads:
        torch.set_num_threads(spec.num_threads)
    torch.manual_seed(spec.seed)
    device = ray.train.torch.get_device()

    checkpoint = ray.train.get_checkpoint()   # the latest of this run: after a failure, or on --resume
    state, controller = {"step": 0, "policy_version": 0, "pairs": 0}, None
    restored = None
    with (checkpoint.as_directory() if checkpoint else contextlib.nullcontext()) as folder:
        policy = load_causal_lm(os.path.join(folder, "policy") if folder else spec.policy, torch.float32,
                                spec.trust_remote_code)
        if folder:
            state, controller = read_checkpoint_state(folder)
            restored = torch.load(os.path.join(folder, "learner.pt"), weights_only=False)
    reference = load_causal_lm(spec.reference, torch.float32, spec.trust_remote_code)
    reference.to(device).eval().requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(spec.policy, trust_remote_code=spec.trust_remote_code)
    pad_id = policy.config.pad_token_id
    pad_id = 0 if pad_id is None else pad_id
    model = ray.train.torch.prepare_model(policy)
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=spec.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(spec.lr_schedule, spec.warmup_steps, spec.max_steps))
    if restored is not None:
        optimizer.load_state_dict(restored["optimizer"])
        scheduler.load_state_dict(restored["scheduler"])
        _set_rng_state(restored["rng"])
    step_fn = DPOStep(model, reference, optimizer, scheduler, spec, pad_id, device)
    pairs_seen, dtype = state["pairs"], DTYPES[spec.dtype]

    step = state["step"]
    if rank == 0:
        weights = publish(model, state["policy_version"], store, dtype)[0] if checkpoint else None
        start = LearnerStart(step=step, version=state["policy_version"], weights=weights, controller=controller,
                             checkpoint=checkpoint.path if checkpoint else None, seconds=time.time() - began)
        ray.get(broker.hello.remote(start))
    while True:
        waited = time.time()
        order = _next_order(broker, step + 1) if rank == 0 else None
        order = _broadcast(order, world)
        if order is None:  # the controller closed the run
            return
        waited = time.time() - waited
        t0 = time.time()
        if not order.pairs:   # save now (the controller stops early)
            state = {"step": step, "policy_version": order.version, "pairs": pairs_seen, "spec": asdict(spec)}
            seconds, nbytes = _report_checkpoint(rank, step, lambda d: save_checkpoint(
                d, model, tokenizer, optimizer, scheduler, state, order.checkpoint))
            if rank == 0:
                broker.done.remote(order.step, {"metrics": {"checkpoint_seconds": seconds,
                                                            "checkpoint_bytes": nbytes}, "weights": None})
            continue
        model.train()
        metrics = _mean_across(step_fn(list(order.pairs[rank::world])), world, device)
        pairs_seen, step = pairs_seen + len(order.pairs), order.step
        metrics.update(step=order.step, pairs=pairs_seen, policy_version=order.version,
                       compute_seconds=time.time() - t0, wait_seconds=waited)
        weights = None
        if order.sync and rank == 0:
            weights, seconds = publish(model, order.version, store, dtype)
            metrics.update(sync_seconds=seconds, sync_bytes=weights.nbytes)
        if order.checkpoint is not None or order.final:
            state = {"step": order.step, "policy_version": order.version, "pairs": pairs_seen,
                     "spec": asdict(spec)}
            seconds, nbytes = _report_checkpoint(rank, order.step, lambda d: save_checkpoint(
                d, model, tokenizer, optimizer, scheduler, state, order.checkpoint))
            metrics.update(checkpoint_seconds=seconds, checkpoint_bytes=nbytes)
        metrics["step_seconds"] = time.time() - t0
        if rank == 0:
            broker.done.remote(order.step, {"metrics": metrics, "weights": weights})


def _next_order(broker, expected: int):
    """Rank 0: the order for step `expected`, or a checkpoint of the step just taken (empty pairs)."""
    import ray

    while True:
        try:
            return ray.get(broker.next.remote(expected, 600))
        except ray.exceptions.RayTaskError as e:  # no order for 10 minutes: keep waiting
            if "TimeoutError" not in str(e):
                raise
