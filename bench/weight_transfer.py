"""Weight transfer: vLLM's weight-transfer API against the hand-built group it replaced, and the object store.

    .venv/bin/python bench/weight_transfer.py [--versions 20] [--runs]

Part 1, the transfer alone, seconds per version with two samplers, in one
run: a local Ray cluster on 127.0.0.1, this process as trainer rank 0, and
- `vllm_api_gloo`: two real sampler actors; each version is pushed through
  vLLM's API (our gloo engines, syncer.py) and is loaded when the call returns;
- `hand_built_group`: two vLLM engines with the old worker extension, fed by
  the old hand-built gloo group and flat buffer (bench/legacy_collective.py,
  kept here only as this baseline): broadcast, then both load;
- `object_store`: the same samplers pull each version from the PolicyStore and
  load it through vLLM's API (chunks inline).
Rounds alternate, twice; the best median of each counts. It checks that the
samplers end on the last version. On a GPU machine with vLLM this is where the
NCCL figures would come from; none has been measured (the GPU machines lent
to this project have no vLLM).

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
    from online_dpo.embedded import EMBEDDED, resolve_model
    from online_dpo.engine import EngineSpec, engine_env
    from online_dpo.sampler import MAX_CONCURRENCY, Sampler
    from online_dpo.syncer import Syncer
    from online_dpo.types import WeightGroup
    from online_dpo.transfer import tensors_of
    from online_dpo.weight_sync import PolicyStore, publish

    use_loopback()
    env = dict(engine_env(1, False, "quiet"), PYTHONPATH=str(ROOT / "bench"))
    ray.init(num_cpus=6, _node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": env})
    import legacy_collective as legacy

    path = resolve_model(EMBEDDED)
    samplers = [ray.remote(Sampler).options(num_cpus=1, max_concurrency=MAX_CONCURRENCY)
                .remote(EngineSpec(model=path, dtype="float32", transfer="gloo"), f"sampler-{i}") for i in range(2)]
    old = [ray.remote(legacy.LegacySampler).options(num_cpus=1).remote(path) for _ in range(2)]
    ray.get([s.ready.remote() for s in samplers + old])
    store = ray.remote(PolicyStore).remote()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    syncer = Syncer(lambda: WeightGroup(1, tuple(samplers)), "gloo", torch.device("cpu"), 64 << 20)
    rdv = legacy.Rendezvous("127.0.0.1")
    spec = rdv.next(2)
    ray.get([s.join.remote(spec, 1 + k) for k, s in enumerate(old)])
    sender = legacy.Sender(lambda: spec, torch.device("cpu"), bucket_bytes=64 << 20)
    assert sender.join(spec)
    deadline = time.time() + 60
    while syncer.engine is None and time.time() < deadline:
        time.sleep(0.1)
    assert syncer.engine is not None, "the vLLM weight group did not form"

    def vllm_api(v):      # push through vLLM's weight-transfer API (what sync.transport: collective does)
        handle, _ = publish(tensors_of(model.state_dict(), None, tied=True), v, store, syncer)
        assert handle.transport == "collective"
        return 0.0

    def object_store(v):  # pull from the store, loaded through the same API
        handle, _ = publish(tensors_of(model.state_dict(), None, tied=True), v, store)
        return max(ray.get([s.load_weights.remote(handle) for s in samplers]))

    def hand_built(v):    # the old path: our gloo group, flat buffer, worker extension + reload_weights
        buffer, layout = legacy.pack(model.state_dict(), tied=True, reuse=True)
        ray.get(store.announce.remote(v, buffer.numel()))   # the serial, as the old publish asked for it
        assert sender.send(v, v, buffer)
        return max(ray.get([s.load.remote(v, layout) for s in old]))

    out, serial = {}, 0
    for name, send in [("vllm_api_gloo", vllm_api), ("hand_built_group", hand_built), ("object_store", object_store)] * 2:
        rows = []
        for _ in range(versions):
            serial += 1
            with torch.no_grad():
                next(model.parameters()).add_(1e-3)
            start = time.perf_counter()
            load = send(serial)
            rows.append((load, time.perf_counter() - start))
        if name != "hand_built_group":
            assert ray.get([s.policy_version.remote() for s in samplers]) == [serial, serial]
        entry = {"total_s": statistics.median(r[1] for r in rows), "load_s": statistics.median(r[0] for r in rows)}
        prev = out.get(name)
        out[name] = entry if prev is None else {k: min(prev[k], entry[k]) for k in entry}
    out["bytes"] = sum(t.numel() * t.element_size() for t in tensors_of(model.state_dict(), None, tied=True).values())
    syncer.stop()
    sender.stop()
    ray.shutdown()
    return out


RUNS = {"object_store": ["sync.transport=object_store"],
        "collective_in_flight": ["sync.transport=collective", "sync.in_flight=true"],
        "collective_between_batches": ["sync.transport=collective", "sync.in_flight=false"]}


def run(name: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [str(ROOT / ".venv" / "bin" / "online-dpo"), "train", str(ROOT / "configs" / "default.yaml"),
               "--set", f"run.output_dir={tmp}"]
        for override in RUNS[name]:
            cmd += ["--set", override]
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
        if proc.returncode != 0:
            raise SystemExit(f"{name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
        (run_dir,) = [p for p in Path(tmp).iterdir() if p.is_dir()]
        rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        summary = json.loads((run_dir / "summary.json").read_text())
    syncs = [r for r in rows if r["kind"] == "train" and r.get("sync_seconds")]
    rollouts = [r for r in rows if r["kind"] == "rollout"]
    return {"sync_s": statistics.median(r["sync_seconds"] for r in syncs),
            "collective_share": sum(r.get("sync_collective", 0) for r in syncs) / len(syncs),
            "load_s": statistics.median([r["load_seconds"] for r in rollouts if r.get("load_seconds")] or [0.0]),
            "spanned_share": sum(r.get("spanned", 0) for r in rollouts) / max(1, sum(r["completions"] for r in rollouts)),
            "train_seconds": summary["train_seconds"], "pairs_per_second": summary["pairs_per_second"],
            "pipeline_efficiency": summary.get("pipeline_efficiency"), "lag_mean": _mean_lag(rows),
            "reward_after": summary["reward_after"], "win_rate": summary["win_rate"]}


def _mean_lag(rows: list) -> float:
    lags = [r["lag_mean"] for r in rows if r["kind"] == "train" and r.get("lag_mean") is not None]
    return sum(lags) / max(1, len(lags))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--versions", type=int, default=20)
    p.add_argument("--runs", action="store_true",
                   help="also run the embedded default: object store, pushed in flight, pushed between batches")
    p.add_argument("--json", default=str(ROOT / "bench" / "results" / "weight_transfer.json"))
    args = p.parse_args()
    result = {"machine": "2 cores, no GPU", "command": "bench/weight_transfer.py" + (" --runs" if args.runs else ""),
              "transfer_two_samplers": transfer(args.versions)}
    t = result["transfer_two_samplers"]
    print(f"{'per version, 2 samplers, ' + str(t['bytes'] >> 10) + ' KiB':34s} {'total':>9s} {'GB/s':>6s}")
    for name in ("vllm_api_gloo", "hand_built_group", "object_store"):
        r = t[name]
        print(f"{name:34s} {r['total_s'] * 1e3:7.1f}ms {t['bytes'] / r['total_s'] / 1e9:6.2f}")
    print(f"vLLM API / hand-built group, total: {t['vllm_api_gloo']['total_s'] / t['hand_built_group']['total_s']:.2f}")
    if args.runs:
        result["default_runs"] = {name: run(name) for name in RUNS}
        for name, r in result["default_runs"].items():
            print(f"default, {name:27s}: sync {r['sync_s'] * 1e3:.1f} ms, train {r['train_seconds']:.1f} s, "
                  f"{r['pairs_per_second']:.0f} pairs/s, efficiency {r['pipeline_efficiency']}, lag {r['lag_mean']:.2f}, "
                  f"spanned {r['spanned_share']:.2f}, reward {r['reward_after']:+.3f}, win {r['win_rate']:.2f}")
    Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
