"""The checked sync (`sync.verify`): the trainer's checksums of a version it publishes, and their
comparison with what vLLM's `compute_weight_checksums` reports from an engine.

Kept apart from transfer.py so that the driver, which compares, never imports vLLM (5 CPU-seconds,
which a first checked sync used to spend in the middle of the run's first steps).
"""

from __future__ import annotations

import hashlib
import re

import torch

FUSED = {"q_proj": ("qkv_proj", ("q_proj", "k_proj", "v_proj")), "gate_proj": ("gate_up_proj", ("gate_proj", "up_proj"))}
EMPTY = hashlib.sha256(b"").hexdigest()


def digest(t: torch.Tensor) -> str:
    """vLLM's checksum of one tensor (model_loader.weight_checksum): sha256 of its bytes."""
    return hashlib.sha256(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy()).hexdigest()


def digests_as_held(t: torch.Tensor, dtype: torch.dtype) -> tuple[str, ...]:
    """A tensor's checksums as an engine in `dtype` may hold it: cast to `dtype`, or, below float32, also
    in float32, as sent or cast first: vLLM on CPU keeps a bf16 engine's small-GEMM biases in float32
    (rounded to bf16 at load, and loaded as sent by a reload)."""
    cast = t.to(dtype)
    if dtype == torch.float32:
        return (digest(cast),)
    return tuple(dict.fromkeys((digest(cast), digest(cast.float()), digest(t.float()))))


def expected_digests(tensors: dict, dtype: torch.dtype) -> dict[str, tuple[str, ...]]:
    """The trainer's checksums of every tensor an engine may hold, cast to the engine's dtype: each under
    its own name, and q/k/v and gate/up also as vLLM fuses them (`qkv_proj`, `gate_up_proj`)."""
    out = {n: digests_as_held(t, dtype) for n, t in tensors.items()}
    for name in tensors:
        m = re.match(r"(.*)\.(q_proj|gate_proj)\.(weight|bias)$", name)
        fused, parts = FUSED[m[2]] if m else (None, ())
        names = [f"{m[1]}.{p}.{m[3]}" for p in parts] if m else []
        if names and all(n in tensors for n in names):
            out[f"{m[1]}.{fused}.{m[3]}"] = digests_as_held(torch.cat([tensors[n] for n in names]), dtype)
    return out


def check(expected: dict[str, tuple[str, ...]], reported: dict[str, str]) -> tuple[int, list[str]]:
    """An engine's checksums (vLLM's `compute_weight_checksums`, names prefixed by its rank) against the
    trainer's: (tensors compared, names that differ). A tensor vLLM keeps in a backend layout cannot be
    compared: on CPU, linear weights pre-packed for oneDNN report an empty tensor."""
    compared, wrong = 0, []
    for full, got in reported.items():
        name = full.rsplit(":", 1)[-1]
        if name not in expected or got == EMPTY:
            continue
        compared += 1
        if got not in expected[name]:
            wrong.append(name)
    return compared, wrong
