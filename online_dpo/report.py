"""Plots and a summary table of a run directory (`online-dpo report RUN_DIR`).

Reads metrics.jsonl and summary.json; draws reward, win rate, loss and KL
curves to `curves.png` (matplotlib, headless) and prints a table.
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


def plot(run_dir: Path, records: list[dict] | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = records if records is not None else read_records(run_dir)
    train = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    steps = [r["step"] for r in train]
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    ax = axes[0][0]
    ax.plot(steps, [r.get("reward_mean") for r in train], label="rollout mean score")
    if evals:
        ax.plot([e.get("step", 0) for e in evals], [e.get("reward") for e in evals], "o-",
                label="held-out mean score")   # evaluations are drawn at the step they were made
    indep = [e for e in evals if e.get("eval_judge/reward") is not None]
    if indep:   # eval.judge: the independent judge on its own axis (its scale differs)
        twin = ax.twinx()
        twin.plot([e.get("step", 0) for e in indep], [e["eval_judge/reward"] for e in indep], "s--", color="C3",
                  label="held-out, eval.judge (right axis)")
        twin.legend(loc="lower right")
    ax.set_title("reward (judge score)")
    ax.set_xlabel("step")
    ax.legend()
    ax = axes[0][1]
    with_wr = [e for e in evals if e.get("win_rate") is not None]
    ax.plot([e.get("step", 0) for e in with_wr], [e["win_rate"] for e in with_wr], "o-", label="training judge")
    indep = [e for e in evals if e.get("eval_judge/win_rate") is not None]
    if indep:
        ax.plot([e.get("step", 0) for e in indep], [e["eval_judge/win_rate"] for e in indep], "s--", label="eval.judge")
        ax.legend()
    ax.axhline(0.5, color="grey", lw=0.5)
    ax.set_ylim(0, 1)
    ax.set_title("held-out win rate vs initial policy")
    ax.set_xlabel("step")
    axes[1][0].plot(steps, [r["loss"] for r in train])
    axes[1][0].set_title("DPO loss")
    axes[1][0].set_xlabel("step")
    axes[1][1].plot(steps, [r["kl"] for r in train])
    axes[1][1].set_title("KL(policy || reference), nats/sequence")
    axes[1][1].set_xlabel("step")
    fig.tight_layout()
    out = Path(run_dir) / "curves.png"
    tmp = out.with_name(".curves.tmp.png")
    fig.savefig(tmp, dpi=80)
    plt.close(fig)
    tmp.replace(out)   # never a half-written curves.png
    return out


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
