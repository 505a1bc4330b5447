"""The run directory: resolved config, metrics.jsonl, summary.json, curves.png, policy/.

Nothing in it tears: whole files are written to a temporary name and renamed
(`os.replace`), policy/ is copied into a temporary directory and swapped in,
and a torn last line of metrics.jsonl (a kill mid-write, a full disk) is
dropped on read. One process at a time: `RunDir` holds an exclusive `flock`
on `.lock` while it is open, and a second process is refused with who holds it.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import sys
import time
from pathlib import Path

from .errors import RunFailed

LOCK = ".lock"


class RunDirBusy(RunFailed):
    """Another process is using this run directory."""


def write_atomic(path: Path, data: str | bytes) -> None:
    """`path` holds either its old content or all of `data`, never a part."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_jsonl(path: Path) -> list[dict]:
    """The records of a JSON-lines file; a torn (unparseable) last line is left out."""
    lines = [ln for ln in Path(path).read_text(errors="replace").splitlines() if ln.strip()]
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except ValueError:
            if i < len(lines) - 1:
                raise RunFailed(f"{path} line {i + 1} is not JSON; the file was changed by something other "
                                "than online-dpo") from None
    return records


class RunDir:
    def __init__(self, path: Path):
        self.path = path
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock = self._acquire()
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

    def _acquire(self):
        """An exclusive lock on the directory for this process's lifetime; RunDirBusy if another holds it."""
        f = open(self.path / LOCK, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise RunDirBusy(f"{self.path} is in use by {holder}; wait for it to end, or stop it first") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')} "
                f"({' '.join(sys.argv[:3])})\n")
        f.flush()
        return f

    def truncate_metrics(self, keep) -> int:
        """Keep only the records `keep(record)` accepts (on resume: those up to the checkpoint)."""
        self._metrics.close()
        path = self.path / "metrics.jsonl"
        records = read_jsonl(path)
        kept = [r for r in records if keep(r)]
        write_atomic(path, "".join(json.dumps(r, default=float) + "\n" for r in kept))
        self._metrics = open(path, "a", buffering=1)
        return len(records) - len(kept)

    def write_config(self, text: str) -> None:
        write_atomic(self.path / "config.yaml", text)

    def record_resume(self, step: int, changes: tuple[str, ...], text: str) -> None:
        """config.yaml becomes the resumed run's config, under a comment per resume saying what changed when."""
        old = (self.path / "config.yaml").read_text().splitlines()
        history = [ln for ln in old if ln.startswith("# resumed at step")]
        history.append(f"# resumed at step {step}, changing {'; '.join(changes)}")
        self.write_config("\n".join(history) + "\n" + text)

    def log(self, record: dict) -> None:
        self._metrics.write(json.dumps(record, default=float) + "\n")

    def write_json(self, name: str, data: dict) -> None:
        write_atomic(self.path / name, json.dumps(data, indent=2, default=float) + "\n")

    def copy_policy(self, checkpoint) -> Path:
        """The checkpoint's policy/ into the run directory (the checkpoint may live in remote storage),
        swapped in whole: a half-copied policy/ never sits under its final name."""
        dest = self.path / "policy"
        tmp = self.path / f".policy.tmp{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        with checkpoint.as_directory() as d:
            shutil.copytree(Path(d) / "policy", tmp)
        if dest.exists():
            old = self.path / f".policy.old{os.getpid()}"
            os.replace(dest, old)
            os.replace(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dest)
        return dest

    def close(self) -> None:
        self._metrics.close()
        self._lock.close()   # releases the flock
