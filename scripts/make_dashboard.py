"""Write cluster/monitoring/grafana-online-dpo.json from online_dpo.metrics (one panel per metric).

    .venv/bin/python scripts/make_dashboard.py
"""

from __future__ import annotations

import json
from pathlib import Path

from online_dpo.metrics import METRICS, SAMPLER_VERSION, group

OUT = Path(__file__).resolve().parents[1] / "cluster" / "monitoring" / "grafana-online-dpo.json"
DS = {"type": "prometheus", "uid": "${datasource}"}


def panels() -> list[dict]:
    rows: dict[str, list[tuple[str, str, str]]] = {}
    for name, (_, _, desc) in METRICS.items():
        rows.setdefault(group(name), []).append((name, desc, "{{run}}"))
    rows[group(SAMPLER_VERSION)].append((SAMPLER_VERSION, "policy version each sampler holds", "{{sampler}}"))
    out, y, pid = [], 0, 1
    for title, metrics in rows.items():
        out.append({"type": "row", "title": title, "id": pid, "collapsed": False,
                    "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}})
        pid, y = pid + 1, y + 1
        for k, (name, desc, legend) in enumerate(metrics):
            out.append({"type": "timeseries", "title": name.removeprefix("online_dpo_").replace("_", " "),
                        "description": desc, "id": pid, "datasource": DS,
                        "gridPos": {"h": 7, "w": 8, "x": 8 * (k % 3), "y": y + 7 * (k // 3)},
                        "targets": [{"expr": f'ray_{name}{{run=~"$run"}}', "legendFormat": legend, "refId": "A"}],
                        "fieldConfig": {"defaults": {}, "overrides": []},
                        "options": {"legend": {"displayMode": "list"}}})
            pid += 1
        y += 7 * ((len(metrics) + 2) // 3)
    return out


def dashboard() -> dict:
    return {
        "title": "online-dpo", "uid": "online-dpo", "schemaVersion": 39, "version": 1, "editable": True,
        "time": {"from": "now-1h", "to": "now"}, "refresh": "10s", "tags": ["online-dpo", "ray"],
        "templating": {"list": [
            {"name": "datasource", "type": "datasource", "query": "prometheus", "label": "Prometheus"},
            {"name": "run", "type": "query", "datasource": DS,
             "query": {"query": "label_values(ray_online_dpo_train_step, run)", "refId": "run"},
             "definition": "label_values(ray_online_dpo_train_step, run)", "includeAll": True, "multi": True,
             "refresh": 2, "current": {"text": "All", "value": "$__all"}}]},
        "panels": panels(),
    }


if __name__ == "__main__":
    OUT.write_text(json.dumps(dashboard(), indent=1) + "\n")
    print(f"wrote {OUT}")
