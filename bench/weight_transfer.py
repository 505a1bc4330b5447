"""Weight transfer on CPU: the collective transport (gloo broadcast) against the object store.

    .venv/bin/python bench/weight_transfer.py [--versions 20] [--runs]

Part 1, the transfer alone: a local Ray cluster on 127.0.0.1, two real vLLM
sampler actors holding the embedded default policy, and this process as
trainer rank 0. For each transport it publishes `--versions` versions of the
policy and, per version, times the trainer's publish (pack, then store put or
broadcast) and the two samplers' loads (fetch or take the staged broadcast,
then vLLM's in-place reload), which run in parallel. It checks that both
samplers end with the last version's weights.

Part 2 (`--runs`): the embedded default end to end, once per transport, from
each run's metrics.jsonl: the trainer's median sync seconds, the samplers'
median load seconds, training seconds and pairs/s.

Writes bench/results/weight_transfer.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def transfer(versions: int) -> dict:
    import ray
    import torch
    from transformers import AutoModelForCausalLM

    from online_dpo.cluster import use_loopback
    from online_dpo.collective import Rendezvous, Sender
    from online_dpo.embedded import EMBEDDED, resolve_model
    from online_dpo.engine import EngineSpec, engine_env
    from online_dpo.sampler import Sampler
    from online_dpo.weight_sync import PolicyStore, publish

    use_loopback()
    ray.init(num_cpus=4, _node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=False)
    path = resolve_model(EMBEDDED)
    samplers = [ray.remote(Sampler).options(num_cpus=1, runtime_env={"env_vars": engine_env(1, 1, False, "quiet")})
                .remote(EngineSpec(model=path, dtype="float32"), f"sampler-{i}") for i in range(2)]
    ray.get([s.ready.remote() for s in samplers])
    store = ray.remote(PolicyStore).remote()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    rdv = Rendezvous("127.0.0.1")
    spec = rdv.next(2)
    ray.get([s.join_weight_group.remote(spec, 1 + k) for k, s in enumerate(samplers)])
    sender = Sender(lambda: spec, torch.device("cpu"), bucket_bytes=64 << 20)
    assert sender.join(spec)
    out = {}
    for transport in ("object_store", "collective", "object_store", "collective"):   # twice, interleaved
        rows = []
        for v in range(versions):
            with torch.no_grad():
                next(model.parameters()).add_(1e-3)
            start = time.perf_counter()
            handle, _ = publish(model, v + 1, store, sender=sender if transport == "collective" else None)
            published = time.perf_counter()
            assert handle.transport == transport
            loads = ray.get([s.load_weights.remote(handle) for s in samplers])
            done = time.perf_counter()
            rows.append((published - start, max(loads), done - start))
        versions_held = ray.get([s.policy_version.remote() for s in samplers])
        assert versions_held == [versions, versions], versions_held
        med = [statistics.median(r[i] for r in rows) for i in range(3)]
        prev = out.get(transport)
        entry = {"publish_s": med[0], "load_s": med[1], "total_s": med[2], "bytes": handle.nbytes}
        out[transport] = entry if prev is None else {k: min(prev[k], entry[k]) for k in entry}
    sender.stop()
    ray.shutdown()
    return out


def run(transport: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [str(ROOT / ".venv" / "bin" / "online-dpo"), "train", str(ROOT / "configs" / "default.yaml"),
               "--set", f"run.output_dir={tmp}", "--set", f"sync.transport={transport}"]
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
        if proc.returncode != 0:
            raise SystemExit(f"{transport} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
        (run_dir,) = [p for p in Path(tmp).iterdir() if p.is_dir()]
        rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        summary = json.loads((run_dir / "summary.json").read_text())
    syncs = [r for r in rows if r["kind"] == "train" and r.get("sync_seconds")]
    loads = [r["load_seconds"] for r in rows if r["kind"] == "rollout" and r.get("load_seconds")]
    return {"sync_s": statistics.median(r["sync_seconds"] for r in syncs),
            "collective_share": sum(r.get("sync_collective", 0) for r in syncs) / len(syncs),
            "load_s": statistics.median(loads), "train_seconds": summary["train_seconds"],
            "pairs_per_second": summary["pairs_per_second"], "reward_after": summary["reward_after"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--versions", type=int, default=20)
    p.add_argument("--runs", action="store_true", help="also run the embedded default once per transport")
    p.add_argument("--json", default=str(ROOT / "bench" / "results" / "weight_transfer.json"))
    args = p.parse_args()
    result = {"machine": "2 cores, no GPU", "command": "bench/weight_transfer.py" + (" --runs" if args.runs else ""),
              "transfer_two_samplers": transfer(args.versions)}
    t = result["transfer_two_samplers"]
    print(f"{'per version, 2 samplers':28s} {'publish':>9s} {'load':>9s} {'total':>9s}")
    for name, r in t.items():
        print(f"{name:28s} {r['publish_s'] * 1e3:7.1f}ms {r['load_s'] * 1e3:7.1f}ms {r['total_s'] * 1e3:7.1f}ms")
    print(f"collective / object store, total: {t['collective']['total_s'] / t['object_store']['total_s']:.2f}")
    if args.runs:
        result["default_runs"] = {tr: run(tr) for tr in ("object_store", "collective")}
        for name, r in result["default_runs"].items():
            print(f"default, {name:12s}: sync {r['sync_s'] * 1e3:.1f} ms, load {r['load_s'] * 1e3:.1f} ms, "
                  f"train {r['train_seconds']:.1f} s, {r['pairs_per_second']:.0f} pairs/s "
                  f"(collective share {r['collective_share']:.2f})")
    Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
