"""Small edges of a run, without Ray: how a run ended, which clusters are on loopback, the job's command
line, a shared judge's config, an endpoint judge's counts in a rollout record, and the start-up figures."""

from __future__ import annotations

import os
import sys

import pytest

from online_dpo.cli_job import entrypoint
from online_dpo.cluster import on_loopback
from online_dpo.config import ConfigError, load_config
from online_dpo.controller import stop_kind
from online_dpo.rollout import usage_sums
from online_dpo.run_stats import LAUNCHED_AT, RunStats, launched_at
from online_dpo.types import Labels


def test_a_run_that_met_its_own_stop_rule_is_whole():
    assert stop_kind(None, False, False) == "max_steps"
    assert stop_kind("converged: the judge separated only 0 of 64", False, False) == "converged"
    assert stop_kind("KL limit: the KL estimate averaged 16", False, False) == "max_kl"
    assert stop_kind("stopped by SIGTERM", True, False) == "signal"
    assert stop_kind("no training step finished in 151s", False, True) == "failure"


def test_loopback_addresses():
    assert on_loopback("127.0.0.1:6379") and on_loopback("ray://127.0.0.1:10001")
    assert not on_loopback("10.0.0.5:6379")


def test_the_job_runs_this_command_line_here_without_job():
    cmd = entrypoint(["train", "configs/a b.yaml", "--job", "--set", "train.beta=0.2"])
    assert cmd.startswith(f"cd {os.getcwd()}") and f"exec {sys.executable} -m online_dpo.cli train" in cmd
    assert "'configs/a b.yaml'" in cmd and "--job" not in cmd and "train.beta=0.2" in cmd
    assert "--no-job" not in entrypoint(["train", "--no-job"])


def test_start_up_counts_from_the_launch_and_each_phase_once(monkeypatch):
    import time

    import psutil

    # this process's start, from /proc (psutil's is within a second: it counts from a whole-second boot time)
    assert abs(launched_at() - psutil.Process().create_time()) < 1.5 and launched_at() < time.time()
    monkeypatch.setenv(LAUNCHED_AT, str(time.time() - 5))   # a job: counts from the submitting command
    stats = RunStats()
    assert 4.9 <= stats.marks["cluster"] < 7
    first = stats.mark("actors_up")
    assert stats.mark("actors_up") == first and 5 <= first < 7
    stats.training()
    stats.step_done({"step": 1, "pairs": 32, "step_seconds": 0.1, "wait_seconds": 0.0}, FakeRollouts(), 1)
    out = stats.startup()
    assert out["first_step_seconds"] == out["startup_seconds"]["first_step"] >= first
    assert list(out["startup_seconds"]) == ["cluster", "actors_up", "first_step"]


class FakeRollouts:
    latest: dict = {}
    busy: dict = {}
    stale = 0


def test_a_shared_judge_is_named_by_its_app():
    base = ["judge.kind=deployment", "judge.function=null"]
    with pytest.raises(ConfigError, match="needs app"):
        load_config(None, base)
    with pytest.raises(ConfigError, match="app is only for judge kind 'deployment'"):
        load_config(None, ["judge.app=judge"])
    assert load_config(None, base + ["judge.app=judge"]).judge.app == "judge"


def test_endpoint_usage_sums_over_a_rounds_label_calls():
    labels = [Labels(groups=2, usage={"requests": 4, "cache_hits": 1}), Labels(groups=1, usage={"requests": 2}),
              Labels(groups=1)]
    assert usage_sums(labels) == {"judge_requests": 6, "judge_cache_hits": 1}
