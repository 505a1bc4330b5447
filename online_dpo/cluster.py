"""Connect to the Ray cluster, or start a local one bound to 127.0.0.1.

`online-dpo train` runs on the current cluster when there is one (RAY_ADDRESS,
or a `ray start` cluster on this machine, which is also how it runs as a Ray
Job entrypoint). Otherwise it starts a local single-node cluster on loopback:
Ray resolves its node address from the network interface unless clusters are
"disabled" (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0), which makes it use
127.0.0.1 for the node, GCS, raylet and dashboard alike.
"""

from __future__ import annotations

import os
import time
from pathlib import Path


def loopback(host: str) -> bool:
    """Whether `host` names this machine's loopback (so nothing beyond it can connect)."""
    import ipaddress

    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def node_ip() -> str:
    """This node's address as Ray knows it (127.0.0.1 on a loopback cluster)."""
    try:
        import ray

        if ray.is_initialized():
            return ray.util.get_node_ip_address()
    except Exception:
        pass
    return "127.0.0.1"


def one_machine() -> bool:
    """Whether every node of the connected cluster is on this machine: its GCS listens on loopback, so
    no other machine can join it (and every node sees the driver's files)."""
    from ray._private import worker

    node = worker.global_worker.node
    return node is not None and loopback(node.gcs_address.rpartition(":")[0])


def existing_address() -> str | None:
    if os.environ.get("RAY_ADDRESS"):
        return os.environ["RAY_ADDRESS"]
    if Path(ADDRESS_FILE).exists():
        return "auto"
    return None


ADDRESS_FILE = "/tmp/ray/ray_current_cluster"   # where `ray start` leaves the address of this machine's cluster


def on_loopback(address: str) -> bool:
    """Whether `address` (or, for "auto", the `ray start` cluster on this machine) is on 127.0.0.1."""
    if address == "auto":
        try:
            address = Path(ADDRESS_FILE).read_text().strip()
        except OSError:
            return False
    return address.removeprefix("ray://").startswith(("127.", "localhost"))


def use_loopback() -> None:
    """Keep a local cluster on 127.0.0.1 (this process and the ones it starts)."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False


SERVE_ENV = {
    # Ray Serve's direct ingress: each policy-server replica answers HTTP on a port of its own
    # (Ray's range, from 30000), beside Serve's proxy on serve.port, which then runs on the head
    # node only. A request to a replica skips the proxy hop and its callbacks for the body: on
    # 2 cores 95 -> 153 req/s, 0.90 of the engine called in-process (bench/serve_vs_direct.py).
    "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
    # Ray holds a stopping direct-ingress replica 30 s for an outside load balancer to notice;
    # there is none by default, so stopping serving takes a second, not half a minute.
    "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "1",
    # Serve's proxy reaches replicas over gRPC instead of Ray actor calls: 95 -> 113 req/s through
    # the proxy on 2 cores.
    "RAY_SERVE_USE_GRPC_BY_DEFAULT": "1",
}


LOCAL_ENV = {
    # Ray Train's preemption watcher polls for nodes being drained; a one-node local cluster has
    # none to drain, and the watcher is one more actor process to start before the first step.
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
}


def serve_defaults() -> None:
    """Ray Serve (and one-node Ray Train) settings for the cluster this process starts (a user's own
    values win). Serve's controller, proxy and replicas read them when they start, so they must be in
    the environment of the process that starts the cluster; on a cluster of your own, export them
    before `ray start`."""
    for k, v in {**SERVE_ENV, **LOCAL_ENV}.items():
        os.environ.setdefault(k, v)


def quiet_ray_notices() -> None:
    """Drop two Ray notices the run reports better itself: a worker death (the run names the
    actor and says it restarts) and Ray Train's 'SIGTERM handler is not set' from its thread."""
    import logging

    from ray._private import worker

    logging.getLogger("ray._private.worker").addFilter(
        lambda r: "SIGTERM handler is not set" not in r.getMessage())
    original = worker.print_to_stdstream
    if getattr(original, "quiet", False):
        return

    def filtered(data, ignore_prefix=False):
        lines = [ln for ln in data.get("lines", []) if "A worker died or was killed" not in ln]
        if lines:
            original({**data, "lines": lines}, ignore_prefix)

    filtered.quiet = True
    worker.print_to_stdstream = filtered


