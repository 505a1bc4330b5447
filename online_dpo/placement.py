"""Placement: whether the cluster can hold what each actor group asks for.

The run YAML places samplers, judges, trainer workers and serve replicas by
Ray resources (CPU, GPU, custom resources such as a node type's) and node
labels. The run plan (plan.py) holds each group's `Ask`, the same one that
places the group when it starts; `fit()` packs the asks onto the cluster's
nodes (first fit, largest first; the trainer gang as its placement group's
strategy says), and `render()` prints the plan. A plan that cannot fit is
refused with a message naming the fields to change, in a dry run and before
a real run starts any actor (`require_fit`), instead of leaving actors
pending forever.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from .errors import RunFailed
from .specs import Ask, LearnerSpec


@dataclass
class Node:
    node_id: str
    address: str
    resources: dict[str, float]
    labels: dict[str, str] = field(default_factory=dict)
    free: dict[str, float] = field(default_factory=dict)

    def __post_init__(self):
        self.free = dict(self.resources)

    def fits(self, ask: Ask, times: int = 1) -> bool:
        if any(self.labels.get(k) != v for k, v in ask.labels.items()):
            return False
        return all(self.free.get(r, 0.0) + 1e-9 >= amount * times for r, amount in ask.resources.items())

    def take(self, ask: Ask, times: int = 1) -> None:
        for r, amount in ask.resources.items():
            self.free[r] = self.free.get(r, 0.0) - amount * times


def cluster_nodes() -> list[Node]:
    """The alive nodes of the connected Ray cluster."""
    import ray

    return [Node(n["NodeID"], n.get("NodeManagerAddress", "?"),
                 {k: float(v) for k, v in n["Resources"].items() if not k.startswith("node:")},
                 dict(n.get("Labels") or {}))
            for n in ray.nodes() if n.get("Alive")]


def local_nodes() -> list[Node]:
    """The single node a local run would start on this machine."""
    gpus = 0
    try:
        import torch
        gpus = torch.cuda.device_count()
    except Exception:
        pass
    res = {"CPU": float(os.cpu_count() or 1)}
    if gpus:
        res["GPU"] = float(gpus)
    return [Node("local", "127.0.0.1", res)]


def fit(asks: list[Ask], nodes: list[Node]) -> tuple[dict[str, list[str]], list[str]]:
    """Pack the asks onto the nodes; returns node addresses per group and the problems."""
    placed: dict[str, list[str]] = {a.group: [] for a in asks}
    problems: list[str] = []
    order = sorted(asks, key=lambda a: (-a.resources.get("GPU", 0), -sum(a.resources.values())))
    for ask in order:
        if ask.strategy == "STRICT_PACK":
            node = next((n for n in nodes if n.fits(ask, ask.count)), None)
            if node:
                node.take(ask, ask.count)
                placed[ask.group] += [node.address] * ask.count
            else:
                problems.append(_problem(ask, nodes, together=True))
            continue
        used: set[str] = set()
        for _ in range(ask.count):
            candidates = [n for n in nodes if n.fits(ask) and not (ask.strategy == "STRICT_SPREAD"
                                                                    and n.node_id in used)]
            if not candidates:
                problems.append(_problem(ask, nodes))
                break
            node = candidates[0]
            node.take(ask)
            used.add(node.node_id)
            placed[ask.group].append(node.address)
    return placed, problems


def _problem(ask: Ask, nodes: list[Node], together: bool = False) -> str:
    want = ", ".join(f"{k} {v:g}" for k, v in ask.resources.items()) or "nothing"
    labels = f" on nodes labelled {ask.labels}" if ask.labels else ""
    totals: dict[str, float] = {}
    for n in nodes:
        for k, v in n.resources.items():
            totals[k] = totals.get(k, 0.0) + v
    missing = [k for k in ask.resources if totals.get(k, 0.0) < ask.resources[k] * (ask.count if together else 1)]
    have = ", ".join(f"{k} {totals.get(k, 0):g}" for k in ask.resources)
    why = (f"the cluster has no {' or '.join(missing)} to give" if missing
           else "no node has that much free once the other actors are placed")
    how = f"{ask.count} together ({ask.strategy})" if together else f"{ask.count} x"
    return (f"{ask.group}: {how} {{{want}}}{labels} does not fit: {why} (cluster total: {have}); "
            f"change {ask.fields}, or add nodes")


def render(asks: list[Ask], nodes: list[Node], placed: dict[str, list[str]], problems: list[str]) -> str:
    lines = ["plan:"]
    for a in asks:
        want = ", ".join(f"{k} {v:g}" for k, v in a.resources.items()) or "-"
        extra = f" labels {a.labels}" if a.labels else ""
        extra += f" placement group {a.strategy}" if a.strategy else ""
        where = ", ".join(sorted(set(placed.get(a.group, [])))) or "-"
        lines.append(f"  {a.group:<8} {a.count} x {{{want}}}{extra}  ->  {where}")
    lines.append("cluster:")
    for n in nodes:
        res = ", ".join(f"{k} {v:g}" for k, v in sorted(n.resources.items())
                        if k in ("CPU", "GPU") or not k.startswith(("memory", "object_store")))
        lines.append(f"  {n.address} ({n.node_id[:8]}): {res}" + (f" labels {n.labels}" if n.labels else ""))
    lines.append("result: fits" if not problems else "result: does NOT fit\n  " + "\n  ".join(problems))
    return "\n".join(lines)


def check(asks: tuple[Ask, ...] | list[Ask], nodes: list[Node]) -> tuple[str, list[str]]:
    """The rendered plan against these nodes, and what does not fit."""
    asks = list(asks)
    placed, problems = fit(asks, nodes)
    return render(asks, nodes, placed, problems), problems


def require_fit(asks: tuple[Ask, ...]) -> None:
    """Refuse a plan the connected cluster cannot hold, instead of leaving actors pending."""
    text, problems = check(asks, cluster_nodes())
    if problems:
        raise RunFailed("the cluster cannot hold this run (set run.check_resources: false on an "
                        "autoscaling cluster):\n" + text)


# ---------------------------------------------------------------- learner memory

def model_parameters(path: str, lora: dict | None = None, trust_remote_code: bool = False) -> tuple[int, int]:
    """(all parameters, trainable ones) of the policy, counted on the meta device from its config alone
    (a hub id reads only config.json). With `lora` ({rank, target_modules}), the trainable ones are the
    adapters'."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        lm = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    total = sum(p.numel() for p in lm.parameters())
    if not lora:
        return total, total
    targets = set(lora["target_modules"])
    adapters = sum(lora["rank"] * (m.in_features + m.out_features) for name, m in lm.named_modules()
                   if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets)
    return total + adapters, adapters


