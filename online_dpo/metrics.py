"""What a run reports: one concise console line per step, and eval results.

The run directory's metrics.jsonl gets every record (see run_dir.py); the
console gets a line per `metrics.log_every_steps` steps.
"""

from __future__ import annotations

import sys
import time


def _fmt(x, spec: str, missing: str = "-") -> str:
    return missing if x is None else format(x, spec)


class ConsoleLog:
    def __init__(self, stream=None):
        self.stream = stream or sys.stdout
        self.start = time.time()

    def _print(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def info(self, text: str) -> None:
        self._print(f"[online-dpo] {text}")

    def step(self, r: dict, total: int) -> None:
        wall = r.get("wall_seconds") or 0.0
        rate = r["pairs"] / wall if wall else 0.0
        self._print(
            f"step {r['step']:>4}/{total}  pairs {r['pairs']:>6}  reward {_fmt(r.get('reward_mean'), '+.3f')}  "
            f"loss {r['loss']:.4f}  acc {r['rewards/accuracy']:.2f}  kl {r['kl']:+.3f}  "
            f"v{r['policy_version']}  {rate:.1f} pairs/s")

    def eval(self, result: dict) -> None:
        parts = [f"eval v{result['policy_version']}: held-out reward {_fmt(result.get('reward'), '+.3f')}"]
        if "win_rate" in result:
            parts.append(f"win rate vs initial {result['win_rate']:.3f}")
        self._print("[online-dpo] " + ", ".join(parts))
