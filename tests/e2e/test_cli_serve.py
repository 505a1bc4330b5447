"""Serving through the real CLI: live during training (`serve.enabled`), then `online-dpo serve RUN_DIR`."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[2]
STEPS = 8


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url, timeout=10):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


def post(url, body, timeout=60):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def wait_healthy(base, proc, limit=300):
    deadline = time.time() + limit
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"exited early: {proc.stdout.read()[-3000:]}")
        try:
            return get(base + "/health", timeout=2)
        except (urllib.error.URLError, OSError, json.JSONDecodeError):
            time.sleep(0.5)
    raise AssertionError("server never became healthy")


def cmdline(proc: psutil.Process) -> str:
    """A process's command line; empty for one that exited or turned zombie meanwhile."""
    try:
        return " ".join(proc.cmdline())
    except psutil.Error:
        return ""


def spawn(*args):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.Popen([sys.executable, "-m", "online_dpo.cli", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.fixture(scope="module")
def live_run(tmp_path_factory, embedded_model):
    """Train with the server on and `serve.keep_alive`; once training is done, kill the replica:
    the policy store (not the finished trainer) owns the final weights, so the new replica serves them."""
    out, port = tmp_path_factory.mktemp("runs"), free_port()
    proc = spawn("train", "--set", f"run.output_dir={out}", "--set", "serve.enabled=true",
                 "--set", "serve.keep_alive=true",
                 "--set", f"serve.port={port}", "--set", "serve.num_cpus=0.2", "--set", "serve.dtype=float32",
                 "--set", "serve.poll_seconds=0.2", "--set", f"train.max_steps={STEPS}", "--set", "sync.every_steps=1",
                 "--set", "eval.prompts=8")
    try:
        base = f"http://127.0.0.1:{port}"
        seen, errors = [], []
        wait_healthy(base, proc)
        while proc.poll() is None:  # one client, asking until it sees the final version
            try:
                body = post(base + "/v1/completions", {"prompt": "I bought this kettle last month and",
                                                        "max_tokens": 8})
                seen.append(body["policy_version"])
                if body["policy_version"] == STEPS:
                    break
            except Exception as e:
                errors.append(repr(e))
        deadline = time.time() + 300
        while not list(out.glob("*/summary.json")):   # training is over; the process keeps serving
            assert proc.poll() is None and time.time() < deadline
            time.sleep(0.2)
        cluster = psutil.Process(proc.pid).children(recursive=True)
        (replica,) = [p for p in cluster if cmdline(p).startswith("ray::ServeReplica")]
        replica.kill()
        replica.wait(10)
        deadline, after_restart = time.time() + 180, None
        while time.time() < deadline and after_restart is None:   # Serve starts a new replica
            try:
                after_restart = post(base + "/v1/completions", {"prompt": "I bought", "max_tokens": 4}, timeout=5)
            except (urllib.error.URLError, OSError, json.JSONDecodeError):
                time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=120)
        assert proc.returncode == 143, rest[-3000:]
        assert not psutil.wait_procs(cluster, timeout=20)[1], "processes of the run's cluster are left"
    finally:   # a failed check above never leaves the run (and its cluster) behind for the rest of the suite
        if proc.poll() is None:
            tree = psutil.Process(proc.pid).children(recursive=True)
            proc.kill()
            proc.wait(60)
            for child in tree:
                with contextlib.suppress(psutil.Error):
                    child.kill()
    (run_dir,) = [p for p in out.iterdir() if p.is_dir()]
    return run_dir, seen, errors, after_restart


def test_a_replica_restarted_after_training_serves_the_final_version(live_run):
    *_, after_restart = live_run
    assert after_restart is not None and after_restart["policy_version"] == STEPS


def test_clients_see_the_policy_improve_live(live_run):
    _, seen, errors, _ = live_run
    assert not errors, errors[:3]
    assert seen == sorted(seen), "versions went backwards"
    assert seen[-1] == STEPS and len(set(seen)) >= 3, seen


def test_serve_a_finished_run_directory_until_interrupted(live_run):
    run_dir, *_ = live_run
    port = free_port()
    proc = spawn("serve", str(run_dir), "--set", f"serve.port={port}", "--set", "serve.dtype=float32",
                 "--set", "serve.num_cpus=1")
    try:
        health = wait_healthy(f"http://127.0.0.1:{port}", proc)
        assert health["model"] == run_dir.name
        line = ""
        while "serving" not in line:
            line = proc.stdout.readline()
        urls = re.findall(r"http://[0-9.:]+/v1", line)   # Serve's proxy, then the replica's own port
        assert len(urls) == 2 and urls[0] == f"http://127.0.0.1:{port}/v1", line
        for url in urls:
            body = post(url + "/chat/completions", {"messages": [{"role": "user", "content": "Write a review."}],
                                                    "max_tokens": 16})
            assert body["choices"][0]["message"]["content"] and body["model"] == run_dir.name
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out[-2000:]


def test_serve_refuses_a_path_that_is_not_a_model(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "online_dpo.cli", "serve", str(tmp_path)], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and "neither a run directory" in proc.stderr
