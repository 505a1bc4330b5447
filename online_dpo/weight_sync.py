"""Versioned weight transport from trainer rank 0 to samplers and serve replicas.

The trainer publishes a state dict as policy version v; every receiver then
loads that version and reports it back. A transport owns how the bytes travel:

- `ObjectStoreTransport` (CPU, and any cluster): the weights are serialised
  once to safetensors bytes and put into Ray's object store; receivers on any
  node fetch them through Ray, so no shared filesystem is needed.
- A GPU NCCL transport (vLLM's weight-transfer engine) can sit beside it with
  the same `publish` / `fetch` pair.

Receivers are Ray actors with a `load_weights(handle) -> int` method that
returns the version they now hold.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(frozen=True)
class WeightsHandle:
    """What travels to each receiver: the version and where to get its bytes."""
    version: int
    transport: str
    payload: Any          # transport-specific (a one-item list holding an ObjectRef)
    nbytes: int


@dataclass(frozen=True)
class SyncReport:
    version: int
    receivers: int
    nbytes: int
    seconds: float
    versions: tuple[int, ...]


class Transport(Protocol):
    name: str

    def publish(self, state_dict: dict, version: int) -> WeightsHandle: ...

    def fetch(self, handle: WeightsHandle) -> bytes: ...


def export_state_dict(model, dtype=None) -> dict:
    """The HF-named weights to send: contiguous, on CPU, tied lm_head dropped."""
    model = getattr(model, "module", model)  # unwrap DDP
    tied = getattr(model.config, "tie_word_embeddings", False)
    out = {}
    for name, t in model.state_dict().items():
        if tied and name == "lm_head.weight":
            continue
        t = t.detach()
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        out[name] = t.to("cpu", copy=False).contiguous()
    return out


class ObjectStoreTransport:
    name = "object_store"

    def publish(self, state_dict: dict, version: int) -> WeightsHandle:
        import ray
        from safetensors.torch import save

        blob = save(state_dict, metadata={"policy_version": str(version)})
        return WeightsHandle(version=version, transport=self.name,
                             payload=[ray.put(blob)], nbytes=len(blob))

    def fetch(self, handle: WeightsHandle) -> bytes:
        import ray

        return ray.get(handle.payload[0])


TRANSPORTS = {ObjectStoreTransport.name: ObjectStoreTransport}


def get_transport(name: str) -> Transport:
    return TRANSPORTS[name]()


def push(handle: WeightsHandle, receivers: list, timeout: float | None = 600) -> SyncReport:
    """Send one version to every receiver and wait until each holds it."""
    import ray

    start = time.time()
    versions = ray.get([r.load_weights.remote(handle) for r in receivers], timeout=timeout)
    bad = [v for v in versions if v != handle.version]
    if bad:
        raise RuntimeError(f"weight sync to version {handle.version}: receivers report {versions}")
    return SyncReport(version=handle.version, receivers=len(receivers), nbytes=handle.nbytes,
                      seconds=time.time() - start, versions=tuple(versions))


class PolicyStore:
    """The latest published version, for receivers that pull (serve replicas).

    Serve replicas cannot be addressed one by one, and autoscaling adds them
    at any time, so they poll this actor and load any newer version
    themselves; a new replica starts from the latest one. Holding the handle
    keeps exactly one version's bytes alive in the object store.
    """

    def __init__(self):
        self.handle: WeightsHandle | None = None

    def publish(self, handle: WeightsHandle) -> int:
        if self.handle is None or handle.version > self.handle.version:
            self.handle = handle
        return self.handle.version

    def version(self) -> int:
        return self.handle.version if self.handle is not None else 0

    def latest(self) -> WeightsHandle | None:
        return self.handle
