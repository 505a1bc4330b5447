"""Why a run failed, in one line a user can act on (no Ray, no torch)."""

from __future__ import annotations


class RunFailed(RuntimeError):
    """The run cannot go on; the message says what failed and, where it can, what to change."""


class JudgeFailed(RunFailed):
    """The judge is broken, not the policy converged: its verdicts are mostly malformed or not finite, or
    its endpoint does not answer. The run stops with everything saved, and fails."""


def last_line(err: BaseException) -> str:
    """The cause at the bottom of a Ray error's remote traceback."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    return lines[-1] if lines else repr(err)


def death_cause(err: BaseException) -> str:
    """One line on why an actor died: out of memory, how its process exited, or its last error line."""
    text = " ".join(str(err).split())
    if "OutOfMemoryError" in type(err).__name__ or "running low on memory" in text:
        return "Ray killed it because the node ran low on memory (out of memory)"
    if "Worker exit detail:" in text:
        detail = text.split("Worker exit detail:", 1)[1].strip()
        return detail.split(". ")[0].rstrip(".")
    return last_line(err)
