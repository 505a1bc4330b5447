"""One Ray Train worker of the gang: its policy, reference and optimizer, and the loop that runs step orders.

Each worker holds the policy, laid out by the sharding strategy (DDP: a full
copy, gloo on CPU and NCCL on GPU; FSDP2: a shard), and a frozen reference
(a second model, or with LoRA the policy with its adapters off). The worker
keeps no schedule of its own: rank 0 takes the next `StepOrder` from the
broker and broadcasts it; each worker takes the DPO step (step.py) on its
shard of the order's pairs, and the strategy averages the gradients. When the
order says so, rank 0 publishes the weights as the next policy version
(weight_sync.publish: through vLLM's transfer engines, syncer.py, or the
object store), with their checksums when `sync.verify` asks, and the gang writes a checkpoint through Ray Train
(checkpoint.py), with the controller state the order carries, so one
checkpoint restores the whole run. On a (re)start the gang restores the
latest checkpoint Ray Train knows and says `hello` with where it stands.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import asdict, replace

import torch

from . import checkpoint
from .gc_pause import paused_gc
from .model import DTYPES, AdaptersOff, adapter_config, load_causal_lm, lora_model
from .sequences import SequenceScorer
from .specs import LearnerSpec
from .step import DPOStep, lr_lambda
from .types import LearnerStart, StepDone, StepOrder

ORDER_WAIT_SECONDS = 600   # rank 0 asks the broker again after this long without an order


class Worker:
    """One Ray Train worker's policy, reference, optimizer and step, laid out by the sharding strategy."""

    def __init__(self, spec: LearnerSpec, folder: str | None, device: torch.device, rank: int, world: int):
        from transformers import AutoTokenizer

        from .sharding import checkpoint_layers, strategy

        self.spec, self.device, self.rank, self.world = spec, device, rank, world
        self.strategy = strategy(spec.strategy)
        head = "liger" if spec.liger_kernels else None
        if spec.lora:
            self.lm = lora_model(self.load(spec.policy), spec.lora,
                                 os.path.join(folder, "policy") if folder else None)
        else:
            self.lm = self.load(os.path.join(folder, "policy") if folder else spec.policy)
        checkpoint_layers(self.lm, spec.checkpoint_every_layers)
        self.tokenizer = AutoTokenizer.from_pretrained(spec.policy, trust_remote_code=spec.trust_remote_code)
        pad_id = self.lm.config.pad_token_id
        packed = spec.pack_sequences and packs(self.lm, len(self.tokenizer), rank)
        self.model = self.strategy.wrap(SequenceScorer(self.lm, spec.logprob_chunk, head, packed), device)
        if spec.lora:   # the reference is the same model with its adapters off: no second copy
            reference = AdaptersOff(self.lm, getattr(self.model, "module", self.model))
        else:
            reference = SequenceScorer(self.load(spec.reference), spec.logprob_chunk, head, packed)
            reference = self.strategy.wrap_frozen(reference.eval().requires_grad_(False), device)
        self.optimizer = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=spec.lr,
                                           weight_decay=spec.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(spec.lr_schedule, spec.warmup_steps, spec.max_steps))
        self.step = DPOStep(self.model, reference, self.optimizer, self.scheduler, spec,
                            0 if pad_id is None else pad_id, device, self.strategy, self._largest)
        self.tied = bool(getattr(self.lm.config, "tie_word_embeddings", False))
        self.syncer = None   # rank 0 with sync.transport collective: a syncer.Syncer
        self.verified = False   # sync.verify first: checksums went with one sync of this gang

    def load(self, path: str):
        from .sequences import use_liger_kernels

        lm = load_causal_lm(path, torch.float32, self.spec.trust_remote_code, self.spec.attention)
        if self.spec.liger_kernels:
            use_liger_kernels(lm)
        return lm

    def restore(self, folder: str) -> None:
        restored = checkpoint.read_learner(folder)
        self.strategy.load_optim(self.model, self.optimizer, restored["optimizer"])
        self.scheduler.load_state_dict(restored["scheduler"])
        checkpoint.set_rng_state(restored["rng"])

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
        """(handle, seconds, checksums or None): the version published; rank 0 only."""
        from .checksums import expected_digests
        from .transfer import tensors_of
        from .weight_sync import publish

        weights = self.weights()
        if self.rank != 0:
            return None, 0.0, None
        tensors = tensors_of(weights, DTYPES[self.spec.dtype], self.tied and not self.spec.lora)
        if self.spec.lora:
            return (*publish(tensors, version, store, adapter=adapter_config(self.lm)), None)
        handle, seconds = publish(tensors, version, store, self.syncer, self.spec.store_copy)
        digests = None
        if self.spec.verify == "every" or (self.spec.verify == "first" and not self.verified):
            digests, self.verified = expected_digests(tensors, DTYPES[self.spec.engine_dtype]), True
        return handle, seconds, digests

    def checkpoint(self, step: int, state: dict, controller: str | None) -> tuple[float, int]:
        gathered, optim = self._gathered(), self.strategy.optim_state(self.model, self.optimizer)
        return checkpoint.report(self.rank, step, lambda d: checkpoint.save(
            d, self.lm, gathered, self.tokenizer, optim, self.scheduler, state, controller))


