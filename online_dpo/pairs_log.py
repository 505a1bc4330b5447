"""The preference log: every judged pair of a run, as Parquet files in RUN_DIR/pairs/.

One row per group the judge labelled: its best and worst completion (prompt,
chosen, rejected), both scores (a pairwise judge's scores are win
probabilities), the policy version of each response, what else the judge
said (an ensemble's per-objective scores, a pairwise judge's agreement
between the two orders), and what became of it (`outcome`):

    trained    the learner stepped on it (`step` says which step)
    tie        the judge could not separate the two (within judge.margin)
    identical  the two responses had the same tokens
    nonfinite  the judge gave fewer than two finite scores
    stale      it waited longer than sync.max_policy_lag versions
    restart    sampled by, or trained into, a version a restored learner no longer has
    unused     still buffered when the run ended

The controller writes one file per step (`{step:06d}-{seq:04d}.parquet`) with
the pairs that step trained and the rows dropped since the last file; the
pairs still buffered at the end go to `unused.parquet`. A gang restart
relabels the lost steps' rows as `restart`; `--resume` deletes the files after
the checkpoint, as metrics.jsonl's records after it are cut. `online-dpo
pairs RUN_DIR` summarises the log, and `--export OUT` writes the pairs as a
Hugging Face dataset with prompt / chosen / rejected columns (TRL's
DPOTrainer reads it).
"""

from __future__ import annotations

import collections
import os
import re
from pathlib import Path

DIR = "pairs"
UNUSED = "unused.parquet"
PART = re.compile(r"^(\d{6})-(\d{4})\.parquet$")
VALID = ("trained", "stale", "restart", "unused")   # real preferences: the judge separated the two
OUTCOMES = ("trained", "tie", "identical", "nonfinite", "stale", "restart", "unused")


def row(outcome: str, pair, step: int | None, logged_step: int) -> dict:
    """One log row of a pair (types.PreferencePair)."""
    c, r = pair.chosen, pair.rejected
    return {"outcome": outcome, "step": step, "logged_step": logged_step, "prompt": pair.prompt,
            "chosen": c.text, "rejected": r.text, "chosen_score": pair.chosen_score,
            "rejected_score": pair.rejected_score, "chosen_version": c.policy_version,
            "rejected_version": r.policy_version, "chosen_tokens": len(c.token_ids),
            "rejected_tokens": len(r.token_ids), "chosen_finish": c.finish_reason,
            "rejected_finish": r.finish_reason, **pair.details}


def write_rows(path: Path, rows: list[dict]) -> None:
    """Rows to one Parquet file, whole or not at all (a temporary name, then renamed)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    pq.write_table(pa.Table.from_pylist(rows), tmp)
    os.replace(tmp, path)


class PairLog:
    """Writes a run's preference log (`enabled` False: does nothing)."""

    def __init__(self, run_path: Path, enabled: bool = True):
        self.dir, self.enabled = Path(run_path) / DIR, enabled
        if enabled:
            self.dir.mkdir(exist_ok=True)
        self.seq = 1 + max((int(m.group(2)) for m in self._parts()), default=0)
        self.orders: dict[int, list] = {}   # step -> the pairs ordered for it, until it is done

    def ordered(self, step: int, pairs) -> None:
        self.orders[step] = list(pairs)

    def done(self, step: int, dropped) -> None:
        """`step` is trained: its pairs, and the rows dropped since the last write, go to the log."""
        self.write(step, self.orders.pop(step, ()), dropped)

    def restarted(self, step: int) -> tuple[list, int]:
        """The gang restarted from the checkpoint at `step`: the pairs of orders it never ran, and how many
        trained pairs the log relabelled as `restart` (steps after `step`)."""
        pending = [p for s in sorted(self.orders) for p in self.orders[s]]
        self.orders.clear()
        return pending, self.rewind(step)

    def _parts(self):
        return [m for p in sorted(self.dir.glob("*.parquet")) if (m := PART.match(p.name))] \
            if self.dir.is_dir() else []

    def write(self, step: int, trained, dropped) -> None:
        """The pairs `step` trained on, and the (why, pair) rows dropped since the last write."""
        if not self.enabled:
            return
        rows = [row("trained", p, step, step) for p in trained] + [row(why, p, None, step) for why, p in dropped]
        if rows:
            write_rows(self.dir / f"{step:06d}-{self.seq:04d}.parquet", rows)
            self.seq += 1

    def end(self, step: int, dropped, waiting) -> None:
        """The run ends at `step`: the rows dropped since the last write, and the pairs still buffered."""
        self.write(step, (), dropped)
        if self.enabled and waiting:
            write_rows(self.dir / UNUSED, [row("unused", p, None, step) for p in waiting])

    def rewind(self, step: int) -> int:
        """A gang restart back to `step`: the rows of later steps were trained into a lost version; they
        become `restart` rows. Returns how many pairs that was."""
        import pyarrow.parquet as pq

        lost = 0
        for m in self._parts() if self.enabled else []:
            if int(m.group(1)) > step:
                path = self.dir / m.group(0)
                rows = pq.read_table(path).to_pylist()
                for r in rows:
                    if r["outcome"] == "trained":
                        r["outcome"], r["step"], lost = "restart", None, lost + 1
                write_rows(path, rows)
        return lost

    def truncate(self, step: int) -> int:
        """On resume from the checkpoint at `step`: delete the files written after it. Returns how many."""
        gone = [self.dir / m.group(0) for m in self._parts() if int(m.group(1)) > step]
        gone += [self.dir / UNUSED] if (self.dir / UNUSED).exists() else []
        for path in gone:
            path.unlink()
        return len(gone)

    def counts(self) -> dict[str, int]:
        """Rows per outcome, over every file."""
        if not self.enabled:
            return {}
        table = read(self.dir.parent, columns=["outcome"])
        return dict(collections.Counter(table.column("outcome").to_pylist())) if table is not None else {}


