"""online-dpo: train | tune | serve | judge serve | monitor | validate | report | pairs | export | make-default.

  online-dpo train [CONFIG] [--set section.field=value ...] [-v] [--dry-run]
  online-dpo train --resume RUN_DIR
  online-dpo serve RUN_DIR|MODEL_DIR [--config CONFIG] [--set serve.field=value ...]
  online-dpo judge serve CONFIG [--app NAME] [--replicas N]
  online-dpo tune [CONFIG] --grid FIELD=V1,V2 [--range FIELD=KIND:LO:HI] [--set ...]
  online-dpo validate CONFIG [CONFIG ...]
  online-dpo monitor [--prometheus-port 9090] [--grafana-port 3000]
  online-dpo up [--num-cpus N] | online-dpo down
  online-dpo report RUN_DIR [--follow]
  online-dpo pairs RUN_DIR [--export OUT]
  online-dpo export RUN_DIR --merge OUT
  online-dpo make-default

With no CONFIG, `train` runs the embedded default (configs/default.yaml).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


from .cli_job import in_job
from .cli_serve import cmd_down, cmd_judge, cmd_monitor, cmd_serve, cmd_up, shutdown_local


def _plan(path, overrides, resume: bool = False):
    """The run plan of a config file and its overrides (`resume`: of a run directory's config.yaml, which
    they may only extend or tune); exits 2 with the message when it is invalid."""
    from .config import ConfigError, load_config
    from .plan import RunPlan

    try:
        return RunPlan.resumed(path, overrides) if resume else RunPlan.from_config(load_config(path, overrides))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def cmd_validate(args) -> int:
    from .config import ConfigError, load_config
    from .plan import check_paths

    bad = 0
    for path in args.configs:
        try:
            check_paths(load_config(path, args.set))
            print(f"ok: {path}")
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            bad += 1
    return 1 if bad else 0


def cmd_make_default(args) -> int:
    from .embedded.build import default_home, ensure_default, is_built

    if args.force and is_built():
        import shutil
        shutil.rmtree(default_home())
    home = ensure_default()
    print(f"embedded default: {home}")
    return 0


def cmd_report(args) -> int:
    from pathlib import Path

    from .report import follow, plot, read_records, table

    run_dir = Path(args.run_dir)
    try:
        if args.follow:   # until the run ends (summary.json), or Ctrl-C
            follow(run_dir, args.every, lambda text: print(text + "\n", flush=True))
            return 0
        records = read_records(run_dir)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(table(run_dir, records))
    print(f"curves: {plot(run_dir, records)}")
    return 0


def cmd_dry_run(plan) -> int:
    """Print which actor goes where against the cluster's resources; 1 if it cannot fit."""
    from .cluster import existing_address
    from .placement import check, cluster_nodes, learner_memory, local_nodes

    if existing_address():
        from .cluster import connect
        connect(namespace="online-dpo-dry-run", dashboard=False, log_to_driver=False)
        nodes, where = cluster_nodes(), "the connected Ray cluster"
    else:
        nodes, where = local_nodes(), "a local Ray cluster on this machine (none is running)"
    text, problems = check(plan.asks, nodes)
    print(f"[online-dpo] dry run of '{plan.name}' against {where}")
    print(text)
    print(learner_memory(plan.learner, plan.gang.ask.count))
    if problems:
        print("error: this plan cannot run on this cluster; see the result above", file=sys.stderr)
    return 1 if problems else 0


def _ensure_embedded(plan, console) -> None:
    from .embedded.build import ensure_default, is_built

    if plan.needs_embedded and not is_built():
        console.info("building the embedded default (once; about two minutes on 2 cores)")
        ensure_default()


