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

from .loss import LENGTH_AVERAGED, dpo_loss, reward_tensors
from .sequences import SequenceScorer, pack

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
    simpo_gamma: float = 0.5      # SimPO's target reward margin
    length_penalty: float = 0.0   # R-DPO's alpha per token of length difference
    lr: float = 1e-6
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    grad_clip: float | None = 1.0
    batch_size: int = 32
    micro_batch_size: int = 8
    micro_batch_tokens: int | None = None   # size micro-batches by padded tokens instead of pairs
    max_steps: int = 100          # the length of the learning-rate schedule
    strategy: str = "ddp"         # ddp | fsdp (sharding.py)
    logprob_chunk: int | None = None   # LM head in chunks of this many positions (no full fp32 logits)
    checkpoint_every_layers: int = 0   # recompute every k-th decoder layer in backward (0: off)
    liger_kernels: bool = False   # Liger's fused RMSNorm, SwiGLU, RoPE and linear cross-entropy (CUDA)
    seed: int = 0
    num_threads: int | None = None
    trust_remote_code: bool = False
    lora: dict | None = None      # {rank, alpha, dropout, target_modules}: train PEFT LoRA adapters
    weights_transport: str = "object_store"   # object_store | collective (collective.py)
    bucket_bytes: int = 64 << 20  # collective: bytes per broadcast
    store_copy: bool = False      # collective: also put each version in the store (serve replicas read it)
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