def read(run_path: Path, columns: list[str] | None = None):
    """The whole log of a run as one pyarrow Table (None: it has none)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = Path(run_path) / DIR
    files = sorted(p for p in d.glob("*.parquet") if PART.match(p.name)) if d.is_dir() else []
    files += [d / UNUSED] if (d / UNUSED).exists() else []
    tables = [pq.read_table(p, columns=columns) for p in files if pq.ParquetFile(p).metadata.num_rows]
    return pa.concat_tables(tables, promote_options="default") if tables else None


def summarise(run_path: Path, examples: int = 3) -> str:
    """What `online-dpo pairs RUN_DIR` prints: rows by outcome and by policy version, the judge's agreement
    between the two orders (pairwise judges), and a few trained pairs."""
    table = read(run_path)
    if table is None:
        return f"{run_path} has no preference log ({DIR}/ is missing or empty; pairs.log was off?)"
    rows = table.to_pylist()
    by = collections.Counter(r["outcome"] for r in rows)
    lines = [f"{len(rows)} judged pairs in {Path(run_path) / DIR}",
             "  " + "  ".join(f"{k} {by[k]}" for k in OUTCOMES if by[k])]
    versions = collections.defaultdict(collections.Counter)
    for r in rows:
        versions[min(r["chosen_version"], r["rejected_version"])][r["outcome"]] += 1
    lines.append("by policy version (of the older response):")
    lines += [f"  v{v:<4} " + "  ".join(f"{k} {c[k]}" for k in OUTCOMES if c[k]) for v, c in sorted(versions.items())]
    agree = [r["order_agreement"] for r in rows if r.get("order_agreement") is not None]
    lines.append(f"judge agreement between the two orders: {sum(agree) / len(agree):.3f} over {len(agree)} pairs"
                 if agree else "judge agreement between the two orders: - (a pointwise judge scores each response once)")
    trained = [r for r in rows if r["outcome"] == "trained"][:examples]
    for r in trained:
        lines += [f"step {r['step']}, scores {r['chosen_score']:+.3f} > {r['rejected_score']:+.3f}",
                  f"  prompt:   {_short(r['prompt'])}", f"  chosen:   {_short(r['chosen'])}",
                  f"  rejected: {_short(r['rejected'])}"]
    return "\n".join(lines)


def export(run_path: Path, out: str, outcomes=VALID) -> int:
    """The log's real preferences (`outcomes`) as a Hugging Face dataset on disk, with prompt / chosen /
    rejected columns (and the scores, the outcome and the step); returns how many rows."""
    import datasets

    datasets.disable_progress_bars()
    table = read(run_path)
    if table is None:
        raise FileNotFoundError(f"{run_path} has no preference log ({DIR}/)")
    rows = [r for r in table.to_pylist() if r["outcome"] in outcomes]
    keys = ("prompt", "chosen", "rejected", "chosen_score", "rejected_score", "outcome", "step")
    datasets.Dataset.from_dict({k: [r[k] for r in rows] for k in keys}).save_to_disk(out)
    return len(rows)


def _short(text: str, width: int = 100) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[:width - 3] + "..."
