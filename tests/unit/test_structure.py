"""The package's shape, read with `ast`: imports run one way, the config stops at the plan, rooms stay small.

These are the structure rules the project holds itself to (shared/LAYOUT.md): no import circle,
the config schema (config.py, schema.py) on the ground floor, the run config read only at the edge (cli.py, tune.py, plan.py),
each derived rule written once, and no file over 400 lines, function over 60 or class over 200.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "online_dpo"
EDGE = {"online_dpo.cli", "online_dpo.cli_serve", "online_dpo.tune", "online_dpo.plan", "online_dpo.plan_judges"}   # where the config is read


def modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


MODULES = modules()


def imported(name: str) -> set[str]:
    """The package's modules that `name` imports, at the top or inside functions."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")[:len(package.split(".")) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            out |= {t for t in [target] + [f"{target}.{a.name}" for a in node.names] if t in MODULES}
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name in MODULES}
    return out - {name, "online_dpo"}


def floors() -> dict[str, int]:
    """Each module's floor: 1 + the highest floor it imports (raises on an import circle)."""
    done: dict[str, int] = {}

    def floor(name: str, path: tuple) -> int:
        if name in path:
            raise AssertionError("import circle: " + " -> ".join(path[path.index(name):] + (name,)))
        if name not in done:
            done[name] = 1 + max((floor(d, path + (name,)) for d in imported(name)), default=0)
        return done[name]

    for name in MODULES:
        floor(name, ())
    return done


def test_imports_run_one_way():
    levels = floors()   # no circle
    for name in MODULES:
        assert all(levels[d] < levels[name] for d in imported(name)), name


def test_the_config_schema_is_the_ground_floor():
    """The schema is config.py and its building blocks (schema.py), which imports nothing of the package."""
    assert imported("online_dpo.schema") == set()
    assert imported("online_dpo.config") == {"online_dpo.schema"}
    assert floors()["online_dpo.config"] == 2


def test_the_run_config_is_read_only_at_the_edge():
    """Below the CLI, tune and the plan, components take their spec: nobody imports the schema or holds a `cfg`."""
    readers = {name for name in MODULES if {"online_dpo.config", "online_dpo.schema"} & imported(name)}
    assert readers <= EDGE | {"online_dpo.config"}, readers - EDGE
    for name, path in MODULES.items():
        if name in EDGE or name in ("online_dpo.config", "online_dpo.schema"):
            continue
        tree = ast.parse(path.read_text())
        names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
        names |= {a.arg for n in ast.walk(tree) if isinstance(n, ast.arguments) for a in n.args + n.kwonlyargs}
        assert not names & {"cfg", "serve_cfg", "run_cfg"}, name


def chains(tree: ast.AST) -> set[str]:
    """Every attribute chain in the code, as written: `cfg.model.lora.rank` gives 'model.lora.rank', ..."""
    out = set()
    for node in ast.walk(tree):
        parts = []
        while isinstance(node, ast.Attribute):
            parts.append(node.attr)
            node = node.value
        out |= {".".join(reversed(parts[:k])) for k in range(2, len(parts) + 1)}
    return out


@pytest.mark.parametrize("rule", ["lora.rank", "model.lora", "sync.transport", "sync.mode"])
def test_each_derived_rule_is_written_once(rule):
    """Whether LoRA is on and its rank, the weight transport and the sync mode are read from the config
    in one place: the plan (which derives the transport, the vLLM LoRA slot and the rollouts from them)."""
    holders = [name for name, path in MODULES.items() if rule in chains(ast.parse(path.read_text()))
               and name not in ("online_dpo.config", "online_dpo.schema")]   # the schema's own cross-field checks
    assert holders == ["online_dpo.plan"], holders


def test_rooms_stay_small():
    too_big = []
    for name, path in MODULES.items():
        text = path.read_text()
        if len(text.splitlines()) > 400:
            too_big.append(f"{name}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            size = getattr(node, "end_lineno", 0) - getattr(node, "lineno", 0) + 1
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and size > 60:
                too_big.append(f"{name}.{node.name}: a {size}-line function")
            if isinstance(node, ast.ClassDef) and size > 200:
                too_big.append(f"{name}.{node.name}: a {size}-line class")
    assert not too_big, too_big


def test_the_loss_imports_neither_ray_nor_vllm():
    import subprocess
    import sys

    code = "import sys, online_dpo.loss, online_dpo.plan; print(sorted(m for m in ('ray', 'vllm', 'torch') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "ray" not in out and "vllm" not in out, out


def test_the_driver_never_imports_vllm():
    """The driver's modules, the checked sync's comparison included, leave vLLM to the actors (importing
    it costs ~5 CPU-seconds, once spent mid-run by the first checked sync)."""
    import subprocess
    import sys

    code = ("import sys, online_dpo.cli, online_dpo.controller, online_dpo.topology, online_dpo.gang, "
            "online_dpo.checksums; print('vllm' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False", out


# Waits whose deadline lives elsewhere: a torch collective's Work.wait() times out by its process group's
# own timeout (transfer.open_group sets it).
WAITS_WITH_DEADLINES_ELSEWHERE = {("online_dpo.transfer", "work.wait()")}


def test_every_wait_has_a_deadline():
    """No `ray.get`, `.wait()`, `.join()` or queue `.get()` without a timeout in the package."""
    found = []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
                continue
            timed = bool(node.args) or any(k.arg == "timeout" for k in node.keywords)
            call, attr = ast.unparse(node), node.func.attr
            blocking = (ast.unparse(node.func) == "ray.get" and not any(k.arg == "timeout" for k in node.keywords)) \
                or (attr in ("wait", "join") and not timed) or (attr == "get" and not node.args and not node.keywords
                                                                 and ast.unparse(node.func.value).endswith("queue"))
            if blocking and (name, call) not in WAITS_WITH_DEADLINES_ELSEWHERE:
                found.append(f"{name}: {call}")
    assert not found, found
