"""The Ray Train gang beside the rollout loop, seen from the controller.

`Gang` runs `TorchTrainer.fit()` in a thread of the driver; its workers run
worker.py's loop. The controller reaches trainer rank 0 only through the
broker: `submit` sends a step order and returns an ObjectRef of its typed
result (StepDone, Restarted or Closed); `wait_start` returns the gang's hello
(where it restored to). Ray Train restarts the gang from its latest
checkpoint when a worker dies (`train.max_failures`); the new gang's hello
tells the controller to plan again from there, and `restarted` counts it so
the next orders are addressed to the new gang.
"""

from __future__ import annotations

import threading

from .errors import RunFailed, last_line
from .specs import GangSpec, LearnerSpec

HELLO_SECONDS = 900.0   # the gang's first hello (models loaded, checkpoint restored) comes within this
SAVE_SECONDS = 1800.0   # a checkpoint outside the schedule is written within this


class Gang(threading.Thread):
    """Runs TorchTrainer.fit() beside the rollout loop; keeps its result or error."""

    def __init__(self, gang: GangSpec, spec: LearnerSpec, broker, store, storage: str, name: str):
        super().__init__(name="train-gang", daemon=True)
        self.gang, self.spec, self.broker, self.store = gang, spec, broker, store
        self.storage, self.run_name = storage, name
        self.result, self.error = None, None
        self.hellos = 0   # hellos seen: the incarnation the next order is for
        self.fitting = threading.Event()   # set as fit() starts: Ray Train's controller is on its way

    def run(self) -> None:
        import ray

        from .gc_pause import paused_gc

        try:
            with paused_gc():   # Ray Train's and torch's imports, unless warm.py did them
                trainer = self.trainer()
        except BaseException as e:   # surfaced by the controller
            self.error = e
            trainer = None
        finally:
            self.fitting.set()
        try:
            if trainer is not None:
                self.result = trainer.fit()
        except BaseException as e:  # surfaced by the controller
            self.error = e
        finally:
            try:
                ray.get(self.broker.close.remote("the learner stopped"), timeout=10)
            except Exception:
                pass

    def trainer(self):
        import os

        # Ray Train's controller polls the workers this often (default 2 s): how soon it records a
        # checkpoint, notices a dead worker, and returns from fit() after the last step.
        os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
        from ray.train import CheckpointConfig, FailureConfig, RunConfig

        from .cluster import one_machine

        return trainer_class(one_machine())(
            learner_loop, train_loop_config={"spec": self.spec, "broker": self.broker, "store": self.store},
            scaling_config=self.scaling(),
            run_config=RunConfig(name=self.run_name, storage_path=self.storage,
                                 failure_config=FailureConfig(max_failures=self.gang.max_failures),
                                 checkpoint_config=CheckpointConfig(num_to_keep=self.gang.keep_checkpoints)))

    def scaling(self):
        """Ray Train's ScalingConfig from the gang's ask."""
        from ray.train import ScalingConfig

        ask = self.gang.ask
        return ScalingConfig(num_workers=ask.count, use_gpu=self.gang.use_gpu,
                             resources_per_worker={"CPU": ask.cpus, **ask.resources},
                             placement_strategy=ask.strategy, label_selector=dict(ask.labels) or None)

    def failure(self) -> RunFailed:
        cause = last_line(self.error) if self.error is not None else "it stopped"
        return RunFailed(f"the learner (Ray Train gang) failed and train.max_failures "
                         f"({self.gang.max_failures}) restarts are used up: {cause}")

    def wait_start(self, timeout: float = HELLO_SECONDS):
        """The next hello from rank 0 (a LearnerStart); RunFailed if the gang died or hung instead."""
        import ray

        start = ray.get(self.broker.wait_hello.remote(self.hellos + 1, timeout), timeout=timeout + 60)
        if start is None:
            self.join(timeout=30)
            if self.error is None and self.is_alive():
                raise RunFailed(f"the learner (Ray Train gang) did not start within {timeout:.0f}s: are there "
                                "resources for train.num_workers, or is a worker stuck loading the model?")
            raise self.failure()
        self.hellos += 1
        return start

    def restarted(self) -> None:
        """The gang said hello again (a Restarted result): address the next orders to the new gang."""
        self.hellos += 1

    def submit(self, order):
        return self.broker.submit.remote(order)

    def save_now(self, step: int, version: int, controller_state: str) -> None:
        """A checkpoint of the step rank 0 is at, outside the schedule; RunFailed if the gang cannot."""
        import ray

        from .types import StepDone, StepOrder

        order = StepOrder(step=step, pairs=(), sync=False, version=version, checkpoint=controller_state,
                          incarnation=self.hellos)
        result = ray.get(self.submit(order), timeout=SAVE_SECONDS)
        if not isinstance(result, StepDone):
            raise RunFailed(f"the learner could not save step {step}: {result}")

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


def learner_loop(config: dict) -> None:
    """Ray Train's train_loop_per_worker: worker.train_loop, imported (torch and the learner's modules)
    with the garbage collector paused (gc_pause.py). The driver pickles only this function."""
    from .gc_pause import paused_gc

    with paused_gc():
        from .worker import train_loop
    train_loop(config)


def trainer_class(one_machine: bool = False):
    """Ray Train's TorchTrainer without what a gang of ours does not use. Each left-out helper is an
    actor, a process of ~1.5 CPU-seconds to start, on cores the vLLM engine is starting on:
    - the dataset manager, which serves Ray Datasets shards: a gang is given none (its orders come
      through the broker);
    - with `one_machine` (every node on this machine's loopback: a local or `up` cluster):
      - the placement-group cleaner, which removes the gang's placement group should Ray Train's
        controller die while the driver lives (ours then fails the run, and the job's end removes it);
      - the autoscaling coordinator, which relays the gang's resource request to an autoscaler (no
        autoscaler can add a node to a cluster on loopback); Ray Train's controller waits for it."""
    from ray.train.torch import TorchTrainer
    from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
    from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback
    from ray.train.v2._internal.execution.scaling_policy.fixed import FixedScalingPolicy

    class FixedWithoutAutoscaler(FixedScalingPolicy):   # pickled by value for Ray Train's controller
        def after_controller_start(self, train_run_context):
            self._requester_id = f"train-{train_run_context.run_id}"

        def _maybe_send_resource_request(self):
            pass

        def _send_resource_request(self):
            pass

        def _cancel_resource_request(self):
            pass

    class Trainer(TorchTrainer):
        def _create_default_callbacks(self):
            callbacks = super()._create_default_callbacks()
            return [c for c in callbacks if not (isinstance(c, DatasetsCallback) and not self.datasets)
                    and not (isinstance(c, PlacementGroupCleanerCallback) and one_machine)]

        def _initialize_and_run_controller(self, **kwargs):
            if one_machine:
                kwargs["scaling_policy"] = FixedWithoutAutoscaler(self.scaling_config)
            return super()._initialize_and_run_controller(**kwargs)

    return Trainer
