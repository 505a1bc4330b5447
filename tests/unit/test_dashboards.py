"""The shipped Grafana dashboard parses and charts every metric the run emits."""

import json
from pathlib import Path

from online_dpo.metrics import METRICS, SAMPLER_VERSION

DASHBOARD = Path(__file__).parents[2] / "cluster" / "monitoring" / "grafana-online-dpo.json"


def test_grafana_dashboard_covers_every_metric():
    dash = json.loads(DASHBOARD.read_text())
    exprs = " ".join(t["expr"] for p in dash["panels"] for t in p.get("targets", []))
    for name in list(METRICS) + [SAMPLER_VERSION]:
        assert f"ray_{name}{{" in exprs, name
    assert {v["name"] for v in dash["templating"]["list"]} == {"datasource", "run"}