def lora_model(lm, lora: dict, adapter_dir: str | None = None):
    """`lm` with trainable LoRA adapters: new ones, or those saved in `adapter_dir` (a checkpoint)."""
    from peft import LoraConfig, PeftModel, get_peft_model

    if adapter_dir:
        return PeftModel.from_pretrained(lm, adapter_dir, is_trainable=True)
    return get_peft_model(lm, LoraConfig(r=lora["rank"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                                         target_modules=list(lora["target_modules"]), task_type="CAUSAL_LM"))


def adapter_config(peft_model) -> dict:
    """The adapter's PEFT config as written to adapter_config.json (what vLLM reads)."""
    config = peft_model.peft_config["default"].to_dict()
    return json.loads(json.dumps(config, default=lambda o: sorted(o) if isinstance(o, set) else str(o)))


class AdaptersOff(torch.nn.Module):
    """The reference of a LoRA policy: the policy's own scorer run with its adapters disabled.

    `scorer` is the policy's SequenceScorer itself (under FSDP the sharded one,
    so its forward gathers the parameters), not a copy: there is no second model."""

    def __init__(self, peft_model, scorer):
        super().__init__()
        self.peft, self.scorer = peft_model, scorer

    def forward(self, *args, **kwargs):
        with self.peft.disable_adapter():
            return self.scorer(*args, **kwargs)


class DPOStep:
    """One optimizer step on a shard of pairs: forward, loss, backward, clip, step.

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
            lp = scorer(ids, attn, resp, average=self.spec.loss in LENGTH_AVERAGED)
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
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return result


def _peak_rss_mib() -> float:
    """This worker process's peak resident memory so far (rank 0 reports its own)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


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


def save_checkpoint(folder: str, lm, weights: dict, tokenizer, optimizer_state: dict, scheduler, state: dict,
                    controller: bytes | None) -> None:
    """Everything a restart or `--resume` needs; the controller state rides along. `weights` and
    `optimizer_state` are full (gathered) state dicts; a PEFT model saves its adapter from `weights`
    (adapter_config.json, adapter_model.safetensors)."""
    lm.save_pretrained(os.path.join(folder, "policy"), state_dict=weights)
    tokenizer.save_pretrained(os.path.join(folder, "policy"))
    torch.save({"optimizer": optimizer_state, "scheduler": scheduler.state_dict(), "rng": _rng_state()},
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

class Worker:
    """One Ray Train worker's policy, reference, optimizer and step, laid out by the sharding strategy."""

    def __init__(self, spec: LearnerSpec, folder: str | None, device: torch.device, rank: int, world: int):
        from transformers import AutoTokenizer

        from .sequences import use_liger_kernels
        from .sharding import checkpoint_layers, strategy

        self.spec, self.device, self.rank, self.world = spec, device, rank, world
        self.strategy = strategy(spec.strategy)
        head = "liger" if spec.liger_kernels else None

        def load(path: str):
            lm = load_causal_lm(path, torch.float32, spec.trust_remote_code)
            if spec.liger_kernels:
                use_liger_kernels(lm)
            return lm

        if spec.lora:
            self.lm = lora_model(load(spec.policy), spec.lora, os.path.join(folder, "policy") if folder else None)
        else:
            self.lm = load(os.path.join(folder, "policy") if folder else spec.policy)
        checkpoint_layers(self.lm, spec.checkpoint_every_layers)
        self.tokenizer = AutoTokenizer.from_pretrained(spec.policy, trust_remote_code=spec.trust_remote_code)
        pad_id = self.lm.config.pad_token_id
        self.model = self.strategy.wrap(SequenceScorer(self.lm, spec.logprob_chunk, head), device)
        if spec.lora:   # the reference is the same model with its adapters off: no second copy
            reference = AdaptersOff(self.lm, getattr(self.model, "module", self.model))
        else:
            reference = SequenceScorer(load(spec.reference), spec.logprob_chunk, head)
            reference = self.strategy.wrap_frozen(reference.eval().requires_grad_(False), device)
        self.optimizer = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=spec.lr,
                                           weight_decay=spec.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(spec.lr_schedule, spec.warmup_steps, spec.max_steps))
        self.step = DPOStep(self.model, reference, self.optimizer, self.scheduler, spec,
                            0 if pad_id is None else pad_id, device, self.strategy, self._largest)
        self.tied = bool(getattr(self.lm.config, "tie_word_embeddings", False))
        self.sender = None   # rank 0 with sync.transport collective: a collective.Sender

    def restore(self, folder: str) -> None:
        restored = torch.load(os.path.join(folder, "learner.pt"), weights_only=False)
        self.strategy.load_optim(self.model, self.optimizer, restored["optimizer"])
        self.scheduler.load_state_dict(restored["scheduler"])
        _set_rng_state(restored["rng"])

    def _largest(self, n: int) -> int:
        if self.world == 1:
            return n
        import torch.distributed as dist

        t = torch.tensor([n], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    def _gathered(self) -> dict:
        """The full policy state dict, gathered on every rank under FSDP (a collective); with LoRA only
        the trainable (adapter) tensors, under the PEFT model's own names."""
        return self.strategy.full_state(self.model, trainable_only=bool(self.spec.lora))

    def weights(self, gathered: dict | None = None) -> dict:
        """What a publish sends: the full policy state dict, or with LoRA the adapter tensors under
        PEFT's adapter names (what vLLM loads). Every rank calls it."""
        gathered = self._gathered() if gathered is None else gathered
        if self.spec.lora:
            from peft import get_peft_model_state_dict

            return get_peft_model_state_dict(self.lm, state_dict=gathered)
        return gathered

    def publish(self, version: int, store):
        from .weight_sync import publish

        weights = self.weights()
        if self.rank != 0:
            return None, 0.0
        if self.spec.lora:
            return publish(weights, version, store, DTYPES[self.spec.dtype], tied=False,
                           adapter=adapter_config(self.lm))
        return publish(weights, version, store, DTYPES[self.spec.dtype], tied=self.tied, sender=self.sender,
                       store_copy=self.spec.store_copy)

    def checkpoint(self, step: int, state: dict, controller: bytes | None) -> tuple[float, int]:
        gathered, optim = self._gathered(), self.strategy.optim_state(self.model, self.optimizer)
        return _report_checkpoint(self.rank, step, lambda d: save_checkpoint(
            d, self.lm, gathered, self.tokenizer, optim, self.scheduler, state, controller))


def train_loop(config: dict) -> None:
    """Ray Train's train_loop_per_worker: restore, say hello, then run step orders until closed."""
    import ray
    import ray.train
    import ray.train.torch

    from .artifacts import local_model
    from .types import LearnerStart

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
    with (checkpoint.as_directory() if checkpoint else contextlib.nullcontext()) as folder:
        learner = Worker(spec, folder, device, rank, world)
        if folder:
            state, controller = read_checkpoint_state(folder)
            learner.restore(folder)
    if rank == 0 and spec.weights_transport == "collective":
        from .collective import Sender

        learner.sender = Sender(lambda: ray.get(broker.weight_group.remote(), timeout=10), device,
                                spec.bucket_bytes)
    pairs_seen, step = state["pairs"], state["step"]
    weights = learner.publish(state["policy_version"], store)[0] if checkpoint else None
    if rank == 0:
        start = LearnerStart(step=step, version=state["policy_version"], weights=weights, controller=controller,
                             checkpoint=checkpoint.path if checkpoint else None, seconds=time.time() - began)
        ray.get(broker.hello.remote(start))
    while True:
        waited = time.time()
        order = _next_order(broker, step + 1) if rank == 0 else None
        order = _broadcast(order, world)
        if order is None:  # the controller closed the run
            if learner.sender is not None:
                learner.sender.stop()
            return
        waited = time.time() - waited
        t0 = time.time()
        if not order.pairs:   # save now (the controller stops early)
            state = {"step": step, "policy_version": order.version, "pairs": pairs_seen, "spec": asdict(spec)}
            seconds, nbytes = learner.checkpoint(step, state, order.checkpoint)
            if rank == 0:
                broker.done.remote(order.step, {"metrics": {"checkpoint_seconds": seconds,
                                                            "checkpoint_bytes": nbytes}, "weights": None})
            continue
        learner.model.train()
        metrics = _mean_across(learner.step(list(order.pairs[rank::world])), world, device)
        pairs_seen, step = pairs_seen + len(order.pairs), order.step
        metrics.update(step=order.step, pairs=pairs_seen, policy_version=order.version,
                       compute_seconds=time.time() - t0, wait_seconds=waited, peak_rss_mib=_peak_rss_mib())
        weights = None
        if order.sync:
            weights, seconds = learner.publish(order.version, store)
            if rank == 0:
                metrics.update(sync_seconds=seconds, sync_bytes=weights.nbytes,
                               sync_collective=int(weights.transport == "collective"))
        if order.checkpoint is not None or order.final:
            state = {"step": order.step, "policy_version": order.version, "pairs": pairs_seen,
                     "spec": asdict(spec)}
            seconds, nbytes = learner.checkpoint(order.step, state, order.checkpoint)
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
