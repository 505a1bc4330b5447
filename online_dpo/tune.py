"""`online-dpo tune CONFIG`: search any config fields with Ray Tune; each trial is a full online run.

    online-dpo tune configs/default.yaml --grid train.beta=0.05,0.1,0.2 --set train.max_steps=30
    online-dpo tune CONFIG --range train.lr=loguniform:1e-5:1e-3 --samples 6 --scheduler asha

`--grid FIELD=V1,V2,...` tries every value (every combination across
fields); `--range FIELD=uniform:LO:HI` or `loguniform:LO:HI` draws
`--samples` values. Each trial runs `online-dpo train` in-process on the same
cluster (samplers, judges, a Ray Train gang of its own) and reports the
held-out reward, the win rate against the initial policy and the final KL.
`--scheduler asha` stops weak trials early from their intermediate held-out
evaluations (`eval.every_steps`; set to a quarter of the run if off).

Writes, under `<run.output_dir>/tune-<run.name>-<time>/`: `results.csv` (one
row per trial), `tune.png` (the metric and KL against each searched field),
`best.yaml` (the base config with the best trial's values) and `trials/`
(each trial's run directory).
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import re
import time
from pathlib import Path

import yaml

from .config import Config, ConfigError, dump, load_config

METRICS = ("reward", "win_rate", "kl")


def parse_grid(items: list[str]) -> dict[str, list]:
    """{'train.beta': [0.05, 0.1]} from ['train.beta=0.05,0.1'] (a YAML list works too)."""
    out = {}
    for item in items:
        field, sep, text = item.partition("=")
        if not sep or not text:
            raise ConfigError(f"--grid {item!r}: write FIELD=V1,V2,... (e.g. train.beta=0.05,0.1,0.2)")
        values = yaml.safe_load(text) if text.strip().startswith("[") else [yaml.safe_load(v) for v in text.split(",")]
        if not isinstance(values, list) or not values:
            raise ConfigError(f"--grid {item!r}: give at least one value")
        out[field.strip()] = values
    return out


def parse_ranges(items: list[str]) -> dict[str, tuple[str, float, float]]:
    """{'train.lr': ('loguniform', 1e-5, 1e-3)} from ['train.lr=loguniform:1e-5:1e-3']."""
    out = {}
    for item in items:
        field, _, text = item.partition("=")
        parts = text.split(":")
        try:
            kind, lo, hi = parts[0], float(parts[1]), float(parts[2])
        except (IndexError, ValueError):
            raise ConfigError(f"--range {item!r}: write FIELD=uniform:LO:HI or FIELD=loguniform:LO:HI") from None
        if kind not in ("uniform", "loguniform") or not lo < hi or (kind == "loguniform" and lo <= 0):
            raise ConfigError(f"--range {item!r}: the kind is uniform or loguniform, LO < HI "
                              "(and LO > 0 for loguniform)")
        out[field.strip()] = (kind, lo, hi)
    return out


def trial_config(base: str | None, overrides: list[str], params: dict, out: Path | None = None,
                 name: str = "trial") -> Config:
    """The base config with the trial's values (each validated like a --set)."""
    extra = [f"{k}={json.dumps(v)}" for k, v in params.items()]   # JSON is YAML: --set parses it
    if out is not None:
        extra += [f"run.output_dir={out}", f"run.name={name}"]
    return load_config(base, list(overrides) + extra)


def check_space(base, overrides, grid: dict, ranges: dict) -> None:
    """Refuse a search whose values do not validate, naming the field, before any trial starts."""
    if not grid and not ranges:
        raise ConfigError("nothing to search: give --grid FIELD=V1,V2,... or --range FIELD=KIND:LO:HI")
    corners = [[(f, v) for v in vals] for f, vals in grid.items()]
    corners += [[(f, lo), (f, hi)] for f, (_, lo, hi) in ranges.items()]
    for combo in itertools.product(*corners):
        try:
            trial_config(base, overrides, dict(combo))
        except ConfigError as e:
            raise ConfigError(f"the search space has an invalid point {dict(combo)}: {e}") from None


def run_trial(params: dict, base: str | None, overrides: list[str], out: str) -> None:
    """Ray Tune's function trainable: one full online run, reporting its evaluations."""
    from ray import tune

    from .controller import train
    from .metrics import ConsoleLog
    from .plan import RunPlan

    name = re.sub(r"[^A-Za-z0-9_.-]", "_", "trial-" + "-".join(f"{k.split('.')[-1]}-{_short(v)}"
                                                              for k, v in params.items()))
    cfg = trial_config(base, overrides, params, Path(out) / "trials", name)
    last = {"kl": None}

    def listener(record: dict) -> None:
        if record.get("kind") == "train":
            last["kl"] = record.get("kl")
        elif record.get("kind") == "eval" and record.get("step") and record.get("reward") is not None:
            tune.report({"reward": record["reward"], "win_rate": record.get("win_rate"), "kl": last["kl"],
                         "step": record["step"], "done": False})

    (Path(out) / "trials").mkdir(parents=True, exist_ok=True)
    with open(Path(out) / "trials" / f"{name}.log", "w") as log:
        summary = train(RunPlan.from_config(cfg), ConsoleLog(stream=log), listener=listener)
    tune.report({"reward": summary["reward_after"], "win_rate": summary["win_rate"], "kl": summary["final_kl"],
                 "step": summary["steps"], "done": True, "run_dir": summary["run_dir"],
                 "train_seconds": summary["train_seconds"]})