def connect(namespace: str, num_cpus: float | None = None, dashboard: bool = True,
            log_to_driver: bool = True, metrics_export_ms: int | None = None) -> bool:
    """Join or start a cluster; returns True when this call started a local one."""
    import ray

    if ray.is_initialized():
        return False
    from ray._private import auto_init_hook

    # A Ray call from a thread still winding down after shutdown() must not start a new cluster.
    auto_init_hook.enable_auto_connect = False
    if not log_to_driver:
        quiet_ray_notices()
    address = existing_address()
    env = {"env_vars": {"TOKENIZERS_PARALLELISM": "false"}}
    if address:
        if address == "auto" and on_loopback(address):   # this machine's `online-dpo up` cluster: the
            use_loopback()                                  # driver must see itself on 127.0.0.1 too
        try:
            ray.init(address=address, namespace=namespace, log_to_driver=log_to_driver,
                     runtime_env=env)
            return False
        except ConnectionError:
            if address != "auto":
                raise
    use_loopback()
    serve_defaults()
    # A cluster started here inherits this environment, so the job needs no runtime_env: with one, the
    # workers Ray prestarts for the first driver (one per CPU) do not match the job's and sit idle while
    # new ones start for the broker and the policy store (2 processes, ~1.3 CPU-seconds at start-up).
    os.environ.update(env["env_vars"])
    ray.init(num_cpus=num_cpus, namespace=namespace, include_dashboard=dashboard,
             dashboard_host="127.0.0.1", _node_ip_address="127.0.0.1",
             log_to_driver=log_to_driver, _system_config=system_config(metrics_export_ms))
    return True


def system_config(metrics_export_ms: int | None = None) -> dict:
    """Ray's settings for a cluster started here. The raylet connects to its own object store, which it
    starts in a thread, and retries every `raylet_client_connect_timeout_milliseconds` (1000 by default):
    on 2 cores about one start in two lost that second. Retried every 50 ms, as many times more (the
    same 10 s for a worker that cannot reach its raylet). `metrics_export_ms`: a monitor's export period."""
    config = {"raylet_client_connect_timeout_milliseconds": 50, "raylet_client_num_connect_attempts": 200}
    if metrics_export_ms:
        config["metrics_report_interval_ms"] = metrics_export_ms
    return config


def shutdown(started: bool, grace: float = 0.05) -> None:
    """Disconnect; when this process started the local cluster, also make sure every process of
    it (GCS, raylet, dashboard and their children: workers, agents) is gone: Ray's shutdown ends
    most at once, a few (the dashboard's module processes, agents) linger and are killed. Those few
    never leave on their own (measured: 4 left after 0.3 s, the time this used to give them)."""
    import ray

    procs = local_processes() if started and ray.is_initialized() else []
    if procs:
        _kill_autoscaler_monitor()
    ray.shutdown()
    end_processes(procs, grace)


def _kill_autoscaler_monitor() -> None:
    """Kill the local cluster's autoscaler monitor before Ray's shutdown: it ignores Ray's SIGTERM,
    and Ray waits a second for it (of the ~1.4 s a shutdown takes); a local cluster has nothing to scale."""
    import subprocess

    from ray._private import ray_constants, worker

    node = getattr(worker, "_global_node", None)
    for info in (node.all_processes.get(ray_constants.PROCESS_TYPE_MONITOR, []) if node is not None else []):
        try:
            info.process.kill()
            info.process.wait(timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            pass


def end_processes(procs: list, grace: float, terminate: bool = False) -> None:
    """Wait `grace` seconds for `procs` to exit (after a SIGTERM each, with `terminate`), then kill the rest.
    A zombie has exited already (only its parent has not reaped it): it is not waited for."""
    if not procs:
        return
    import psutil

    for proc in procs if terminate else []:
        try:
            proc.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=grace)
    alive = [p for p in alive if not _zombie(p)]
    for proc in alive:
        try:
            proc.kill()
        except psutil.Error:
            pass
    deadline = time.time() + 10
    while alive and time.time() < deadline:
        _, alive = psutil.wait_procs(alive, timeout=0.1)
        alive = [p for p in alive if not _zombie(p)]


def _zombie(proc) -> bool:
    import psutil

    try:
        return proc.status() == psutil.STATUS_ZOMBIE
    except psutil.Error:
        return True


def local_processes() -> list:
    """The processes of the cluster this driver started (ray.init's node) and their descendants."""
    import psutil
    from ray._private import worker

    node = getattr(worker, "_global_node", None)
    out = []
    for infos in (node.all_processes.values() if node is not None else []):
        for info in infos:
            try:
                proc = psutil.Process(info.process.pid)
                out += [proc] + proc.children(recursive=True)
            except (psutil.Error, AttributeError):
                continue
    return out


def dashboard_note() -> str | None:
    """Where the local cluster's dashboard is, and how to get past its token prompt."""
    import os

    from ray._private import worker

    node = getattr(worker, "_global_node", None)
    url = getattr(node, "webui_url", None) if node is not None else None
    if not url:
        return None
    url = url if url.startswith("http") else f"http://{url}"
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return f"Ray dashboard: {url}"
    return f"Ray dashboard: {url} (it asks for a token: `ray get-auth-token` prints it)"


