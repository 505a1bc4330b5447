"""Plots and a summary table of a run directory (`online-dpo report RUN_DIR`).

Reads metrics.jsonl and summary.json; draws reward, win rate, throughput,
loss and KL curves against the step to `curves.png` (matplotlib, headless)
and prints a table; `--follow` does both again every few seconds while a run
goes.
"""

from __future__ import annotations

import json
from pathlib import Path


def read_records(run_dir: Path) -> list[dict]:
    from .run_dir import read_jsonl

    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{run_dir} has no metrics.jsonl: is it a run directory?")
    return read_jsonl(path)


def series(records: list[dict]) -> dict[str, tuple[list, list]]:
    """Every curve of curves.png as (x, y), x always the optimizer step: rollout score, loss, KL and live
    throughput per step, and each held-out evaluation at the step it was made (the final one at the
    last step), by the training judge and, with eval.judge, by the independent one."""
    train = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]

    def along(rows: list[dict], key: str) -> tuple[list, list]:
        kept = [r for r in rows if r.get(key) is not None]
        return [r.get("step", 0) for r in kept], [r[key] for r in kept]

    return {"rollout score": along(train, "reward_mean"), "loss": along(train, "loss"), "kl": along(train, "kl"),
            "pairs/s": along(train, "pairs_per_second"), "held-out score": along(evals, "reward"),
            "held-out win rate": along(evals, "win_rate"), "eval.judge score": along(evals, "eval_judge/reward"),
            "eval.judge win rate": along(evals, "eval_judge/win_rate")}


def plot(run_dir: Path, records: list[dict] | None = None) -> Path:
    """curves.png: six panels against the step (written whole, never half)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = series(records if records is not None else read_records(run_dir))
    fig, axes = plt.subplots(2, 3, figsize=(14, 7))
    ax = axes[0][0]
    ax.plot(*s["rollout score"], label="rollout mean score")
    ax.plot(*s["held-out score"], "o-", label="held-out mean score")
    ax.legend(loc="upper left")
    if s["eval.judge score"][0]:   # eval.judge: the independent judge on its own axis (its scale differs)
        twin = ax.twinx()
        twin.plot(*s["eval.judge score"], "s--", color="C3", label="held-out, eval.judge (right axis)")
        twin.legend(loc="lower right")
    ax = axes[0][1]
    ax.plot(*s["held-out win rate"], "o-", label="training judge")
    if s["eval.judge win rate"][0]:
        ax.plot(*s["eval.judge win rate"], "s--", label="eval.judge")
        ax.legend()
    ax.axhline(0.5, color="grey", lw=0.5)
    ax.set_ylim(0, 1)
    panels = [(axes[0][0], "reward (judge score)"), (ax, "held-out win rate vs initial policy"),
              (axes[0][2], "throughput, pairs/s (last 10 steps)"), (axes[1][0], "DPO loss"),
              (axes[1][1], "KL(policy || reference), nats/sequence")]
    axes[0][2].plot(*s["pairs/s"])
    axes[1][0].plot(*s["loss"])
    axes[1][1].plot(*s["kl"])
    for panel, title in panels:
        panel.set_title(title)
        panel.set_xlabel("step")
    axes[1][2].axis("off")
    fig.subplots_adjust(left=0.05, right=0.95, bottom=0.07, top=0.95, wspace=0.3, hspace=0.3)   # tight_layout: +0.1 s
    out = Path(run_dir) / "curves.png"
    tmp = out.with_name(".curves.tmp.png")
    fig.savefig(tmp, dpi=80)
    plt.close(fig)
    tmp.replace(out)   # never a half-written curves.png
    return out


def follow(run_dir: Path, every: float, say, until=None) -> None:
    """`report --follow`: redraw curves.png and print the table every `every` seconds while the run goes,
    once more when summary.json appears (the run ended), then return. `until()` True also ends it."""
    import time

    while True:
        done = (Path(run_dir) / "summary.json").exists()
        records = read_records(run_dir)
        plot(run_dir, records)
        say(table(run_dir, records) + f"\n(curves.png redrawn at {time.strftime('%H:%M:%S')})")
        if done or (until is not None and until()):
            return
        time.sleep(every)


def table(run_dir: Path, records: list[dict] | None = None) -> str:
    records = records if records is not None else read_records(run_dir)
    summary_path = Path(run_dir) / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    train = [r for r in records if r.get("kind") == "train"]
    rollouts = [r for r in records if r.get("kind") == "rollout"]
    last = train[-1] if train else {}
    rows = [
        ("run", Path(run_dir).name),
        ("steps", summary.get("steps", len(train))),
        ("pairs", summary.get("pairs", last.get("pairs"))),
        ("reward before", summary.get("reward_before")),
        ("reward after", summary.get("reward_after")),
        ("win rate", summary.get("win_rate")),
        ("final loss", last.get("loss")),
        ("final KL", last.get("kl")),
        ("policy version", last.get("policy_version")),
        ("pairs/s", summary.get("pairs_per_second")),
        ("ties dropped", sum(r.get("ties", 0) for r in rollouts)),
        ("wall seconds", summary.get("wall_seconds")),
    ]
    width = max(len(k) for k, _ in rows)
    lines = [f"{k:<{width}}  {_show(v)}" for k, v in rows]
    return "\n".join(lines)


def _show(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