def _short(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def search(base: str | None, overrides: list[str], grid: dict, ranges: dict, samples: int, scheduler: str,
           metric: str, concurrent: int, console) -> dict:
    """Run the trials on the connected cluster; write results.csv, tune.png and best.yaml."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    base = str(Path(base).resolve()) if base else None   # trials run in their own working directory
    cfg = load_config(base, overrides)
    if scheduler == "asha" and not cfg.eval.every_steps:
        overrides = list(overrides) + [f"eval.every_steps={max(1, cfg.train.max_steps // 4)}"]
        cfg = load_config(base, overrides)
    out = Path(cfg.run.output_dir).resolve() / f"tune-{cfg.run.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    out.mkdir(parents=True)
    space = {f: tune.grid_search(v) for f, v in grid.items()}
    space.update({f: (tune.loguniform if k == "loguniform" else tune.uniform)(lo, hi)
                  for f, (k, lo, hi) in ranges.items()})
    trials = samples if ranges else 1
    total = trials * math.prod(len(v) for v in grid.values())
    console.info(f"tune: {total} trial(s), {concurrent} at a time, into {out}")
    sched = ASHAScheduler(time_attr="step", max_t=cfg.train.max_steps,
                          grace_period=max(1, cfg.eval.every_steps)) if scheduler == "asha" else None
    trainable = tune.with_resources(tune.with_parameters(run_trial, base=base, overrides=list(overrides),
                                                         out=str(out)), {"cpu": 0.01})
    from ray.tune import RunConfig

    tuner = tune.Tuner(trainable, param_space=space,
                       tune_config=tune.TuneConfig(metric=metric, mode="max", num_samples=trials,
                                                   scheduler=sched, max_concurrent_trials=concurrent),
                       run_config=RunConfig(name="ray-tune", storage_path=str(out), verbose=0))
    grid_result = tuner.fit()
    rows = []
    for r in grid_result:
        params = {f: r.config.get(f) for f in list(grid) + list(ranges)}
        m = r.metrics or {}
        rows.append({**params, **{k: m.get(k) for k in METRICS}, "steps": m.get("step"),
                     "finished": bool(m.get("done")), "error": _cause(r.error) if r.error else "",
                     "run_dir": m.get("run_dir", "")})
    fields = list(grid) + list(ranges)
    write_csv(out / "results.csv", rows, fields)
    plot(out / "tune.png", rows, fields, metric)
    ok = [r for r in rows if r.get(metric) is not None and not r["error"]]
    if not ok:
        raise RuntimeError(f"no trial finished; see {out / 'trials'} for each trial's log")
    best = max(ok, key=lambda r: r[metric])
    best_cfg = trial_config(base, overrides, {f: best[f] for f in fields})
    (out / "best.yaml").write_text(f"# best of {len(rows)} trials by held-out {metric}: "
                                   + ", ".join(f"{f}={best[f]}" for f in fields) + "\n" + dump(best_cfg))
    return {"dir": str(out), "rows": rows, "best": best}


def result_lines(result: dict, metric: str) -> list[str]:
    """What `online-dpo tune` prints at the end: one line per trial, the best, and where the files are."""
    def num(x, spec: str) -> str:
        return "-" if x is None else format(x, spec)

    lines = []
    for row in result["rows"]:
        values = ", ".join(f"{k}={row[k]}" for k in row if "." in k)
        status = "" if row["finished"] else f"  (stopped at step {row['steps']})" if not row["error"] else \
            f"  (failed: {row['error']})"
        lines.append(f"{values}: held-out reward {num(row['reward'], '+.3f')}  win rate "
                     f"{num(row['win_rate'], '.3f')}  kl {num(row['kl'], '.2f')}{status}")
    lines.append(f"best by held-out {metric}: " + ", ".join(f"{k}={v}" for k, v in result["best"].items() if "." in k))
    lines.append(f"wrote {result['dir']}/results.csv, tune.png and best.yaml")
    return lines


def _cause(err: BaseException) -> str:
    """The last line of a trial's error: its cause, not Ray's wrapper."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    return lines[-1] if lines else type(err).__name__


def write_csv(path: Path, rows: list[dict], fields: list[str]) -> None:
    columns = fields + list(METRICS) + ["steps", "finished", "error", "run_dir"]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k) for k in columns})


def plot(path: Path, rows: list[dict], fields: list[str], metric: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(fields), 2, figsize=(9, 3.2 * len(fields)), squeeze=False)
    for i, f in enumerate(fields):
        pts = sorted((r[f], r.get(metric), r.get("kl")) for r in rows if isinstance(r.get(f), (int, float)))
        for j, (name, k) in enumerate(((metric, 1), ("kl", 2))):
            ax = axes[i][j]
            xs = [p[0] for p in pts if p[k] is not None]
            ax.plot(xs, [p[k] for p in pts if p[k] is not None], "o-")
            if xs and min(xs) > 0 and max(xs) / min(xs) >= 10:
                ax.set_xscale("log")
            ax.set_xlabel(f)
            ax.set_ylabel(f"held-out {name}" if name != "kl" else "KL (nats/seq)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
