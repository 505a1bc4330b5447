"""The run directory: resolved config, metrics.jsonl, summary.json, policy/."""

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

    def write_config(self, text: str) -> None:
        (self.path / "config.yaml").write_text(text)

    def log(self, record: dict) -> None:
        self._metrics.write(json.dumps(record, default=float) + "\n")

    def write_json(self, name: str, data: dict) -> None:
        (self.path / name).write_text(json.dumps(data, indent=2, default=float) + "\n")

    def copy_policy(self, checkpoint_dir: str | Path) -> Path:
        dest = self.path / "policy"
        shutil.copytree(Path(checkpoint_dir) / "policy", dest, dirs_exist_ok=True)
        return dest

    def close(self) -> None:
        self._metrics.close()
