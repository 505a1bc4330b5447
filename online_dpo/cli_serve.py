"""The CLI commands that keep something up: `serve`, `judge serve`, `monitor`, and `up` / `down`.

Both join the cluster this process can reach (RAY_ADDRESS, or a `ray start`
cluster on this machine) or start a local one on loopback, deploy a Ray
Serve application, say where it is, and keep it up until Ctrl-C (exit 130) or
SIGTERM (143). On a cluster they joined, `judge serve` deploys and returns:
the application stays up for the cluster's runs. `up` starts a local cluster
that outlives the commands that join it; `down` stops it.
"""

from __future__ import annotations

import signal
import sys
import time


def shutdown_local() -> None:
    """Stop the local cluster this command started, all its processes; signals wait until it is down."""
    from .cluster import shutdown

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    shutdown(started=True)


def _serve_section(args):
    """The `serve` section `online-dpo serve` uses: from --config, or the defaults with --set serve.*."""
    from .config import ConfigError, apply_override, load_config, validate

    if args.config:
        return load_config(args.config, args.set).serve
    raw = {"model": {"policy": "unused"}, "data": {"source": "unused"}}
    for item in args.set:
        if not item.startswith("serve."):
            raise ConfigError(f"--set {item}: only serve.* fields apply to `online-dpo serve`")
        apply_override(raw, item)
    return validate(raw, source="--set").serve


def serve_until_interrupted(namespace: str, verbose: bool, deploy, undeploy, stay: bool = True) -> int:
    """Connect, `deploy()` (which prints where), and wait for a signal; `undeploy()` on the way out.
    `stay` False: on a cluster this process joined, leave the application up and return at once."""
    from .cluster import connect
    from .errors import RunFailed
    from .signals import Interrupted, Stop

    started = connect(namespace=namespace, log_to_driver=verbose)
    Stop().install()   # after ray.init(), whose SIGTERM handler aborts the process
    code, keep = 0, not stay and not started
    try:
        deploy(started)
        while not keep:
            time.sleep(3600)
    except Interrupted as e:
        print(f"[online-dpo] {e.reason}", file=sys.stderr)
        code = e.code
    except RunFailed as e:
        print(f"error: {e}", file=sys.stderr)
        code, keep = 2, False
    finally:
        if not keep:
            undeploy()
        if started:
            shutdown_local()
    return code


def cmd_serve(args) -> int:
    """Serve a finished run directory or any HF model directory until interrupted."""
    from .config import ConfigError
    from .plan import standalone_serve

    try:
        plan, what = standalone_serve(args.path, _serve_section(args), "info" if args.verbose else "quiet")
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from .serve import app

    def deploy(_started: bool) -> None:
        url = app.deploy(plan.spec, plan.options, plan.host, plan.port, plan.route_prefix, plan.app_name)
        where = app.describe(url, app.replica_urls(plan.route_prefix, plan.app_name))
        print(f"[online-dpo] serving {what} as '{plan.spec.served_name}' at {where} (Ctrl-C to stop)", flush=True)

    return serve_until_interrupted(f"online-dpo-serve-{int(time.time())}", args.verbose, deploy,
                                   lambda: app.undeploy(plan.app_name))


def cmd_judge(args) -> int:
    """`online-dpo judge serve CONFIG`: the config's judge section as a Serve application runs share."""
    from .config import ConfigError
    from .plan_judges import shared_judge

    try:
        spec, actor_options = shared_judge(args.config, args.set)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    def deploy(started: bool) -> None:
        import ray

        from .judges.deployment import deploy as deploy_judge

        deploy_judge(spec, args.app, args.replicas, actor_options)
        where = ray.get_runtime_context().gcs_address
        join = f"RAY_ADDRESS={where} " if started else ""
        print(f"[online-dpo] judge '{spec.kind}' serving as app '{args.app}' ({args.replicas} replica(s)) on the "
              f"cluster at {where}; runs use it with: {join}online-dpo train CONFIG --set judge.kind=deployment "
              f"--set judge.app={args.app}" + (" (Ctrl-C to stop)" if started else ""), flush=True)

    def undeploy() -> None:
        from ray import serve

        serve.delete(args.app)

    return serve_until_interrupted(f"online-dpo-judge-{args.app}", args.verbose, deploy, undeploy, stay=False)


def cmd_up(args) -> int:
    """A local cluster that stays up between runs (and after them, for the dashboard)."""
    from .cluster import up
    from .errors import RunFailed
    from .monitor import EXPORT_SECONDS, attached, ray_env

    monitor = attached()
    try:
        url = up(args.num_cpus, ray_env(monitor) if monitor else {}, EXPORT_SECONDS * 1000 if monitor else None,
                 args.dashboard_port)
    except RunFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"[online-dpo] a local Ray cluster is up on 127.0.0.1; dashboard {url} (`ray get-auth-token` prints its "
          "token). `online-dpo train`, `serve` and `judge serve` on this machine join it; `online-dpo down` stops it"
          + (f"; metrics go to the monitor's Prometheus at {monitor['prometheus']}" if monitor else ""))
    return 0


def cmd_down(args) -> int:
    from .cluster import down

    print("[online-dpo] stopped the local Ray cluster" if down() else "[online-dpo] no local Ray cluster was up")
    return 0


def cmd_monitor(args) -> int:
    """Prometheus and Grafana (where installed) for the Ray dashboard, until interrupted."""
    from pathlib import Path

    from .monitor import run

    data = Path(args.data or Path.home() / ".cache" / "online-dpo" / "monitor-data")
    return run(args.prometheus_port, args.grafana_port, data, say=lambda t: print(f"[online-dpo] {t}", flush=True),
               anonymous=args.grafana_anonymous)
