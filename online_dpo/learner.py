"""The Ray Train gang beside the rollout loop, seen from the controller.

`Learner` runs `TorchTrainer.fit()` in a thread of the driver. The
controller reaches trainer rank 0 only through the broker: `submit` sends a
step order and returns an ObjectRef of its result; `wait_start` returns
the gang's hello (where it restored to). Ray Train restarts the gang from
its latest checkpoint when a worker dies (`train.max_failures`); the new
gang's hello tells the controller to plan again from there.
"""

from __future__ import annotations

import threading

from .config import Config
from .topology import RunFailed, last_line, threads_for
from .trainer import LearnerSpec, train_loop


def learner_spec(cfg: Config, policy: str, reference: str, files=None) -> LearnerSpec:
    t = cfg.train
    return LearnerSpec(policy=policy, reference=reference, dtype=cfg.model.dtype, loss=t.loss, beta=t.beta,
                       label_smoothing=t.label_smoothing, simpo_gamma=t.simpo_gamma,
                       length_penalty=t.length_penalty, lr=t.lr, lr_schedule=t.lr_schedule,
                       warmup_steps=t.warmup_steps, weight_decay=t.weight_decay, grad_clip=t.grad_clip,
                       batch_size=t.batch_size, micro_batch_size=t.micro_batch_size,
                       micro_batch_tokens=t.micro_batch_tokens, max_steps=t.max_steps, strategy=t.strategy,
                       logprob_chunk=t.logprob_chunk, checkpoint_every_layers=t.checkpoint_every_layers,
                       liger_kernels=t.liger_kernels,
                       seed=cfg.run.seed if t.seed is None else t.seed,
                       num_threads=threads_for(t.num_cpus_per_worker, t.num_threads),
                       trust_remote_code=cfg.model.trust_remote_code,
                       lora=cfg.model.lora.model_dump() if cfg.model.lora else None,
                       weights_transport="object_store" if cfg.model.lora else cfg.sync.transport,
                       bucket_bytes=cfg.sync.bucket_mb << 20, store_copy=cfg.serve.enabled, file_server=files)


class Learner(threading.Thread):
    """Runs TorchTrainer.fit() beside the rollout loop; keeps its result or error."""

    def __init__(self, cfg: Config, spec: LearnerSpec, broker, store, storage: str, name: str):
        super().__init__(name="learner", daemon=True)
        self.cfg, self.spec, self.broker, self.store = cfg, spec, broker, store
        self.storage, self.run_name = storage, name
        self.result, self.error = None, None
        self.hellos = 0

    def run(self) -> None:
        import os

        import ray

        # Ray Train's controller polls the workers this often (default 2 s): how soon it records a
        # checkpoint, notices a dead worker, and returns from fit() after the last step.
        os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
        from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchTrainer

        t = self.cfg.train
        trainer = TorchTrainer(
            train_loop,
            train_loop_config={"spec": self.spec, "broker": self.broker, "store": self.store},
            scaling_config=ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu,
                                         resources_per_worker={"CPU": t.num_cpus_per_worker,
                                                               **({"GPU": 1} if t.use_gpu else {}),
                                                               **t.resources_per_worker},
                                         placement_strategy=t.placement_strategy,
                                         label_selector=dict(t.node_labels) or None),
            run_config=RunConfig(name=self.run_name, storage_path=self.storage,
                                 failure_config=FailureConfig(max_failures=t.max_failures),
                                 checkpoint_config=CheckpointConfig(num_to_keep=self.cfg.checkpoint.keep)))
        try:
            self.result = trainer.fit()
        except BaseException as e:  # surfaced by the controller
            self.error = e
        finally:
            try:
                ray.get(self.broker.close.remote("the learner stopped"))
            except Exception:
                pass

    def failure(self) -> RunFailed:
        cause = last_line(self.error) if self.error is not None else "it stopped"
        return RunFailed(f"the learner (Ray Train gang) failed and train.max_failures "
                         f"({self.cfg.train.max_failures}) restarts are used up: {cause}")

    def wait_start(self, timeout: float = 900):
        """The next hello from rank 0 (a LearnerStart); RunFailed if the gang died instead."""
        import ray

        start = ray.get(self.broker.wait_hello.remote(self.hellos + 1, timeout))
        if start is None:
            self.join(timeout=30)
            raise self.failure()
        self.hellos += 1
        return start

    def submit(self, order):
        return self.broker.submit.remote(order)

    def close(self, reason: str) -> None:
        """Close the broker: rank 0's next order is None, and fit() returns soon after."""
        import ray

        try:
            ray.get(self.broker.close.remote(reason), timeout=10)
        except Exception:
            pass

    def stop(self, reason: str, timeout: float = 120) -> None:
        self.close(reason)
        self.join(timeout=timeout)

    def checkpoint(self, step: int):
        """The checkpoint written after `step` (Ray Train storage: a local path or a URI)."""
        from ray.train import Checkpoint

        return Checkpoint(f"{self.storage.rstrip('/')}/{self.run_name}/step-{step:06d}")
