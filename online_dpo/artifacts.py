"""Model directories on nodes that do not share a filesystem with the driver.

A run names its models by hub id or by a local directory on the driver's node
(the embedded default is built there). An actor on another node may not see
that directory. `FileServer`, an actor pinned to the driver's node, hands out a
directory as tar bytes through Ray's object store, and `local_model()` on the
actor's side uses the path when it exists on its node, and otherwise fetches it
once into a local cache. Hub ids pass through unchanged (each node downloads).
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from pathlib import Path


class FileServer:
    """Serves directories of the driver's node as tar bytes."""

    def tar(self, path: str) -> bytes:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            tar.add(path, arcname=".")
        return buf.getvalue()


NAME = "file-server"
FETCH_SECONDS = 1800   # a model directory arrives within this (tens of GB over a slow link)


def start_file_server(name: str = NAME):
    """A FileServer on this (the driver's) node. Actors that may restart get its name rather than
    its handle (a handle among constructor arguments is kept in the object store)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    node = ray.get_runtime_context().get_node_id()
    return ray.remote(FileServer).options(
        num_cpus=0, name=name,
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=node, soft=False)).remote()


def cache_root() -> Path:
    root = os.environ.get("ONLINE_DPO_HOME") or Path.home() / ".cache" / "online-dpo"
    return Path(root) / "fetched"


def fetch_model(path: str, server, root: Path | None = None) -> str:
    """Copy the server's directory `path` into the local cache (once); returns the copy."""
    import ray

    dest = (root or cache_root()) / hashlib.sha1(path.encode()).hexdigest()[:16]
    if (dest / ".complete").exists():
        return str(dest)
    tmp = dest.with_name(dest.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(ray.get(server.tar.remote(path), timeout=FETCH_SECONDS)), mode="r") as tar:
        tar.extractall(tmp, filter="data")
    (tmp / ".complete").write_text(path)
    if dest.exists():  # another process on this node finished first
        return str(dest)
    tmp.rename(dest)
    return str(dest)


def local_model(path: str, server=None) -> str:
    """A path this process can load `path` from: itself, a hub id, or a fetched copy.
    `server` is a FileServer handle or its actor name (in this job's namespace)."""
    if server is None or os.path.exists(path) or not path.startswith("/"):
        return path
    if isinstance(server, str):
        import ray

        server = ray.get_actor(server)
    return fetch_model(path, server)
