"""The shipped Grafana dashboard parses and charts every metric the run emits."""

import json
from pathlib import Path

from online_dpo.metrics import METRICS, OBJECTIVE_METRICS, SAMPLER_VERSION

DASHBOARD = Path(__file__).parents[2] / "cluster" / "monitoring" / "grafana-online-dpo.json"


def test_grafana_dashboard_covers_every_metric():
    dash = json.loads(DASHBOARD.read_text())
    exprs = " ".join(t["expr"] for p in dash["panels"] for t in p.get("targets", []))
    for name in list(METRICS) + [SAMPLER_VERSION] + list(OBJECTIVE_METRICS):
        assert f"ray_{name}{{" in exprs, name
    assert {v["name"] for v in dash["templating"]["list"]} == {"datasource", "run"}


def test_dashboard_files_are_what_the_generator_writes():
    """Edit online_dpo/metrics.py, then run scripts/make_dashboard.py: the files never drift."""
    import importlib.util

    import yaml

    spec = importlib.util.spec_from_file_location("make_dashboard", DASHBOARD.parents[2] / "scripts" / "make_dashboard.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    text = json.dumps(gen.dashboard(), indent=1) + "\n"
    assert DASHBOARD.read_text() == text
    configmap = yaml.safe_load((DASHBOARD.parent / "kuberay" / "grafana-dashboard-configmap.yaml").read_text())
    assert configmap["data"]["online-dpo.json"] == text and configmap["metadata"]["labels"]["grafana_dashboard"]


def test_prometheus_follows_rays_service_discovery_file():
    import yaml

    conf = yaml.safe_load((DASHBOARD.parent / "prometheus.yml").read_text())
    (job,) = conf["scrape_configs"]
    assert job["file_sd_configs"][0]["files"] == ["/tmp/ray/prom_metrics_service_discovery.json"]
    provisioned = (DASHBOARD.parent / "grafana" / "provisioning" / "datasources" / "online-dpo.yaml").read_text()
    assert "type: prometheus" in provisioned and "isDefault: true" in provisioned


def test_grafana_starts_on_loopback_with_a_password_and_no_anonymous_viewers(tmp_path):
    from online_dpo.monitor import grafana_command

    _, env = grafana_command("grafana-server", 3000, tmp_path, "http://127.0.0.1:9090", "pw-1")
    assert env["GF_SERVER_HTTP_ADDR"] == "127.0.0.1" and env["GF_SECURITY_ADMIN_PASSWORD"] == "pw-1"
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "false"
    _, env = grafana_command("grafana-server", 3000, tmp_path, "http://127.0.0.1:9090", "pw-2", anonymous=True)
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "true"
