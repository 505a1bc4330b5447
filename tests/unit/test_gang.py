"""The Ray Train gang's trainer (constructed, not run: no cluster)."""

def test_the_gang_starts_no_dataset_manager_but_keeps_ray_trains_other_callbacks():
    """A gang is given no Ray Datasets, so Ray Train's dataset manager (one more process at start) is
    left out; a trainer given datasets keeps it."""
    from ray.train import ScalingConfig
    from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
    from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

    from online_dpo.gang import trainer_class

    kinds = [type(c) for c in trainer_class()(lambda: None, scaling_config=ScalingConfig(num_workers=1))
             ._create_default_callbacks()]
    assert DatasetsCallback not in kinds and PlacementGroupCleanerCallback in kinds
    given = trainer_class()(lambda: None, scaling_config=ScalingConfig(num_workers=1), datasets={"x": [1]})
    assert DatasetsCallback in [type(c) for c in given._create_default_callbacks()]