def cmd_train(args) -> int:
    from pathlib import Path

    config = args.config
    if args.resume:
        config = Path(args.resume) / "config.yaml"
        if args.config or not config.exists():
            print(f"error: --resume takes a run directory (with config.yaml) instead of CONFIG; "
                  f"{args.resume} has none" if not config.exists() else
                  "error: give either CONFIG or --resume RUN_DIR, not both", file=sys.stderr)
            return 2
    plan = _plan(config, args.set + (["run.log_level=info"] if args.verbose else []), resume=bool(args.resume))
    if args.dry_run:
        return cmd_dry_run(plan)
    from .cluster import connect, dashboard_note, existing_address, joined_up
    from .metrics import ConsoleLog
    from .monitor import EXPORT_SECONDS, attached, hold_seconds, ray_env
    from .signals import Stop

    console = ConsoleLog()
    _ensure_embedded(plan, console)
    monitor = attached()
    if monitor and not existing_address():   # the dashboard process inherits these
        os.environ.update(ray_env(monitor))
    warm = None
    if not existing_address() and not args.job:   # a local cluster's start leaves the cores time for them
        from .warm import warm_imports
        warm = warm_imports()
    started = connect(namespace=f"online-dpo-{plan.name}-{int(time.time())}", log_to_driver=plan.log_level != "quiet",
                      metrics_export_ms=EXPORT_SECONDS * 1000 if monitor else None)
    if warm is not None:
        warm.finish()   # before this thread imports any of it (two threads in one module's import can clash)
    stop = Stop()
    stop.install()   # after ray.init(): Ray's own SIGTERM handler aborts the process
    console.info("started a local Ray cluster on 127.0.0.1" if started else "joined the Ray cluster")
    note = dashboard_note() if started else None
    if note:
        console.info(note)
    if monitor:
        console.info(f"metrics go to the monitor's Prometheus at {monitor['prometheus']}")
    # a job by default on the `up` cluster, whose dashboard outlives the run; a cluster of the run's own
    # goes away with it, so there the job's page would too, and its driver is one more process to start
    as_job = not in_job() and (args.job if args.job is not None else not started and joined_up())
    try:
        if as_job:
            return _submit(plan, console)
        return _train(plan, console, args.resume, stop)
    finally:
        if hold_seconds(monitor) and not as_job:   # let Prometheus scrape the final values (from this driver's gauges)
            time.sleep(hold_seconds(monitor))
        if started:
            shutdown_local()


def _submit(plan, console) -> int:
    """`train --job`: check the plan fits here, then run it as a Ray job (cli_job.py)."""
    from .cli_job import run_as_job
    from .errors import RunFailed

    try:
        if plan.check_resources:
            from .placement import require_fit
            require_fit(plan.asks)
    except RunFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return run_as_job(sys.argv[1:], plan.name, console.info)


def _train(plan, console, resume, stop) -> int:
    """Run the plan; the exit code, with what went wrong or how to continue on stderr."""
    from .controller import train
    from .data import DataError
    from .errors import RunFailed
    from .run_dir import RunDirBusy
    from .signals import Interrupted

    try:
        summary = train(plan, console, resume_dir=resume, stop=stop)
    except (DataError, RunDirBusy) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RunFailed as e:
        print(f"error: {e}{_resume_hint(e)}", file=sys.stderr)
        return 1
    except Interrupted as e:
        print(f"[online-dpo] {e.reason}{_resume_hint(e)}", file=sys.stderr)
        return e.code
    shown = {k: v for k, v in summary.items() if not k.startswith("samples")}
    console.info("summary: " + json.dumps(shown))
    return 0


def cmd_export(args) -> int:
    """A LoRA run's policy/ is a PEFT adapter; --merge writes base + adapter as one HF model."""
    from pathlib import Path

    from .config import ConfigError
    from .plan import merge_target

    out = Path(args.merge)
    try:
        base, adapter, trust_remote_code = merge_target(args.run_dir)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if out.exists() and any(out.iterdir()):
        print(f"error: --merge {out} exists and is not empty; give a new directory", file=sys.stderr)
        return 2
    from .model import merge_adapter

    merge_adapter(base, adapter, str(out), trust_remote_code)
    print(f"merged {adapter} into {base}: {out}")
    return 0


