"""Fake actors for Ray tests; importable by Ray workers (tests/ray is on their PYTHONPATH)."""

from __future__ import annotations

import hashlib


class FakeReceiver:
    """Records what a sampler would load: versions in arrival order and a digest of the bytes."""

    def __init__(self):
        self.seen = []

    def load_weights(self, handle) -> int:
        from online_dpo.weight_sync import get_transport

        blob = get_transport(handle.transport).fetch(handle)
        self.seen.append((handle.version, hashlib.sha256(blob).hexdigest(), len(blob)))
        return handle.version

    def history(self):
        return self.seen


def constant(prompts, responses):
    """A judge rule that cannot tell responses apart: every pair is a tie."""
    return [0.0] * len(responses)


_calls = 0


def ties_after_some_calls(prompts, responses):
    """Separates responses (by length) for its first 6 calls, then ties everything, like a judge
    facing a policy that has converged."""
    global _calls
    _calls += 1
    return [float(len(r)) for r in responses] if _calls <= 6 else [0.0] * len(responses)
