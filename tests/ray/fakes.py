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


def nan_for_some(prompts, responses):
    """VADER, but NaN or infinity for about one response in seven: a judge with stray bad scores."""
    from online_dpo.judges.rule import vader_compound

    bad = (float("nan"), float("inf"))
    return [bad[len(r) % 2] if len(r) % 7 == 0 else s for r, s in zip(responses, vader_compound(prompts, responses))]


def always_nan(prompts, responses):
    """A broken judge: every score is NaN."""
    return [float("nan")] * len(responses)


_hang_calls = 0


def hangs_after_some_calls(prompts, responses):
    """VADER for this process's first 3 calls, then it never answers: a judge that hangs."""
    import time

    from online_dpo.judges.rule import vader_compound

    global _hang_calls
    _hang_calls += 1
    if _hang_calls > 3:
        time.sleep(3600)
    return vader_compound(prompts, responses)