def packs(lm, vocab: int, rank: int) -> bool:
    """Whether the policy scores packed sequences as it scores them padded (checked once, on the CPU
    copy before placement); a model that does not is trained padded, and rank 0 says so."""
    from .sequences import packing_agrees

    if packing_agrees(lm, min(vocab, lm.config.vocab_size)):
        return True
    if rank == 0:
        print(f"[online-dpo] {type(lm).__name__} scores packed sequences differently from padded ones "
              f"(its attention or LM head does not follow packed rows): training on padded sequences; set "
              f"train.pack_sequences: false to skip this check", flush=True)
    return False


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


# ---------------------------------------------------------------- the loop

def train_loop(config: dict) -> None:
    """Ray Train's train_loop_per_worker: restore, say hello, then run step orders until closed."""
    import ray.train
    import ray.train.torch

    from .artifacts import local_model

    began = time.time()
    spec: LearnerSpec = config["spec"]
    spec = replace(spec, policy=local_model(spec.policy, spec.file_server),
                   reference=local_model(spec.reference, spec.file_server), file_server=None)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if spec.num_threads:
        torch.set_num_threads(spec.num_threads)
    torch.manual_seed(spec.seed)
    found = ray.train.get_checkpoint()   # the latest of this run: after a failure, or on --resume
    state, controller = {"step": 0, "policy_version": 0, "pairs": 0}, None
    with (found.as_directory() if found else contextlib.nullcontext()) as folder:
        if folder:
            state, controller = checkpoint.read_state(folder)
        with paused_gc():   # transformers' import and the models' load
            worker = Worker(spec, folder, ray.train.torch.get_device(), rank, world)
        if folder:
            worker.restore(folder)
    loop = OrderLoop(worker, config["broker"], config["store"], state)
    if rank == 0 and spec.weights_transport == "collective":
        with paused_gc():   # vLLM's import
            loop.start_syncer()
    weights = worker.publish(state["policy_version"], loop.store)[0] if found else None
    if rank == 0:
        start = LearnerStart(step=state["step"], version=state["policy_version"], weights=weights,
                             controller=controller, checkpoint=found.path if found else None,
                             seconds=time.time() - began)
        ray.get(loop.broker.hello.remote(start), timeout=60)
    loop.run()


class OrderLoop:
    """Runs step orders until the controller closes the run; rank 0 reads them from the broker."""

    def __init__(self, worker: Worker, broker, store, state: dict):
        self.worker, self.broker, self.store = worker, broker, store
        self.step, self.pairs = state["step"], state["pairs"]

    def start_syncer(self) -> None:
        import ray

        from .syncer import Syncer

        spec = self.worker.spec
        self.worker.syncer = Syncer(lambda: ray.get(self.broker.weight_group.remote(), timeout=10),
                                    spec.transfer, self.worker.device, spec.bucket_bytes)

    def run(self) -> None:
        w = self.worker
        while True:
            waited = time.time()
            order = _broadcast(self.next_order(self.step + 1) if w.rank == 0 else None, w.world)
            if order is None:  # the controller closed the run
                if w.syncer is not None:
                    w.syncer.stop()
                return
            result = self.save_now(order) if not order.pairs else self.take(order, time.time() - waited)
            if w.rank == 0:
                self.broker.done.remote(order.step, result)

    def save_now(self, order: StepOrder) -> StepDone:
        """A checkpoint of the step just taken, outside the schedule (the controller stops early)."""
        seconds, nbytes = self.worker.checkpoint(self.step, self.state(order.version), order.checkpoint)
        return StepDone({"checkpoint_seconds": seconds, "checkpoint_bytes": nbytes})

    def take(self, order: StepOrder, waited: float) -> StepDone:
        w, t0 = self.worker, time.time()
        w.model.train()
        metrics = _mean_across(w.step(list(order.pairs[w.rank::w.world])), w.world, w.device)
        metrics = {k: v if math.isfinite(v) else None for k, v in metrics.items()}   # NaN never reaches a record
        self.pairs, self.step = self.pairs + len(order.pairs), order.step
        metrics.update(step=order.step, pairs=self.pairs, policy_version=order.version,
                       compute_seconds=time.time() - t0, wait_seconds=waited, peak_rss_mib=_peak_rss_mib())
        weights = digests = None
        if order.sync:
            weights, seconds, digests = w.publish(order.version, self.store)
            if w.rank == 0:
                metrics.update(sync_seconds=seconds, sync_bytes=weights.nbytes,
                               sync_collective=int(weights.transport == "collective"))
        if order.checkpoint is not None or order.final:
            seconds, nbytes = w.checkpoint(order.step, self.state(order.version), order.checkpoint)
            metrics.update(checkpoint_seconds=seconds, checkpoint_bytes=nbytes)
        metrics["step_seconds"] = time.time() - t0
        return StepDone(metrics, weights, digests)

    def state(self, version: int) -> dict:
        return {"step": self.step, "policy_version": version, "pairs": self.pairs, "spec": asdict(self.worker.spec)}

    def next_order(self, expected: int):
        """Rank 0: the order for step `expected`, or a checkpoint of the step just taken (empty pairs)."""
        import ray

        while True:
            try:
                return ray.get(self.broker.next.remote(expected, ORDER_WAIT_SECONDS),
                               timeout=ORDER_WAIT_SECONDS + 60)
            except ray.exceptions.GetTimeoutError:
                continue   # the broker is slow to answer; ask again
            except ray.exceptions.RayTaskError as e:  # no order for 10 minutes: keep waiting
                if "TimeoutError" not in str(e):
                    raise
