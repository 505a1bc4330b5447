"""`online-dpo monitor`: Prometheus and Grafana for the Ray dashboard, in one step.

Starts the Prometheus and Grafana installed on this machine (their packages,
not ours) on 127.0.0.1 with the configs in cluster/monitoring/: Prometheus
follows Ray's service-discovery file, Grafana gets the Prometheus data source
and the online-dpo dashboard provisioned. It writes a small state file;
`online-dpo train`, when it starts a local cluster while a monitor runs,
points the Ray dashboard at them (RAY_PROMETHEUS_HOST, RAY_GRAFANA_HOST, ...),
has Ray export metrics every 2 s, and holds the cluster at the end until the
final values (the final evaluation) have been scraped.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

MONITORING = Path(__file__).resolve().parent.parent / "cluster" / "monitoring"
EXPORT_SECONDS = 2          # Ray's metrics export interval on clusters started for a monitor
SCRAPE_SECONDS = 2          # cluster/monitoring/prometheus.yml
HINTS = {
    "prometheus": "install it: `sudo apt-get install prometheus` (Debian/Ubuntu), or a release from "
                  "https://prometheus.io/download/ on your PATH",
    "grafana": "install it from Grafana's apt repository (https://grafana.com/docs/grafana/latest/setup-"
               "grafana/installation/debian/) so that `grafana-server` or `grafana` is on your PATH; without it "
               "the metrics are in Prometheus (its /graph page) but the Ray dashboard's Metrics view stays empty",
}


def state_file() -> Path:
    """Where a running monitor leaves its addresses ($ONLINE_DPO_MONITOR overrides it)."""
    if os.environ.get("ONLINE_DPO_MONITOR"):
        return Path(os.environ["ONLINE_DPO_MONITOR"])
    root = os.environ.get("ONLINE_DPO_HOME") or Path.home() / ".cache" / "online-dpo"
    return Path(root) / "monitor.json"


def attached() -> dict | None:
    """The running monitor's addresses, or None (no monitor, or its process is gone)."""
    path = state_file()
    try:
        state = json.loads(path.read_text())
        os.kill(state["pid"], 0)
    except (OSError, ValueError, KeyError):
        return None
    return state


def ray_env(state: dict) -> dict[str, str]:
    """What the Ray dashboard needs to show the monitor's charts (set before the cluster starts)."""
    env = {}
    if state.get("prometheus"):
        env.update(RAY_PROMETHEUS_HOST=state["prometheus"], RAY_PROMETHEUS_NAME="Prometheus")
    if state.get("grafana"):
        env.update(RAY_GRAFANA_HOST=state["grafana"], RAY_GRAFANA_IFRAME_HOST=state["grafana"])
    return env


def hold_seconds(state: dict | None) -> float:
    """How long a finished run keeps its local cluster so the last values reach Prometheus."""
    return EXPORT_SECONDS + SCRAPE_SECONDS + 1.0 if state and state.get("prometheus") else 0.0


def prometheus_command(binary: str, port: int, data: Path) -> list[str]:
    return [binary, f"--config.file={MONITORING / 'prometheus.yml'}", f"--web.listen-address=127.0.0.1:{port}",
            f"--storage.tsdb.path={data / 'prometheus'}", "--log.level=warn"]


def grafana_command(binary: str, port: int, data: Path, prometheus_url: str, password: str,
                    anonymous: bool = False) -> tuple[list[str], dict]:
    """Grafana on loopback with a fresh admin password; anonymous viewers only when asked for (the Ray
    dashboard's embedded charts then show without a Grafana login)."""
    home = next((p for p in ("/usr/share/grafana", "/opt/grafana") if Path(p).exists()), None)
    cmd = [binary] + (["server"] if Path(binary).name == "grafana" else []) + \
        ([f"--homepath={home}"] if home else [])
    dashboards = data / "dashboards"
    dashboards.mkdir(parents=True, exist_ok=True)
    shutil.copy(MONITORING / "grafana-online-dpo.json", dashboards / "online-dpo.json")
    env = {**os.environ,
           "GF_SERVER_HTTP_ADDR": "127.0.0.1", "GF_SERVER_HTTP_PORT": str(port),
           "GF_PATHS_DATA": str(data / "grafana"), "GF_PATHS_PROVISIONING": str(MONITORING / "grafana" / "provisioning"),
           "GF_SECURITY_ALLOW_EMBEDDING": "true", "GF_SECURITY_ADMIN_PASSWORD": password,
           "GF_AUTH_ANONYMOUS_ENABLED": "true" if anonymous else "false", "GF_AUTH_ANONYMOUS_ORG_ROLE": "Viewer",
           "PROMETHEUS_URL": prometheus_url, "DASHBOARDS_DIR": str(dashboards)}
    return cmd, env


def wait_http(url: str, proc: subprocess.Popen, timeout: float = 60) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return True
        except OSError:
            time.sleep(0.3)
    return False


def run(prometheus_port: int, grafana_port: int, data: Path, say=print, anonymous: bool = False) -> int:
    """Start what is installed, write the state file, wait until interrupted; 1 if nothing could start."""
    procs, state = [], {"pid": os.getpid(), "prometheus": None, "grafana": None}
    data.mkdir(parents=True, exist_ok=True)
    try:
        binary = shutil.which("prometheus")
        if binary is None:
            say(f"prometheus is not installed; {HINTS['prometheus']}")
        else:
            proc = subprocess.Popen(prometheus_command(binary, prometheus_port, data))
            procs.append(proc)
            url = f"http://127.0.0.1:{prometheus_port}"
            if not wait_http(url + "/-/ready", proc):
                say(f"prometheus did not start (exit {proc.poll()}); is port {prometheus_port} free?")
                return 1
            state["prometheus"] = url
            say(f"Prometheus: {url} (following /tmp/ray/prom_metrics_service_discovery.json)")
        binary = shutil.which("grafana-server") or shutil.which("grafana")
        if binary is None:
            say(f"grafana is not installed; {HINTS['grafana']}")
        elif state["prometheus"]:
            password = secrets.token_urlsafe(12)   # new at every start, shown once, kept nowhere
            cmd, env = grafana_command(binary, grafana_port, data, state["prometheus"], password, anonymous)
            proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL)
            procs.append(proc)
            url = f"http://127.0.0.1:{grafana_port}"
            if wait_http(url + "/api/health", proc):
                state["grafana"] = url
                say(f"Grafana: {url}/d/online-dpo (user admin, password {password}"
                    + ("; anonymous viewers allowed)" if anonymous else ")"))
            else:
                say(f"grafana did not start (exit {proc.poll()}); is port {grafana_port} free?")
        if not state["prometheus"]:
            return 1
        state_file().parent.mkdir(parents=True, exist_ok=True)
        state_file().write_text(json.dumps(state))
        say("`online-dpo train` runs started from now on send their metrics here; Ctrl-C stops the monitor")
        while all(p.poll() is None for p in procs):
            time.sleep(1)
        return 1
    finally:
        if attached() and attached().get("pid") == os.getpid():
            state_file().unlink(missing_ok=True)
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