def cmd_tune(args) -> int:
    from .cluster import connect
    from .config import ConfigError
    from .metrics import ConsoleLog
    from .tune import check_space, parse_grid, parse_ranges, result_lines, search

    try:
        grid, ranges = parse_grid(args.grid), parse_ranges(args.range)
        check_space(args.config, args.set, grid, ranges)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    plan = _plan(args.config, args.set)
    console = ConsoleLog()
    _ensure_embedded(plan, console)
    started = connect(namespace=f"online-dpo-tune-{plan.name}-{int(time.time())}", log_to_driver=args.verbose)
    try:
        result = search(args.config, args.set, grid, ranges, args.samples, args.scheduler, args.metric,
                        args.concurrent, console)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        if started:
            shutdown_local()
    for line in result_lines(result, args.metric):
        console.info(line)
    return 0


def cmd_pairs(args) -> int:
    """The preference log: a summary, or (--export OUT) a Hugging Face dataset of its pairs."""
    from pathlib import Path

    from .pairs_log import export, summarise

    try:
        print(f"wrote {export(Path(args.run_dir), args.export)} pairs to {args.export} (prompt, chosen, rejected)"
              if args.export else summarise(Path(args.run_dir)))
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def _resume_hint(err) -> str:
    """How to continue a run that stopped, when it has a checkpoint to continue from."""
    run_dir = getattr(err, "run_dir", None)
    if run_dir is None or not getattr(err, "checkpoint_step", 0):
        return ""
    return f"\n  continue it with: online-dpo train --resume {run_dir}"


