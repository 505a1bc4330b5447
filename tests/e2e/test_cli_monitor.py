"""Live curves through the real CLI: `online-dpo monitor` starts Debian's Prometheus, a run sends
every metric the Grafana dashboard charts there, the final evaluation included."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import psutil
import pytest

from online_dpo.cluster import up_state

ROOT = Path(__file__).resolve().parents[2]
# the default plus an ensemble judge, so the per-objective series on the dashboard are emitted too
ENSEMBLE = str(ROOT / "configs" / "ensemble.yaml")
DASHBOARD = ROOT / "cluster" / "monitoring" / "grafana-online-dpo.json"
pytestmark = pytest.mark.skipif(shutil.which("prometheus") is None,
                                reason="Prometheus is not installed (apt-get install prometheus; .ci/run does)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def query(base: str, expr: str) -> list:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())["data"]["result"]


def test_every_dashboard_metric_reaches_prometheus_with_the_final_evaluation(tmp_path, embedded_model):
    """`online-dpo up` with the monitor's settings, two runs of one config joining it (one series each, by
    run_id; the first a Ray job, as runs on `up` are by default, the second not), every metric of the
    dashboard in Prometheus, then `online-dpo down`."""
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},
           "ONLINE_DPO_MONITOR": str(tmp_path / "monitor.json")}
    port = free_port()
    cli = [sys.executable, "-m", "online_dpo.cli"]
    monitor = subprocess.Popen(cli + ["monitor", "--prometheus-port", str(port), "--grafana-port", str(free_port()),
                                      "--data", str(tmp_path / "data")],
                               cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    up = None
    try:
        deadline = time.time() + 60
        while not (tmp_path / "monitor.json").exists():
            assert monitor.poll() is None and time.time() < deadline, monitor.stdout.read()
            time.sleep(0.2)
        up = subprocess.run(cli + ["up", "--num-cpus", "4", "--dashboard-port", str(free_port())], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
        assert up.returncode == 0 and "a local Ray cluster is up" in up.stdout, up.stdout + up.stderr
        runs = []
        for steps, job in ((4, []), (2, ["--no-job"])):   # eval.judge: its metrics are on the dashboard too
            runs.append(subprocess.run(cli + ["train", ENSEMBLE, *job, "--set", "run.name=monitored-e2e",
                                              "--set", f"run.output_dir={tmp_path / 'runs'}",
                                              "--set", f"train.max_steps={steps}", "--set", "eval.prompts=8",
                                              "--set", "eval.judge={function: 'online_dpo.judges.rule:distinct_words', "
                                                       "num_cpus: 0.1}"],
                                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600))
            assert runs[-1].returncode == 0, runs[-1].stdout[-3000:] + runs[-1].stderr[-3000:]
        assert "joined the Ray cluster" in runs[0].stdout and f"Prometheus at http://127.0.0.1:{port}" in runs[0].stdout
        # on the `up` cluster a run is a Ray job by default (its log on the Jobs page); --no-job is not
        assert "submitted as Ray job" in runs[0].stdout and "submitted as Ray job" not in runs[1].stdout
        base = f"http://127.0.0.1:{port}"
        names = sorted(set(re.findall(r"(ray_online_dpo_\w+)\{", DASHBOARD.read_text())))
        missing = [n for n in names if not query(base, f'last_over_time({n}{{run="monitored-e2e"}}[15m])')]
        assert not missing, f"not in Prometheus: {missing}"
        win = query(base, 'last_over_time(ray_online_dpo_eval_win_rate{run="monitored-e2e"}[15m])')
        assert all(0 <= float(w["value"][1]) <= 1 for w in win)   # the final evaluations' win rates
        steps = query(base, 'max_over_time(ray_online_dpo_train_step{run="monitored-e2e"}[15m])')
        by_run = {s["metric"]["run_id"]: float(s["value"][1]) for s in steps}
        dirs = sorted(p.name for p in (tmp_path / "runs").iterdir())
        assert sorted(by_run) == dirs and sorted(by_run.values()) == [2.0, 4.0], by_run   # two series, by run_id
        state = json.loads(up_state().read_text())
        down, up = subprocess.run(cli + ["down"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=180), None
        assert down.returncode == 0, down.stdout + down.stderr
        left = [p.pid for p in psutil.process_iter(["cmdline"])
                if any(state["session"] in a or a == f"--address={state['address']}" for a in p.info["cmdline"] or [])]
        assert not left, f"processes of the up cluster left after down (the Ray Client server among them?): {left}"
    finally:
        if up is not None:
            subprocess.run(cli + ["down"], cwd=ROOT, env=env, capture_output=True, timeout=180)
        monitor.send_signal(signal.SIGINT)
        out, _ = monitor.communicate(timeout=60)
    assert not (tmp_path / "monitor.json").exists(), out
