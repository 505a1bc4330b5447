"""The run directory: resolved config, metrics.jsonl, summary.json, curves.png, policy/."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path


class RunDir:
    def __init__(self, path: Path):
        self.path = path
        self.path.mkdir(parents=True, exist_ok=True)
        self._metrics = open(self.path / "metrics.jsonl", "a", buffering=1)

    @classmethod
    def create(cls, output_dir: str, name: str) -> "RunDir":
        stamp = time.strftime("%Y%m%d-%H%M%S")
        path = Path(output_dir).expanduser().resolve() / f"{name}-{stamp}"
        k = 1
        while path.exists():
            k += 1
            path = path.with_name(f"{name}-{stamp}-{k}")
        return cls(path)

    @classmethod
    def open(cls, path: str | Path) -> "RunDir":
        """An existing run directory, to continue it."""
        path = Path(path).expanduser().resolve()
        if not (path / "config.yaml").exists():
            raise FileNotFoundError(f"{path} is not a run directory (it has no config.yaml)")
        return cls(path)

    def truncate_metrics(self, keep) -> int:
        """Keep only the records `keep(record)` accepts (on resume: those up to the checkpoint)."""
        self._metrics.close()
        path = self.path / "metrics.jsonl"
        lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
        kept = [ln for ln in lines if keep(json.loads(ln))]
        path.write_text("".join(ln + "\n" for ln in kept))
        self._metrics = open(path, "a", buffering=1)
        return len(lines) - len(kept)

    def write_config(self, text: str) -> None:
        (self.path / "config.yaml").write_text(text)

    def log(self, record: dict) -> None:
        self._metrics.write(json.dumps(record, default=float) + "\n")

    def write_json(self, name: str, data: dict) -> None:
        (self.path / name).write_text(json.dumps(data, indent=2, default=float) + "\n")

    def copy_policy(self, checkpoint) -> Path:
        """The checkpoint's policy/ into the run directory (the checkpoint may live in remote storage)."""
        dest = self.path / "policy"
        with checkpoint.as_directory() as d:
            shutil.copytree(Path(d) / "policy", dest, dirs_exist_ok=True)
        return dest

    def close(self) -> None:
        self._metrics.close()
