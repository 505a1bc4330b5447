"""The Ray Train gang's trainer (constructed, not run: no cluster)."""

from ray.train import ScalingConfig
from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

from online_dpo.gang import trainer_class


def kinds(trainer) -> list[type]:
    return [type(c) for c in trainer._create_default_callbacks()]


def test_the_gang_starts_no_dataset_manager_but_keeps_ray_trains_other_callbacks():
    """A gang is given no Ray Datasets, so Ray Train's dataset manager (one more process at start) is
    left out; a trainer given datasets keeps it. Off one machine the placement-group cleaner stays."""
    plain = kinds(trainer_class()(lambda: None, scaling_config=ScalingConfig(num_workers=1)))
    assert DatasetsCallback not in plain and PlacementGroupCleanerCallback in plain
    given = trainer_class()(lambda: None, scaling_config=ScalingConfig(num_workers=1), datasets={"x": [1]})
    assert DatasetsCallback in kinds(given)


def test_on_one_machine_the_gang_needs_no_cleaner_and_no_autoscaler(monkeypatch):
    """On a cluster on loopback, the placement-group cleaner is left out too, and the scaling policy
    the controller gets sends no resource request to Ray's autoscaling coordinator (it would start it)."""
    import ray.train.v2.api.data_parallel_trainer as dpt

    trainer = trainer_class(one_machine=True)(lambda: None, scaling_config=ScalingConfig(num_workers=2))
    plain = kinds(trainer_class()(lambda: None, scaling_config=ScalingConfig(num_workers=2)))
    assert kinds(trainer) == [k for k in plain if k is not PlacementGroupCleanerCallback]
    given = {}
    monkeypatch.setattr(dpt.DataParallelTrainer, "_initialize_and_run_controller",
                        lambda self, **kwargs: given.update(kwargs))
    trainer._initialize_and_run_controller(scaling_policy=None, callbacks=[])
    policy = given["scaling_policy"]
    policy._coordinator_client = None   # any request would need it (an assert in Ray's own methods)
    policy.after_controller_start(type("Context", (), {"run_id": "r"})())
    assert policy.make_decision_for_non_running_worker_group().num_workers == 2
    policy.before_controller_abort()
    from ray import cloudpickle
    assert type(cloudpickle.loads(cloudpickle.dumps(policy))).__name__ == "FixedWithoutAutoscaler"


def test_the_drivers_heavy_imports_are_done_in_a_thread_the_driver_then_waits_for():
    """warm.py imports Ray Train and torch in a thread; finish() returns
    once they are all in sys.modules (a fresh interpreter: this one has them already)."""
    import subprocess
    import sys

    code = ("import sys\nfrom online_dpo.warm import MODULES, warm_imports\n"
            "assert not any(m in sys.modules for m in MODULES)\n"
            "w = warm_imports(); w.finish()\n"
            "assert not w.is_alive() and all(m in sys.modules for m in MODULES), sorted(set(MODULES) - set(sys.modules))\n"
            "print('WARM-OK')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "WARM-OK" in proc.stdout, proc.stderr[-2000:]
