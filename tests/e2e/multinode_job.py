"""Run inside a network namespace that has only loopback (see test_cluster.py), so every
Ray node, GCS and raylet binds 127.0.0.1. Prints one JSON line with what it saw.

1. A 3-node cluster (ray.cluster_utils.Cluster): a head, a node with the custom
   resource `samplers`, a node with `trainers`. A short embedded-default run
   places samplers and trainer workers on different nodes by those resources.
2. `ray job submit` of `online-dpo train` to the same head; waits for it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path


def main(out_dir: str) -> None:
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "resources": {"head": 4}})
    sampler_node = cluster.add_node(num_cpus=1, resources={"samplers": 4})
    trainer_node = cluster.add_node(num_cpus=1, resources={"trainers": 4})
    ray.init(address=cluster.address, namespace="multinode", log_to_driver=False)
    result: dict = {"nodes": len(ray.nodes())}
    try:
        result["placed"] = placed_run(out_dir, sampler_node.node_id, trainer_node.node_id)
        result["job"] = submit_job(out_dir)
    finally:
        ray.shutdown()
        cluster.shutdown()
    print("RESULT " + json.dumps(result), flush=True)


def placed_run(out_dir: str, sampler_node: str, trainer_node: str) -> dict:
    from ray.util.state import list_actors

    from online_dpo.config import load_config
    from online_dpo.controller import train
    from online_dpo.plan import RunPlan
    from online_dpo.metrics import ConsoleLog

    cfg = load_config(None, [f"run.output_dir={out_dir}/placed", "run.name=placed", "train.max_steps=4",
                             "eval.prompts=8", "sampler.resources={samplers: 1}",
                             "train.resources_per_worker={trainers: 1}", "judge.resources={head: 1}"])
    summary = train(RunPlan.from_config(cfg), ConsoleLog(stream=sys.stderr))
    actors = list_actors(detail=True, limit=1000)
    where = {}
    for a in actors:
        where.setdefault(a["class_name"], set()).add(a["node_id"])
    return {"summary": {k: summary[k] for k in ("steps", "pairs", "reward_before", "reward_after")},
            "policy_exists": Path(summary["policy_dir"] or "/nonexistent", "config.json").exists(),
            "samplers_on_sampler_node": where.get("Sampler") == {sampler_node},
            "trainers_on_trainer_node": where.get("RayTrainWorker") == {trainer_node},
            "sampler_nodes": sorted(where.get("Sampler", [])), "trainer_nodes": sorted(where.get("RayTrainWorker", []))}


def submit_job(out_dir: str) -> dict:
    bin_dir = Path(sys.executable).parent
    entry = (f"{bin_dir}/online-dpo train --set run.output_dir={out_dir}/job --set run.name=job "
             "--set train.max_steps=3 --set eval.prompts=8")
    start = time.time()
    proc = subprocess.run([str(bin_dir / "ray"), "job", "submit", "--address", "http://127.0.0.1:8265",
                           "--submission-id", "online-dpo-job", "--", *entry.split()],
                          capture_output=True, text=True, timeout=900)
    from ray.job_submission import JobSubmissionClient

    status = JobSubmissionClient("http://127.0.0.1:8265").get_job_status("online-dpo-job")
    runs = list(Path(out_dir, "job").glob("job-*/summary.json"))
    return {"returncode": proc.returncode, "seconds": round(time.time() - start, 1),
            "status": str(status),
            "summary": json.loads(runs[0].read_text()) if runs else None,
            "tail": (proc.stdout + proc.stderr)[-1500:]}


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main(sys.argv[1])