def _serving_parsers(sub) -> None:
    """The commands that serve until interrupted (cli_serve.py), and the monitor."""
    p = sub.add_parser("serve", help="serve a run directory or model directory over OpenAI-compatible HTTP")
    p.add_argument("path", help="a run directory, an HF model directory, or embedded:reviews")
    p.add_argument("--config", default=None, help="take the serve section of this run YAML")
    p.add_argument("--set", action="append", default=[], metavar="serve.KEY=VALUE")
    p.add_argument("-v", "--verbose", action="store_true")
    p.set_defaults(fn=cmd_serve)
    p = sub.add_parser("judge", help="`judge serve CONFIG`: one judge as a Ray Serve app that runs share")
    p.add_argument("action", choices=["serve"])
    p.add_argument("config", help="a run YAML: its judge section is served")
    p.add_argument("--app", default="judge", help="the Serve application's name (runs set judge.app to it)")
    p.add_argument("--replicas", type=int, default=1, help="copies of the judge (each takes judge.num_cpus/gpus)")
    p.add_argument("--set", action="append", default=[], metavar="judge.KEY=VALUE")
    p.add_argument("-v", "--verbose", action="store_true")
    p.set_defaults(fn=cmd_judge)
    p = sub.add_parser("monitor", help="start Prometheus and Grafana (where installed) for live curves")
    p.add_argument("--prometheus-port", type=int, default=9090)
    p.add_argument("--grafana-port", type=int, default=3000)
    p.add_argument("--data", default=None, help="where they keep their data (default ~/.cache/online-dpo/monitor-data)")
    p.add_argument("--grafana-anonymous", action="store_true",
                   help="let anyone who reaches Grafana view it without logging in (off: admin password printed once)")
    p.set_defaults(fn=cmd_monitor)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="online-dpo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="run online DPO (the embedded default without CONFIG)")
    p.add_argument("config", nargs="?", default=None)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a field")
    p.add_argument("-v", "--verbose", action="store_true", help="show Ray, vLLM and actor logs")
    p.add_argument("--dry-run", action="store_true", help="print the placement plan and check it; run nothing")
    p.add_argument("--resume", metavar="RUN_DIR", default=None,
                   help="continue a stopped or killed run from its latest checkpoint")
    p.add_argument("--job", action=argparse.BooleanOptionalAction, default=None,
                   help="run as a Ray job (Job Submission API): its log is on the dashboard's Jobs page, and streams "
                   "here (default: on the `online-dpo up` cluster, not on a cluster the run starts itself)")
    p.set_defaults(fn=cmd_train)
    p = sub.add_parser("tune", help="search config fields (e.g. train.beta) with Ray Tune; one online run per trial")
    p.add_argument("config", nargs="?", default=None)
    p.add_argument("--grid", action="append", default=[], metavar="FIELD=V1,V2,...", help="values to try")
    p.add_argument("--range", action="append", default=[], metavar="FIELD=uniform|loguniform:LO:HI",
                   help="a range to draw --samples values from")
    p.add_argument("--samples", type=int, default=4, help="draws per --range (default 4)")
    p.add_argument("--scheduler", choices=["grid", "asha"], default="grid",
                   help="asha stops weak trials early from their held-out evaluations")
    p.add_argument("--metric", choices=["reward", "win_rate"], default="reward", help="what 'best' maximises")
    p.add_argument("--concurrent", type=int, default=1, help="trials at a time (default 1)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a field in every trial")
    p.add_argument("-v", "--verbose", action="store_true")
    p.set_defaults(fn=cmd_tune)
    _serving_parsers(sub)
    p = sub.add_parser("up", help="start a local Ray cluster that stays up between runs (`online-dpo down` stops it)")
    p.add_argument("--num-cpus", type=int, default=None, help="logical CPUs (default: this machine's)")
    p.add_argument("--dashboard-port", type=int, default=8265)
    p.set_defaults(fn=cmd_up)
    sub.add_parser("down", help="stop the cluster `online-dpo up` started").set_defaults(fn=cmd_down)
    p = sub.add_parser("export", help="write a LoRA run's policy as one merged Hugging Face model")
    p.add_argument("run_dir")
    p.add_argument("--merge", required=True, metavar="OUT", help="where to write the merged model")
    p.set_defaults(fn=cmd_export)
    p = sub.add_parser("report", help="print a run's summary table and redraw its curves.png")
    p.add_argument("run_dir")
    p.add_argument("--follow", action="store_true", help="redraw and print again while the run goes, until it ends")
    p.add_argument("--every", type=float, default=5.0, help="--follow: seconds between redraws (default 5)")
    p.set_defaults(fn=cmd_report)
    p = sub.add_parser("pairs", help="summarise a run's preference log (RUN_DIR/pairs/), or export it as a dataset")
    p.add_argument("run_dir")
    p.add_argument("--export", metavar="OUT", default=None, help="write a datasets dataset (prompt/chosen/rejected)")
    p.set_defaults(fn=cmd_pairs)
    p = sub.add_parser("validate", help="check run configs; non-zero exit on an invalid one")
    p.add_argument("configs", nargs="+")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.set_defaults(fn=cmd_validate)
    p = sub.add_parser("make-default", help="build the embedded default model and prompts (cached)")
    p.add_argument("--force", action="store_true", help="rebuild even if cached")
    p.set_defaults(fn=cmd_make_default)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from .signals import Interrupted, Stop

    Stop().install()   # a signal before a run starts interrupts at once (exit 130 / 143)
    try:
        code = args.fn(args)
    except Interrupted as e:
        print(f"[online-dpo] {e.reason}", file=sys.stderr)
        code = e.code
    if argv is None and args.command == "train":
        exit_now(code)
    return code


def exit_now(code: int) -> None:
    """End a command-line run without the interpreter's teardown (~1.3 s here, for the modules and threads
    a run leaves behind): by now the run has closed every file it wrote and stopped its cluster."""
    import logging

    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():   # a driver on a cluster it joined: leave it cleanly
        ray.shutdown()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
