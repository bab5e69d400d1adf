"""What ships for operators: alert rules, scrape configuration, Kubernetes monitors and
the Grafana dashboard, checked by Prometheus' own promtool and Grafana's own
schema-generated models. (A real Prometheus scraping a real fleet:
tests/integration/test_gateway.py.)"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from ichat.commands.up import parse_args
from ichat.errors import ConfigError
from ichat.observability import shipped
from ichat.observability.prometheus import PrometheusConfig
from ichat.worker.metrics import exposition
from ichat.worker.supervisor import WorkerStats
from tests.support import prometheus_binary

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy" / "observability"
ALERTS = shipped("alerts.yml")
DASHBOARD = shipped("grafana-dashboard.json")
JOBS = ("ichat-worker", "ichat-engine", "ichat-gateway")


def promtool(*args: str, cwd: Path = ROOT) -> str:
    """Run promtool (scripts/setup-prometheus.sh provides it); its output."""
    binary = prometheus_binary("promtool")
    done = subprocess.run([binary, *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


def alerts() -> list[dict[str, Any]]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


# ------------------------------------------------------------------ alert rules


def test_the_alert_rules_are_valid_prometheus_rules() -> None:
    out = promtool("check", "rules", str(ALERTS))
    assert f"SUCCESS: {len(alerts())} rules found" in out


def test_every_alert_fires_and_stays_quiet_in_promtools_unit_tests() -> None:
    out = promtool("test", "rules", "alerts_test.yml", cwd=DEPLOY)
    assert "SUCCESS" in out
    cases = yaml.safe_load((DEPLOY / "alerts_test.yml").read_text())["tests"]
    checks = [check for case in cases for check in case["alert_rule_test"]]
    for rule in alerts():
        name = rule["alert"]
        mine = [c for c in checks if c["alertname"] == name]
        assert any(c["exp_alerts"] for c in mine), f"no test where {name} fires"
        assert any(not c["exp_alerts"] for c in mine), f"no test where {name} stays quiet"
        assert rule["labels"]["severity"] in ("critical", "warning", "info")
        assert {"summary", "description"} <= set(rule["annotations"])


def test_alerts_select_only_jobs_the_scrape_configuration_defines() -> None:
    for rule in alerts():
        for job in _quoted_after('job="', rule["expr"]):
            assert job in JOBS, (rule["alert"], job)


def test_the_deploy_folder_links_the_shipped_files() -> None:
    assert (DEPLOY / "alerts.yml").resolve() == ALERTS.resolve()
    assert (DEPLOY / "grafana-dashboard.json").resolve() == DASHBOARD.resolve()


# ----------------------------------------------------------- scrape configuration


def test_the_example_scrape_configuration_is_what_ichat_up_prometheus_runs() -> None:
    config = parse_args(["--workers", "2", "--prometheus"]).monitoring
    assert config is not None
    example = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    assert example == config.document(Path("alerts.yml"))
    assert [job["job_name"] for job in example["scrape_configs"]] == list(JOBS)
    out = promtool("check", "config", str(DEPLOY / "prometheus.yml"))
    assert "SUCCESS: 1 rule files found" in out


def test_ichat_up_prometheus_scrapes_every_worker_engine_and_the_gateway(
    tmp_path: Path,
) -> None:
    up = parse_args(["--workers", "3", "--port", "9000", "--worker-port", "9100", "--prometheus"])
    config = up.monitoring
    assert config is not None and config.port == 9090
    assert config.workers == ["127.0.0.1:9200", "127.0.0.1:9201", "127.0.0.1:9202"]
    assert config.engines == ["127.0.0.1:9100", "127.0.0.1:9101", "127.0.0.1:9102"]
    assert config.gateways == ["127.0.0.1:9001"]
    # the workers get the status ports Prometheus scrapes
    assert up.worker_argv(2, "/m")[up.worker_argv(2, "/m").index("--status-port") + 1] == "9202"
    written = tmp_path / "prometheus.yml"
    written.write_text(json.dumps(config.document(ALERTS)))
    promtool("check", "config", str(written))
    given = parse_args(["--prometheus", "9999", "--status-port", "7000"])
    assert given.monitoring is not None and given.monitoring.port == 9999
    assert given.status_urls == ["http://127.0.0.1:7000"]
    assert parse_args([]).monitoring is None and parse_args([]).status_urls == []


def test_a_missing_prometheus_binary_is_a_configuration_error_that_says_how_to_get_one() -> None:
    with pytest.raises(ConfigError, match="apt-get install prometheus"):
        PrometheusConfig(binary="/nonexistent/prometheus").find_binary()


# -------------------------------------------------------------------- Kubernetes


def _k8s(kind: str, path: Path) -> dict[str, Any]:
    (found,) = [d for d in yaml.safe_load_all(path.read_text()) if d and d["kind"] == kind]
    return found  # type: ignore[no-any-return]


MONITORING = DEPLOY / "kubernetes" / "monitoring.yaml"
K8S = ROOT / "deploy" / "kubernetes"


def test_the_prometheus_rule_object_carries_exactly_the_alert_rules() -> None:
    rule = _k8s("PrometheusRule", MONITORING)
    assert rule["spec"] == yaml.safe_load(ALERTS.read_text())


def test_the_pod_monitor_scrapes_both_ports_of_every_worker_manifest_as_the_alerts_expect() -> None:
    monitor = _k8s("PodMonitor", MONITORING)
    selector = monitor["spec"]["selector"]["matchLabels"]
    endpoints = {e["port"]: e for e in monitor["spec"]["podMetricsEndpoints"]}
    jobs = {port: e["relabelings"][0]["replacement"] for port, e in endpoints.items()}
    assert jobs == {"status": "ichat-worker", "http": "ichat-engine"}
    assert endpoints["http"]["metricRelabelings"][0]["regex"] == "ichat_.*"
    workers = [K8S / "worker.yaml", K8S / "discovery" / "worker.yaml"]
    for path in workers:
        deployment = _k8s("Deployment", path)
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert selector.items() <= labels.items(), path
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        named = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert set(endpoints) <= set(named), path
        args = container["args"]
        assert str(named["status"]) == args[args.index("--status-port") + 1]


def test_the_service_monitor_scrapes_the_gateways_metrics_port() -> None:
    monitor = _k8s("ServiceMonitor", MONITORING)
    service = _k8s("Service", K8S / "gateway.yaml")
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert endpoint["relabelings"][0]["replacement"] == "ichat-gateway"


# --------------------------------------------------------------------- dashboard


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())  # type: ignore[no-any-return]


def panels() -> list[dict[str, Any]]:
    return [p for p in dashboard()["panels"] if p["type"] != "row"]


def test_grafanas_own_models_read_the_dashboard_without_dropping_anything() -> None:
    sdk = pytest.importorskip("grafana_foundation_sdk", reason="Python >= 3.11")
    from grafana_foundation_sdk.cog import plugins
    from grafana_foundation_sdk.cog.encoder import JSONEncoder
    from grafana_foundation_sdk.models import dashboard as model
    from grafana_foundation_sdk.models import prometheus

    assert sdk is not None
    plugins.register_default_plugins()
    original = dashboard()
    decoded = model.Dashboard.from_json(original)
    again = json.loads(json.dumps(decoded, cls=JSONEncoder))
    assert _dropped(original, again) == []  # every field is one Grafana's schema knows
    for panel in decoded.panels or []:
        if isinstance(panel, model.RowPanel):
            continue
        assert not isinstance(panel.options, dict), f"{panel.type}: not a Grafana panel type"
        assert panel.targets, panel.title
        for target in panel.targets:
            assert isinstance(target, prometheus.Dataquery) and target.expr, panel.title


def test_the_dashboard_shows_what_the_issue_asks_for() -> None:
    exprs = " ".join(t["expr"] for p in panels() for t in p["targets"])
    for name in (
        "ichat_worker_state",
        "ichat_worker_restarts_total",
        "ichat_worker_engine_deaths_total",
        "ichat_worker_last_restart_to_ready_seconds",
        "ichat_worker_last_death_detection_window_seconds",
        "ichat_worker_phase_seconds",
        "vllm:num_requests_running",
        "vllm:e2e_request_latency_seconds_bucket",
        "sglang:num_running_reqs",
        "smg_worker_health",
    ):
        assert name in exprs, name
    ids = [p["id"] for p in dashboard()["panels"]]
    assert len(ids) == len(set(ids))
    for panel in panels():
        for target in panel["targets"]:
            for job in _quoted_after('job="', target["expr"]):
                assert job in JOBS, (panel["title"], job)


# ----------------------------------------------------------------------- metrics


def test_worker_metrics_name_the_url_the_gateway_knows_and_export_every_outcome() -> None:
    stats = WorkerStats(url="http://10.0.0.1:8000", gateway_url="http://gw:8080")
    stats.served_model_names = ["m"]
    text = exposition(stats)[0].decode()
    assert (
        'ichat_worker_info{gateway="http://gw:8080",model="m",url="http://10.0.0.1:8000"} 1.0'
        in text
    )
    for outcome in ("continued", "cut", "refused", "closed", "gave_up"):
        assert f'ichat_worker_continuations_total{{outcome="{outcome}"}} 0.0' in text
    for outcome in ("ok", "failed", "refused"):
        assert f'ichat_worker_reloads_total{{outcome="{outcome}"}} 0.0' in text
    stats.reloads["ok"] = 2
    assert 'ichat_worker_reloads_total{outcome="ok"} 2.0' in exposition(stats)[0].decode()


# ----------------------------------------------------------------------- helpers


def _quoted_after(prefix: str, text: str) -> list[str]:
    found = []
    start = text.find(prefix)
    while start != -1:
        end = text.index('"', start + len(prefix))
        found.append(text[start + len(prefix) : end])
        start = text.find(prefix, end)
    return found


def _dropped(original: Any, again: Any, path: str = "") -> list[str]:
    """Keys of ``original`` missing from ``again`` (what a decoder did not know)."""
    if isinstance(original, dict) and isinstance(again, dict):
        missing = [f"{path}/{k}" for k in original if k not in again]
        for k in original:
            if k in again:
                missing += _dropped(original[k], again[k], f"{path}/{k}")
        return missing
    if isinstance(original, list) and isinstance(again, list):
        pairs = enumerate(zip(original, again, strict=True))
        return [m for i, (a, b) in pairs for m in _dropped(a, b, f"{path}[{i}]")]
    return []