RAY_CLIENT_SERVER = "ray.util.client.server"   # `ray start` leaves it running; its command line names the GCS, not the session
DASHBOARD_START_SECONDS = 60   # `ray start` returns before the dashboard answers


def up(num_cpus: int | None, env: dict[str, str], metrics_export_ms: int | None, dashboard_port: int = 8265) -> str:
    """`online-dpo up`: a local cluster that outlives the runs (`ray start --head` on 127.0.0.1, with Serve's
    settings, and a monitor's where one runs). Runs and `serve` on this machine join it; returns the
    dashboard's URL. Its session is noted (`up_state()`), so `down` stops exactly its processes.
    RunFailed when a cluster is already up here or it does not start."""
    import json
    import shutil
    import subprocess
    import sys

    from .errors import RunFailed

    if existing_address() == "auto" and not _answers(Path(ADDRESS_FILE).read_text().strip()):
        Path(ADDRESS_FILE).unlink(missing_ok=True)   # left by a cluster that is gone
    if existing_address():
        raise RunFailed(f"a Ray cluster is already up here ({existing_address()}): use it, or `online-dpo down` first")
    ray = shutil.which("ray", path=os.path.dirname(sys.executable)) or "ray"
    cmd = [ray, "start", "--head", "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
           f"--dashboard-port={dashboard_port}", "--disable-usage-stats"]
    cmd += [f"--num-cpus={num_cpus}"] if num_cpus else []
    cmd += ["--system-config", json.dumps(system_config(metrics_export_ms))]
    loopback = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}   # every part of it on 127.0.0.1 (one node)
    proc = subprocess.run(cmd, env={**SERVE_ENV, **LOCAL_ENV, **os.environ, **env, **loopback}, capture_output=True, text=True,
                          timeout=180)
    if proc.returncode != 0:
        raise RunFailed(f"`ray start` failed: {last_line_of(proc.stderr or proc.stdout)}")
    if not _wait_until_answers(f"127.0.0.1:{dashboard_port}", DASHBOARD_START_SECONDS):
        raise RunFailed(f"the dashboard did not answer on 127.0.0.1:{dashboard_port} within {DASHBOARD_START_SECONDS}s "
                        "of `ray start`: see /tmp/ray/session_latest/logs/dashboard.log, then `online-dpo down`")
    session = Path("/tmp/ray/session_latest").resolve().name
    up_state().parent.mkdir(parents=True, exist_ok=True)
    up_state().write_text(json.dumps({"session": session, "address": Path(ADDRESS_FILE).read_text().strip()}))
    return f"http://127.0.0.1:{dashboard_port}"


def _wait_until_answers(address: str, seconds: float) -> bool:
    """Whether something listens at host:port within `seconds` (the dashboard: a run submits jobs through it)."""
    import time

    deadline = time.monotonic() + seconds
    while not _answers(address):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def _answers(address: str) -> bool:
    """Whether something listens at host:port (a cluster's GCS)."""
    import socket

    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=2):
            return True
    except (OSError, ValueError):
        return False


def up_state() -> Path:
    root = os.environ.get("ONLINE_DPO_HOME") or Path.home() / ".cache" / "online-dpo"
    return Path(root) / "cluster.json"


def joined_up() -> bool:
    """Whether this process is connected to the cluster `online-dpo up` started on this machine."""
    import json

    from ray._private import worker

    try:
        session = json.loads(up_state().read_text())["session"]
        return worker.global_worker.node is not None and worker.global_worker.node.session_name == session
    except (OSError, ValueError, KeyError, AttributeError):
        return False


def down(grace: float = 10.0) -> bool:
    """`online-dpo down`: stop the cluster `up` started, and only it: the processes of its session (GCS,
    raylet, dashboard, agents), the Ray Client server it started, and their descendants (workers). False when
    none was up."""
    import json

    import psutil

    try:
        state = json.loads(up_state().read_text())
        session, client = state["session"], f"--address={state.get('address')}"
    except (OSError, ValueError, KeyError):
        return False
    procs = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            cmdline = proc.info["cmdline"] or []
            if any(session in arg for arg in cmdline) or (RAY_CLIENT_SERVER in cmdline and client in cmdline):
                procs += [proc] + proc.children(recursive=True)
        except psutil.Error:
            continue
    end_processes(procs, grace, terminate=True)
    Path(ADDRESS_FILE).unlink(missing_ok=True)
    up_state().unlink(missing_ok=True)
    return True


def last_line_of(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else "no output"
