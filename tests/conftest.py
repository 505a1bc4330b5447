"""Shared fixtures. Tests are sorted by what they need:
tests/unit (no Ray, no vLLM), tests/ray (a local Ray cluster on 127.0.0.1,
real vLLM), tests/e2e (the real CLI in a subprocess)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def embedded_model() -> str:
    """Path of the embedded default policy (built once, cached)."""
    from online_dpo.embedded import EMBEDDED, resolve_model

    return resolve_model(EMBEDDED)


@pytest.fixture(scope="session")
def ray_local():
    """A local single-node Ray cluster bound to 127.0.0.1, shared by the Ray tests."""
    from online_dpo.cluster import serve_defaults, system_config, use_loopback

    use_loopback()
    serve_defaults()
    import ray

    here = os.path.dirname(os.path.abspath(__file__))
    ray.init(num_cpus=4, include_dashboard=True, dashboard_host="127.0.0.1", _node_ip_address="127.0.0.1",
             _system_config=system_config(1000),  # scrapes see values within ~1 s
             namespace="online-dpo-tests", log_to_driver=False,
             runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false",
                                       # so Ray workers can import test helpers (tests/ray/fakes.py)
                                       "PYTHONPATH": os.path.join(here, "ray")}})
    yield ray
    ray.shutdown()


def pytest_collection_modifyitems(items):
    for item in items:
        path = str(item.fspath)
        if "/tests/ray/" in path:
            item.add_marker(pytest.mark.ray)
        elif "/tests/e2e/" in path:
            item.add_marker(pytest.mark.e2e)


def pytest_sessionfinish(session, exitstatus):
    """Objects frozen by gc_pause.paused_gc (a judge built in a test) go back to the collector before
    exit, so extension modules do not report them as leaked."""
    import gc

    gc.unfreeze()