def learner_state_bytes(params: int, trainable: int, strategy: str, workers: int, lora: bool = False) -> int:
    """Bytes of model state per trainer worker: fp32 weights (4 per parameter), and for trainable ones
    fp32 gradients and AdamW's two fp32 moments (12 more), plus the fp32 reference (4 per parameter;
    none with LoRA, whose reference is the policy with its adapters off). FSDP shards all of it over
    the workers; DDP keeps a full copy in each. Activations come on top."""
    total = 4 * params + 12 * trainable + (0 if lora else 4 * params)
    return total // workers if strategy == "fsdp" else total


def learner_memory(spec: LearnerSpec, workers: int) -> str:
    """One line for the dry run: the learner's model state per worker, or why it is unknown."""
    try:
        params, trainable = model_parameters(spec.policy, spec.lora, spec.trust_remote_code)
    except Exception as e:   # offline, or an unknown architecture: the plan above still stands
        return f"learner memory: unknown (cannot read {spec.policy}'s config: {str(e).splitlines()[0][:160]})"
    nbytes = learner_state_bytes(params, trainable, spec.strategy, workers, bool(spec.lora))
    shard = f"sharded over {workers} workers (fsdp)" if spec.strategy == "fsdp" else "a full copy each (ddp)"
    return (f"learner memory: {_count(params)} parameters ({_count(trainable)} trained) -> {_size(nbytes)} per "
            f"worker of weights, gradients, AdamW state and reference, {shard}; activations come on top")


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def _size(n: int) -> str:
    return f"{n / 2 ** 30:.1f} GiB" if n >= 2 ** 30 else f"{n / 2 ** 20:.1f} MiB"
