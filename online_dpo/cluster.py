"""Connect to the Ray cluster, or start a local one bound to 127.0.0.1.

`online-dpo train` runs on the current cluster when there is one (RAY_ADDRESS,
or a `ray start` cluster on this machine, which is also how it runs as a Ray
Job entrypoint). Otherwise it starts a local single-node cluster on loopback:
Ray resolves its node address from the network interface unless clusters are
"disabled" (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0), which makes it use
127.0.0.1 for the node, GCS, raylet and dashboard alike.
"""

from __future__ import annotations

import os
from pathlib import Path


def existing_address() -> str | None:
    if os.environ.get("RAY_ADDRESS"):
        return os.environ["RAY_ADDRESS"]
    if Path("/tmp/ray/ray_current_cluster").exists():
        return "auto"
    return None


def use_loopback() -> None:
    """Keep a local cluster on 127.0.0.1 (this process and the ones it starts)."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False


def connect(namespace: str, num_cpus: float | None = None, dashboard: bool = True,
            log_to_driver: bool = True) -> bool:
    """Join or start a cluster; returns True when this call started a local one."""
    import ray

    if ray.is_initialized():
        return False
    address = existing_address()
    env = {"env_vars": {"TOKENIZERS_PARALLELISM": "false"}}
    if address:
        try:
            ray.init(address=address, namespace=namespace, log_to_driver=log_to_driver,
                     runtime_env=env)
            return False
        except ConnectionError:
            if address != "auto":
                raise
    use_loopback()
    ray.init(num_cpus=num_cpus, namespace=namespace, include_dashboard=dashboard,
             dashboard_host="127.0.0.1", _node_ip_address="127.0.0.1",
             log_to_driver=log_to_driver, runtime_env=env)
    return True
