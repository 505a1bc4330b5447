"""`online-dpo train` as a Ray job (on the `up` cluster, or with --job): a local run submitted through Ray's
Job Submission API, its log streamed back.

The command starts (or joins) the cluster as usual, then submits itself as a
Ray job: the same command line, run by Ray in this directory with
ONLINE_DPO_IN_JOB set (so it trains instead of submitting again). The job's
log streams to this terminal, and the dashboard's Jobs page shows it: the
step lines, warnings and the summary. Ctrl-C or SIGTERM is passed to the
job's driver, which stops as a terminal run does (a checkpoint, a partial
summary, exit 130 or 143); a second signal stops it at once. The command
exits with the job's exit code.
"""

from __future__ import annotations

import os
import shlex
import signal
import sys
import time

IN_JOB = "ONLINE_DPO_IN_JOB"
POLL = 0.3   # seconds between reads of the job's log


def in_job() -> bool:
    return bool(os.environ.get(IN_JOB))


def dashboard_url() -> str:
    from ray._private import worker

    url = worker.global_worker.node.webui_url if worker.global_worker.node is not None else None
    if not url:
        raise RuntimeError("this Ray cluster has no dashboard, so no Job Submission API: run without --job")
    return url if url.startswith("http") else f"http://{url}"


def entrypoint(argv: list[str]) -> str:
    """The job's command: this command line, minus --job / --no-job, in this directory, with this Python."""
    args = [a for a in argv if a not in ("--job", "--no-job")]
    return f"cd {shlex.quote(os.getcwd())} && exec {shlex.quote(sys.executable)} -m online_dpo.cli {shlex.join(args)}"


class Forward:
    """Signals to this process, passed on to the job's driver (stop_job before the driver is up)."""

    def __init__(self):
        self.pending: list[int] = []

    def install(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda signum, frame: self.pending.append(signum))

    def deliver(self, client, job: str, info) -> None:
        while self.pending:
            signum = self.pending.pop(0)
            pid = getattr(getattr(info, "driver_info", None), "pid", None)
            if pid:
                os.kill(int(pid), signum)
            else:
                client.stop_job(job)


def run_as_job(argv: list[str], name: str, say) -> int:
    """Submit `online-dpo <argv>` as a Ray job, stream its log to stdout until it ends; its exit code."""
    from ray.job_submission import JobSubmissionClient

    from .run_stats import LAUNCHED_AT, launched_at

    os.environ.setdefault(LAUNCHED_AT, str(launched_at()))   # the job's start-up counts from this command's
    client = JobSubmissionClient(dashboard_url())
    env = {k: v for k, v in os.environ.items() if k.startswith(("ONLINE_DPO_", "HF_", "VLLM_"))}
    job = client.submit_job(entrypoint=entrypoint(argv), submission_id=f"online-dpo-{name}-{int(time.time())}",
                            runtime_env={"env_vars": {**env, IN_JOB: "1"}})   # connect() adds the rest
    say(f"submitted as Ray job {job}: its log is on the dashboard's Jobs page, and here")
    forward, printed = Forward(), 0
    forward.install()
    while True:
        info = client.get_job_info(job)
        logs = client.get_job_logs(job)
        sys.stdout.write(logs[printed:])
        sys.stdout.flush()
        printed = len(logs)
        if info.status.is_terminal():
            break
        forward.deliver(client, job, info)
        time.sleep(POLL)
    if info.driver_exit_code is not None:
        return info.driver_exit_code
    return 0 if str(info.status) == "SUCCEEDED" else 1
