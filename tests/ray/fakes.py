"""Judge rules for Ray tests; importable by Ray workers (tests/ray is on their PYTHONPATH)."""

from __future__ import annotations


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
