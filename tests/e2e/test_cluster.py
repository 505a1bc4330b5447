"""Several Ray nodes on one machine, all on 127.0.0.1 (inside a loopback-only network
namespace): samplers and trainer workers on different nodes, and `ray job submit`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def can_unshare() -> bool:
    try:
        return subprocess.run(["unshare", "-n", "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.fixture(scope="module")
def multinode(tmp_path_factory, embedded_model):
    if not can_unshare():
        pytest.skip("needs `unshare -n` (root) to keep a multi-node Ray cluster on loopback")
    out = tmp_path_factory.mktemp("multinode")
    cmd = f"ip link set lo up && exec {sys.executable} {HERE / 'multinode_job.py'} {out}"
    proc = subprocess.run(["unshare", "-n", "sh", "-c", cmd], capture_output=True, text=True, timeout=1500)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads(lines[-1].removeprefix("RESULT "))


def test_samplers_and_trainers_run_on_different_nodes(multinode):
    placed = multinode["placed"]
    assert multinode["nodes"] == 3
    assert placed["samplers_on_sampler_node"] and placed["trainers_on_trainer_node"], placed
    assert placed["sampler_nodes"] != placed["trainer_nodes"]
    assert placed["summary"]["steps"] == 4 and placed["policy_exists"]


def test_ray_job_submit_of_the_train_entrypoint_completes(multinode):
    job = multinode["job"]
    assert job["returncode"] == 0, job["tail"]
    assert "SUCCEEDED" in job["status"], job
    assert job["summary"] and job["summary"]["steps"] == 3
