"""The cluster YAMLs parse, and the commands in them point at configs and entrypoints that exist."""

import shlex
import tomllib
from pathlib import Path

import pytest
import yaml

from online_dpo.config import load_config

ROOT = Path(__file__).parents[2]
FILES = sorted((ROOT / "cluster").rglob("*.yaml"))


def strings(node):
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for v in node.values():
            yield from strings(v)
    elif isinstance(node, list):
        for v in node:
            yield from strings(v)


def train_commands(path: Path) -> list[list[str]]:
    """Every `online-dpo train ...` command line in a YAML file's strings or a README."""
    text = path.read_text()
    if path.suffix == ".yaml":
        lines = [s for doc in yaml.safe_load_all(text) for s in strings(doc)]
    else:  # the README's fenced code blocks
        blocks = text.split("```")[1::2]
        lines = [ln for b in blocks for ln in b.replace("\\\n", " ").splitlines()]
    out = []
    for line in lines:
        start = line.find("online-dpo train")
        if start >= 0:
            out.append(shlex.split(" ".join(line[start:].split()), comments=True))
    return out


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_yaml_parses(path):
    docs = list(yaml.safe_load_all(path.read_text()))
    assert docs and all(isinstance(d, dict) for d in docs)


def test_kuberay_manifests_have_the_right_kinds():
    kinds = {yaml.safe_load(p.read_text())["kind"] for p in (ROOT / "cluster" / "kuberay").glob("*.yaml")}
    assert kinds == {"RayCluster", "RayJob"}


def test_train_commands_point_at_valid_configs():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["online-dpo"] == "online_dpo.cli:main"
    sources = FILES + [ROOT / "cluster" / "README.md"]
    commands = [c for p in sources for c in train_commands(p)]
    assert len(commands) >= 2
    for cmd in commands:
        assert cmd[:2] == ["online-dpo", "train"]
        config = ROOT / cmd[2]
        assert config.exists(), cmd
        sets = [cmd[i + 1] for i, w in enumerate(cmd) if w == "--set"]
        load_config(config, sets)  # raises ConfigError if a field is wrong


def test_launcher_installs_this_package():
    cfg = yaml.safe_load((ROOT / "cluster" / "gpu-cluster.yaml").read_text())
    assert cfg["file_mounts"]["/home/ubuntu/online-dpo"] == "." and (ROOT / "pyproject.toml").exists()
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any("[gpu]" in c for c in cfg["setup_commands"]) and "gpu" in extras
    for node_type in cfg["available_node_types"]:
        assert node_type in ("head", "sampler-gpu", "trainer-gpu")


def test_runtime_env_is_valid():
    from ray.runtime_env import RuntimeEnv

    env = yaml.safe_load((ROOT / "cluster" / "runtime_env.yaml").read_text())
    RuntimeEnv(**env)


def test_cluster_files_start_ray_with_the_serve_settings_of_local_clusters():
    """Serve's settings are read when a cluster starts: every way to launch one sets them all."""
    from online_dpo.cluster import SERVE_ENV

    launcher = yaml.safe_load((ROOT / "cluster" / "gpu-cluster.yaml").read_text())
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        (start,) = [c for c in launcher[key] if "ray start" in c]
        assert all(f"{k}={v}" in start.split(";")[0].split() for k, v in SERVE_ENV.items()), start
    for name in ("raycluster.yaml", "rayjob.yaml"):
        text = (ROOT / "cluster" / "kuberay" / name).read_text()
        containers = [c for spec in _pod_specs(yaml.safe_load(text)) for c in spec["containers"]]
        assert containers
        for c in containers:
            assert {e["name"]: e["value"] for e in c.get("env", [])} == SERVE_ENV, (name, c["name"])


def test_cluster_files_turn_on_ray_token_auth_and_pin_the_package():
    """The dashboard is opened beyond loopback on a cluster: job submission through it must need Ray's
    token. Pods install a pinned release, never a moving branch."""
    launcher = yaml.safe_load((ROOT / "cluster" / "gpu-cluster.yaml").read_text())
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        (start,) = [c for c in launcher[key] if "ray start" in c]
        assert "RAY_AUTH_MODE=token" in start.split(";")[0].split(), start
    assert launcher["file_mounts"]["/home/ubuntu/.ray/auth_token"] == "~/.ray/auth_token"
    cluster = yaml.safe_load((ROOT / "cluster" / "kuberay" / "raycluster.yaml").read_text())
    job = yaml.safe_load((ROOT / "cluster" / "kuberay" / "rayjob.yaml").read_text())
    assert cluster["spec"]["authOptions"] == {"mode": "token"} == job["spec"]["rayClusterSpec"]["authOptions"]
    for name in ("raycluster.yaml", "rayjob.yaml"):
        text = (ROOT / "cluster" / "kuberay" / name).read_text()
        installs = [a for a in text.split('"') if "pip install" in a]
        assert installs and all("@v" in a for a in installs), installs
        assert "heads/main" not in text


def _pod_specs(node):
    if isinstance(node, dict):
        if "containers" in node:
            yield node
        for v in node.values():
            yield from _pod_specs(v)
    elif isinstance(node, list):
        for v in node:
            yield from _pod_specs(v)
